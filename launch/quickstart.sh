#!/usr/bin/env bash
# Fresh machine -> the main job, in one command: venv, install, run the embedded default on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TGPO_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# setuptools prints a notice block for every editable install ("Editable installation ... folders
# with the same name as your package"): nothing for a user to act on, so it is filtered here
PYTHONWARNINGS="ignore:Editable installation" "$VENV/bin/python" -m pip install --quiet -e .
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec "$VENV/bin/tgpo-jax" demo "$@"
