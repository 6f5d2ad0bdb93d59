"""TPU devices to compile for, without a TPU: `libtpu` (the `tpu-aot` extra) describes a slice's
topology to a CPU-only process, and jit(...).lower(...).compile() then runs the real TPU compiler.

A slice is named either as in presets.HARDWARE (`v5p-8`) or as a topology (`v5p:2x2x1`). The chip
configuration and chips per host follow Cloud TPU's: v4 and v5p run one JAX device per chip
("megacore"), 4 chips per host; v5e and v6e one device per chip, up to 8 chips per host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re

from tgpo_jax.configtree import ConfigError

DEFAULT_HEADROOM = 0.90  # the share of HBM a run may plan for (the runtime and fragmentation take the rest)
INSTALL_HINT = 'pip install -e ".[tpu-aot]"  (installs libtpu, the TPU compiler, pinned to jax\'s version)'


class AotUnavailable(RuntimeError):
    """The TPU compiler (libtpu) is not installed in this environment."""


@dataclasses.dataclass(frozen=True)
class Generation:
    chip_config: str  # libtpu's chip_config_name
    chips_per_host: tuple[int, int, int]
    hbm_gib: float  # per JAX device


GENERATIONS = {
    "v4": Generation("megacore", (2, 2, 1), 32.0),
    "v5p": Generation("megacore", (2, 2, 1), 95.0),
    "v5e": Generation("default", (2, 4, 1), 16.0),
    "v6e": Generation("default", (2, 4, 1), 32.0),
}
# presets.HARDWARE name -> topology
HARDWARE_TOPOLOGY = {"v4-8": "v4:2x2x1", "v5e-8": "v5e:2x4", "v5p-8": "v5p:2x2x1", "v4-32": "v4:2x2x4"}
_TOPOLOGY = re.compile(r"^(v4|v5p|v5e|v6e):(\d+)x(\d+)(?:x(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # e.g. v5p:2x2x1
    generation: str
    dims: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.dims)

    @property
    def hbm_gib(self) -> float:
        return GENERATIONS[self.generation].hbm_gib

    @property
    def accelerator_type(self) -> str:
        """gcloud's name of the slice (v4 and v5p count TensorCores, two per chip)."""
        prefix, per_chip = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5e": ("v5litepod", 1), "v6e": ("v6e", 1)}[
            self.generation
        ]
        return f"{prefix}-{self.chips * per_chip}"

    def chips_per_host(self) -> tuple[int, int, int]:
        g = GENERATIONS[self.generation]
        dims = (self.dims + (1, 1, 1))[:3]
        if self.chips <= math.prod(g.chips_per_host):  # one host: its bounds are the slice's
            return dims
        return g.chips_per_host


def parse_topology(name: str) -> Topology:
    """`v5p-8` (a presets.HARDWARE name) or `v5p:2x2x1`; anything else is a ConfigError listing both forms."""
    topo = HARDWARE_TOPOLOGY.get(name, name)
    m = _TOPOLOGY.match(topo)
    if not m:
        raise ConfigError(
            f"unknown TPU topology {name!r}; accepted: a hardware name ({', '.join(HARDWARE_TOPOLOGY)}) or "
            f"<generation>:<dims> with generation one of {', '.join(GENERATIONS)} (e.g. v5p:2x2x1, v5e:2x4, v6e:4x4)"
        )
    dims = tuple(int(d) for d in m.groups()[1:] if d is not None)
    return Topology(topo, m.group(1), dims)


@contextlib.contextmanager
def _compile_only_env(topology: Topology):
    """libtpu reads a TPU VM's metadata when it starts; elsewhere it prints a page of warnings.
    Compile-only use needs none of it, so the slice is described in the environment while libtpu
    starts (values already set are kept), and the environment restored after: left set, these
    variables would make the rest of the process believe it runs on a Cloud TPU VM
    (sharding.distributed.is_cloud_tpu_env). ALLOW_MULTIPLE_LIBTPU_LOAD: nothing holds a chip,
    so several processes may compile at once (libtpu's lockfile would refuse the second)."""
    values = {
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_ACCELERATOR_TYPE": topology.accelerator_type,
    }
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def tpu_devices(topology: Topology) -> list:
    """The JAX devices of `topology` (compile-only: nothing runs on them)."""
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise AotUnavailable(f"compiling for a TPU needs the TPU compiler, libtpu: {INSTALL_HINT}") from e
    from jax.experimental import topologies

    with _compile_only_env(topology):
        desc = topologies.get_topology_desc(
            topology_name=topology.name,
            platform="tpu",
            chip_config_name=GENERATIONS[topology.generation].chip_config,
            chips_per_host_bounds=topology.chips_per_host(),
            num_slices=1,
        )
    return list(desc.devices)
