"""`tgpo-jax experiment divergence`: config validation, the cell plan, aggregation against
hand-computed values, and the --quick path end to end on a reduced config."""

import json
import math

import pytest
import yaml

from tgpo_jax.cli import main
from tgpo_jax.configtree import ConfigError
from tgpo_jax.experiments.divergence import (
    Cell,
    ExperimentConfig,
    TeacherRung,
    cell_train_dict,
    cells,
    load_experiment_config,
)
from tgpo_jax.experiments.report import aggregate, markdown_table
from tgpo_jax.train.config import load_train_config


def _write(tmp_path, d) -> str:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def test_shipped_config_parses_full_and_quick():
    full = load_experiment_config("configs/experiment_divergence.yaml")
    assert len(full.teachers) >= 3 and len(full.seeds) >= 3
    assert set(full.methods) == {"grpo", "rkl", "kdrl", "tgpo_reg", "tgpo_adv"}
    quick = load_experiment_config("configs/experiment_divergence.yaml", quick=True)
    assert quick.seeds == (0,) and quick.out_dir != full.out_dir and quick.teachers == full.teachers


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"seedz": [0]}, "valid keys"),
        ({"methods": ["grpo", "ppo"]}, "unknown objective 'ppo'"),
        ({"teachers": [{"name": "a", "style_b_frac": 1.5}]}, "style_b_frac must be in [0, 1]"),
        ({"teachers": [{"name": "a", "style_b_frac": 0.5}, {"name": "a", "style_b_frac": 0.0}]}, "distinct names"),
        ({"method_overrides": {"kdrl": ["x=1"]}, "methods": ["grpo"]}, "'kdrl' is not in methods"),
        ({"base_config": "/nonexistent.yaml"}, "file not found"),
    ],
)
def test_config_errors_name_the_problem(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_experiment_config(_write(tmp_path, bad))


def test_cell_plan_and_train_configs(tmp_path):
    cfg = ExperimentConfig(
        out_dir=str(tmp_path),
        teachers=(TeacherRung("a", 1.0), TeacherRung("b", 0.0)),
        seeds=(0, 1),
        method_overrides={"kdrl": ["objective.kdrl_beta=0.01"]},
    )
    plan = cells(cfg)
    # GRPO once per seed (no teacher); the 4 teacher methods once per teacher and seed
    assert len(plan) == 2 * (1 + 4 * 2)
    assert [c for c in plan if c.method == "grpo"] == [Cell("grpo", None, 0), Cell("grpo", None, 1)]
    for c in plan:
        d = cell_train_dict(cfg, c, "/s", None if c.teacher is None else f"/t/{c.teacher}", "/tr.jsonl", "/ho.jsonl")
        assert d["objective"]["name"] == c.method and d["train"]["seed"] == c.seed
        assert d["models"]["teacher"] == ("" if c.method == "grpo" else f"/t/{c.teacher}")
        assert d["run_dir"].endswith(c.name) and d["train"]["iterations"] == 40  # the base config's
        # only TGPO-Reg takes the base config's lambda schedule; the others keep the spec's defaults
        assert ("lambda_0" in d["objective"]) == (c.method == "tgpo_reg")
        tc = load_train_config(d)
        if c.method == "tgpo_adv":
            assert tc.objective.schedule()[:2] == (0.02, 1e-4)
        if c.method == "kdrl":
            assert tc.objective.kdrl_beta == 0.01


def _result(method, teacher, seed, accs, gap=None, lengths=(10.0, 12.0)):
    recs = []
    for i, (acc, ln) in enumerate(zip(accs, lengths), 1):
        r = {"iteration": i, "eval/score": acc, "response/length_mean": ln}
        if gap and i == 1:
            r.update({"gap/reverse_kl_k1": gap[0], "gap/mismatch_ratio": gap[1]})
        recs.append(r)
    return {"method": method, "teacher": teacher, "seed": seed, "records": recs}


def test_aggregate_hand_computed():
    results = [
        _result("tgpo_reg", "a", 0, [0.2, 0.4], gap=(1.0, 0.2)),
        _result("tgpo_reg", "a", 1, [0.3, 0.6], gap=(3.0, 0.4)),
        _result("rkl", "a", 0, [0.1, 0.1], gap=(2.0, 0.3)),
        _result("grpo", None, 0, [0.2, 0.5]),
    ]
    agg = aggregate(results, ["a", "b"], ["grpo", "rkl", "tgpo_reg"])
    assert agg["divergence"]["a"] == {"gap/reverse_kl_k1": 2.0, "gap/mismatch_ratio": pytest.approx(0.3)}
    mean, std, n = agg["accuracy"]["tgpo_reg"]["a"]
    assert (mean, n) == (pytest.approx(0.5), 2) and std == pytest.approx(math.sqrt(0.02))  # stdev of 0.4, 0.6
    assert agg["accuracy"]["grpo"] == {"a": (0.5, 0.0, 1), "b": (0.5, 0.0, 1)}  # teacher-independent
    assert "b" not in agg["accuracy"]["tgpo_reg"]
    assert agg["curves"]["tgpo_reg"]["a"] == {1: pytest.approx(0.25), 2: pytest.approx(0.5)}
    table = markdown_table(agg, ["a", "b"], ["grpo", "rkl", "tgpo_reg"])
    assert "| tgpo_reg | 50.0 ± 14.1 (n=2) | n/a |" in table
    assert "| grpo (no teacher) | 50.0 ± 0.0 (n=1) | 50.0 ± 0.0 (n=1) |" in table
    assert "| *gap/reverse_kl_k1 at iteration 1* | 2.000 | n/a |" in table


def test_quick_end_to_end_then_cached(tmp_path, capsys):
    d = yaml.safe_load(open("configs/experiment_divergence.yaml"))
    d.update(
        out_dir=str(tmp_path / "full"),
        methods=["grpo", "rkl", "tgpo_reg"],
        teachers=[{"name": "same", "style_b_frac": 1.0}, {"name": "different", "style_b_frac": 0.0}],
        task={"heldout": 16},
        quick={
            "out_dir": str(tmp_path / "quick"),
            "seeds": [0],
            "student": {"steps": 3, "hidden_size": 32, "intermediate_size": 64, "head_dim": 8},
            "teacher": {"steps": 3, "hidden_size": 32, "intermediate_size": 64, "head_dim": 8},
            "train_overrides": [
                "train.iterations=2",
                "eval.every=1",
                "eval.k=1",
                "rollout.prompts_per_iteration=4",
                "rollout.n=4",
                "train.micro_batch=8",
            ],
        },
    )
    path = _write(tmp_path, d)
    assert main(["experiment", "divergence", "--config", path, "--quick"]) == 0
    out = tmp_path / "quick"
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["teachers_by_divergence"]) == ["different", "same"]
    for t in ("same", "different"):
        assert math.isfinite(res["divergence"][t]["gap/reverse_kl_k1"])
        assert 0.0 <= res["divergence"][t]["gap/mismatch_ratio"] <= 1.0
        for m in ("grpo", "rkl", "tgpo_reg"):
            mean, std, n = res["accuracy"][m][t]
            assert 0.0 <= mean <= 1.0 and n == 1
    report = (out / "report.md").read_text()
    assert "| tgpo_reg |" in report and "| rkl |" in report and "| grpo (no teacher) |" in report
    assert (out / "accuracy_vs_divergence.png").stat().st_size > 0 and (out / "training_curves.png").exists()
    assert len(list((out / "cells").iterdir())) == 1 + 2 * 2
    capsys.readouterr()
    # rerun: every SFT model and every cell comes from the cache
    assert main(["experiment", "divergence", "--config", path, "--quick"]) == 0
    log = capsys.readouterr().out
    assert log.count("(cached)") == 5 and log.count("cached SFT model") == 3


def test_overrides_and_variant_keep_cells_and_report_apart(tmp_path):
    cfg = load_experiment_config(
        "configs/experiment_divergence.yaml",
        out_dir=str(tmp_path),
        overrides=[
            "variant=lam002",
            "methods=[tgpo_reg]",
            "seeds=[0]",
            "method_overrides.tgpo_reg=[objective.lambda_0=0.002, objective.lambda_decay=0.0]",
        ],
    )
    assert (
        cfg.methods == ("tgpo_reg",) and cfg.seeds == (0,) and cfg.report_dir == str(tmp_path / "variants" / "lam002")
    )
    cell = cells(cfg)[0]
    d = cell_train_dict(cfg, cell, "/s", "/t", "/tr.jsonl", "/ho.jsonl")
    assert d["run_dir"] == str(tmp_path / "cells" / f"{cell.name}__lam002")
    assert load_train_config(d).objective.schedule() == (0.002, 0.0, 0.0)
    with pytest.raises(ConfigError, match="valid keys"):
        load_experiment_config("configs/experiment_divergence.yaml", overrides=["variantt=x"])
