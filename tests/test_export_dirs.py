"""Where `export`, `convert` and `save_hf` may write: a new or empty directory, or with --overwrite a
previous model export, and nothing else (a run directory stays intact, with or without the flag);
the refusal comes before anything is loaded and is one line naming the directory and the choices.
Exports are written atomically and with the user's umask, not mkdtemp's 0700 / safetensors' 0600."""

import json
import os

import jax
import numpy as np
import pytest
from train_e2e_helpers import tiny_config

from tgpo_jax.cli import main
from tgpo_jax.configtree import to_dict
from tgpo_jax.models import hf_export
from tgpo_jax.models.hf_export import OutputDirError, check_out_dir, flat_params, is_model_export, save_hf
from tgpo_jax.models.hf_import import load_model
from tgpo_jax.models.tiny import make_tiny_checkpoint
from tgpo_jax.train.checkpoint import RunCheckpoints
from tgpo_jax.train.config import load_train_config
from tgpo_jax.train.step import init_train_state, make_optimizer

ITERATION = 3


def _tree(path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), path)] = None
        for f in filenames:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), path)] = fh.read()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as `tgpo-jax train` leaves it (config.json, metrics.jsonl, a checkpoint of the
    student whose weights are the initial ones plus 0.25), made without a training run."""
    root = str(tmp_path_factory.mktemp("export_dirs"))
    cfg = load_train_config(tiny_config(root, "run"))
    os.makedirs(cfg.run_dir)
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        json.dump(to_dict(cfg), f)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"iteration": ITERATION, "optimizer_step": 6}) + "\n")
    student = load_model(cfg.models.student)
    _, state = init_train_state(student, make_optimizer(cfg.optimizer))
    state = state.replace(params=jax.tree.map(lambda x: x + 0.25, state.params))
    ckpt = RunCheckpoints(cfg.run_dir, keep=1, keep_best=0, async_save=False)
    ckpt.save(ITERATION, state, {"iteration": ITERATION})
    ckpt.close()
    expected = {k: np.asarray(v) for k, v in flat_params(student).items()}
    return cfg, {k: v + np.float32(0.25) for k, v in expected.items()}


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
@pytest.mark.parametrize("where", ["run", "parent"])
def test_export_into_the_run_directory_is_refused(run, capsys, flags, where):
    cfg, _ = run
    target = cfg.run_dir if where == "run" else os.path.dirname(cfg.run_dir)
    before = _tree(target)
    assert main(["export", "--checkpoint", cfg.run_dir, "--to-hf", target] + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tgpo-jax export: error: --to-hf: ")
    assert f"{target} is not empty and is not a model export" in err[0]
    assert "even with --overwrite" in err[0] and "choose a new or empty directory" in err[0]
    assert _tree(target) == before  # checkpoints, metrics, config: all as they were


def test_export_overwrite_replaces_a_previous_export_only_with_the_flag(run, tmp_path, capsys):
    cfg, expected = run
    out = str(tmp_path / "exported")
    # a previous export of another model (the teacher) in the way
    assert main(["convert", "--from-hf", cfg.models.teacher, "--to-hf", out]) == 0
    before = _tree(out)
    assert main(["export", "--checkpoint", cfg.run_dir, "--to-hf", out]) == 2
    err = capsys.readouterr().err
    assert f"--to-hf: {out} already holds a model export" in err and "pass --overwrite to replace it" in err
    assert _tree(out) == before
    assert main(["export", "--checkpoint", cfg.run_dir, "--to-hf", out, "--overwrite"]) == 0
    assert f"wrote {out} (student at iteration {ITERATION})" in capsys.readouterr().out
    got = {k: np.asarray(v) for k, v in flat_params(load_model(out)).items()}
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    assert is_model_export(out)
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".export-")]


def test_export_into_an_empty_directory(run, tmp_path):
    cfg, _ = run
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["export", "--checkpoint", cfg.run_dir, "--to-hf", str(out)]) == 0
    assert is_model_export(str(out))


def test_convert_checks_before_loading(tmp_path, capsys):
    """The source does not exist: a refusal that came after loading would name it instead."""
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "a.txt").write_text("mine")
    missing = str(tmp_path / "no_such_model")
    for flags in ([], ["--overwrite"]):
        assert main(["convert", "--from-hf", missing, "--to-hf", str(foreign)] + flags) == 2
        err = capsys.readouterr().err
        assert (
            f"tgpo-jax convert: error: --to-hf: {foreign} is not empty and is not a model export (it holds a.txt)"
            in err
            and missing not in err
        )
    assert _tree(foreign) == {"a.txt": b"mine"}


def test_convert_overwrite_replaces_an_export(tmp_path):
    a = make_tiny_checkpoint(str(tmp_path / "a"), seed=0)
    b = make_tiny_checkpoint(str(tmp_path / "b"), seed=1)
    out = str(tmp_path / "out")
    assert main(["convert", "--from-hf", a, "--to-hf", out]) == 0
    assert main(["convert", "--from-hf", b, "--to-hf", out]) == 2
    assert _tree(out)["model.safetensors"] == _tree(a)["model.safetensors"]
    assert main(["convert", "--from-hf", b, "--to-hf", out, "--overwrite"]) == 0
    assert _tree(out)["model.safetensors"] == _tree(b)["model.safetensors"]


def test_what_counts_as_a_model_export(tmp_path):
    m = make_tiny_checkpoint(str(tmp_path / "m"))
    assert is_model_export(m)
    check_out_dir(m, overwrite=True)
    (tmp_path / "m" / "generation_config.json").write_text("{}")
    (tmp_path / "m" / "special_tokens_map.json").write_text("{}")
    assert is_model_export(m)
    for extra in ("metrics.jsonl", "checkpoints"):
        path = tmp_path / "m" / extra
        path.mkdir() if extra == "checkpoints" else path.write_text("")
        assert not is_model_export(m)
        with pytest.raises(OutputDirError, match="not a model export"):
            check_out_dir(m, overwrite=True)
        path.rmdir() if extra == "checkpoints" else path.unlink()
    os.remove(tmp_path / "m" / "model.safetensors")
    assert not is_model_export(m)  # config and tokenizer without weights: not an export
    target = tmp_path / "link"
    target.symlink_to(tmp_path / "m")
    with pytest.raises(OutputDirError, match="is a symbolic link"):
        check_out_dir(str(target), overwrite=True)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_export_modes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = make_tiny_checkpoint(str(tmp_path / "m"))  # save_hf
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
    files = os.listdir(out)
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    for f in files:
        assert os.stat(os.path.join(out, f)).st_mode & 0o777 == 0o666 & ~umask, f


def test_failed_overwrite_keeps_the_previous_export(tmp_path, monkeypatch):
    out = make_tiny_checkpoint(str(tmp_path / "m"), seed=0)
    before = _tree(out)
    model = load_model(make_tiny_checkpoint(str(tmp_path / "other"), seed=1))

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "_write_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, out, overwrite=True)
    assert _tree(out) == before
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".export-")]
