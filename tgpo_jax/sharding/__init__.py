"""Mesh, logical-axis sharding rules and sharded placement for student and teacher."""

from tgpo_jax.sharding.mesh import MeshConfig, ShardingConfigError, build_mesh
from tgpo_jax.sharding.placement import abstract_sharded_params, init_sharded, load_sharded
from tgpo_jax.sharding.rules import (
    DEFAULT_RULES,
    LOGICAL_AXES,
    ActivationSharding,
    ShardingRules,
    param_shardings,
)

__all__ = [
    "MeshConfig",
    "ShardingConfigError",
    "build_mesh",
    "abstract_sharded_params",
    "init_sharded",
    "load_sharded",
    "DEFAULT_RULES",
    "LOGICAL_AXES",
    "ActivationSharding",
    "ShardingRules",
    "param_shardings",
]
