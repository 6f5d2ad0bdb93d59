"""`rollout.generate` (the rollout engine at one sample per prompt) against transformers' generate, and the CLI sample path."""

import jax
import numpy as np
import pytest
import torch
from hf_tiny import TINY, left_padded_batch, make_hf_model

from tgpo_jax.cli import main
from tgpo_jax.models.hf_import import load_model
from tgpo_jax.rollout.generate import generate


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_greedy_equals_transformers_generate(kind, tmp_path):
    hf = make_hf_model(kind, str(tmp_path))
    model = load_model(str(tmp_path))
    tokens, mask = left_padded_batch(TINY["vocab_size"], lengths=(4, 9, 2), seed=3)
    out = generate(model, tokens, mask, jax.random.key(0), max_new_tokens=10)
    ref = hf.generate(
        input_ids=torch.tensor(tokens).long(),
        attention_mask=torch.tensor(mask),
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[:, tokens.shape[1] :].numpy()
    assert np.array_equal(np.asarray(out.tokens_BT), ref)
    assert np.asarray(out.mask_BT).all()


def test_generation_stops_at_eos_and_masks_after(tmp_path):
    make_hf_model("qwen2", str(tmp_path))
    model = load_model(str(tmp_path))
    tokens, mask = left_padded_batch(TINY["vocab_size"], lengths=(4, 9, 2), seed=3)
    free = np.asarray(generate(model, tokens, mask, jax.random.key(0), max_new_tokens=10).tokens_BT)
    eos = int(free[1, 3])  # the greedy token row 1 emits at step 3 becomes the stop id
    out = generate(model, tokens, mask, jax.random.key(0), max_new_tokens=10, eos_ids=(eos,))
    toks, m = np.asarray(out.tokens_BT), np.asarray(out.mask_BT)
    for b in range(3):
        hits = np.flatnonzero(free[b] == eos)
        n = hits[0] + 1 if len(hits) else 10
        assert m[b].tolist() == [1] * n + [0] * (10 - n)
        assert (toks[b, n:] == 0).all() and np.array_equal(toks[b, :n], free[b, :n])
        assert int(out.lengths_B[b]) == n


def test_tiny_checkpoint_samples_through_cli(tmp_path, capsys):
    from tgpo_jax.models.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path / "tiny"), arch="qwen3", seed=0)
    assert (tmp_path / "tiny" / "model.safetensors").exists()
    assert main(["sample", "--model", path, "--prompt", "1+1", "--max-new-tokens", "3"]) == 0
    assert "response (" in capsys.readouterr().out


def test_cli_reports_bad_model_dir(capsys):
    assert main(["sample", "--model", "/nonexistent/dir", "--prompt", "x"]) == 2
    assert "model directory not found: /nonexistent/dir" in capsys.readouterr().err
