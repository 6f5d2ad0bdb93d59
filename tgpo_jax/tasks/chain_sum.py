"""The demo's toy task: reasoning-gym `chain_sum` problems (one-digit additions of 2-3 terms) with two
solution styles, split into a train set and a disjoint held-out set.

Style A (the teacher's): left-to-right partial sums, "2 + 2 = 4\\n4 + 9 = 13\\n</think>\\n\\boxed{13}".
Style B (the student's): right-to-left in words, "From the right: 9 + 2 is 11, 11 + 2 is 13.\\n</think>
\\n\\boxed{13}". Every row of the data files carries both (`teacher_solution`, `student_solution`);
`write_style_mix` picks one per row for an SFT run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

from tgpo_jax.demo_dirs import claim_dir, is_cached, write_key


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
    # distinct problems for tuning (validation.jsonl), never trained on and disjoint from the
    # held-out set: coefficients are chosen on these, the held-out numbers are only reported
    validation: int = 0


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


def validation_path(out_dir: str) -> str:
    """The validation file make_task_data writes when TaskSpec.validation > 0."""
    return os.path.join(out_dir, "data", "validation.jsonl")


def make_task_data(out_dir: str, task: TaskSpec) -> tuple[str, str, dict]:
    """(train.jsonl, heldout.jsonl, stats): distinct reasoning-gym chain_sum problems with both solution
    styles; the held-out problems never appear in the train file. With task.validation > 0 the next
    `validation` problems of the shuffled list go to validation.jsonl (`validation_path`), also
    never trained on. Cached by the task spec."""
    from reasoning_gym.arithmetic.chain_sum import ChainSumConfig, ChainSumDataset

    data_dir = os.path.join(out_dir, "data")
    train_path, heldout_path = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "heldout.jsonl")
    spec = dataclasses.asdict(task)
    if not task.validation:  # the key of a spec without a validation split stays what it was
        del spec["validation"]
    key = {"task": spec, "format": 1}
    if is_cached(data_dir, key, "heldout.jsonl"):
        with open(os.path.join(data_dir, "stats.json")) as f:
            return train_path, heldout_path, json.load(f)
    claim_dir(data_dir, "data")  # no key: a half-written data directory is redone (seconds)
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
    n_out = task.heldout + task.validation
    if len(items) <= n_out:
        raise ValueError(
            f"only {len(items)} distinct problems: cannot hold out {task.heldout} + {task.validation} (validation)"
        )
    splits = {heldout_path: items[: task.heldout], train_path: items[n_out:]}
    if task.validation:
        splits[validation_path(out_dir)] = items[task.heldout : n_out]
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
    stats = {"distinct": len(items), "train": len(items) - n_out, "heldout": task.heldout}
    if task.validation:
        stats["validation"] = task.validation
    with open(os.path.join(data_dir, "stats.json"), "w") as f:
        json.dump(stats, f)
    write_key(data_dir, key)
    return train_path, heldout_path, stats


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
