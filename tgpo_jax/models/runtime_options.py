"""How a model is computed, as opposed to what it is: the runtime options of a decoder.

None of these is a Hugging Face config.json field (ModelConfig.to_hf_dict never writes them and
from_hf_dict never reads them); each picks one of several exact implementations of the same model,
so they may differ between the runs that train, score and sample one checkpoint. ModelConfig
inherits them (as keyword-only fields), so `cfg.attn_impl` and `cfg.replace(attn_impl=...)` work on
any model config; a train or SFT config's `models` section and the benchmarks validate their own
copies with `runtime_option_problems`, the one check they all share.
"""

from __future__ import annotations

import dataclasses

from tgpo_jax.kernels.attention import IMPLS as ATTN_IMPLS

AUTO_QUERY_BLOCK = -1  # attn_query_block: chosen per sequence length and backend
# How the experts' SwiGLU is dispatched (models/moe.py, `resolve_impl`): "auto" picks "ragged"
# (lax.ragged_dot, a grouped matmul kernel) on GPU / TPU and "blocks" (sorted blocks in a loop)
# elsewhere; "dense" runs every expert on every token (a reference for tests only, never a default).
MOE_IMPLS = ("auto", "ragged", "blocks", "dense")
CACHE_LAYERS = ("auto", "unroll", "scan")
REMAT_POLICIES = ("auto", "nothing", "attn_out")

_CHOICES = {
    "moe_impl": MOE_IMPLS,
    "attn_impl": ATTN_IMPLS,
    "remat_policy": REMAT_POLICIES,
    "cache_layers": CACHE_LAYERS,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    moe_impl: str = "auto"  # the experts' dispatch (see MOE_IMPLS); ignored by dense models
    moe_block_size: int = 64  # rows per block of the "blocks" dispatch
    # > 0: cache-free causal self-attention (training, scoring) in query blocks of this many rows,
    # each reading only the keys up to its last row (exact). 0: full scores. -1 (AUTO_QUERY_BLOCK):
    # chosen per sequence length and platform (kernels.auto_query_block).
    attn_query_block: int = 0
    # The cache-free attention kernel (tgpo_jax/kernels/attention.py). "einsum": ours (fp32 scores);
    # "sdpa": jax.nn.dot_product_attention, backend's choice, padding as sequence lengths; "cudnn":
    # that, cuDNN forced (GPU only, bf16/fp16); "cpu": the fused C++ kernel for XLA:CPU (fp32, built
    # on first use); "splash": the Pallas TPU splash-attention kernel (interpret mode off TPU: tests
    # only); "auto": from the mesh's devices, "cpu" on CPU, "splash" on TPU, "cudnn" on GPU, each
    # where it applies (per shard on a multi-device mesh), else "einsum". attn_query_block applies
    # to "einsum" (and "auto").
    attn_impl: str = "einsum"
    # How the KV-cache path (prefill, decode) runs the layers. "unroll": one cache buffer per layer,
    # layers unrolled (no per-step copy of a layer's cache or weights; compile time grows with
    # depth). "scan": one stacked [L, B, K, S, D] cache, one compiled layer body scanned over the
    # layers (compile time independent of depth). "auto": unroll on CPU (measured faster there),
    # scan on accelerators.
    cache_layers: str = "auto"
    # What training's per-layer recomputation keeps (decoder.remat_policy). "nothing": only each
    # layer's input; "attn_out": also its attention output [B, T, H, D], so the recomputation skips
    # the attention forward (12% faster CPU train steps at the demo shape, one more [B, T, H*D]
    # tensor per layer); "auto": attn_out on CPU, nothing on accelerators.
    remat_policy: str = "auto"
    # The platform of the devices the model runs on ("cpu", "gpu", "tpu"), which every "auto" above
    # resolves against. A Decoder built with an activation sharding takes it from its mesh's devices,
    # so a program built in a CPU process for a TPU mesh (AOT compilation) gets the TPU choices; ""
    # (a model without a mesh) means the process's default backend.
    platform: str = ""

    def target_platform(self) -> str:
        """`platform`, else the default backend's."""
        if self.platform:
            return self.platform
        import jax

        return jax.default_backend()

    def runtime_options(self) -> RuntimeOptions:
        """These options alone (e.g. of a ModelConfig), as a plain RuntimeOptions."""
        return RuntimeOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RuntimeOptions)})

    def runtime_problems(self) -> list[str]:
        return runtime_option_problems(**dataclasses.asdict(self.runtime_options()))


def runtime_option_problems(**options) -> list[str]:
    """What is wrong with the given runtime options (any subset of RuntimeOptions' fields, by
    name), one message each, in the order given."""
    problems = []
    for k, v in options.items():
        if k in _CHOICES and v not in _CHOICES[k]:
            problems.append(f"{k}={v!r}; accepted: {', '.join(_CHOICES[k])}")
        elif k == "attn_query_block" and v < AUTO_QUERY_BLOCK:
            problems.append(f"attn_query_block={v} must be >= 0 (0: off) or -1 (auto)")
        elif k == "moe_block_size" and v < 1:
            problems.append(f"moe_block_size={v} must be positive")
    return problems
