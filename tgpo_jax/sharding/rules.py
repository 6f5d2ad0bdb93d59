"""Logical-axis sharding rules: every parameter and activation dimension carries a logical name
(embed, vocab, heads, ...), and a rule table maps each name to mesh axes (or None = replicated).

Student and teacher share one mesh but may each have their own rules (e.g. a teacher replicated
over `data` when it fits, or fully FSDP-sharded when it does not)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tgpo_jax.configtree import build
from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.params import param_specs
from tgpo_jax.sharding.mesh import ShardingConfigError

MeshAxes = None | str | tuple[str, ...]

PARAM_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "expert", "moe_mlp", "router")
ACTIVATION_AXES = ("batch", "seq", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab", "cache_seq")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

# FSDP over `fsdp` (and `data` for activations' batch), tensor parallelism over heads / MLP / vocab.
# Experts are not split by default (`expert: null`); EXPERT_PARALLEL_RULES split them over an
# `expert` mesh axis.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    # Mixture of experts: map `expert` to a mesh axis (e.g. an `expert` axis, or `fsdp`) for expert
    # parallelism; the MoE block then runs under shard_map over it (models/moe.py). `router` is the
    # router's expert dim (small, replicated).
    "expert": None,
    "moe_mlp": "tensor",
    "router": None,
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_seq": None,
}


EXPERT_PARALLEL_RULES: dict[str, MeshAxes] = {"expert": "expert"}


def _is_str(x) -> bool:
    return isinstance(x, str)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """logical axis name -> mesh axis name(s) or None. Hashable, so it can be static in jit."""

    table: tuple[tuple[str, MeshAxes], ...] = tuple(DEFAULT_RULES.items())

    @classmethod
    def from_config(cls, overrides: Mapping[str, MeshAxes] | None, path: str = "") -> ShardingRules:
        """The YAML form, overrides of DEFAULT_RULES (configtree's hook); `path` names the key."""
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ShardingConfigError(
                f"{path or 'rules'}: expected a mapping logical axis -> mesh axes, got {overrides!r}"
            )
        merged = dict(DEFAULT_RULES)
        for k, v in (overrides or {}).items():
            if k not in LOGICAL_AXES:
                raise ShardingConfigError(
                    f"unknown logical axis {k!r} in sharding rules{f' ({path})' if path else ''}; "
                    f"valid: {', '.join(LOGICAL_AXES)}"
                )
            if not (
                v is None or isinstance(v, str) or (isinstance(v, list | tuple) and all(isinstance(a, str) for a in v))
            ):
                raise ShardingConfigError(
                    f"{path or 'rules'}.{k} must be null, a mesh axis name or a list of them; got {v!r}"
                )
            merged[k] = tuple(v) if isinstance(v, list) else v
        return cls(tuple(merged.items()))

    @classmethod
    def from_dict(cls, overrides: Mapping[str, MeshAxes] | ShardingRules | None = None) -> ShardingRules:
        """configtree.build: overrides of DEFAULT_RULES (or a ShardingRules, returned as is)."""
        return build(cls, overrides)

    def to_config(self) -> dict[str, MeshAxes]:
        """The overrides of DEFAULT_RULES: what a config file holds (`{}` for the defaults)."""
        return {k: v for k, v in self.table if k not in DEFAULT_RULES or DEFAULT_RULES[k] != v}

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return None
        return dict(self.table)[logical]

    def spec(self, logical_axes: tuple[str | None, ...]) -> PartitionSpec:
        """PartitionSpec for a tuple of logical names; a mesh axis is used at most once (the
        first dimension that asks for it wins), since a PartitionSpec cannot repeat an axis."""
        used: set[str] = set()
        out = []
        for name in logical_axes:
            axes = self.mesh_axes(name)
            axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
            free = tuple(a for a in axes_t if a not in used)
            used.update(free)
            out.append(None if not free else free[0] if len(free) == 1 else free)
        return PartitionSpec(*out)

    def validate(self, mesh: Mesh) -> None:
        for logical, axes in self.table:
            for a in (axes,) if isinstance(axes, str) else tuple(axes or ()):
                if a not in mesh.axis_names:
                    raise ShardingConfigError(
                        f"sharding rule {logical} -> {a!r} names an axis the mesh does not have; "
                        f"mesh axes: {', '.join(mesh.axis_names)}"
                    )


def axis_size(mesh: Mesh, spec_entry) -> int:
    if spec_entry is None:
        return 1
    names = (spec_entry,) if isinstance(spec_entry, str) else spec_entry
    size = 1
    for n in names:
        size *= mesh.shape[n]
    return size


def param_shardings(cfg: ModelConfig, rules: ShardingRules, mesh: Mesh) -> dict[str, NamedSharding]:
    """{param path: NamedSharding} for every parameter, checking that each sharded dimension is
    divisible by its mesh axes (the error names the parameter)."""
    rules.validate(mesh)
    out = {}
    for path, spec in param_specs(cfg).items():
        pspec = rules.spec(spec.axes)
        for dim, (size, entry, logical) in enumerate(zip(spec.shape, pspec, spec.axes)):
            n = axis_size(mesh, entry)
            if size % n:
                raise ShardingConfigError(
                    f"parameter {path} dim {dim} ({logical}={size}) is not divisible by mesh axes {entry} "
                    f"of size {n}; change the rule for {logical!r} (e.g. to null) or the mesh"
                )
        out[path] = NamedSharding(mesh, pspec)
    return out


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """Mesh + rules the model uses for `with_sharding_constraint` on its activations."""

    mesh: Mesh
    rules: ShardingRules

    def spec_for(self, shape: tuple[int, ...], logical_axes: tuple[str | None, ...]) -> PartitionSpec:
        """The rules' spec for an array of this shape; a dimension that does not divide its mesh
        axes stays unsharded rather than padded."""
        spec = self.rules.spec(logical_axes)
        return PartitionSpec(*(e if shape[i] % axis_size(self.mesh, e) == 0 else None for i, e in enumerate(spec)))

    def constrain(self, x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec_for(x.shape, logical_axes)))


def constrain(sharding: ActivationSharding | None, x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    return x if sharding is None else sharding.constrain(x, logical_axes)
