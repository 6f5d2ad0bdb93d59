"""Multi-process (multi-host) JAX: starting the distributed runtime and moving batches between
host-local numpy and global, possibly non-fully-addressable, jax.Arrays.

Every process runs the same program over one global mesh (`build_mesh()` over `jax.devices()`,
which lists the devices of all processes). Each process feeds only the batch rows its own devices
hold and reads results back with an all-gather.

`initialize()` must run before anything touches the JAX backend (jax.devices(), an array, a jit).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Explicit settings: our own names first, then the ones some launchers export for JAX.
ENV_VARS = {
    "coordinator_address": ("TGPO_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("TGPO_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("TGPO_PROCESS_ID", "JAX_PROCESS_ID"),
}
# Set on Cloud TPU VMs (single- and multi-slice); JAX then finds the rest itself.
TPU_ENV_VARS = (
    "TPU_WORKER_HOSTNAMES",
    "TPU_WORKER_ID",
    "TPU_ACCELERATOR_TYPE",
    "TPU_PROCESS_ADDRESSES",
    "CLOUD_TPU_TASK_ID",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "MEGASCALE_NUM_SLICES",
)

_state: dict[str, bool] = {}


class DistributedConfigError(ValueError):
    """Distributed settings that cannot start a multi-process run."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Explicit multi-process settings; None fields are taken from the environment (ENV_VARS).

    Give all three of coordinator_address ("host:port" of process 0), num_processes and
    process_id, or none of them (single process, or a Cloud TPU VM where JAX detects them)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _env_value(field: str, environ: Mapping[str, str]) -> str | int | None:
    """The first environment variable set for `field`, as int for the counts."""
    for var in ENV_VARS[field]:
        raw = environ.get(var, "").strip()
        if not raw:
            continue
        if field == "coordinator_address":
            return raw
        try:
            return int(raw)
        except ValueError:
            raise DistributedConfigError(f"{var}={raw!r} is not an integer") from None
    return None


def resolve_config(cfg: DistributedConfig | None = None, environ: Mapping[str, str] | None = None) -> DistributedConfig:
    """`cfg` with each unset field filled from the environment (config values win)."""
    cfg = cfg or DistributedConfig()
    environ = os.environ if environ is None else environ
    filled = {f: getattr(cfg, f) if getattr(cfg, f) is not None else _env_value(f, environ) for f in ENV_VARS}
    return dataclasses.replace(cfg, **filled)


def is_cloud_tpu_env(environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment looks like a Cloud TPU VM (any of TPU_ENV_VARS is set)."""
    environ = os.environ if environ is None else environ
    return any(environ.get(v) for v in TPU_ENV_VARS)


def _validate_explicit(cfg: DistributedConfig) -> None:
    """Raises DistributedConfigError unless the three explicit fields are all set and consistent."""
    missing = [f for f in ENV_VARS if getattr(cfg, f) is None]
    if missing:
        hints = ", ".join(f"{f} (or {' / '.join(ENV_VARS[f])})" for f in missing)
        raise DistributedConfigError(
            f"incomplete multi-process settings: missing {hints}; give coordinator_address, num_processes "
            "and process_id together, or none of them for a single process"
        )
    if ":" not in cfg.coordinator_address:
        raise DistributedConfigError(f"coordinator_address {cfg.coordinator_address!r} must be host:port")
    if cfg.num_processes < 1:
        raise DistributedConfigError(f"num_processes must be >= 1; got {cfg.num_processes}")
    if not 0 <= cfg.process_id < cfg.num_processes:
        raise DistributedConfigError(
            f"process_id must be in [0, num_processes={cfg.num_processes}); got {cfg.process_id}"
        )


def plan(
    cfg: DistributedConfig | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, DistributedConfig]:
    """What `initialize` would do, without doing it: ("explicit" | "tpu" | "single", resolved cfg).

    Explicit settings (any field set) are validated strictly, except on a Cloud TPU VM, where
    JAX's own detection fills whatever is missing."""
    environ = os.environ if environ is None else environ
    cfg = resolve_config(cfg, environ)
    any_explicit = any(getattr(cfg, f) is not None for f in ENV_VARS)
    if is_cloud_tpu_env(environ):
        if any_explicit and all(getattr(cfg, f) is not None for f in ENV_VARS):
            _validate_explicit(cfg)
        return "tpu", cfg
    if any_explicit:
        _validate_explicit(cfg)
        return "explicit", cfg
    return "single", cfg


def initialize(cfg: DistributedConfig | None = None) -> bool:
    """Starts jax.distributed when this run spans several processes; returns whether it did.

    Idempotent: later calls return the first call's answer without doing anything (and True if
    someone else already started jax.distributed). Must run before the JAX backend is used."""
    if "multi" in _state:
        return _state["multi"]
    if jax.distributed.is_initialized():
        _state["multi"] = True
        return True
    mode, cfg = plan(cfg)
    if mode != "single":
        ids = list(cfg.local_device_ids) if cfg.local_device_ids is not None else None
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            local_device_ids=ids,
        )
    _state["multi"] = mode != "single"
    return _state["multi"]


# ---------------------------------------------------------------------------- batches
def host_local_to_global(local_BX: np.ndarray, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """One global array from every process's host-local rows (`process_batch_slice` of them).

    The batch (leading) dimension is sharded over `spec[0]` (e.g. ('data', 'fsdp')); every
    process calls this with its own rows, same shape and dtype everywhere."""
    local_BX = np.asarray(local_BX)
    if len(spec) > local_BX.ndim:
        raise ValueError(f"spec {spec} has more entries than the local batch has dimensions {local_BX.shape}")
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local_BX)


def put_global(x, sharding: NamedSharding) -> jax.Array:
    """A global array from host data that every process holds in full and identically (a batch
    all processes drew from the same seeded pipeline, a counter): each process places just the
    shards its own devices hold. Single-process it is a plain sharded device_put."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)


def put_batch(x, mesh: Mesh, rules) -> jax.Array:
    """`put_global` of host data with a leading batch axis, sharded as `rules` map "batch"."""
    x = np.asarray(x)
    return put_global(x, NamedSharding(mesh, rules.spec(("batch",) + (None,) * (x.ndim - 1))))


def global_to_host(x: jax.Array) -> np.ndarray:
    """The whole of `x` as numpy on every process (an all-gather across processes when `x` is
    not fully addressable; a plain device-to-host copy otherwise). Collective: all processes call it."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _mesh_rows(global_batch: int, mesh: Mesh, spec: PartitionSpec) -> slice:
    """The contiguous row range this process's devices hold under NamedSharding(mesh, spec)."""
    sharding = NamedSharding(mesh, PartitionSpec(spec[0] if len(spec) else None))
    idx = sharding.addressable_devices_indices_map((global_batch,)).values()
    rows = sorted({r for (s,) in idx for r in range(*s.indices(global_batch))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"this process's batch rows under {spec} on the mesh are not contiguous: {rows}")
    return slice(rows[0], rows[-1] + 1)


def process_batch_slice(global_batch: int, mesh: Mesh | None = None, spec: PartitionSpec | None = None) -> slice:
    """The rows of a global batch this process feeds to `host_local_to_global`.

    Without a mesh: an even split in process order (process i gets rows [i*B/n, (i+1)*B/n)),
    which is what a mesh from `build_mesh` over jax.devices() with the batch sharded over its
    leading axes gives. With mesh and spec: read off the sharding itself (exact for any layout,
    including processes that are replicas of each other)."""
    if mesh is not None:
        return _mesh_rows(global_batch, mesh, spec if spec is not None else PartitionSpec())
    n, i = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by the {n} processes")
    per = global_batch // n
    return slice(i * per, (i + 1) * per)


__all__ = [
    "DistributedConfig",
    "DistributedConfigError",
    "ENV_VARS",
    "TPU_ENV_VARS",
    "initialize",
    "plan",
    "resolve_config",
    "is_cloud_tpu_env",
    "host_local_to_global",
    "put_global",
    "put_batch",
    "global_to_host",
    "process_batch_slice",
]
