"""The decoder (dense Qwen2 / Qwen3 / Llama, and Qwen3-MoE) as a flax.nnx module.

The module is a parameter container whose layer parameters are stacked on a leading [layers] axis;
the cache-free forward (training, scoring) scans one compiled layer body over them (compile time
does not grow with depth). The KV-cache forward (prefill, decode) scans too over a stacked cache,
or unrolls the layers over one cache buffer per layer so that a decode step copies no layer's
cache or weights (compile time grows with depth): `ModelConfig.cache_layers`, see kv_cache.py.
At a jit boundary split it with `nnx.split(model)` and merge inside (see `apply`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tgpo_jax import kernels
from tgpo_jax.kernels import ATTN_OUT
from tgpo_jax.kernels import paged as paged_kernels
from tgpo_jax.models import layers as L
from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.kv_cache import KVCache, PagedKVCache, PageIndex, write_layer_slots, write_slots
from tgpo_jax.models.moe import moe_block
from tgpo_jax.models.params import initializer, layer_param_specs, param_specs


def remat_policy(cfg: ModelConfig):
    """The checkpoint policy of training's per-layer recomputation (ModelConfig.remat_policy).
    Keeping the attention output lets the recomputation of a layer's activations skip the attention
    forward (the score and probability-times-value matmuls); the attention backward recomputes the
    probabilities either way. Measured on the 2-core CPU: 114 -> 100 ms train steps at the demo's
    training shape, 130 -> 122 ms at 320 positions."""
    name = cfg.remat_policy
    if name == "auto":
        name = "attn_out" if cfg.target_platform() == "cpu" else "nothing"
    if name == "attn_out":
        return jax.checkpoint_policies.save_only_these_names(ATTN_OUT)
    return jax.checkpoint_policies.nothing_saveable


def _make_params(owner: nnx.Module, specs, prefix: str, cfg: ModelConfig, rngs: nnx.Rngs):
    for path, spec in specs.items():
        if not path.startswith(prefix):
            continue
        name = path[len(prefix) :]
        if "." in name:
            continue
        value = initializer(spec.init)(rngs.params(), spec.shape, cfg.jnp_param_dtype)
        setattr(owner, name, nnx.Param(value, out_sharding=spec.axes, eager_sharding=False))


class StackedLayers(nnx.Module):
    """Stacked layer parameters with a leading [layers] axis: every layer ('layers.'), or a MoE
    model's sparse ('moe.') or dense ('dense_mlp.') MLPs."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, prefix: str = "layers."):
        _make_params(self, param_specs(cfg), prefix, cfg, rngs)


class Decoder(nnx.Module):
    """`sharding` (a tgpo_jax.sharding.ActivationSharding, or None) adds activation sharding
    constraints; it is static, so a change of mesh or rules recompiles."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs | None = None, sharding: Any = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        if sharding is not None and not cfg.platform:  # auto choices follow the mesh, not the process
            cfg = cfg.replace(platform=sharding.mesh.devices.flat[0].platform)
        self.cfg = cfg
        self.sharding = sharding
        specs = param_specs(cfg)
        _make_params(self, specs, "", cfg, rngs)
        self.layers = StackedLayers(cfg, rngs)
        if cfg.moe_layer_ids:
            self.moe = StackedLayers(cfg, rngs, "moe.")
        if cfg.dense_mlp_layer_ids:
            self.dense_mlp = StackedLayers(cfg, rngs, "dense_mlp.")

    # ------------------------------------------------------------------ forward
    def __call__(self, tokens_BT, positions_BT, mask_BT, cache: KVCache | None = None, layers: list | None = None):
        """Logits [B, T, V] (fp32) and the updated cache (None when no cache was given)."""
        h_BTE, cache = self.hidden_states(tokens_BT, positions_BT, mask_BT, cache, layers=layers)
        return self.logits(h_BTE), cache

    def hidden_states(
        self,
        tokens_BT,
        positions_BT,
        mask_BT,
        cache: KVCache | None = None,
        remat: bool = False,
        layers: list | None = None,
    ):
        """Final-norm hidden states [B, T, E] in the compute dtype.

        tokens/positions/mask are [B, T]; mask is 1 for real tokens (0 for left padding). Without a
        cache, token t attends to real tokens s <= t of the same row. With a cache, the tokens are
        written at slots [cache.index, cache.index + T) and attend to every earlier real slot.
        remat=True recomputes each layer's activations in the backward pass (training memory).
        layers: `layer_list()`, sliced once outside a decode loop (else sliced here, per call); used
        with a per-layer cache only (a stacked cache scans the stacked parameters).
        """
        cfg = self.cfg
        sh = self.sharding
        # FSDP: gather the table over its embed shards before the lookup (as every weight is
        # gathered at use); vocab stays tensor-sharded and XLA masks + reduces the lookup.
        table_VE = _constrain(sh, self.embed[...].astype(cfg.jnp_dtype), ("vocab", None))
        x_BTE = _constrain(sh, table_VE[tokens_BT], ("batch", "seq", "act_embed"))
        cos, sin = L.rope_cos_sin(positions_BT, L.rope_inv_freq(cfg), cfg.jnp_dtype)
        layer_params, stacks = self._scan_params()
        run = functools.partial(
            _run_layers, cfg, sh, functools.partial(_layer, stacks=stacks), layer_params, cos=cos, sin=sin
        )
        if cache is None:  # causal over the real tokens: the kernel takes the [B, T] key mask
            x_BTE, _ = run(x_BTE, mask_BT, None, remat=remat)
        elif isinstance(cache, PagedKVCache):  # decode: each row attends to its own pages' tokens
            x_BTE, (k, v) = run(x_BTE, None, cache, layers=layers)
            index = cache.index.replace(lengths_N=cache.index.lengths_N + tokens_BT.shape[1])
            cache = cache.replace(k=k, v=v, index=index)
        else:
            slot_mask, allowed = cache.allowed_BTS(mask_BT)
            x_BTE, (k, v) = run(x_BTE, allowed, cache, layers=layers)
            cache = KVCache(k, v, slot_mask, cache.index + tokens_BT.shape[1])
        return L.rms_norm(x_BTE, self.final_norm[...], cfg.rms_norm_eps), cache

    def layer_list(self) -> list[dict]:
        """One parameter dict per layer, sliced from the stacks (a MoE mix's shared stacks are
        indexed inside the layer, as in the scan)."""
        return _per_layer(self._scan_params()[0], self.cfg.num_layers)

    def _scan_params(self):
        """(per-layer xs for the scan, stacks indexed inside the body). A dense architecture's
        MLP weights are in the layer stack. A MoE model whose layers are all sparse (or all dense)
        scans its MLP stack alongside; a mix carries, per layer, (is_sparse, index in the sparse
        stack, index in the dense stack) and picks the branch with lax.cond."""
        cfg = self.cfg

        def pure(module):
            return {k: v[...] for k, v in nnx.to_pure_dict(nnx.state(module, nnx.Param)).items()}

        xs = pure(self.layers)
        if not cfg.is_moe:
            return xs, {}
        sparse, n = cfg.sparse_layers, cfg.num_layers
        if all(sparse):
            return {**xs, "moe": pure(self.moe)}, {}
        if not any(sparse):
            return {**xs, "dense_mlp": pure(self.dense_mlp)}, {}
        moe_idx = jnp.asarray([sum(sparse[:i]) for i in range(n)], jnp.int32)
        dense_idx = jnp.asarray([i - sum(sparse[:i]) for i in range(n)], jnp.int32)
        xs["mlp_select"] = (jnp.asarray(sparse), moe_idx, dense_idx)
        return xs, {"moe": pure(self.moe), "dense_mlp": pure(self.dense_mlp)}

    def logits(self, h_BTE: jax.Array) -> jax.Array:
        """fp32 logits [..., V]; rows at or beyond cfg.valid_vocab_size get a large negative value."""
        cfg = self.cfg
        head_EV = self.lm_head_EV()
        logits = L.dense(h_BTE, head_EV.astype(h_BTE.dtype), preferred_element_type=jnp.float32)
        if logits.ndim == 3:
            logits = _constrain(self.sharding, logits, ("batch", "seq", "act_vocab"))
        return mask_padded_vocab(logits, cfg)

    def lm_head_EV(self) -> jax.Array:
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]


def mask_padded_vocab(logits_V: jax.Array, cfg: ModelConfig) -> jax.Array:
    if cfg.valid_vocab_size is None or cfg.valid_vocab_size == cfg.vocab_size:
        return logits_V
    valid = jnp.arange(logits_V.shape[-1]) < cfg.valid_vocab_size
    return jnp.where(valid, logits_V, L.MASK_VALUE)


def _per_layer(xs: dict, num_layers: int) -> list[dict]:
    return [jax.tree.map(lambda a, i=i: a[i], xs) for i in range(num_layers)]


def _constrain(sharding, x, logical_axes):
    return x if sharding is None else sharding.constrain(x, logical_axes)


def _run_layers(
    cfg: ModelConfig,
    sh,
    layer_fn,
    layer_params,
    x_BTE,
    mask,
    cache: KVCache | None,
    *,
    cos,
    sin,
    remat: bool = False,
    layers: list | None = None,
):
    """Every layer over x: a scan of one compiled body over the stacked parameters (no cache, or a
    stacked cache carried and written in place), or unrolled over per-layer cache buffers (each
    layer writes its new slots in place and reads its own buffer directly). Returns (x, (k, v))."""
    if cache is not None and not cache.stacked:
        ks, vs = list(cache.k), list(cache.v)
        for i, lp in enumerate(layers if layers is not None else _per_layer(layer_params, cfg.num_layers)):
            x_BTE, (ks[i], vs[i]) = layer_fn(cfg, sh, lp, x_BTE, cos, sin, mask, (ks[i], vs[i]), cache.index)
        return x_BTE, (tuple(ks), tuple(vs))
    index = None if cache is None else cache.index

    def body(carry, xs):
        x, kv = carry
        lp, layer = xs
        x, kv = layer_fn(cfg, sh, lp, x, cos, sin, mask, None if kv is None else (*kv, layer), index)
        return (x, None if kv is None else kv[:2]), None

    if remat:
        body = jax.checkpoint(body, policy=remat_policy(cfg))
    kv0 = None if cache is None else (cache.k, cache.v)
    (x_BTE, kv), _ = jax.lax.scan(body, (x_BTE, kv0), (layer_params, jnp.arange(cfg.num_layers)))
    return x_BTE, kv


def _cache_kv(kv: tuple, k_BTKD, v_BTKD, index):
    """Writes the new keys / values into the cache entry `kv`: a layer's own buffers (k, v), or
    the stacked buffers and the layer's index (k_all, v_all, layer). Returns (keys, values to
    attend over, the updated entry)."""
    if len(kv) == 2:
        k_c, v_c = write_slots(kv[0], k_BTKD, index), write_slots(kv[1], v_BTKD, index)
        return k_c, v_c, (k_c, v_c)
    k_all, k_c = write_layer_slots(kv[0], k_BTKD, kv[2], index)
    v_all, v_c = write_layer_slots(kv[1], v_BTKD, kv[2], index)
    return k_c, v_c, (k_all, v_all, kv[2])


_MLP_KEYS = ("moe", "dense_mlp", "mlp_select")  # MoE models' per-layer MLP entries (see _scan_params)


def _dense_mlp(cfg: ModelConfig, sh, w: dict, h_BTE):
    return L.swiglu(
        h_BTE,
        w["gate_kernel"],
        w["up_kernel"],
        w["down_kernel"],
        constrain_hidden=lambda a: _constrain(sh, a, ("batch", "seq", "act_mlp")),
    )


def _mlp(cfg: ModelConfig, sh, p: dict, h_BTE, stacks: dict):
    """The layer's MLP: dense SwiGLU, or the mixture of experts (see `Decoder._scan_params`)."""
    dt = cfg.jnp_dtype
    cast = lambda tree: jax.tree.map(lambda a: a.astype(dt), tree)  # noqa: E731
    if not cfg.is_moe:  # p: the layer's weights, already cast
        return _dense_mlp(cfg, sh, p, h_BTE)
    if "moe" in p:
        return moe_block(cfg, sh, cast(p["moe"]), h_BTE)
    if "dense_mlp" in p:
        return _dense_mlp(cfg, sh, cast(p["dense_mlp"]), h_BTE)
    is_sparse, i_moe, i_dense = p["mlp_select"]
    pick = lambda stack, i: cast(jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), stack))  # noqa: E731
    return jax.lax.cond(
        is_sparse,
        lambda h: moe_block(cfg, sh, pick(stacks["moe"], i_moe), h),
        lambda h: _dense_mlp(cfg, sh, pick(stacks["dense_mlp"], i_dense), h),
        h_BTE,
    )


def _attend(cfg: ModelConfig, sh, q, k, v, mask, kv, index):
    """The layer's attention [B, T, H, D] and the updated cache entry: over the cache (`mask` is
    the cache's allowed [B, T, S]), or cache-free through the configured kernel (`mask` is the
    [B, T] key mask; tgpo_jax/kernels)."""
    if kv is not None and isinstance(index, PageIndex):
        return _paged_attend(cfg, sh, q, k, v, kv, index)
    if kv is not None:
        k_c, v_c, kv = _cache_kv(kv, k, v, index)
        live = jnp.minimum(jnp.max(index) + q.shape[1], k_c.shape[2])  # the longest row's end
        return kernels.cached_attention(q, k_c, v_c, mask, live), kv
    attn = kernels.causal_attention(
        q,
        k,
        v,
        mask,
        impl=cfg.attn_impl,
        platform=cfg.target_platform(),
        sharding=sh,
        query_block=cfg.attn_query_block,
    )
    return attn, kv


def _paged_attend(cfg: ModelConfig, sh, q, k, v, kv, index: PageIndex):
    """Decode attention over a paged cache (kernels/paged.py): writes each row's new key / value at
    its length and attends to its pages. kv: the layer's pools (k, v), or the stacked pools and the
    layer (k_all, v_all, layer), whose pages start at layer * index.pages."""
    if q.shape[1] != 1:
        raise ValueError(f"a paged KV cache decodes one token per row, got {q.shape[1]}")
    first = 0 if len(kv) == 2 else kv[2] * index.pages
    out, k_pool, v_pool = paged_kernels.decode_step(
        q[:, 0],
        k[:, 0],
        v[:, 0],
        kv[0],
        kv[1],
        index.lengths_N,
        index.table_NM,
        first,
        platform=cfg.target_platform(),
        sharding=sh,
        groups=index.groups,
    )
    return out[:, None], (k_pool, v_pool, *kv[2:])


def _layer(cfg: ModelConfig, sh, p: dict, x_BTE, cos, sin, mask, kv, index, stacks=None):
    """One pre-norm decoder layer: x + attn(norm(x)); then x + mlp(norm(x)) (SwiGLU or MoE)."""
    dt = cfg.jnp_dtype
    w = {k: v.astype(dt) for k, v in p.items() if k not in _MLP_KEYS}
    h = L.rms_norm(x_BTE, w["attn_norm"], cfg.rms_norm_eps)
    q, k, v = L.dense(h, w["q_kernel"]), L.dense(h, w["k_kernel"]), L.dense(h, w["v_kernel"])
    if cfg.qkv_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    if cfg.qk_norm:
        q = L.rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = L.rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
    q = _constrain(sh, q, ("batch", "seq", "act_heads", None))
    k = _constrain(sh, k, ("batch", "seq", "act_kv_heads", None))
    v = _constrain(sh, v, ("batch", "seq", "act_kv_heads", None))
    attn, kv = _attend(cfg, sh, q, k, v, mask, kv, index)
    out = L.dense(attn, w["o_kernel"], n_in=2)
    if cfg.o_bias:
        out = out + w["o_bias"]
    x_BTE = _constrain(sh, x_BTE + out, ("batch", "seq", "act_embed"))
    h = L.rms_norm(x_BTE, w["mlp_norm"], cfg.rms_norm_eps)
    mlp = _mlp(cfg, sh, p if cfg.is_moe else w, h, stacks or {})
    x_BTE = _constrain(sh, x_BTE + mlp, ("batch", "seq", "act_embed"))
    return x_BTE, kv


# ---------------------------------------------------------------------- functional helpers
def left_pad_positions(mask_BT: jax.Array) -> jax.Array:
    """Positions for a left-padded batch: 0 at the first real token, pads clamped to 0."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def apply(graphdef: Any, state: Any, method: str, *args, **kwargs):
    """Calls `method` of the model rebuilt from (graphdef, state): the pure entry point used
    inside jitted functions."""
    model = nnx.merge(graphdef, state)
    return getattr(model, method)(*args, **kwargs)


def init_model(cfg: ModelConfig, seed: int = 0, sharding: Any = None) -> Decoder:
    return Decoder(cfg, nnx.Rngs(seed), sharding)


def abstract_model(cfg: ModelConfig, sharding: Any = None) -> Decoder:
    """A Decoder whose parameters are jax.ShapeDtypeStruct: no memory allocated."""
    return nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0), sharding))


__all__ = [
    "Decoder",
    "StackedLayers",
    "apply",
    "init_model",
    "abstract_model",
    "left_pad_positions",
    "layer_param_specs",
]
