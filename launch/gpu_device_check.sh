#!/usr/bin/env bash
# The prepared device runs (H200), as two calls that each fit the 600 s command limit:
#   bash launch/gpu_device_check.sh sampler   # smoke test, cuDNN-vs-ours attention check, sampler bench
#   bash launch/gpu_device_check.sh train     # smoke test, train-step bench: einsum, then cuDNN attention
#   bash launch/gpu_device_check.sh long      # the same two at the paper's 1,024 + 8,192 positions (MFU)
#   bash launch/gpu_device_check.sh rollout   # smoke test, the rollout engine vs the static sampler (issue 24
#                                             # item 5): Qwen2.5-1.5B shape, bf16, and the engine's HBM fraction
# (`all` runs both in one go, for machines without that limit). The benchmarks are
# launch/gpu_bench_sampler.sh and launch/gpu_bench_train_step.sh. Each part has its own time limit
# so that one slow or failing part leaves the others' results; logs land under $OUT (default
# /tmp/out). Flax: the machine's own if our smoke test passes with it, else the wheel in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
PART="${1:-all}"
case "$PART" in all|sampler|train|long|rollout) ;; *) echo "usage: $0 [all|sampler|train|long|rollout]" >&2; exit 2;; esac
T_SAMPLER="${T_SAMPLER:-330}" T_TRAIN="${T_TRAIN:-240}" T_LONG="${T_LONG:-270}" T_ROLLOUT="${T_ROLLOUT:-420}"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/device.log"; }

smoke() {
  timeout 120 python3 - <<'PY'
import jax, jax.numpy as jnp, flax
from flax import nnx
from tgpo_jax.models.decoder import Decoder, left_pad_positions
from tgpo_jax.models.tiny import tiny_config
print("jax", jax.__version__, "flax", flax.__version__, jax.devices())
cfg = tiny_config("qwen2").replace(dtype="bfloat16")
tok = jnp.ones((2, 8), jnp.int32); mask = jnp.ones((2, 8), jnp.int32)
h, _ = Decoder(cfg, nnx.Rngs(0))(tok, left_pad_positions(mask), mask)
print("smoke forward ok", h.shape, h.dtype)
PY
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; } 2>&1 | tee -a "$OUT/device.log"
log "smoke (machine flax)"
if ! smoke 2>&1 | tee -a "$OUT/device.log"; then
  log "smoke failed with the machine's flax; installing .whl/"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
  smoke 2>&1 | tee -a "$OUT/device.log" || { log "smoke failed twice: stop"; exit 1; }
fi

if [ "$PART" = all ] || [ "$PART" = sampler ]; then
log "cudnn attention vs ours (bf16 decoder hidden states and gradients, left padding)"
timeout 90 python3 - <<'PY' 2>&1 | tee -a "$OUT/device.log"
import dataclasses, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from tgpo_jax.models.decoder import Decoder, left_pad_positions
from tgpo_jax.models.tiny import tiny_config
cfg = dataclasses.replace(tiny_config("qwen2"), dtype="bfloat16", head_dim=64)
tok = jax.random.randint(jax.random.key(0), (4, 256), 1, cfg.vocab_size)
mask = jnp.ones((4, 256), jnp.int32).at[1, :37].set(0)
pos = left_pad_positions(mask)
valid = np.asarray(mask, bool)
out = {}
for impl in ("einsum", "cudnn"):
    m = Decoder(dataclasses.replace(cfg, attn_impl=impl), nnx.Rngs(0))
    gd, st = nnx.split(m)
    def loss(st):
        h, _ = nnx.merge(gd, st).hidden_states(tok, pos, mask)
        return jnp.sum(jnp.where(mask[..., None] > 0, h.astype(jnp.float32), 0.0) ** 2), h
    (l, h), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(st)
    out[impl] = (np.asarray(h.astype(jnp.float32))[valid], float(l), jax.tree.leaves(g))
dh = np.abs(out["einsum"][0] - out["cudnn"][0]).max()
gnorm = lambda gs: float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in gs)))
print(f"cudnn vs einsum: max |dh| {dh:.3e} (|h| max {np.abs(out['einsum'][0]).max():.2f}), "
      f"loss {out['einsum'][1]:.4f} vs {out['cudnn'][1]:.4f}, grad norm {gnorm(out['einsum'][2]):.4f} vs {gnorm(out['cudnn'][2]):.4f}")
PY

log "sampler"
OUT= timeout "$T_SAMPLER" bash launch/gpu_bench_sampler.sh ${SAMPLER_ARGS:-} > "$OUT/sampler.log" 2>&1; log "sampler rc=$?"
tail -n 12 "$OUT/sampler.log" | cut -c1-2000
fi

if [ "$PART" = all ] || [ "$PART" = train ]; then
log "train step, attn einsum"
OUT= timeout "$T_TRAIN" bash launch/gpu_bench_train_step.sh --attn-impl einsum ${TRAIN_ARGS:-} > "$OUT/train_einsum.log" 2>&1; log "rc=$?"
tail -n 8 "$OUT/train_einsum.log" | cut -c1-2500

log "train step, attn cudnn"
OUT= timeout "$T_TRAIN" bash launch/gpu_bench_train_step.sh --attn-impl cudnn ${TRAIN_ARGS:-} > "$OUT/train_cudnn.log" 2>&1; log "rc=$?"
tail -n 8 "$OUT/train_cudnn.log" | cut -c1-2500
fi

if [ "$PART" = all ] || [ "$PART" = long ]; then
# Qwen2.5-1.5B shape, bf16, 1 prompt of 1,024 + 8,192 response positions per micro-batch
LONG=(--batch 2 --micro-batch 1 --prompt-len 1024 --response-len 8192 --chunk 512 --repeats 3)
for impl in cudnn einsum; do
  log "train step at 9,216 positions, attn $impl"
  OUT= timeout "$T_LONG" bash launch/gpu_bench_train_step.sh --attn-impl "$impl" "${LONG[@]}" > "$OUT/long_$impl.log" 2>&1; log "rc=$?"
  tail -n 8 "$OUT/long_$impl.log" | cut -c1-2500
done
fi
if [ "$PART" = all ] || [ "$PART" = rollout ]; then
# 32 prompts x 8 = 256 requests, 64-token prompts, cap 1,024; the engine at 128 slots (half), the
# static sampler at all 256 rows and at 128 (2 calls); uniform and long_tail lengths
log "rollout engine vs static sampler, Qwen2.5-1.5B shape"
unset JAX_PLATFORMS
timeout "$T_ROLLOUT" python3 -m tgpo_jax.cli bench rollout --model qwen2.5-1.5b --dtype bfloat16 --prompts 32 --n 8 \
  --prompt-len 64 --new-tokens 1024 --slots 128 --dist uniform long_tail --repeats 2 ${ROLLOUT_ARGS:-} \
  --json-out "$OUT/bench_rollout_gpu.json" > "$OUT/rollout.log" 2>&1; log "rollout rc=$?"
tail -n 12 "$OUT/rollout.log" | cut -c1-3000
fi
log "done"
