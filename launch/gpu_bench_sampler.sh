#!/usr/bin/env bash
# Sampler throughput on a GPU machine (no pip install there): a Qwen2.5-1.5B-shaped random model in
# bf16, 32 prompts x 8 samples = 256 rows, 64-token prompts, 1,024 new tokens, no transformers peer.
# Needs python3 with jax[cuda], flax, numpy, safetensors, ml_dtypes and transformers importable.
# Prints the table and, as its last line, the JSON report; with $OUT set also writes
# $OUT/bench_sampler_gpu.json (the JSON) and $OUT/bench_sampler_gpu.log (everything).
# The roofline's bandwidth is the GPU's data-sheet peak (tgpo_jax/bench/device_peaks.py: H100 SXM 3,350
# GB/s, H200 4,800); HBM_GBPS=... overrides it. Extra arguments are passed on (e.g. --repeats 5, --cache-layers unroll:
# the KV cache is the stacked, scanned layout on accelerators by default; see ModelConfig.cache_layers).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset JAX_PLATFORMS  # let jax pick the GPU
PY="${PYTHON:-python3}"

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
ARGS=(bench sampler --model qwen2.5-1.5b --dtype bfloat16 --prompts 32 --n 8 --new-tokens 1024 --prompt-len 64
      --no-peer ${HBM_GBPS:+--hbm-gbps "$HBM_GBPS"})
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  "$PY" -m tgpo_jax.cli "${ARGS[@]}" --json-out "$OUT/bench_sampler_gpu.json" "$@" 2>&1 | tee "$OUT/bench_sampler_gpu.log"
else
  "$PY" -m tgpo_jax.cli "${ARGS[@]}" "$@"
fi
