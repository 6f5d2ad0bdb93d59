#!/usr/bin/env bash
# Train-step throughput and model-FLOPs utilisation on a GPU machine (no pip install there): the
# TGPO-Reg train step on a Qwen2.5-1.5B-shaped random student, bf16 compute with fp32 parameters and
# AdamW state, B=16 sequences of P=256 prompt + T=1,792 response positions (32,768 tokens/step),
# micro-batches of 4, log-prob chunk 256, no PyTorch peer, old_logp = zeros (no extra forward compile;
# the step's cost does not depend on the values). Needs python3 with jax[cuda], flax, optax, numpy,
# safetensors, ml_dtypes importable.
#
# MFU = model FLOPs per step / median step seconds / peak, with
#   model FLOPs = 6 * N_layers * B * (P+T) + 6 * E * V * B * T + 12 * layers * H * D * (P+T)^2 * B
#   (fwd + bwd; the per-layer and log-prob rematerialisation is NOT counted), and
#   peak = --peak-tflops (default 989 TFLOP/s: H100 / H200 SXM dense bf16; PEAK_TFLOPS overrides).
# Prints the table and, as its last line, the JSON report; with $OUT set also writes
# $OUT/bench_train_step_gpu.json (the JSON) and $OUT/bench_train_step_gpu.log (everything).
# Extra arguments are passed on (e.g. --repeats 5, --micro-batch 8, --batch 32).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset JAX_PLATFORMS  # let jax pick the GPU
PY="${PYTHON:-python3}"

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
ARGS=(bench train-step --model qwen2.5-1.5b --dtype bfloat16 --param-dtype float32 --no-peer --old-logp zeros
      --batch 16 --prompt-len 256 --response-len 1792 --micro-batch 4 --chunk 256 --repeats 3
      --peak-tflops "${PEAK_TFLOPS:-989}")
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  "$PY" -m tgpo_jax.cli "${ARGS[@]}" --json-out "$OUT/bench_train_step_gpu.json" "$@" 2>&1 | tee "$OUT/bench_train_step_gpu.log"
else
  "$PY" -m tgpo_jax.cli "${ARGS[@]}" "$@"
fi
