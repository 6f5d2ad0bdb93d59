"""`tgpo-jax experiment divergence`: the paper's central claim in miniature, on CPU.

One student (style B, see tgpo_jax/tasks/chain_sum.py) and a ladder of teachers made by `sft` that write
style A on a growing share of their training problems (style_b_frac 1 -> 0: same style, partly
different, very different). Every method x teacher x seed cell is a plain `tgpo-jax train` run of
the base config (configs/demo.yaml) with the cell's objective, seed and teacher; GRPO has no
teacher and runs once per seed. The divergence of a teacher is measured on the student's own
rollouts at iteration 1 (before any update): gap/reverse_kl_k1 and gap/mismatch_ratio.

Cells are cached: a cell whose run directory holds a finished `cell.json` with the same key is not
rerun, so an interrupted experiment resumes where it stopped. Orchestration only: the report
(table, plots) is written by tgpo_jax/experiments/report.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from tgpo_jax.bundled import resolve_config
from tgpo_jax.configtree import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from tgpo_jax.demo import DEFAULT_CONFIG
from tgpo_jax.demo_dirs import digest, file_digest
from tgpo_jax.objectives.registry import ObjectiveConfig, get_objective
from tgpo_jax.tasks.chain_sum import TaskSpec, make_task_data
from tgpo_jax.train.sft_cache import SFTSpec, heldout_accuracy, sft_model

METHODS = ("grpo", "rkl", "kdrl", "tgpo_reg", "tgpo_adv")  # the ones the report knows how to label
CELL_FILE = "cell.json"


@dataclasses.dataclass(frozen=True)
class TeacherRung:
    name: str
    style_b_frac: float  # share of its SFT problems solved in the STUDENT's style (1 = same style)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
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
    quick: dict = dataclasses.field(default_factory=dict)  # merged over this config by --quick
    # A named variant (e.g. another lambda) reuses the data and SFT models of out_dir but keeps its
    # own cells (cells/<cell>__<variant>) and report (variants/<variant>/).
    variant: str = ""

    @property
    def report_dir(self) -> str:
        return os.path.join(self.out_dir, "variants", self.variant) if self.variant else self.out_dir


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_experiment_config(
    path: str, *, quick: bool = False, out_dir: str | None = None, overrides=()
) -> ExperimentConfig:
    """The typed config (unknown keys -> error listing the valid ones), checked before any work.
    `overrides`: key.path=value strings applied last (after the quick section)."""
    from tgpo_jax.objectives.registry import OBJECTIVES

    d = load_yaml(path) or {}
    if quick:
        d = _merge(d, d.get("quick") or {})
    d = apply_overrides(d, list(overrides))
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

    @property
    def name(self) -> str:
        return f"{self.method}__{self.teacher or 'no_teacher'}__seed{self.seed}"


def cells(cfg: ExperimentConfig) -> list[Cell]:
    """GRPO once per seed; every other method once per teacher and seed."""
    out = []
    for seed in cfg.seeds:
        for m in cfg.methods:
            teachers = [t.name for t in cfg.teachers] if get_objective(m).needs_teacher else [None]
            out += [Cell(m, t, seed) for t in teachers]
    return out


def cell_train_dict(
    cfg: ExperimentConfig, cell: Cell, student: str, teacher: str | None, train_path: str, heldout_path: str
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
    overrides = list(cfg.train_overrides) + list(cfg.method_overrides.get(cell.method, []))
    return apply_overrides(d, overrides)


def run_cell(cfg: ExperimentConfig, cell: Cell, train_dict: dict, log=print) -> dict:
    """Trains one cell (or returns its cached result); the result holds the metrics records."""
    from tgpo_jax.train.config import load_train_config
    from tgpo_jax.train.loop import train
    from tgpo_jax.train.metrics import read_jsonl

    run_dir = train_dict["run_dir"]
    key = digest(
        {
            "train": train_dict,
            "models": [
                file_digest(os.path.join(p, "model.safetensors"))
                for p in (train_dict["models"]["student"], train_dict["models"]["teacher"])
                if p
            ],
        }
    )
    done = os.path.join(run_dir, CELL_FILE)
    if os.path.exists(done):
        with open(done) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return dict(saved, cached=True)
    tcfg = load_train_config(train_dict)
    if os.path.isdir(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    train(tcfg)
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    result = {"key": key, **dataclasses.asdict(cell), "seconds": time.perf_counter() - t0, "records": records}
    with open(done, "w") as f:
        json.dump(result, f)
    return result


def prepare_models(cfg: ExperimentConfig, log=print) -> tuple[str, str, str, dict[str, str]]:
    """(train.jsonl, heldout.jsonl, student HF dir, {teacher name: HF dir}); SFT models cached."""
    train_path, heldout_path, stats = make_task_data(cfg.out_dir, cfg.task)
    log(f"[divergence] chain_sum: {stats['train']} train / {stats['heldout']} held-out problems")
    data_section = {
        k: v for k, v in (load_yaml(cfg.base_config or DEFAULT_CONFIG).get("data") or {}).items() if k != "files"
    }
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


def run_experiment(cfg: ExperimentConfig, log=print) -> dict:
    """Runs (or resumes) every cell, then writes report.md, results.json and the PNGs."""
    from tgpo_jax.experiments.report import final_accuracy, write_report

    os.makedirs(cfg.report_dir, exist_ok=True)
    enable_compile_cache(os.path.join(cfg.out_dir, "jax_cache"))
    with open(os.path.join(cfg.report_dir, "experiment_config.json"), "w") as f:
        json.dump(to_dict(cfg), f, indent=2)
    t0 = time.perf_counter()
    train_path, heldout_path, student, teachers = prepare_models(cfg, log)
    todo = cells(cfg)
    # The eval settings come from the base config; a teacher-free cell reads them without a teacher.
    baseline = sft_accuracies(cfg, Cell("grpo", None, cfg.seeds[0]), student, teachers, train_path, heldout_path)
    log(
        f"[divergence] held-out accuracy before RL: student {100 * baseline['student']:.1f}%, teachers "
        + ", ".join(f"{t} {100 * a:.1f}%" for t, a in baseline["teachers"].items())
    )
    t_models = time.perf_counter() - t0
    results = []
    for i, cell in enumerate(todo, 1):
        d = cell_train_dict(cfg, cell, student, teachers.get(cell.teacher), train_path, heldout_path)
        r = run_cell(cfg, cell, d, log)
        final, took = final_accuracy(r["records"]), "cached" if r.get("cached") else f"{r['seconds']:.0f}s"
        log(
            f"[divergence] {i}/{len(todo)} {cell.name}: final held-out accuracy "
            f"{'n/a' if final is None else f'{100 * final:.1f}%'} ({took})"
        )
        results.append(r)
    times = {"models_s": t_models, "total_s": time.perf_counter() - t0}
    return write_report(cfg, results, times, baseline, log)


__all__ = [
    "ExperimentConfig",
    "TeacherRung",
    "Cell",
    "cells",
    "load_experiment_config",
    "run_experiment",
    "cell_train_dict",
]
