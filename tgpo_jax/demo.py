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

Both SFT models (and their held-out accuracy) are cached under --out, keyed by a hash of everything
that determines them, so a rerun only repeats the TGPO stage. Every directory the demo makes gets a
marker (MARKER, holding that key) before anything else is written in it: an interrupted demo, run
again with the same command, continues an SFT stage from its last checkpoint and redoes the other
stages, while a directory without the marker (not the demo's) is never removed. `--quick` is a
seconds-scale smoke version of the same path (used by the tests; its numbers are not meaningful).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from typing import Any

from tgpo_jax.bundled import config_path

DEFAULT_CONFIG = config_path("demo.yaml")
KEY_FILE = "demo_key.json"  # written last: the stage in this directory is complete
MARKER = ".tgpo_demo"  # written first: this directory is the demo's (JSON: the key of the work in it)
# What earlier versions of the demo (without MARKER) wrote in each directory, so that a directory they
# left half-written is recognised as the demo's too.
_LEGACY = {
    "data": {KEY_FILE, "train.jsonl", "heldout.jsonl", "stats.json", "heldout_head.jsonl"},
    "sft": {KEY_FILE, "sft_data.jsonl", "init", "sft", "hf", "heldout_eval.json"},
    "tgpo": {"config.json", "metrics.jsonl", "checkpoints", "tensorboard", "curves.png"},
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """reasoning-gym chain_sum, one-digit terms, additions only (problems with a '-' are skipped)."""

    min_terms: int = 2
    max_terms: int = 3
    digits: int = 1
    rg_size: int = 20000  # items drawn from reasoning-gym before de-duplication (~1020 distinct)
    rg_seed: int = 0
    heldout: int = 128  # distinct problems held out for evaluation (never trained on)
    split_seed: int = 0


@dataclasses.dataclass(frozen=True)
class SFTSpec:
    """A tiny model made by `make_tiny_checkpoint` and fine-tuned by `sft` on a mix of the two
    solution styles: a seeded `style_b_frac` of the training problems in style B, the rest in A."""

    style_b_frac: float  # 0: style A only; 1: style B only
    arch: str = "qwen2"
    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    max_solution_len: int = 48

    def model_kwargs(self) -> dict[str, int]:
        """The architecture fields, as keyword arguments of `tiny_config` / `make_tiny_checkpoint`."""
        return {
            k: getattr(self, k)
            for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        }


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


# ------------------------------------------------------------------------------------------ data
def style_a(expression: str) -> str:
    """The teacher's style: left-to-right partial sums, one equation per line."""
    nums = [int(x) for x in expression.split("+")]
    acc, lines = nums[0], []
    for c in nums[1:]:
        lines.append(f"{acc} + {c} = {acc + c}")
        acc += c
    return "\n".join(lines) + f"\n</think>\n\\boxed{{{acc}}}"


def style_b(expression: str) -> str:
    """The student's style: right-to-left, in words, on one line."""
    nums = [int(x) for x in expression.split("+")][::-1]
    acc, parts = nums[0], []
    for c in nums[1:]:
        parts.append(f"{acc} + {c} is {acc + c}")
        acc += c
    return "From the right: " + ", ".join(parts) + f".\n</think>\n\\boxed{{{acc}}}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _cached(dir_: str, key: dict, must_exist: str) -> bool:
    try:
        with open(os.path.join(dir_, KEY_FILE)) as f:
            return json.load(f) == json.loads(json.dumps(key, default=str)) and os.path.exists(
                os.path.join(dir_, must_exist)
            )
    except (OSError, ValueError):
        return False


def _write_key(dir_: str, key: dict) -> None:
    with open(os.path.join(dir_, KEY_FILE), "w") as f:
        json.dump(key, f, indent=2, default=str)


def _read_marker(path: str):
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_demo_dir(path: str, kind: str) -> bool:
    """The demo's: it has the marker, or (from a version before the marker) only what the demo writes
    there, or nothing. Temporary export directories (.export-*) left by a kill count as the demo's."""
    if os.path.exists(os.path.join(path, MARKER)):
        return True
    return all(e in _LEGACY[kind] or e.startswith(".export-") for e in os.listdir(path))


def _claim_dir(path: str, kind: str, key: dict | None = None) -> bool:
    """Makes `path` the demo's directory for `key`. True when it already holds unfinished work for
    that key, to be continued; else it is emptied (only if it is the demo's) and marked. A directory
    with anything else in it is refused."""
    key = json.loads(json.dumps(key, default=str)) if key is not None else None
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"--out: {path} exists and is not a directory; choose another --out, or move it away")
    if os.path.isdir(path):
        if not _is_demo_dir(path, kind):
            raise ValueError(
                f"--out: {path} exists and was not written by the demo (no {MARKER} in it, and it holds "
                f"{', '.join(sorted(os.listdir(path))[:5])}); choose another --out, or move it away"
            )
        if key is not None and _read_marker(path) == {"key": key}:
            for e in os.listdir(path):  # an export a kill interrupted: never to be finished
                if e.startswith(".export-"):
                    shutil.rmtree(os.path.join(path, e), ignore_errors=True)
            return True
        shutil.rmtree(path)
    os.makedirs(path)
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"key": key}, f)
    return False


def make_task_data(out_dir: str, task: TaskSpec) -> tuple[str, str, dict]:
    """(train.jsonl, heldout.jsonl, stats): distinct reasoning-gym chain_sum problems with both solution
    styles; the held-out problems never appear in the train file. Cached by the task spec."""
    from reasoning_gym.arithmetic.chain_sum import ChainSumConfig, ChainSumDataset

    data_dir = os.path.join(out_dir, "data")
    train_path, heldout_path = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "heldout.jsonl")
    key = {"task": dataclasses.asdict(task), "format": 1}
    if _cached(data_dir, key, "heldout.jsonl"):
        with open(os.path.join(data_dir, "stats.json")) as f:
            return train_path, heldout_path, json.load(f)
    _claim_dir(data_dir, "data")  # no key: a half-written data directory is redone (seconds)
    ds = ChainSumDataset(
        ChainSumConfig(
            min_terms=task.min_terms,
            max_terms=task.max_terms,
            min_digits=task.digits,
            max_digits=task.digits,
            allow_negation=False,
            size=task.rg_size,
            seed=task.rg_seed,
        )
    )
    distinct: dict[str, dict] = {}
    for entry in ds:
        expr = entry["metadata"]["expression"]
        if "-" not in expr and expr not in distinct:
            distinct[expr] = entry
    items = sorted(distinct.values(), key=lambda e: e["metadata"]["source_index"])
    random.Random(task.split_seed).shuffle(items)
    if len(items) <= task.heldout:
        raise ValueError(f"only {len(items)} distinct problems: cannot hold out {task.heldout}")
    splits = {heldout_path: items[: task.heldout], train_path: items[task.heldout :]}
    for path, rows in splits.items():
        with open(path, "w") as f:
            for e in rows:
                expr = e["metadata"]["expression"]
                assert sum(int(x) for x in expr.split("+")) == int(e["answer"]), e
                f.write(
                    json.dumps(
                        {
                            "problem": f"What is {expr}?",
                            "answer": e["answer"],
                            "data_source": "chain_sum",
                            "teacher_solution": style_a(expr),
                            "student_solution": style_b(expr),
                        }
                    )
                    + "\n"
                )
    stats = {"distinct": len(items), "train": len(items) - task.heldout, "heldout": task.heldout}
    with open(os.path.join(data_dir, "stats.json"), "w") as f:
        json.dump(stats, f)
    _write_key(data_dir, key)
    return train_path, heldout_path, stats


# ------------------------------------------------------------------------------------------ SFT
def write_style_mix(train_path: str, out_path: str, style_b_frac: float, seed: int) -> str:
    """The train file with one `solution` column: style B for a seeded `style_b_frac` of the rows."""
    if not 0.0 <= style_b_frac <= 1.0:
        raise ValueError(f"style_b_frac must be in [0, 1]; got {style_b_frac}")
    rng = random.Random(seed)
    with open(train_path) as f, open(out_path, "w") as g:
        for line in f:
            row = json.loads(line)
            style = "student" if rng.random() < style_b_frac else "teacher"
            g.write(json.dumps({**row, "solution": row[f"{style}_solution"]}) + "\n")
    return out_path


def sft_model(
    out_dir: str, name: str, spec: SFTSpec, train_path: str, data_section: dict, log=print
) -> tuple[str, bool]:
    """(HF directory, reused?) of the model fine-tuned by `spec`; reused when its key matches. An
    unfinished SFT for the same key (an interrupted demo) continues from its last checkpoint."""
    from tgpo_jax.models.tiny import TINY_VOCAB, make_tiny_checkpoint
    from tgpo_jax.train.sft import load_sft_config, sft

    root = os.path.join(out_dir, name)
    hf_dir = os.path.join(root, "hf")
    key = {
        "spec": dataclasses.asdict(spec),
        "data": _file_digest(train_path),
        "vocab": TINY_VOCAB,
        "prompt": {k: data_section.get(k) for k in ("system_prompt", "template", "max_prompt_len")},
    }
    if _cached(root, key, os.path.join("hf", "config.json")):
        log(f"[demo] {name}: cached SFT model {hf_dir} (key matches, skipping training)")
        return hf_dir, True
    every = sft_checkpoint_every(spec.steps)
    if _claim_dir(root, "sft", key):
        log(f"[demo] {name}: continuing the unfinished SFT in {root} (same key)")
    log(
        f"[demo] {name}: SFT {spec.steps} steps, a checkpoint every {every} (an interrupted demo continues "
        f"from the last) -> {hf_dir}"
    )
    sft_data = write_style_mix(train_path, os.path.join(root, "sft_data.jsonl"), spec.style_b_frac, spec.seed)
    init = os.path.join(root, "init")
    if not os.path.isfile(os.path.join(init, "config.json")):  # seeded: the same weights when made again
        make_tiny_checkpoint(init, arch=spec.arch, seed=spec.seed, **spec.model_kwargs())
    cfg = load_sft_config(
        {
            "run_dir": os.path.join(root, "sft"),
            "model": init,
            "out_dir": hf_dir,
            "steps": spec.steps,
            "batch_size": spec.batch_size,
            "micro_batch": spec.batch_size,
            "max_solution_len": spec.max_solution_len,
            "logprob_chunk": 16,
            "log_every": max(1, spec.steps // 10),
            "progress": True,
            "checkpoint_every": every,
            "overwrite_out_dir": True,  # hf/ is inside the demo's own directory
            "optimizer": {"lr": spec.lr, "weight_decay": 0.0, "warmup_steps": spec.warmup_steps},
            "data": {**data_section, "files": [sft_data], "solution_column": "solution"},
        }
    )
    t0 = time.perf_counter()
    sft(cfg)
    shutil.rmtree(init, ignore_errors=True)
    _write_key(root, key)
    log(f"[demo] {name}: SFT {spec.steps} steps in {time.perf_counter() - t0:.0f}s -> {hf_dir}")
    return hf_dir, False


def sft_checkpoint_every(steps: int) -> int:
    """About ten checkpoints per SFT (a tiny model's save is a fraction of a second), at least two
    steps apart so that the seconds-scale quick mode stays quick."""
    return max(2, steps // 10)


def heldout_accuracy(model_dir: str, eval_path: str, cfg) -> float:
    """avg@k accuracy of a HF model on the held-out file with the run's eval settings (sampling,
    prompt rendering, grading). Cached next to the model, keyed by the model and those settings."""
    from tgpo_jax.eval.model_policy import run_eval

    root = os.path.dirname(model_dir)
    path = os.path.join(root, "heldout_eval.json")
    prompt = {k: cfg.data[k] for k in ("system_prompt", "template", "max_prompt_len") if k in cfg.data}
    key = {
        "eval_file": _file_digest(eval_path),
        "k": cfg.eval.k,
        "temperature": cfg.eval.temperature,
        "top_p": cfg.eval.top_p,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "seed": cfg.train.seed,
        "model": _file_digest(os.path.join(root, KEY_FILE)),
        "prompt": prompt,
    }
    try:
        with open(path) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return saved["accuracy"]
    except (OSError, ValueError, KeyError):
        pass
    with open(eval_path) as f:
        n_items = sum(1 for line in f if line.strip())
    rep = run_eval(
        model_dir,
        [eval_path],
        k=cfg.eval.k,
        max_new_tokens=cfg.eval.max_new_tokens,
        temperature=cfg.eval.temperature,
        top_p=cfg.eval.top_p,
        batch_size=n_items,
        seed=cfg.train.seed,
        num_workers=cfg.rewards.workers,
        timeout_s=cfg.rewards.timeout_s,
        **prompt,
    )
    with open(path, "w") as f:
        json.dump({"key": key, "accuracy": rep.mean_accuracy, "mean_length": rep.mean_length}, f)
    return rep.mean_accuracy


def _head(path: str, n: int, out: str) -> str:
    with open(path) as f, open(out, "w") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)
    return out


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
    eval_path = heldout_path
    if settings.eval_items:  # quick mode: the first items of the held-out set
        eval_path = _head(heldout_path, settings.eval_items, os.path.join(out_dir, "data", "heldout_head.jsonl"))
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, data={**cfg.eval.data, "files": [eval_path]}))
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
    _claim_dir(cfg.run_dir, "tgpo")  # no key: the TGPO stage always starts over (see the module docstring)
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
    "SFTSpec",
    "TaskSpec",
    "FULL",
    "QUICK",
    "style_a",
    "style_b",
    "make_task_data",
    "summary_table",
]
