"""Arguments and body of `tgpo-jax eval` (kept here so tgpo_jax/cli.py only wires it in)."""

from __future__ import annotations

import argparse

from tgpo_jax.rollout.flags import add_sampling_arguments


def _k_pair(s: str) -> tuple[str, int]:
    name, sep, k = s.rpartition("=")
    if not sep or not name or not k.isdigit() or int(k) < 1:
        raise argparse.ArgumentTypeError(f"expected DATA_SOURCE=K with K >= 1, got {s!r}")
    return name, int(k)


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True, help="local HF model directory (weights + tokenizer)")
    s.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="FILE",
        help="eval files (.jsonl/.json/.parquet) with problem, answer and data_source columns",
    )
    s.add_argument("--k", type=int, default=1, help="samples per item (avg@k), default for every data source")
    s.add_argument(
        "--k-per-source",
        type=_k_pair,
        action="append",
        default=[],
        metavar="SOURCE=K",
        help="k for one data source, e.g. aime24=32 (repeatable)",
    )
    s.add_argument("--batch-size", type=int, default=64, help="items per sampler call")
    s.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed; a training run's in-run eval uses its train.seed, so the same seed, k and "
        "--batch-size (= min(its eval.batch_size, resolved as TrainConfig.eval_batch_prompts, and the eval "
        "set size)) reproduce its scores",
    )
    add_sampling_arguments(s, max_new_tokens=8192, temperature=0.6, top_k=False, stop_note="; a run's rollout.stop_ids")
    s.add_argument("--out", default="runs/eval", help="directory for eval.json and eval.md")
    s.add_argument(
        "--system-prompt",
        default=None,
        help="system prompt (default: tgpo_jax.data.DEFAULT_SYSTEM_PROMPT; '' for none)",
    )
    s.add_argument(
        "--template", default="chat", choices=["chat", "plain"], help="plain: base models without a chat template"
    )
    s.add_argument("--no-think", action="store_true", help="no '<think>\\n' suffix; grade the whole response")
    s.add_argument(
        "--max-prompt-len",
        type=int,
        default=1024,
        help="rendered prompts longer than this many tokens are dropped (and counted)",
    )
    s.add_argument("--problem-column", default="problem", help="column holding the problem text")
    s.add_argument("--answer-column", default="answer", help="column holding the ground-truth answer")
    s.add_argument(
        "--data-source-column",
        default="data_source",
        help="column naming each row's data source (missing: the file stem)",
    )
    s.add_argument("--timeout-s", type=float, default=10.0, help="hard grading time limit per response")
    s.add_argument("--num-workers", type=int, default=0, help="grading processes (0: min(8, CPUs))")


def check_args(args: argparse.Namespace) -> None:
    """Every numeric flag against what it accepts, before any file is read: ValueError naming it."""
    from tgpo_jax.rollout.sampling import sampling_problems

    problems = sampling_problems(
        style="flag", max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, k=args.k
    )
    checks = (
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--max-prompt-len", args.max_prompt_len, args.max_prompt_len >= 1, ">= 1"),
        ("--timeout-s", args.timeout_s, args.timeout_s > 0, "> 0"),
        ("--num-workers", args.num_workers, args.num_workers >= 0, ">= 0 (0: min(8, CPUs))"),
    )
    problems += [f"{flag}={value!r}: must be {accepted}" for flag, value, ok, accepted in checks if not ok]
    if problems:
        raise ValueError("; ".join(problems))


def main(args: argparse.Namespace) -> int:
    from tgpo_jax.eval.model_policy import run_eval

    check_args(args)
    data = {} if args.system_prompt is None else {"system_prompt": args.system_prompt or None}
    report = run_eval(
        args.model,
        args.data,
        k=args.k,
        k_per_source=dict(args.k_per_source),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
        timeout_s=args.timeout_s,
        num_workers=args.num_workers,
        think_format=not args.no_think,
        stop_ids=args.stop_ids,
        template=args.template,
        max_prompt_len=args.max_prompt_len,
        problem_column=args.problem_column,
        answer_column=args.answer_column,
        data_source_column=args.data_source_column,
        **data,
    )
    json_path, md_path = report.write(args.out)
    print(report.to_markdown())
    print(f"wrote {json_path} and {md_path}")
    return 0
