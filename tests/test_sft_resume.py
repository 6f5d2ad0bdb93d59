"""`tgpo-jax sft`: an interrupted run resumes from its latest checkpoint and ends with the weights of
an uninterrupted run; its out_dir is checked before anything is loaded and only a previous model
export is ever replaced (with overwrite_out_dir)."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from tgpo_jax.configtree import ConfigError, to_dict
from tgpo_jax.models.hf_export import OutputDirError
from tgpo_jax.models.tiny import make_tiny_checkpoint
from tgpo_jax.train import checkpoint as checkpoint_mod
from tgpo_jax.train.sft import load_sft_config, sft

STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_resume")
    model = make_tiny_checkpoint(
        str(root / "init"), arch="qwen2", seed=0, hidden_size=32, intermediate_size=64, head_dim=8
    )
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for a in range(1, 7):
            for b in range(1, 5):
                f.write(
                    json.dumps(
                        {
                            "problem": f"What is {a} + {b}?",
                            "answer": str(a + b),
                            "solution": f"{a} + {b} = {a + b}\n</think>\n\\boxed{{{a + b}}}",
                        }
                    )
                    + "\n"
                )
    return root, model, str(data)


def _cfg(setup, run: str, **kw):
    root, model, data = setup
    d = {
        "run_dir": str(root / run),
        "model": model,
        "steps": STEPS,
        "batch_size": 8,
        "micro_batch": 8,
        "max_solution_len": 32,
        "logprob_chunk": 16,
        "log_every": 1,
        "progress": False,
        "checkpoint_every": EVERY,
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 2},
        "data": {
            "files": [data],
            "solution_column": "solution",
            "max_prompt_len": 64,
            "system_prompt": "Think, then answer in \\boxed{}.",
        },
    }
    d.update(kw)
    return load_sft_config(d)


def _weights(out_dir: str) -> dict[str, np.ndarray]:
    return load_file(os.path.join(out_dir, "model.safetensors"))


def _losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["iteration"]: r["sft/loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = sft(_cfg(setup, "whole"))
    return out, _losses(str(setup[0] / "whole"))


def test_interrupted_sft_resumes_to_the_uninterrupted_weights(setup, uninterrupted, monkeypatch, capsys):
    """Ctrl-C right after the checkpoint of step 4 (the KeyboardInterrupt a terminal's SIGINT raises),
    then the same call again: it says where it resumed, runs steps 5-6 only, and its export equals
    the uninterrupted run's bit for bit (on CPU, restored state and data position are exact)."""
    original = checkpoint_mod.RunCheckpoints.save

    def save_then_interrupt(self, iteration, state, meta, eval_score=None):
        original(self, iteration, state, meta, eval_score)
        if iteration == 4:
            raise KeyboardInterrupt

    cfg = _cfg(setup, "resumed")
    monkeypatch.setattr(checkpoint_mod.RunCheckpoints, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        sft(cfg)
    monkeypatch.undo()
    assert not os.path.exists(cfg.run_dir + "/hf")
    capsys.readouterr()
    out = sft(dataclasses.replace(cfg, progress=True))
    printed = capsys.readouterr()
    assert "[sft] resumed from step 4" in printed.out
    # the bar (on stderr) starts at the resumed step and ends at the last one
    assert re.search(rf"sft:.*\b4/{STEPS}\b", printed.err)
    assert re.search(rf"sft: 100%.*\b{STEPS}/{STEPS}\b", printed.err)
    assert "sft:" not in printed.out
    whole_out, whole_losses = uninterrupted
    a, b = _weights(whole_out), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    # the weights moved (a resumed run that trained nothing would also fail the comparison above,
    # unless the uninterrupted one trained nothing either)
    init = _weights(setup[1])
    assert any(not np.array_equal(init[k], a[k]) for k in a)
    assert _losses(cfg.run_dir) == whole_losses and sorted(whole_losses) == list(range(1, STEPS + 1))


def test_rerun_of_a_finished_sft_refuses_its_export_unless_overwrite(setup, uninterrupted, capsys):
    cfg = _cfg(setup, "whole")
    before = _weights(uninterrupted[0])
    with pytest.raises(OutputDirError, match="overwrite_out_dir=true"):
        sft(cfg)
    # with the flag: resumed at its last step, nothing left to train, the same weights exported again
    out = sft(_cfg(setup, "whole", overwrite_out_dir=True))
    assert f"[sft] resumed from step {STEPS}" in capsys.readouterr().out
    after = _weights(out)
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)


def test_out_dir_checked_before_loading(setup, tmp_path):
    """A foreign out_dir is refused before the model is read: a model path that does not exist
    would otherwise be the error."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        cfg = _cfg(
            setup, "never", model=str(tmp_path / "no_such_model"), out_dir=str(foreign), overwrite_out_dir=overwrite
        )
        with pytest.raises(OutputDirError, match=f"out_dir: {foreign} is not empty and is not a model export"):
            sft(cfg)
    assert (foreign / "notes.txt").read_text() == "keep me" and os.listdir(foreign) == ["notes.txt"]


@pytest.mark.parametrize("out", ["run", "."])
def test_out_dir_may_not_hold_the_run_dir(setup, tmp_path, out):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="out_dir=.* would hold run_dir"):
        _cfg(setup, "x", run_dir=str(run), out_dir=str(run if out == "run" else tmp_path))


def test_checkpoint_beyond_steps_is_named(setup, uninterrupted):
    cfg = _cfg(setup, "whole", steps=EVERY, out_dir=str(setup[0] / "short_out"))
    with pytest.raises(ValueError, match=f"checkpoint at step {STEPS}, beyond steps={EVERY}"):
        sft(cfg)


def test_cli_sft_interrupted_says_how_to_resume_then_resumes(setup, uninterrupted, monkeypatch, capsys, tmp_path):
    """`tgpo-jax sft`: Ctrl-C is one line on stderr (exit 130, no traceback) saying that the same
    command resumes; that command then resumes and writes the uninterrupted run's weights."""
    import yaml

    from tgpo_jax.cli import main

    cfg = _cfg(setup, "cli")
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    original = checkpoint_mod.RunCheckpoints.save

    def save_then_interrupt(self, iteration, state, meta, eval_score=None):
        original(self, iteration, state, meta, eval_score)
        if iteration == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_mod.RunCheckpoints, "save", save_then_interrupt)
    assert main(["sft", "--config", str(path)]) == 130
    err = capsys.readouterr().err
    assert "tgpo-jax sft: interrupted; the same command resumes from the last checkpoint" in err
    assert "Traceback" not in err
    monkeypatch.undo()
    assert main(["sft", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "[sft] resumed from step 2" in printed and f"wrote {cfg.run_dir}/hf" in printed
    a, b = _weights(uninterrupted[0]), _weights(cfg.run_dir + "/hf")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_restart_without_checkpoints_is_announced(setup, capsys):
    """checkpoint_every=0 keeps nothing to resume from: a rerun says it starts at step 1, and the
    earlier run's metrics are replaced rather than followed by a second step 1."""
    cfg = _cfg(setup, "no_ckpt", steps=2, checkpoint_every=0)
    os.makedirs(cfg.run_dir)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"iteration": 1, "optimizer_step": 1, "sft/loss": 123.0}) + "\n")
    sft(cfg)
    assert "holds an earlier run but checkpoint_every=0 keeps none: starting at step 1" in capsys.readouterr().out
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["iteration"] for r in records] == [1, 2] and records[0]["sft/loss"] != 123.0


def test_sft_never_trains_ids_its_tokenizer_lacks(setup):
    """The tiny tokenizer has fewer entries than the model's 512 embedding rows: the SFT model masks
    the other rows out of its softmax (as the TGPO run's student does, models/vocab_map.py), so
    they never enter the loss and their logits stay untrained."""
    from flax import nnx

    from tgpo_jax.models.hf_import import load_tokenizer
    from tgpo_jax.train.sft import _build

    root, model, data = setup
    n_tok = len(load_tokenizer(model))
    run = _build(_cfg(setup, "vocab_limit"))
    cfg = nnx.merge(run.graphdef, run.state.params).cfg
    assert cfg.vocab_size == 512 and n_tok < 512
    assert cfg.valid_vocab_size == n_tok
