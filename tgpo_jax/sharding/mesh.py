"""One device mesh for student and teacher, built from a small typed config."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from tgpo_jax.configtree import ConfigError, build


class ShardingConfigError(ConfigError):
    """A mesh or sharding-rule configuration that cannot work; raised before any compile."""


DEFAULT_AXES = (("data", 1), ("fsdp", -1), ("tensor", 1))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Named mesh axes in order, outermost first; one size may be -1 ("all remaining devices").

    Axis order matters for locality: the last axis varies fastest over devices, so `tensor` (the
    most communication-heavy) goes last, where devices are nearest."""

    axes: tuple[tuple[str, int], ...] = DEFAULT_AXES

    @classmethod
    def from_config(cls, d, path: str = "") -> MeshConfig:
        """The YAML form, a mapping axis name -> size (configtree's hook); `path` names the key."""
        where = path or "mesh"
        if not isinstance(d, dict) or not d:
            raise ShardingConfigError(
                f"{where} must be a mapping of axis name -> size, e.g. {{data: 1, fsdp: -1, tensor: 1}}; got {d!r}"
            )
        for k, v in d.items():
            if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
                raise ShardingConfigError(
                    f"{where}: mesh axis {k!r} has size {v!r}; accepted: a positive integer or -1"
                )
        if list(d.values()).count(-1) > 1:
            raise ShardingConfigError(f"{where}: at most one mesh axis may be -1; got {d}")
        return cls(tuple(d.items()))

    @classmethod
    def from_dict(cls, d) -> MeshConfig:
        """configtree.build: a mapping (or a MeshConfig, returned as is)."""
        return build(cls, d)

    def to_config(self) -> dict[str, int]:
        return dict(self.axes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    def resolve(self, n_devices: int) -> tuple[int, ...]:
        """Concrete axis sizes for `n_devices`, with -1 filled in."""
        sizes = [s for _, s in self.axes]
        if len(set(self.names)) != len(self.names):
            raise ShardingConfigError(f"mesh axis names repeat: {self.names}")
        if sizes.count(-1) > 1:
            raise ShardingConfigError(f"at most one mesh axis may be -1; got {dict(self.axes)}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ShardingConfigError(
                    f"mesh {dict(self.axes)}: the fixed axes ({known} devices) do not divide the {n_devices} devices"
                )
            sizes[sizes.index(-1)] = n_devices // known
        elif known != n_devices:
            raise ShardingConfigError(
                f"mesh {dict(self.axes)} has {known} devices but {n_devices} are available; "
                "the sizes must multiply to the device count (use -1 for one axis to take the rest)"
            )
        return tuple(sizes)


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: every device of every process) with Auto axis types, so
    XLA's SPMD partitioner propagates shardings from the parameter and activation constraints."""
    devices = list(devices if devices is not None else jax.devices())
    shape = cfg.resolve(len(devices))
    try:
        arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # non-TPU topologies or a device subset: plain row-major order
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, cfg.names, axis_types=(AxisType.Auto,) * len(shape))
