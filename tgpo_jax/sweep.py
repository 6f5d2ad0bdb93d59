"""`tgpo-jax sweep configs/sweeps/<name>.yaml`: a grid or a list of overrides -> named runs.

A sweep file (yaml.safe_load):

    name: teacher_ladder_1p5b
    base: {preset: qwen2.5-math-1.5b__qwen2.5-math-7b-instruct, hardware: v5p-8}  # or {config: FILE.yaml}
    run_root: gs://BUCKET/tgpo/sweeps/teacher_ladder_1p5b   # run_dir of each run = run_root/<run name>
    overrides: {train.iterations: 300}                      # applied to every run (optional)
    grid: {preset: [...], objective.name: [tgpo_reg, rkl]}  # cartesian product, or:
    runs: [{name: tgpo, overrides: {objective.name: tgpo_reg}}, ...]

Grid and run keys are dotted TrainConfig keys; `preset` and `hardware` pick another preset or
hardware for that run. A grid run's name joins its values ("tgpo_reg", "lr1e-06", the preset name).
Modes: run locally one after another (default); `--tpu NAME` prints one `launch/tpu.sh run` command
per run; `--dry-run` prints the plan only; `--summary` only collects the final metrics of the runs
it finds into run_root/summary.md and summary.json (also written after a local sweep).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shlex
from typing import Any

from tgpo_jax import paths
from tgpo_jax.configtree import ConfigError, load_yaml
from tgpo_jax.presets import render, set_dotted

SWEEP_KEYS = ("name", "base", "run_root", "overrides", "grid", "runs", "summary_metrics")
SPECIAL = ("preset", "hardware")
SUMMARY_METRICS = (
    "reward/mean",
    "eval/score",
    "loss/total",
    "gap/reverse_kl_k1",
    "gap/mismatch_ratio",
    "response/length_mean",
)


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    run_dir: str
    preset: str | None
    hardware: str | None
    config: str | None
    overrides: dict  # dotted key -> value (common overrides first, then the run's own)

    def train_dict(self) -> dict:
        d = render(self.preset, self.hardware) if self.preset else load_yaml(self.config)
        for k, v in self.overrides.items():
            set_dotted(d, k, v)
        d["run_dir"] = self.run_dir
        return d

    def override_args(self) -> list[str]:
        """key=value strings, values in YAML flow style (what `tgpo-jax train` parses back)."""
        return [f"{k}={_yaml_value(v)}" for k, v in self.overrides.items()]


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    path: str
    run_root: str
    runs: tuple[Run, ...]
    summary_metrics: tuple[str, ...]


def _yaml_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v).lower() if isinstance(v, bool) else str(v)


def _name_part(key: str, value: Any) -> str:
    text = str(value) if isinstance(value, str) or key in SPECIAL else f"{key.split('.')[-1]}{value}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _expand(d: dict, where: str) -> list[tuple[str, dict]]:
    if ("grid" in d) == ("runs" in d):
        raise ConfigError(f"{where}: give exactly one of `grid` (a mapping key -> list of values) or `runs` (a list)")
    if "grid" in d:
        grid = d["grid"]
        if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
            raise ConfigError(f"{where}: grid must map each dotted key to a non-empty list of values; got {grid!r}")
        keys = list(grid)
        return [
            ("_".join(_name_part(k, v) for k, v in zip(keys, combo)), dict(zip(keys, combo)))
            for combo in itertools.product(*grid.values())
        ]
    runs = d["runs"]
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{where}: runs must be a non-empty list of {{name: ..., overrides: {{...}}}}")
    out = []
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or set(r) - {"name", "overrides"}:
            raise ConfigError(f"{where}: runs[{i}] must be {{name: <str>, overrides: {{key: value}}}}; got {r!r}")
        out.append((r["name"], dict(r.get("overrides") or {})))
    return out


def load_sweep(path: str, run_root: str | None = None) -> Sweep:
    d = load_yaml(path)
    unknown = sorted(set(d) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SWEEP_KEYS)}")
    base = d.get("base") or {}
    if (
        not isinstance(base, dict)
        or ("config" in base) == ("preset" in base)
        or set(base) - {"config", "preset", "hardware"}
    ):
        raise ConfigError(f"{path}: base must be {{preset: NAME, hardware: HW}} or {{config: FILE.yaml}}; got {base!r}")
    root = run_root or d.get("run_root") or f"runs/sweeps/{d.get('name') or 'sweep'}"
    common = dict(d.get("overrides") or {})
    runs = []
    for name, over in _expand(d, path):
        merged = {**common, **over}
        preset = merged.pop("preset", base.get("preset"))
        hw = merged.pop("hardware", base.get("hardware"))
        if preset and not hw:
            raise ConfigError(f"{path}: run {name!r} uses preset {preset!r} but names no hardware")
        runs.append(Run(name, paths.join(root, name), preset, hw, None if preset else base.get("config"), merged))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: run names repeat: {', '.join(dup)}; give the runs distinct names")
    return Sweep(d.get("name") or "sweep", path, root, tuple(runs), tuple(d.get("summary_metrics") or SUMMARY_METRICS))


def validate_runs(sweep: Sweep) -> None:
    """Every run's config validates before anything starts (errors name the run)."""
    from tgpo_jax.train.config import load_train_config

    for r in sweep.runs:
        try:
            load_train_config(r.train_dict())
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"sweep run {r.name!r}: {e}") from None


# ------------------------------------------------------------------------------------------ plan
def tpu_command(run: Run, tpu: str, zone: str | None = None) -> str:
    """The launch/tpu.sh line that starts `run` on TPU VM `tpu` (babysat: recreated and resumed
    after a preemption)."""
    cmd = ["bash", "launch/tpu.sh", "babysit", "--name", tpu]
    if zone:
        cmd += ["--zone", zone]
    cmd += ["--preset", run.preset, "--hardware", run.hardware] if run.preset else ["--config", run.config]
    cmd += ["--run-dir", run.run_dir]
    if run.overrides:
        cmd += ["--", *run.override_args()]
    return shlex.join(cmd)


def format_plan(sweep: Sweep, tpu: str | None = None, zone: str | None = None) -> str:
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} runs under {sweep.run_root}"]
    for i, r in enumerate(sweep.runs, 1):
        base = f"preset {r.preset} on {r.hardware}" if r.preset else f"config {r.config}"
        over = " ".join(r.override_args()) or "(no overrides)"
        lines.append(f"  {i:>2}. {r.name:<28} {base}; {over}")
        lines.append(f"      run_dir {r.run_dir}")
    if tpu:
        lines.append("launch commands (one TPU VM per run: append a suffix to --name to run them in parallel):")
        lines += [tpu_command(r, f"{tpu}-{i}", zone) for i, r in enumerate(sweep.runs, 1)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ run
def run_local(sweep: Sweep, train_fn=None) -> dict[str, str]:
    """Runs every run one after another (each resumes if its run_dir holds checkpoints);
    a failing run is reported and the sweep goes on. Returns {run name: 'ok' | error}."""
    from tgpo_jax.train.config import load_train_config

    if train_fn is None:
        from tgpo_jax.train.loop import train as train_fn
    status = {}
    for i, r in enumerate(sweep.runs, 1):
        print(f"[sweep] run {i}/{len(sweep.runs)}: {r.name} -> {r.run_dir}", flush=True)
        try:
            train_fn(load_train_config(r.train_dict()))
            status[r.name] = "ok"
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the sweep
            status[r.name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"[sweep] run {r.name} failed: {status[r.name]}", flush=True)
    return status


# ------------------------------------------------------------------------------------------ summary
def final_metrics(run_dir: str) -> dict | None:
    """The last record of run_dir/metrics.jsonl, plus best/eval_score over the run; None if absent."""
    path = paths.join(run_dir, "metrics.jsonl")
    if not paths.exists(path):
        return None
    from tgpo_jax.train.metrics import read_jsonl

    rows = read_jsonl(path)  # a partial last line (a run stopped mid-write) is skipped, not fatal
    if not rows:
        return None
    out = dict(rows[-1])
    evals = [r["eval/score"] for r in rows if isinstance(r.get("eval/score"), (int, float))]
    if evals:
        out["best/eval_score"] = max(evals)
    return out


def summarize(sweep: Sweep, status: dict[str, str] | None = None) -> tuple[str, list[dict]]:
    """A Markdown table (one row per run found) and the rows; written to run_root/summary.md / .json."""
    cols = ["iteration", *sweep.summary_metrics, "best/eval_score"]
    rows = []
    for r in sweep.runs:
        m = final_metrics(r.run_dir)
        row = {"run": r.name, "status": (status or {}).get(r.name, "found" if m else "not found")}
        row.update({c: (m or {}).get(c) for c in cols})
        rows.append(row)
    head = ["run", "status", *cols]
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(row[h]).replace("|", "/") for h in head) + " |" for row in rows]
    table = "\n".join(lines)
    found = [row for row in rows if row["iteration"] is not None]
    if found:
        paths.makedirs(sweep.run_root)
        paths.write_text(paths.join(sweep.run_root, "summary.md"), f"# Sweep {sweep.name}\n\n{table}\n")
        paths.write_text(paths.join(sweep.run_root, "summary.json"), json.dumps(rows, indent=2))
    return table, rows


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(p) -> None:
    p.add_argument("sweep", help="sweep YAML (configs/sweeps/<name>.yaml)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (and launch commands with --tpu); run nothing"
    )
    p.add_argument(
        "--tpu",
        default=None,
        metavar="NAME",
        help="print one launch/tpu.sh command per run (TPU VM names NAME-1, NAME-2, ...) instead of running locally",
    )
    p.add_argument("--zone", default=None, help="zone for the printed TPU commands")
    p.add_argument("--run-root", default=None, help="override the sweep's run_root (a local path or gs:// URL)")
    p.add_argument("--summary", action="store_true", help="only collect the final metrics of the runs found")


def main(args) -> int:
    sweep = load_sweep(args.sweep, run_root=args.run_root)
    validate_runs(sweep)
    if args.dry_run or args.tpu:
        print(format_plan(sweep, args.tpu, args.zone))
        return 0
    status = None
    if not args.summary:
        print(format_plan(sweep), flush=True)
        status = run_local(sweep)
    table, _ = summarize(sweep, status)
    print(table)
    failed = [k for k, v in (status or {}).items() if v != "ok"]
    return 1 if failed else 0
