"""`tgpo-jax experiment divergence | hard`: the paper's claims in miniature, on CPU.

`divergence` (configs/experiment_divergence.yaml) tests the central claim across a teacher ladder;
`hard` (configs/experiment_hard.yaml) runs the same machinery in the regime where the student rarely
succeeds (two-digit sums, a weak student), with coefficients tuned on a validation split. Both are
this module; only their configs differ.

One student (style B, see tgpo_jax/tasks/chain_sum.py) and a ladder of teachers made by `sft` that write
style A on a growing share of their training problems (style_b_frac 1 -> 0: same style, partly
different, very different). Every method x teacher x seed cell is a plain `tgpo-jax train` run of
the base config (configs/demo.yaml) with the cell's objective, seed and teacher; GRPO has no
teacher and runs once per seed. The divergence of a teacher is measured on the student's own
rollouts at iteration 1 (before any update): gap/reverse_kl_k1 and gap/mismatch_ratio.

Tuning (`tune`, optional): for each listed method, candidate override lists (e.g. other
lambda_0) run first on `tune_seeds` with the validation split (TaskSpec.validation) as the eval
set; per (method, teacher) the candidate with the best mean final VALIDATION accuracy becomes the
method's `@tuned` arm, run on `seeds` and reported on the held-out split like the others. Nothing is
chosen from held-out numbers.

Cells are cached: a cell whose run directory holds a finished `cell.json` with the same key is not
rerun, so an interrupted experiment resumes where it stopped (a cell cut off mid-run is redone).
Orchestration only: the report (table, plots) is written by tgpo_jax/experiments/report.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

from tgpo_jax.bundled import resolve_config
from tgpo_jax.configtree import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from tgpo_jax.demo import DEFAULT_CONFIG
from tgpo_jax.demo_dirs import digest, file_digest
from tgpo_jax.objectives.registry import ObjectiveConfig, get_objective
from tgpo_jax.tasks.chain_sum import TaskSpec, make_task_data, validation_path
from tgpo_jax.train.sft_cache import SFTSpec, heldout_accuracy, sft_model

METHODS = ("grpo", "rkl", "kdrl", "tgpo_reg", "tgpo_adv")  # the ones the report knows how to label
CELL_FILE = "cell.json"
INTERVALS = ("std", "ci95")  # the spread reported next to a mean over seeds
TUNED = "tuned"  # the arm of a method run with its validation-chosen candidate


@dataclasses.dataclass(frozen=True)
class TeacherRung:
    name: str
    style_b_frac: float  # share of its SFT problems solved in the STUDENT's style (1 = same style)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "divergence"  # the log prefix and the report's title
    out_dir: str = "runs/divergence"
    base_config: str = ""  # a `tgpo-jax train` config; "" = configs/demo.yaml
    task: TaskSpec = TaskSpec()
    student: SFTSpec = SFTSpec(style_b_frac=1.0, seed=1, hidden_size=64, intermediate_size=192, head_dim=16, steps=400)
    teacher: SFTSpec = SFTSpec(style_b_frac=0.0, hidden_size=128, intermediate_size=384, head_dim=32, steps=500)
    teachers: tuple[TeacherRung, ...] = (
        TeacherRung("same_style", 1.0),
        TeacherRung("partly_different", 0.5),
        TeacherRung("very_different", 0.0),
    )
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    train_overrides: tuple[str, ...] = ()  # key=value on the base config, for every cell
    method_overrides: dict = dataclasses.field(default_factory=dict)  # method -> [key=value, ...]
    quick: dict = dataclasses.field(default_factory=dict)  # merged over this config by --quick (`tune`: replaced)
    # A named variant (e.g. another lambda) reuses the data and SFT models of out_dir but keeps its
    # own cells (cells/<cell>__<variant>) and report (variants/<variant>/).
    variant: str = ""
    # variants bundled with the config: `variant=NAME` with NAME here applies variants[NAME]
    # (each of its keys replaces the config's whole value), then the command's other overrides
    variants: dict = dataclasses.field(default_factory=dict)
    interval: str = "std"  # std: mean ± std over seeds; ci95: mean ± the 95% t-interval half-width
    # method -> candidate override lists, tried on tune_seeds against the validation split; the best
    # (mean final validation accuracy, per teacher) is run on `seeds` as the arm <method>@tuned
    tune: dict = dataclasses.field(default_factory=dict)
    tune_seeds: tuple[int, ...] = ()
    # write the report from the finished cells only (nothing is trained; SFT models must exist):
    # an interim report while a run is going, from another shell
    report_only: bool = False

    @property
    def report_dir(self) -> str:
        return os.path.join(self.out_dir, "variants", self.variant) if self.variant else self.out_dir


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _with_variant(d: dict, overrides: list[str]) -> dict:
    """d with the overrides applied, over the bundled variant they name (if any): its keys replace
    the config's values whole (a variant's `tune: {}` empties the tuning, not a merge), and the
    command's overrides still come last."""
    out = apply_overrides(d, overrides)
    bundled = out.get("variants") or {}
    name = out.get("variant") or ""
    if name not in bundled:
        return out
    if not isinstance(bundled[name], dict):
        raise ConfigError(f"variants.{name}: expected a mapping of config keys, got {bundled[name]!r}")
    if "variants" in bundled[name] or "variant" in bundled[name]:
        raise ConfigError(f"variants.{name}: a variant cannot set 'variant' or 'variants'")
    return apply_overrides({**d, **bundled[name]}, overrides)


def load_experiment_config(
    path: str, *, quick: bool = False, out_dir: str | None = None, overrides=()
) -> ExperimentConfig:
    """The typed config (unknown keys -> error listing the valid ones), checked before any work.
    `overrides`: key.path=value strings applied last (after the quick section)."""
    from tgpo_jax.objectives.registry import OBJECTIVES

    d = load_yaml(path) or {}
    if quick:
        q = d.get("quick") or {}
        d = _merge(d, q)
        if "tune" in q:  # the quick tuning replaces the full one (a merge would keep every method's)
            d["tune"] = q["tune"]
    d = _with_variant(d, list(overrides))
    if out_dir:
        d["out_dir"] = out_dir
    cfg = from_dict(ExperimentConfig, d)
    problems = [
        f"methods: unknown objective {m!r}; accepted: {', '.join(OBJECTIVES)}"
        for m in cfg.methods
        if m not in OBJECTIVES
    ]
    problems += [
        f"method_overrides: {m!r} is not in methods {list(cfg.methods)}"
        for m in cfg.method_overrides
        if m not in cfg.methods
    ]
    names = [t.name for t in cfg.teachers]
    if len(set(names)) != len(names) or not names:
        problems.append(f"teachers: need at least one, with distinct names; got {names}")
    problems += [
        f"teachers.{t.name}.style_b_frac must be in [0, 1]; got {t.style_b_frac}"
        for t in cfg.teachers
        if not 0.0 <= t.style_b_frac <= 1.0
    ]
    if not cfg.seeds:
        problems.append("seeds: need at least one")
    if cfg.interval not in INTERVALS:
        problems.append(f"interval: {cfg.interval!r}; accepted: {', '.join(INTERVALS)}")
    for m, cands in cfg.tune.items():
        if m not in cfg.methods:
            problems.append(f"tune: {m!r} is not in methods {list(cfg.methods)}")
        elif not get_objective(m).needs_teacher:
            problems.append(f"tune: {m!r} has no teacher coefficient to tune")
        if not isinstance(cands, list) or not cands or not all(isinstance(c, list) for c in cands):
            problems.append(
                f"tune.{m}: a non-empty list of candidate override lists, e.g. [[], [objective.lambda_0=0.02]]"
            )
    if cfg.tune and not cfg.tune_seeds:
        problems.append("tune_seeds: need at least one when tune is set")
    if cfg.tune and set(cfg.tune_seeds) & set(cfg.seeds):
        problems.append(f"tune_seeds {list(cfg.tune_seeds)} must differ from seeds {list(cfg.seeds)}")
    if cfg.tune and not cfg.task.validation:
        problems.append("task.validation: tuning needs a validation split (e.g. validation: 128)")
    base = resolve_config(cfg.base_config or DEFAULT_CONFIG)
    if not os.path.isfile(base):
        problems.append(f"base_config: file not found: {base}")
    if problems:
        raise ConfigError("invalid experiment config:\n  " + "\n  ".join(problems))
    return cfg


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    teacher: str | None  # None: GRPO (no teacher)
    seed: int
    arm: str = ""  # "": the method's default coefficients; "tuned"; "c<i>": tuning candidate i
    split: str = "heldout"  # the eval set: heldout | validation (tuning cells)

    @property
    def label(self) -> str:
        """The row of the report: the method, or <method>@<arm>."""
        return f"{self.method}@{self.arm}" if self.arm else self.method

    @property
    def name(self) -> str:
        prefix = "val__" if self.split == "validation" else ""
        return f"{prefix}{self.label}__{self.teacher or 'no_teacher'}__seed{self.seed}"


def cells(cfg: ExperimentConfig, tuned: dict | None = None) -> list[Cell]:
    """GRPO once per seed; every other method once per teacher and seed; with `tuned` (the tuning's
    choice, see choose_tuned) also every tuned method as the arm <method>@tuned."""
    out = []
    for seed in cfg.seeds:
        for m in cfg.methods:
            teachers = [t.name for t in cfg.teachers] if get_objective(m).needs_teacher else [None]
            out += [Cell(m, t, seed) for t in teachers]
            if tuned and m in cfg.tune:
                out += [Cell(m, t, seed, arm=TUNED) for t in teachers]
    return out


def tuning_cells(cfg: ExperimentConfig) -> list[Cell]:
    """Every tuning candidate x teacher x tune seed, evaluated on the validation split."""
    return [
        Cell(m, t.name, seed, arm=f"c{i}", split="validation")
        for seed in cfg.tune_seeds
        for m, cands in cfg.tune.items()
        for i in range(len(cands))
        for t in cfg.teachers
    ]


def arm_overrides(cfg: ExperimentConfig, cell: Cell, tuned: dict | None = None) -> list[str]:
    """The overrides a cell's arm adds: a tuning candidate's, or the tuned choice's for its teacher."""
    if cell.arm.startswith("c") and cell.arm[1:].isdigit():
        return list(cfg.tune[cell.method][int(cell.arm[1:])])
    if cell.arm == TUNED:
        return list(cfg.tune[cell.method][tuned[cell.method][cell.teacher]["candidate"]])
    return []


def choose_tuned(cfg: ExperimentConfig, results: list[dict]) -> dict:
    """{method: {teacher: {"candidate": i, "overrides": [...], "validation": {i: mean final
    validation accuracy}}}}: the best candidate per method and teacher (ties: the earlier one)."""
    from tgpo_jax.experiments.report import final_accuracy

    scores: dict = {}
    for r in results:
        i = int(r["arm"][1:])
        fa = final_accuracy(r["records"])
        if fa is not None:
            scores.setdefault(r["method"], {}).setdefault(r["teacher"], {}).setdefault(i, []).append(fa)
    out: dict = {}
    for m, cands in cfg.tune.items():
        for t in cfg.teachers:
            means = {i: statistics.fmean(v) for i, v in sorted(scores.get(m, {}).get(t.name, {}).items())}
            best = max(means, key=lambda i: (means[i], -i)) if means else 0
            out.setdefault(m, {})[t.name] = {"candidate": best, "overrides": list(cands[best]), "validation": means}
    return out


def cell_train_dict(
    cfg: ExperimentConfig,
    cell: Cell,
    student: str,
    teacher: str | None,
    train_path: str,
    heldout_path: str,
    extra_overrides=(),
) -> dict:
    d = load_yaml(cfg.base_config or DEFAULT_CONFIG)
    d["run_dir"] = os.path.join(cfg.out_dir, "cells", cell.name + (f"__{cfg.variant}" if cfg.variant else ""))
    d.setdefault("models", {}).update(student=student, teacher=teacher or "")
    d.setdefault("data", {})["files"] = [train_path]
    d.setdefault("eval", {}).setdefault("data", {})["files"] = [heldout_path]
    base_objective = d.setdefault("objective", {}).get("name", ObjectiveConfig.name)
    d["objective"]["name"] = cell.method
    for k in ("lambda_0", "lambda_decay", "lambda_min"):  # the base objective's schedule is not the others'
        if cell.method != base_objective:
            d["objective"].pop(k, None)
    d.setdefault("train", {})["seed"] = cell.seed
    d.setdefault("checkpoint", {}).update(every=0, resume=False)
    d.setdefault("logging", {}).update(progress=False, tensorboard=False, plot=False)
    overrides = list(cfg.train_overrides) + list(cfg.method_overrides.get(cell.method, [])) + list(extra_overrides)
    return apply_overrides(d, overrides)


def _cell_key(train_dict: dict) -> str:
    return digest(
        {
            "train": train_dict,
            "models": [
                file_digest(os.path.join(p, "model.safetensors"))
                for p in (train_dict["models"]["student"], train_dict["models"]["teacher"])
                if p
            ],
        }
    )


def cached_cell(train_dict: dict) -> dict | None:
    """The finished result of a cell with this exact key, or None."""
    done = os.path.join(train_dict["run_dir"], CELL_FILE)
    try:
        with open(done) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return dict(saved, cached=True) if saved.get("key") == _cell_key(train_dict) else None


def run_cell(cfg: ExperimentConfig, cell: Cell, train_dict: dict, log=print) -> dict | None:
    """Trains one cell (or returns its cached result); the result holds the metrics records.
    cfg.report_only: None for a cell that has not finished (nothing is trained)."""
    from tgpo_jax.train.config import load_train_config
    from tgpo_jax.train.loop import train
    from tgpo_jax.train.metrics import read_jsonl

    run_dir = train_dict["run_dir"]
    saved = cached_cell(train_dict)
    if saved is not None or cfg.report_only:
        return saved
    key = _cell_key(train_dict)
    tcfg = load_train_config(train_dict)
    if os.path.isdir(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    train(tcfg)
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    result = {
        "key": key,
        **dataclasses.asdict(cell),
        "label": cell.label,
        "seconds": time.perf_counter() - t0,
        "records": records,
    }
    with open(os.path.join(run_dir, CELL_FILE), "w") as f:
        json.dump(result, f)
    return result


def prepare_models(cfg: ExperimentConfig, log=print) -> tuple[str, str, str, dict[str, str]]:
    """(train.jsonl, heldout.jsonl, student HF dir, {teacher name: HF dir}); SFT models cached."""
    train_path, heldout_path, stats = make_task_data(cfg.out_dir, cfg.task)
    log(
        f"[{cfg.name}] chain_sum: {stats['train']} train / {stats['heldout']} held-out"
        + (f" / {stats['validation']} validation" if stats.get("validation") else "")
        + " problems"
    )
    # the prompt settings of the cells (base config + train_overrides): the SFT models see the same prompts
    base = apply_overrides(load_yaml(cfg.base_config or DEFAULT_CONFIG), list(cfg.train_overrides))
    data_section = {k: v for k, v in (base.get("data") or {}).items() if k != "files"}
    if cfg.report_only:
        names = ["student"] + [f"teacher_{r.name}" for r in cfg.teachers]
        missing = [n for n in names if not os.path.isfile(os.path.join(cfg.out_dir, n, "hf", "config.json"))]
        if missing:
            raise ConfigError(f"report_only: no SFT model yet for {', '.join(missing)} under {cfg.out_dir}")
    student, _ = sft_model(cfg.out_dir, "student", cfg.student, train_path, data_section, log)
    teachers = {}
    for rung in cfg.teachers:
        spec = dataclasses.replace(cfg.teacher, style_b_frac=rung.style_b_frac)
        teachers[rung.name], _ = sft_model(cfg.out_dir, f"teacher_{rung.name}", spec, train_path, data_section, log)
    return train_path, heldout_path, student, teachers


def sft_accuracies(
    cfg: ExperimentConfig, cell: Cell, student: str, teachers: dict[str, str], train_path: str, heldout_path: str
) -> dict:
    """Held-out accuracy of the SFT student and teachers with the cells' eval settings (cached)."""
    from tgpo_jax.train.config import load_train_config

    tcfg = load_train_config(cell_train_dict(cfg, cell, student, None, train_path, heldout_path))
    return {
        "student": heldout_accuracy(student, heldout_path, tcfg),
        "teachers": {t: heldout_accuracy(p, heldout_path, tcfg) for t, p in teachers.items()},
    }


def enable_compile_cache(path: str) -> None:
    """JAX's persistent compilation cache: the cells share most shapes (same models, batch and
    lengths), so every cell after the first of its kind loads its executables instead of compiling."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class _Progress:
    """One bar over all cells of the experiment (with an ETA) on stderr; log lines print above it."""

    def __init__(self, total: int, enabled: bool, log):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="cells", unit="cell", disable=not enabled, dynamic_ncols=True)
        self.log = (lambda msg: self.bar.write(str(msg))) if enabled and log is print else log

    def done(self, cached: bool):
        if cached:  # cached cells take no time: keep them out of the rate behind the ETA
            self.bar.total -= 1
            self.bar.refresh()
        else:
            self.bar.update(1)

    def close(self):
        self.bar.close()


def _run_cells(cfg, todo, make_dict, prog: _Progress, stage: str) -> list[dict]:
    from tgpo_jax.experiments.report import final_accuracy

    results = []
    for i, cell in enumerate(todo, 1):
        r = run_cell(cfg, cell, make_dict(cell), prog.log)
        if r is None:  # report_only: not finished yet
            prog.done(True)
            continue
        final, took = final_accuracy(r["records"]), "cached" if r.get("cached") else f"{r['seconds']:.0f}s"
        prog.log(
            f"[{cfg.name}] {stage}{i}/{len(todo)} {cell.name}: final {cell.split} accuracy "
            f"{'n/a' if final is None else f'{100 * final:.1f}%'} ({took})"
        )
        prog.done(bool(r.get("cached")))
        results.append(r)
    return results


def _lock_out_dir(out_dir: str):
    """One training experiment per out_dir at a time: two would train (and delete) the same cells.
    An exclusive flock on <out_dir>/.experiment.lock, held until the returned file is closed (or
    the process ends, also when it is killed)."""
    import fcntl

    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, ".experiment.lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError(
            f"another experiment is running in {out_dir}; wait for it, or write an interim report with --report-only"
        ) from None
    return f


def run_experiment(cfg: ExperimentConfig, log=print, progress: bool = False) -> dict:
    """Runs (or resumes) every cell (the tuning cells first, if any), then writes report.md,
    results.json and the PNGs. progress: a bar over the cells on stderr."""
    lock = None if cfg.report_only else _lock_out_dir(cfg.out_dir)
    try:
        return _run_experiment(cfg, log, progress)
    finally:
        if lock is not None:
            lock.close()


def _run_experiment(cfg: ExperimentConfig, log, progress: bool) -> dict:
    from tgpo_jax.experiments.report import write_report

    os.makedirs(cfg.report_dir, exist_ok=True)
    enable_compile_cache(os.path.join(cfg.out_dir, "jax_cache"))
    if not cfg.report_only:
        with open(os.path.join(cfg.report_dir, "experiment_config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)
    t0 = time.perf_counter()
    train_path, heldout_path, student, teachers = prepare_models(cfg, log)
    # The eval settings come from the base config; a teacher-free cell reads them without a teacher.
    baseline = sft_accuracies(cfg, Cell("grpo", None, cfg.seeds[0]), student, teachers, train_path, heldout_path)
    log(
        f"[{cfg.name}] held-out accuracy before RL: student {100 * baseline['student']:.1f}%, teachers "
        + ", ".join(f"{t} {100 * a:.1f}%" for t, a in baseline["teachers"].items())
    )
    t_models = time.perf_counter() - t0
    tune_todo = tuning_cells(cfg)
    n_main = len(cells(cfg, tuned={m: {} for m in cfg.tune}))
    prog = _Progress(len(tune_todo) + n_main, progress, log)
    try:
        tuned = None
        if tune_todo:
            val_path = validation_path(cfg.out_dir)
            tune_results = _run_cells(
                cfg,
                tune_todo,
                lambda c: cell_train_dict(
                    cfg, c, student, teachers[c.teacher], train_path, val_path, arm_overrides(cfg, c)
                ),
                prog,
                "tuning ",
            )
            tuned = choose_tuned(cfg, tune_results)
            if not cfg.report_only:  # an interim report may see only part of the tuning
                with open(os.path.join(cfg.report_dir, "tuning.json"), "w") as f:
                    json.dump(tuned, f, indent=2)
            for m, per_teacher in tuned.items():
                for t, ch in per_teacher.items():
                    log(f"[{cfg.name}] tuned {m} / {t}: candidate {ch['candidate']} {ch['overrides']} (on validation)")
        results = _run_cells(
            cfg,
            cells(cfg, tuned),
            lambda c: cell_train_dict(
                cfg,
                c,
                student,
                teachers.get(c.teacher),
                train_path,
                heldout_path,
                arm_overrides(cfg, c, tuned),
            ),
            prog,
            "",
        )
    finally:
        prog.close()
    times = {"models_s": t_models, "total_s": time.perf_counter() - t0}
    return write_report(cfg, results, times, baseline, log, tuned=tuned)


__all__ = [
    "ExperimentConfig",
    "TeacherRung",
    "Cell",
    "cells",
    "load_experiment_config",
    "run_experiment",
    "cell_train_dict",
    "choose_tuned",
    "tuning_cells",
]
