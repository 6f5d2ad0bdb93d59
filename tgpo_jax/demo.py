"""`tgpo-jax demo`: the embedded default, TGPO-Reg end to end on CPU in minutes, offline.

  1. data     reasoning-gym `chain_sum` problems (one-digit additions of 2-3 terms), written to jsonl
              with two solution styles and split into a train set and a disjoint held-out set;
  2. teacher  a tiny Qwen2 (fresh byte-level BPE tokenizer, random init) fine-tuned with `sft`
              mostly (80%) on style A, left-to-right partial sums: "2 + 2 = 4\\n4 + 9 = 13\\n</think>
              \\n\\boxed{13}", and on style B for the rest: it writes A, and can read B;
  3. student  a smaller Qwen2 fine-tuned for fewer steps on style B only, right-to-left in words:
              "From the right: 9 + 2 is 11, 11 + 2 is 13.\\n</think>\\n\\boxed{13}" (a different
              reasoning style from the teacher's), clearly weaker than the teacher. A teacher that
              has never seen style B is the `very_different` rung of `tgpo-jax experiment divergence`
              (its argmax at a style-B prefix is often no sensible token; see docs/experiments.md);
  4. TGPO-Reg `train` with configs/demo.yaml (student = 3., teacher = 2.), held-out accuracy at
              temperature 0.6 every few iterations, then a summary table and the curves PNG.

The toy task is tasks/chain_sum.py; both SFT models (and their held-out accuracy) are cached under
--out by train/sft_cache.py, keyed by a hash of everything that determines them, so a rerun only
repeats the TGPO stage. Every directory the demo makes gets a marker (demo_dirs.MARKER, holding
that key) before anything else is written in it: an interrupted demo, run again with the same
command, continues an SFT stage from its last checkpoint and redoes the other stages, while a
directory without the marker (not the demo's) is never removed. `--quick` is a seconds-scale
smoke version of the same path (used by the tests; its numbers are not meaningful). This module is
the orchestration and the summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from tgpo_jax.bundled import config_path
from tgpo_jax.demo_dirs import claim_dir
from tgpo_jax.tasks.chain_sum import TaskSpec, make_task_data
from tgpo_jax.train.sft_cache import SFTSpec, heldout_accuracy, sft_model

DEFAULT_CONFIG = config_path("demo.yaml")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    task: TaskSpec = TaskSpec()
    # The teacher writes style A but has read some style B: like a strong real teacher, its argmax on
    # a style-B prefix is a sensible (correct) continuation, while its own solutions differ in style.
    teacher: SFTSpec = SFTSpec(style_b_frac=0.2, hidden_size=128, intermediate_size=384, head_dim=32, steps=500)
    student: SFTSpec = SFTSpec(style_b_frac=1.0, seed=1, hidden_size=64, intermediate_size=192, head_dim=16, steps=400)
    eval_items: int | None = None  # None: the whole held-out set
    train_overrides: tuple[str, ...] = ()  # key=value overrides of configs/demo.yaml


FULL = DemoSettings()
# Smoke-test scale: every stage runs (and compiles) once, on a few steps and a small eval set.
QUICK = DemoSettings(
    teacher=dataclasses.replace(FULL.teacher, hidden_size=64, intermediate_size=128, head_dim=16, steps=6),
    student=dataclasses.replace(FULL.student, hidden_size=32, intermediate_size=64, head_dim=8, steps=4),
    eval_items=16,
    train_overrides=(
        "train.iterations=2",
        "rollout.prompts_per_iteration=8",
        "rollout.n=4",
        "train.micro_batch=16",
        "eval.every=1",
        "eval.k=1",
        "logging.progress=false",
        "logging.tensorboard=false",
    ),
)


# ------------------------------------------------------------------------------------------ eval subset
def _head(path: str, n: int, out: str) -> str:
    with open(path) as f, open(out, "w") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)
    return out


def _eval_subset(cfg, settings: DemoSettings, out_dir: str, heldout_path: str):
    """(cfg, eval file): quick mode evaluates on the first `eval_items` of the held-out set only."""
    if not settings.eval_items:
        return cfg, heldout_path
    eval_path = _head(heldout_path, settings.eval_items, os.path.join(out_dir, "data", "heldout_head.jsonl"))
    cfg = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, data=type(cfg.eval.data)({**cfg.eval.data, "files": [eval_path]}))
    )
    return cfg, eval_path


# ------------------------------------------------------------------------------------------ TGPO
def train_config_dict(
    config_path: str, out_dir: str, student: str, teacher: str, train_path: str, heldout_path: str, overrides=()
) -> dict:
    """configs/demo.yaml with the demo's paths filled in and `overrides` applied."""
    from tgpo_jax.configtree import apply_overrides, load_yaml

    d = load_yaml(config_path)
    d["run_dir"] = os.path.join(out_dir, "tgpo")
    d.setdefault("models", {}).update(student=student, teacher=teacher)
    d.setdefault("data", {})["files"] = [train_path]
    d.setdefault("eval", {}).setdefault("data", {})["files"] = [heldout_path]
    return apply_overrides(d, list(overrides))


def _records(path: str) -> list[dict]:
    from tgpo_jax.train.metrics import read_jsonl

    return read_jsonl(path)


def summarize(records: list[dict], teacher_acc: float, student_acc: float, curves: str | None, times: dict) -> dict:
    evals = [(r["iteration"], r["eval/score"]) for r in records if "eval/score" in r]
    first = records[0] if records else {}
    last = records[-1] if records else {}
    return {
        "teacher_accuracy": teacher_acc,
        "student_accuracy_before": student_acc,
        "student_accuracy_after": evals[-1][1] if evals else None,
        "student_accuracy_best": max(v for _, v in evals) if evals else None,
        "eval_curve": [(0, student_acc)] + evals,
        "iterations": last.get("iteration"),
        "gap_iteration_1": {k: first.get(k) for k in ("gap/reverse_kl_k1", "gap/mismatch_ratio")},
        "gap_last": {k: last.get(k) for k in ("gap/reverse_kl_k1", "gap/mismatch_ratio")},
        "reward_first": first.get("reward/mean"),
        "reward_last": last.get("reward/mean"),
        "curves_png": curves,
        "times_s": times,
    }


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:5.1f}%"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def summary_table(s: dict) -> str:
    curve = "  ".join(f"it {it}: {100 * v:.0f}%" for it, v in s["eval_curve"])
    g1, gl = s["gap_iteration_1"], s["gap_last"]
    rows = [
        "| held-out accuracy (temperature 0.6)        |        |",
        "|--------------------------------------------|-------:|",
        f"| teacher (SFT, style A + {s['teacher_style_b_pct']:>2.0f}% B)             | {_pct(s['teacher_accuracy'])} |",
        f"| student before TGPO (SFT, style B)         | {_pct(s['student_accuracy_before'])} |",
        f"| student after TGPO-Reg ({s['iterations']} iterations)     | {_pct(s['student_accuracy_after'])} |",
        "",
        "| teacher-student gap        | iteration 1 | last iteration |",
        "|----------------------------|------------:|---------------:|",
        f"| gap/reverse_kl_k1          | {_num(g1['gap/reverse_kl_k1']):>11} | {_num(gl['gap/reverse_kl_k1']):>14} |",
        f"| gap/mismatch_ratio         | {_num(g1['gap/mismatch_ratio']):>11} | {_num(gl['gap/mismatch_ratio']):>14} |",
        f"| train reward/mean          | {_num(s['reward_first']):>11} | {_num(s['reward_last']):>14} |",
        "",
        f"held-out accuracy by iteration: {curve}",
        f"curves: {s['curves_png']}",
    ]
    return "\n".join(rows)


def run_demo(
    out_dir: str = "runs/demo", *, quick: bool = False, config_path: str | None = None, overrides=(), log=print
) -> dict:
    """Runs the whole demo; returns the summary (also written to <out>/summary.json and summary.md)."""
    from tgpo_jax.train.config import load_train_config

    settings = QUICK if quick else FULL
    config_path = config_path or DEFAULT_CONFIG
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"demo train config not found: {config_path} (pass --config)")
    os.makedirs(out_dir, exist_ok=True)
    times, t_all = {}, time.perf_counter()

    t0 = time.perf_counter()
    train_path, heldout_path, stats = make_task_data(out_dir, settings.task)
    times["data"] = time.perf_counter() - t0
    log(
        f"[demo] reasoning-gym chain_sum: {stats['distinct']} distinct problems -> {stats['train']} train, "
        f"{stats['heldout']} held out ({os.path.dirname(train_path)})"
    )

    # The train config is read first: its data section (system prompt, template, prompt length) and
    # eval settings are shared by the SFT stages and the before/after accuracy.
    all_overrides = list(settings.train_overrides) + list(overrides)
    placeholder = train_config_dict(config_path, out_dir, "-", "-", train_path, heldout_path, all_overrides)
    data_section = {k: v for k, v in placeholder.get("data", {}).items() if k != "files"}

    t0 = time.perf_counter()
    teacher, t_cached = sft_model(out_dir, "teacher", settings.teacher, train_path, data_section, log)
    student, s_cached = sft_model(out_dir, "student", settings.student, train_path, data_section, log)
    times["sft"] = time.perf_counter() - t0

    cfg = load_train_config(
        train_config_dict(config_path, out_dir, student, teacher, train_path, heldout_path, all_overrides)
    )
    cfg, eval_path = _eval_subset(cfg, settings, out_dir, heldout_path)
    t0 = time.perf_counter()
    teacher_acc = heldout_accuracy(teacher, eval_path, cfg)
    student_acc = heldout_accuracy(student, eval_path, cfg)
    times["eval_sft"] = time.perf_counter() - t0
    log(
        f"[demo] held-out accuracy: teacher {_pct(teacher_acc)}, student {_pct(student_acc)} "
        f"(k={cfg.eval.k}, temperature {cfg.eval.temperature})"
    )

    times["tgpo"] = run_tgpo_stage(cfg, out_dir, log)
    times["total"] = time.perf_counter() - t_all
    curves = os.path.join(cfg.run_dir, "curves.png")
    summary = summarize(
        _records(os.path.join(cfg.run_dir, "metrics.jsonl")),
        teacher_acc,
        student_acc,
        curves if os.path.exists(curves) else None,
        times,
    )
    summary.update(
        teacher_style_b_pct=100 * settings.teacher.style_b_frac,
        quick=quick,
        cached_sft={"teacher": t_cached, "student": s_cached},
        teacher=teacher,
        student=student,
        run_dir=cfg.run_dir,
    )
    write_summary(out_dir, summary, log)
    return summary


def run_tgpo_stage(cfg, out_dir: str, log=print) -> float:
    """The TGPO-Reg `train` run of the demo (its config saved as <out>/train_config.yaml); seconds."""
    import yaml

    from tgpo_jax.train.config import config_dict
    from tgpo_jax.train.loop import train

    lam0, decay, _ = cfg.objective.schedule()
    log(
        f"[demo] TGPO-Reg: {cfg.train.iterations} iterations x {cfg.rollout.prompts_per_iteration} prompts x "
        f"{cfg.rollout.n} samples, lr {cfg.optimizer.lr:g}, lambda_0 {lam0:g} (decay {decay:g}/iteration), "
        f"held-out eval every {cfg.eval.every} -> {cfg.run_dir}"
    )
    claim_dir(cfg.run_dir, "tgpo")  # no key: the TGPO stage always starts over (see the module docstring)
    with open(os.path.join(out_dir, "train_config.yaml"), "w") as f:
        yaml.safe_dump(config_dict(cfg), f, sort_keys=False)
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


def write_summary(out_dir: str, summary: dict, log=print) -> None:
    """<out>/summary.json, <out>/summary.md, and the table on the console."""
    table = summary_table(summary)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    log("")
    log(table)
    t, cached = summary["times_s"], all(summary["cached_sft"].values())
    log(
        f"[demo] done in {t['total']:.0f}s (data {t['data']:.0f}s, SFT {t['sft']:.0f}s{' cached' if cached else ''}, "
        f"SFT evals {t['eval_sft']:.0f}s, TGPO {t['tgpo']:.0f}s); summary: {os.path.join(out_dir, 'summary.md')}"
    )


__all__ = [
    "run_demo",
    "DemoSettings",
    "FULL",
    "QUICK",
    "summary_table",
]
