"""The avg@k evaluator on a synthetic policy with known success probabilities, the report files, and
the `tgpo-jax eval` command on a tiny random checkpoint."""

import json
import math

import numpy as np
import pytest

from tgpo_jax.cli import main
from tgpo_jax.eval import Completion, EvalItem, evaluate
from tgpo_jax.rewards import RewardFn

MAX_TOKENS = 50


def _items():
    rng = np.random.default_rng(0)
    items, probs = [], []
    for src, n in (("aime", 10), ("math500", 8)):
        for i in range(n):
            items.append(EvalItem(f"{src} problem {i}", str(int(rng.integers(1, 1000))), src, len(items)))
            probs.append(float(rng.uniform(0.05, 0.95)))
    return items, probs


class SyntheticPolicy:
    """Answers item i correctly with probability probs[i]; some wrong answers lack "</think>" or are
    truncated. Records every generation so length and truncation can be checked exactly."""

    def __init__(self, items, probs, seed=1):
        self.p = {it.index: p for it, p in zip(items, probs)}
        self.rng = np.random.default_rng(seed)
        self.log: list[Completion] = []

    def __call__(self, items, n):
        out = []
        for it in items:
            gens = [self._one(it) for _ in range(n)]
            self.log.extend(gens)
            out.append(gens)
        return out

    def _one(self, it):
        length = int(self.rng.integers(5, MAX_TOKENS + 1))
        if self.rng.random() < self.p[it.index]:
            form = "<think>reasoning</think> The answer is $\\boxed{%s}$." if length % 2 else "<think>r</think> %s"
            return Completion(form % it.answer, length, False)
        if length == MAX_TOKENS:  # truncated mid-thought: no "</think>"
            return Completion(f"<think>still thinking about {it.answer}", length, True)
        return Completion(f"<think>hmm</think> \\boxed{{{int(it.answer) + 1}}}", length, False)


@pytest.fixture(scope="module")
def reward():
    with RewardFn(think_format=True, boxed_fallback=True, timeout_s=5.0, num_workers=2) as r:
        yield r


def test_avg_at_k_recovers_known_success_probabilities(reward, tmp_path):
    items, probs = _items()
    policy = SyntheticPolicy(items, probs)
    report = evaluate(policy, items, k=16, k_per_source={"math500": 24}, reward_fn=reward, batch_size=7)
    p = np.asarray(probs)
    for src, k, sl in (("aime", 16, slice(0, 10)), ("math500", 24, slice(10, 18))):
        r = report.sources[src]
        assert r.k == k and r.n_items == sl.stop - sl.start
        sigma = math.sqrt(np.sum(p[sl] * (1 - p[sl])) / k) / r.n_items  # binomial std of avg@k
        assert abs(r.accuracy - p[sl].mean()) < 3 * sigma, (src, r.accuracy, p[sl].mean(), sigma)
        for est, true in zip(r.item_accuracy, p[sl]):  # per item: within 4 sigma (18 items, k >= 16)
            assert abs(est - true) <= 4 * math.sqrt(true * (1 - true) / k) + 1e-9
    assert report.mean_accuracy == pytest.approx(
        (report.sources["aime"].accuracy + report.sources["math500"].accuracy) / 2
    )
    assert len(policy.log) == 10 * 16 + 8 * 24
    assert report.mean_length == pytest.approx(np.mean([g.num_tokens for g in policy.log]))
    assert report.truncation_rate == pytest.approx(np.mean([g.truncated for g in policy.log]))
    json_path, md_path = report.write(str(tmp_path))
    saved = json.load(open(json_path))
    assert saved["sources"]["aime"]["k"] == 16 and saved["mean_accuracy"] == pytest.approx(report.mean_accuracy)
    md = open(md_path).read()
    assert "| aime | 10 | 16 |" in md and "**mean (unweighted)**" in md


def test_evaluator_rejects_a_policy_with_the_wrong_number_of_samples(reward):
    items, _ = _items()
    with pytest.raises(ValueError, match="generations for"):
        evaluate(lambda its, n: [[Completion("x", 1, False)] * (n - 1) for _ in its], items[:2], k=2, reward_fn=reward)
    with pytest.raises(ValueError, match="no evaluation items"):
        evaluate(lambda its, n: [], [], reward_fn=reward)


def test_eval_command_on_a_tiny_checkpoint(tmp_path, capsys):
    from tgpo_jax.models.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(str(tmp_path / "model"))
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1), "data_source": "toy"} for i in range(3)]
    rows.append({"problem": "No answer here", "answer": "", "data_source": "toy"})
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(
        [
            "eval",
            "--model",
            model,
            "--data",
            str(data),
            "--k",
            "2",
            "--max-new-tokens",
            "6",
            "--batch-size",
            "4",
            "--num-workers",
            "1",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    assert "| toy | 3 | 2 |" in capsys.readouterr().out
    saved = json.load(open(tmp_path / "out" / "eval.json"))
    assert saved["meta"]["data_stats"]["skipped_no_answer"] == 1 and saved["meta"]["temperature"] == 0.6
    assert saved["meta"]["top_p"] == 1.0
    toy = saved["sources"]["toy"]
    assert 1 <= toy["mean_length"] <= 6 and 0.0 <= toy["truncation_rate"] <= 1.0
    bad = main(["eval", "--model", model, "--data", str(tmp_path / "missing.jsonl")])
    assert bad == 2 and "data file not found" in capsys.readouterr().err
