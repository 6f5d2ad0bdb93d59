"""The sampling flags of the commands that sample (`tgpo-jax sample`, `tgpo-jax eval`), declared once.
argparse only: building the command line must not import JAX. What each flag accepts is checked by
`rollout.sampling.sampling_problems`, the rule shared with SamplingParams and the configs."""

from __future__ import annotations

import argparse


def add_sampling_arguments(
    s: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float, top_k: bool, stop_note: str = ""
) -> None:
    """--max-new-tokens, --temperature, --top-p, [--top-k,] --stop-id with these defaults."""
    s.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help="response length limit in tokens (>= 1; prompt + this must fit the model's context)",
    )
    s.add_argument("--temperature", type=float, default=temperature, help="sampling temperature (>= 0; 0 = greedy)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    if top_k:
        s.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (>= 0; 0 = off)")
    s.add_argument(
        "--stop-id",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        dest="stop_ids",
        help=f"extra stop token id besides EOS and <|im_end|> (repeatable{stop_note})",
    )
