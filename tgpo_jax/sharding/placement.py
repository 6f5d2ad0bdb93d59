"""Creating and loading models directly into their shardings on the shared mesh: no full replica
on one device or host ever exists (random init runs under jit with sharded outputs; checkpoint
loading hands each device only its own shard)."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.decoder import Decoder
from tgpo_jax.models.hf_export import flat_params
from tgpo_jax.models.hf_import import load_model, model_from_flat
from tgpo_jax.sharding.rules import ActivationSharding, ShardingRules, param_shardings


def _sharded_init_fn(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules, seed: int):
    shardings = param_shardings(cfg, rules, mesh)
    return jax.jit(lambda: flat_params(Decoder(cfg, nnx.Rngs(seed))), out_shardings=shardings)


def abstract_sharded_params(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules, seed: int = 0) -> dict:
    """{path: ShapeDtypeStruct with .sharding} of a sharded init, computed without allocating."""
    return jax.eval_shape(_sharded_init_fn(cfg, mesh, rules, seed))


def init_sharded(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules, seed: int = 0) -> Decoder:
    """A randomly initialised Decoder whose parameters are created in their shardings."""
    flat = _sharded_init_fn(cfg, mesh, rules, seed)()
    return model_from_flat(cfg, flat, ActivationSharding(mesh, rules))


def load_sharded(path: str, mesh: Mesh, rules: ShardingRules, **kw) -> Decoder:
    """An HF checkpoint loaded straight into the shardings the rules give on `mesh`."""
    cfg = ModelConfig.from_hf_dir(path, param_dtype=kw.get("param_dtype", "float32"), dtype=kw.get("dtype", "float32"))
    return load_model(
        path, shardings=param_shardings(cfg, rules, mesh), activation_sharding=ActivationSharding(mesh, rules), **kw
    )
