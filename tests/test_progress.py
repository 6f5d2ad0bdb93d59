"""Progress of the evaluation: a bar over the items with an ETA, on stderr, and none when asked."""

import re

from tgpo_jax.eval.evaluator import Completion, EvalItem, evaluate
from tgpo_jax.rewards.reward_fn import RewardConfig, RewardFn


def _items(n):
    return [
        EvalItem(problem=f"{i} + 1", answer=str(i + 1), data_source="toy", index=i, prompt_ids=[1] * (i % 3 + 1))
        for i in range(n)
    ]


def _policy(items, k):
    return [[Completion(f"</think>\\boxed{{{int(it.answer)}}}", 4, False)] * k for it in items]


def test_eval_progress_on_stderr_and_switchable(capsys):
    items = _items(10)
    with RewardFn(RewardConfig(think_format=True, boxed_fallback=True)) as reward:
        rep = evaluate(_policy, items, k=2, reward_fn=reward, batch_size=4)
        printed = capsys.readouterr()
        assert rep.mean_accuracy == 1.0
        assert re.search(r"eval:.*\b\d+/10\b", printed.err) and "eval:" not in printed.out
        evaluate(_policy, items, k=2, reward_fn=reward, batch_size=4, progress=False)
        assert "eval:" not in capsys.readouterr().err
