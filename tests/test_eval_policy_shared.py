"""One sampling + stop-id policy: a training run's in-run evaluator and `tgpo-jax eval` on the same
model, items, settings and seed produce the same generations and per-item scores."""

import json

import pytest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tgpo_jax.models.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("shared")
    model = make_tiny_checkpoint(str(root / "model"), arch="qwen2", seed=3)
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i), "data_source": "ab"[i % 2]} for i in range(5)]
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, str(data), root


def _record(monkeypatch) -> list:
    """Every Completion made by the shared policy, in order."""
    import tgpo_jax.eval.model_policy as mp

    monkeypatch.undo()  # the previous recorder off: each list sees only its own run
    seen, real = [], mp._completion
    monkeypatch.setattr(mp, "_completion", lambda *a: seen.append(g := real(*a)) or g)
    return seen


# eval.batch_size -> the prompts per sampler call (5 items; k = 2; rollout batch 2 x 2 = 4 rows):
# 0 -> 4 // k = 2 (calls of 2, 2, 1 padded to 2); 3 (3, 2 padded to 3); 8 -> capped at the 5 items.
EVAL_BATCHES = {0: 2, 3: 3, 8: 5}


@pytest.mark.parametrize("eval_batch", EVAL_BATCHES)
def test_in_run_evaluator_and_eval_command_agree(setup, monkeypatch, eval_batch):
    """In-run eval with eval.batch_size = eval_batch == `tgpo-jax eval --batch-size b` (b resolved,
    capped at the eval set); the sampler gets b prompts per call, never more."""
    from tgpo_jax.eval.model_policy import run_eval
    from tgpo_jax.rollout.text import stop_ids_for
    from tgpo_jax.train.config import load_train_config
    from tgpo_jax.train.setup import InRunEvaluator, build_model_parts

    model_dir, data, root = setup
    settings = dict(k=2, temperature=1.0, top_p=0.9, max_new_tokens=8)
    cfg = load_train_config(
        {
            "run_dir": str(root / "run"),
            "models": {"student": model_dir},
            "objective": {"name": "grpo"},
            "rollout": {"prompts_per_iteration": 2, "n": 2, "max_new_tokens": 8, "prompt_buckets": [256]},
            "data": {"max_prompt_len": 256},
            "train": {"micro_batch": 2, "logprob_chunk": 8, "seed": 7},
            "rewards": {"workers": 1},
            "eval": {"every": 1, **settings, "batch_size": eval_batch, "data": {"files": [data]}},
        }
    )
    b = EVAL_BATCHES[eval_batch]
    models, train_state, tokenizer = build_model_parts(cfg)
    calls, sample = [], models.sampler.sample
    models.sampler.sample = lambda prompts, *a, **kw: calls.append(len(prompts)) or sample(prompts, *a, **kw)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert models.sampler.stop_ids == stop_ids_for(tokenizer, models.sampler.cfg)
    assert {tokenizer.eos_token_id, im_end} <= set(models.sampler.stop_ids) and im_end != tokenizer.eos_token_id

    in_run_gens = _record(monkeypatch)
    evaluator = InRunEvaluator(cfg, models, tokenizer)
    try:
        metrics = evaluator(train_state.params, 3)
    finally:
        evaluator.close()
    in_run = evaluator.last_report
    n_items = len(evaluator.items)
    assert calls == [b] * -(-n_items // b)  # a short last call is padded to b, as `tgpo-jax eval` pads

    eval_gens = _record(monkeypatch)
    rep = run_eval(model_dir, [data], seed=cfg.train.seed, batch_size=b, num_workers=1, **settings)

    assert [(g.text, g.num_tokens, g.truncated) for g in in_run_gens] == [
        (g.text, g.num_tokens, g.truncated) for g in eval_gens
    ]
    assert len(in_run_gens) == n_items * 2 and len({g.text for g in in_run_gens}) > 3  # real, varied samples
    assert {s: r.item_accuracy for s, r in in_run.sources.items()} == {
        s: r.item_accuracy for s, r in rep.sources.items()
    }
    assert metrics["eval/score"] == rep.mean_accuracy

    # The equality is not vacuous: another seed, or another batch size, draws other samples.
    other = _record(monkeypatch)
    if eval_batch == 0:
        run_eval(model_dir, [data], seed=cfg.train.seed, batch_size=n_items, num_workers=1, **settings)
    else:
        run_eval(model_dir, [data], seed=cfg.train.seed + 1, batch_size=b, num_workers=1, **settings)
    assert sorted(g.text for g in other) != sorted(g.text for g in eval_gens)
