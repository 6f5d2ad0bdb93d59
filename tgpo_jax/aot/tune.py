"""Prompts per iteration and micro-batch of a preset entry, chosen by the TPU compiler: the largest
that fit the device with the headroom. `tgpo-jax preset tune NAME HW`.

The rollout programs (rollout, eval_rollout) depend on the prompts per iteration alone; scoring and
the train step on the micro-batch (at a given mini-batch). So the prompts are searched first,
compiling only the rollouts, then the micro-batch at those prompts, compiling score and train step:
each a walk from the preset's current value, doubling while it fits (up to the paper's setting) or
halving until it does.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

from tgpo_jax.aot.compile import compile_run
from tgpo_jax.aot.topology import DEFAULT_HEADROOM, parse_topology

MAX_PROMPTS = 128  # the paper's prompts per iteration
MAX_MICRO_BATCH = 16


@dataclasses.dataclass
class TuneResult:
    prompts: int | None  # None: not even the smallest batch fits
    micro_batch: int | None
    tried: list[tuple[str, int, bool, float]]  # (what, value, fits, largest program total GiB)
    summary: dict | None = None  # CompileReport.summary() of every program at the chosen values


def _walk(start: int, lo: int, hi: int, fits: Callable[[int], bool], valid: Callable[[int], bool]) -> int | None:
    """The largest power-of-two multiple or fraction of `start` in [lo, hi] for which `fits` holds,
    found by doubling from a fitting start or halving from a failing one (`valid` filters values)."""
    v = start
    if fits(v):
        while v * 2 <= hi and valid(v * 2) and fits(v * 2):
            v *= 2
        return v
    while v // 2 >= lo:
        v //= 2
        if valid(v) and fits(v):
            return v
    return None


def tune_entry(name: str, hw: str, headroom: float = DEFAULT_HEADROOM, log=print) -> TuneResult:
    from tgpo_jax.configtree import apply_overrides
    from tgpo_jax.presets import bundled_hf_config, hardware, load_preset, render
    from tgpo_jax.train.config import load_train_config

    preset, topo, hosts = load_preset(name), parse_topology(hw), hardware(hw).hosts
    base = render(preset, hw, allow_unsupported=True)
    student = bundled_hf_config(preset.student, preset.student_context)
    teacher = bundled_hf_config(preset.teacher) if preset.teacher else None
    tried: list[tuple[str, int, bool, float]] = []
    reports: dict[tuple[str, int], object] = {}

    def check(overrides: list[str], only: tuple[str, ...], what: str, value: int) -> bool:
        try:
            cfg = load_train_config(apply_overrides(copy.deepcopy(base), overrides))
        except Exception as e:  # a value the config rejects (micro-batch not dividing, ...)
            log(f"  {what}={value}: not a valid config ({e})")
            return False
        report = reports[what, value] = compile_run(cfg, student, teacher, topo, headroom=headroom, only=only)
        worst = max((p.total_bytes for p in report.programs), default=0) / 1024**3
        ok = report.all_fit
        tried.append((what, value, ok, worst))
        log(f"  {what}={value}: {'fits' if ok else 'does not fit'} (largest {worst:.2f} GiB)")
        return ok

    shards = _batch_shards(base, hardware(hw).devices)
    m0 = max(int(base.get("train", {}).get("micro_batch", 1)), shards)
    p0 = int(base.get("rollout", {}).get("prompts_per_iteration", 1))
    prompts = _walk(
        p0,
        hosts,
        MAX_PROMPTS,
        lambda p: check([f"rollout.prompts_per_iteration={p}", "train.micro_batch=1"], _ROLLOUTS, "prompts", p),
        lambda p: p % hosts == 0,
    )
    if prompts is None:
        return TuneResult(None, None, tried)
    rows = prompts * int(base.get("rollout", {}).get("n", 8)) // int(base.get("train", {}).get("mini_batches", 2))
    # A micro-batch smaller than the batch shards leaves devices computing the same rows (the same
    # memory per device, a fraction of the work): never chosen.
    micro = _walk(
        min(m0, rows),
        shards,
        min(MAX_MICRO_BATCH, rows),
        lambda m: check([f"rollout.prompts_per_iteration={prompts}", f"train.micro_batch={m}"], _STEPS, "micro", m),
        lambda m: rows % m == 0 and m % shards == 0,
    )
    if micro is None:
        return TuneResult(prompts, None, tried)
    summary = reports["prompts", prompts].summary()
    steps = reports["micro", micro].summary()
    summary["programs"] = {**summary["programs"], **steps["programs"]}
    summary["fits"] = summary["fits"] and steps["fits"]
    return TuneResult(prompts, micro, tried, summary)


_ROLLOUTS = ("rollout", "eval_rollout")
_STEPS = ("score", "train_step")


def _batch_shards(cfg: dict, devices: int) -> int:
    """Devices the batch is split over in a rendered config: the mesh axes the student's rules map
    `batch` to (data and fsdp by default)."""
    from tgpo_jax.sharding.mesh import MeshConfig
    from tgpo_jax.sharding.rules import ShardingRules

    sharding = cfg.get("sharding", {})
    mesh = MeshConfig.from_dict(sharding.get("mesh", dict(MeshConfig().axes)))
    sizes = dict(zip(mesh.names, mesh.resolve(devices), strict=True))
    axes = ShardingRules.from_dict(sharding.get("student_rules")).spec(("batch",))[0]
    names = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(sizes.get(a, 1) for a in names)


def write_entry(path: str, hw: str, values: dict[str, int]) -> None:
    """Sets `key: value` lines of the `hw:` block under `hardware:` in a preset YAML, in place
    (comments and layout kept); a key the block lacks is added at its end."""
    with open(path) as f:
        lines = f.read().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.rstrip() == f"  {hw}:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i].startswith("    ")), None)
    end = len(lines) if end is None else end
    for key, value in values.items():
        hit = [i for i in range(start + 1, end) if lines[i].strip().startswith(f"{key}:")]
        if hit:
            lines[hit[0]] = f"    {key}: {value}"
        else:
            lines.insert(end, f"    {key}: {value}")
            end += 1
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
