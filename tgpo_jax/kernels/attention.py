"""One entry point for attention: `causal_attention` (cache-free: training, scoring) runs the
configured implementation, and `resolve` makes the `auto` choice from the platform of the mesh's
devices (never the process's default backend, so a TPU program built in a CPU process gets the
TPU kernel). `cached_attention` is the KV-cache path (prefill, decode).

Implementations (ModelConfig.attn_impl):
  einsum  full fp32 scores (`reference`), or query blocks with a hand-written backward where
          attn_query_block asks for them (`blocked`; auto: on CPU only)
  sdpa    jax.nn.dot_product_attention, the backend's choice, padding as sequence lengths (`lengths`)
  cudnn   the same, cuDNN forced (GPU, bf16 / fp16)
  cpu     the fused C++ kernel for XLA:CPU (`cpu`; fp32)
  splash  the Pallas TPU splash kernel (`splash`; interpret mode off TPU)
  auto    cpu on CPU, splash on TPU, cudnn on GPU, each where it applies; else einsum
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from tgpo_jax.kernels import blocked, cpu, decode, lengths, reference, splash
from tgpo_jax.kernels.common import ATTN_OUT, KV_AXES, Q_AXES

IMPLS = ("einsum", "sdpa", "cudnn", "cpu", "splash", "auto")
CUDNN_DTYPES = ("bfloat16", "float16")


class AttentionUnavailable(ValueError):
    """An explicitly configured attention implementation cannot run here (the message says why)."""


def auto_query_block(setting: int, T: int, platform: str) -> int:
    """The query block `blocked.blocked_causal_attention` uses for T positions (0: full scores).
    `setting` >= 0 is taken as is; -1 (auto) picks blocks only on CPU, where skipping the upper
    triangle measured 1.1-1.45x faster train steps at 112-320 positions: blocks of 32 rows, or
    T / 16 for long sequences (at most 16 blocks: the blocks are unrolled at trace time)."""
    if setting >= 0:
        return setting
    if platform != "cpu" or T < 96:
        return 0
    return max(32, -(-T // 16))


def cpu_why_not(platform: str, sh, q_shape, k_shape, dtype) -> str | None:
    """None if the fused CPU kernel can run this attention on `platform`, per shard when the mesh
    has several devices, else why not."""
    if (why := cpu.supports_shape(q_shape, dtype, platform)) is not None:
        return why
    if sh is not None and sh.mesh.size > 1:
        qs, ks = sh.spec_for(q_shape, Q_AXES), sh.spec_for(k_shape, KV_AXES)
        if qs[1] is not None:
            return f"the sequence is sharded over {qs[1]!r}; the kernel needs whole rows"
        if qs[2] != ks[2]:  # a shard must hold each of its query heads' kv head
            return (
                f"query heads ({q_shape[2]}) shard over {qs[2]!r} but kv heads ({k_shape[2]}) over "
                f"{ks[2]!r}; the kernel needs both split alike"
            )
    return cpu.unavailable_reason()


def splash_why_not(platform: str, sh, q_shape, k_shape) -> str | None:
    """None if `auto` should take splash: a TPU mesh, head_dim a multiple of the 128 lanes, whole rows."""
    if platform != "tpu":
        return f"splash attention is a TPU kernel; the mesh is on {platform}"
    if q_shape[-1] % splash.LANES:
        return f"head_dim {q_shape[-1]} is not a multiple of {splash.LANES}"
    return splash.why_not(sh, q_shape, k_shape)


def cudnn_why_not(platform: str, q_shape, dtype) -> str | None:
    """None if cuDNN's fused attention applies: a GPU mesh, bf16 / fp16, head_dim <= 128 and % 8 == 0."""
    if platform != "gpu":
        return f"cuDNN attention needs a GPU mesh; the mesh is on {platform}"
    if jax.numpy.dtype(dtype).name not in CUDNN_DTYPES:
        return f"cuDNN attention needs {' or '.join(CUDNN_DTYPES)}, got {jax.numpy.dtype(dtype).name}"
    if q_shape[-1] > 128 or q_shape[-1] % 8:
        return f"cuDNN attention needs head_dim <= 128 and a multiple of 8, got {q_shape[-1]}"
    return None


def resolve(impl: str, platform: str, sh, q_shape, k_shape, dtype) -> str:
    """The implementation that runs: `impl` itself (raising AttentionUnavailable, with the reason,
    where it cannot run), or for "auto" the platform's kernel where it applies, else "einsum"."""
    if impl == "auto":
        if platform == "cpu" and cpu_why_not(platform, sh, q_shape, k_shape, dtype) is None:
            return "cpu"
        if platform == "tpu" and splash_why_not(platform, sh, q_shape, k_shape) is None:
            return "splash"
        if platform == "gpu" and cudnn_why_not(platform, q_shape, dtype) is None:
            return "cudnn"
        return "einsum"
    why = {
        "cpu": lambda: cpu_why_not(platform, sh, q_shape, k_shape, dtype),
        "splash": lambda: splash.why_not(sh, q_shape, k_shape),
        "cudnn": lambda: cudnn_why_not(platform, q_shape, dtype),
    }.get(impl, lambda: None)()
    if why is not None:
        raise (cpu.CpuKernelUnavailable if impl == "cpu" else AttentionUnavailable)(f"attn_impl={impl!r}: {why}")
    if impl not in IMPLS:
        raise AttentionUnavailable(f"attn_impl={impl!r}; accepted: {', '.join(IMPLS)}")
    return impl


def _cpu_attention(sh, q, k, v, key_mask_BT):
    """The fused CPU kernel; on a multi-device mesh under shard_map, each device running it on its
    batch rows and heads (GSPMD cannot partition an FFI call: it would gather to one device)."""
    if sh is None or sh.mesh.size == 1:
        return cpu.causal_attention(q, k, v, key_mask_BT)
    qs, ks = sh.spec_for(q.shape, Q_AXES), sh.spec_for(k.shape, KV_AXES)
    return jax.shard_map(
        cpu.causal_attention, mesh=sh.mesh, in_specs=(qs, ks, ks, P(qs[0], None)), out_specs=qs, check_vma=False
    )(q, k, v, key_mask_BT)


def causal_attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    key_mask_BT: jax.Array,
    *,
    impl: str = "auto",
    platform: str | None = None,
    sharding=None,
    query_block: int = 0,
) -> jax.Array:
    """Grouped-query causal self-attention [B, T, H, D]: query t of a row reads key s iff s <= t
    and key s is a real token (key_mask nonzero); query head h reads kv head h // (H / K).
    platform: the mesh's ("cpu", "gpu", "tpu"; None: the default backend's). sharding: the
    decoder's ActivationSharding (kernels that run per device use its mesh and rules). The output,
    or a kernel's own residuals, carries the checkpoint name ATTN_OUT (decoder.remat_policy)."""
    platform = platform or jax.default_backend()
    name = resolve(impl, platform, sharding, q_BTHD.shape, k_BTKD.shape, q_BTHD.dtype)
    if name == "cpu":
        return _cpu_attention(sharding, q_BTHD, k_BTKD, v_BTKD, key_mask_BT)
    if name == "splash":
        return splash.causal_attention(
            q_BTHD, k_BTKD, v_BTKD, key_mask_BT, sharding=sharding, interpret=platform != "tpu"
        )
    if name in ("sdpa", "cudnn"):
        out = lengths.causal_attention(q_BTHD, k_BTKD, v_BTKD, key_mask_BT, None if name == "sdpa" else "cudnn")
        return checkpoint_name(out, ATTN_OUT)
    T = q_BTHD.shape[1]
    if 0 < (block := auto_query_block(query_block, T, platform)) < T:
        return blocked.blocked_causal_attention(q_BTHD, k_BTKD, v_BTKD, key_mask_BT, block)
    return checkpoint_name(reference.causal_attention(q_BTHD, k_BTKD, v_BTKD, key_mask_BT), ATTN_OUT)


def cached_attention(
    q_BTHD: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array, allowed_BTS: jax.Array, live: jax.Array | None = None
) -> jax.Array:
    """Attention over a KV cache ([B, K, S, D] keys and values; allowed[b, t, s]: query t may read
    slot s), for prefill and decode. `live` (int32 scalar, optional): no query sees a slot at or past
    it; a decode step (a few queries) over a cache of at least two blocks then reads only the blocks
    before it (`decode.live_attention`)."""
    S = k_BKSD.shape[2]
    if live is not None and q_BTHD.shape[1] <= 8 and S >= 2 * decode.BLOCK:
        return decode.live_attention(q_BTHD, k_BKSD, v_BKSD, allowed_BTS, live)
    return reference.attention(q_BTHD, k_BKSD, v_BKSD, allowed_BTS, kv_layout="bksd")
