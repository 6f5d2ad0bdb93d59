"""tgpo-jax sweep: expansion into named runs, the plan, errors, a real local sweep of two tiny runs
and its summary table (checked against each run's metrics.jsonl)."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from train_e2e_helpers import tiny_config

from tgpo_jax import sweep as sw
from tgpo_jax.configtree import ConfigError


def _write(path, d) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return str(path)


def test_grid_expands_to_named_runs(tmp_path):
    cfg = _write(tmp_path / "base.yaml", {"models": {"student": "s", "teacher": "t"}})
    s = sw.load_sweep(
        _write(
            tmp_path / "sw.yaml",
            {
                "name": "g",
                "base": {"config": cfg},
                "run_root": "gs://b/sw",
                "overrides": {"train.iterations": 5},
                "grid": {"objective.name": ["tgpo_reg", "rkl"], "optimizer.lr": [1e-6, 2e-6]},
            },
        )
    )
    assert [r.name for r in s.runs] == ["tgpo_reg_lr1e-06", "tgpo_reg_lr2e-06", "rkl_lr1e-06", "rkl_lr2e-06"]
    r = s.runs[2]
    assert r.run_dir == "gs://b/sw/rkl_lr1e-06"
    assert r.override_args() == ["train.iterations=5", "objective.name=rkl", "optimizer.lr=1e-06"]
    d = r.train_dict()
    assert d["objective"]["name"] == "rkl" and d["optimizer"]["lr"] == 1e-6 and d["run_dir"] == r.run_dir


def test_preset_runs_and_tpu_commands():
    s = sw.load_sweep("configs/sweeps/teacher_ladder_1p5b.yaml", run_root="gs://b/ladder")
    assert len(s.runs) == 4 and s.runs[3].preset == "qwen2.5-math-1.5b__r1-distill-qwen-32b"
    sw.validate_runs(s)
    assert sw.tpu_command(s.runs[0], "lad-1", "us-east5-a") == (
        "bash launch/tpu.sh babysit --name lad-1 --zone us-east5-a --preset qwen2.5-math-1.5b__qwen2.5-math-7b-instruct "
        "--hardware v5p-8 --run-dir gs://b/ladder/qwen2.5-math-1.5b__qwen2.5-math-7b-instruct"
    )


@pytest.mark.parametrize(
    "body, message",
    [
        ({"base": {"config": "x.yaml"}}, "exactly one of `grid`"),
        ({"base": {"config": "x.yaml"}, "grid": {"a": 1}}, "grid must map each dotted key to a non-empty list"),
        ({"base": {"config": "x.yaml"}, "runs": [{"name": "a"}, {"name": "a"}]}, "run names repeat: a"),
        ({"base": {"preset": "p"}, "runs": [{"name": "a"}]}, "names no hardware"),
        ({"base": {}, "runs": [{"name": "a"}]}, "base must be"),
        ({"base": {"config": "x.yaml"}, "runs": [{"name": "a"}], "colour": 1}, "unknown key\\(s\\) colour"),
    ],
)
def test_bad_sweeps_are_named(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        sw.load_sweep(_write(tmp_path / "s.yaml", body))


def test_invalid_run_config_names_the_run(tmp_path):
    cfg = _write(tmp_path / "base.yaml", {"models": {"student": "s"}})
    s = sw.load_sweep(
        _write(tmp_path / "s.yaml", {"base": {"config": cfg}, "runs": [{"name": "bad", "overrides": {"rollout.n": 1}}]})
    )
    with pytest.raises(ConfigError, match=r"(?s)sweep run .bad.:.*rollout.n=1"):
        sw.validate_runs(s)


def test_local_sweep_runs_and_summarizes(tmp_path, capsys):
    from tgpo_jax.cli import main

    base = tiny_config(str(tmp_path), "unused", iterations=1)
    base.update(checkpoint={"every": 0}, logging={"progress": False, "tensorboard": False, "plot": False})
    cfg = _write(tmp_path / "base.yaml", base)
    path = _write(
        tmp_path / "sweep.yaml",
        {"name": "tiny", "base": {"config": cfg}, "run_root": str(tmp_path / "sw"), "grid": {"train.seed": [0, 1]}},
    )
    assert main(["sweep", path]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "sw" / "summary.json") as f:
        rows = {r["run"]: r for r in json.load(f)}
    assert set(rows) == {"seed0", "seed1"}
    for name in rows:
        with open(tmp_path / "sw" / name / "metrics.jsonl") as f:
            last = [json.loads(x) for x in f][-1]
        assert rows[name]["status"] == "ok" and rows[name]["iteration"] == 1
        assert rows[name]["reward/mean"] == last["reward/mean"] and rows[name]["loss/total"] == last["loss/total"]
    assert (
        "| seed0 | ok | 1 |" in out and "| seed1 | ok | 1 |" in out and os.path.exists(tmp_path / "sw" / "summary.md")
    )
    # --summary alone finds the same runs; a run that does not exist is listed as not found
    s = sw.load_sweep(path)
    table, found = sw.summarize(s)
    assert [r["status"] for r in found] == ["found", "found"]
