"""`tgpo-jax experiment hard` (issue 26): the per-iteration reward-signal metrics, the teacher
gradient share, the validation split, tuning on it, CI aggregation, and --quick end to end on a
reduced config."""

import json
import math

import numpy as np
import pytest
import yaml

from tgpo_jax.cli import main
from tgpo_jax.configtree import ConfigError
from tgpo_jax.experiments.divergence import (
    Cell,
    cell_train_dict,
    cells,
    choose_tuned,
    load_experiment_config,
    tuning_cells,
)
from tgpo_jax.experiments.report import aggregate, ci95, paired_table, verdict
from tgpo_jax.tasks.chain_sum import TaskSpec, make_task_data, validation_path
from tgpo_jax.train.config import load_train_config
from tgpo_jax.train.iteration import group_reward_metrics


def test_group_reward_metrics_count_all_equal_groups():
    # 4 groups of 3: all zero, mixed, all one, all zero
    r = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0], np.float32)
    m = group_reward_metrics(r, 3)
    assert m == {"reward/all_equal_group_frac": pytest.approx(0.75), "reward/all_zero_group_frac": pytest.approx(0.5)}
    assert group_reward_metrics(r, 1) == {}


HARD = "configs/experiment_hard.yaml"


def test_shipped_config_full_and_quick():
    full = load_experiment_config(HARD)
    assert len(full.seeds) >= 5 and full.interval == "ci95" and full.task.validation > 0
    assert {"grpo", "rkl", "kdrl", "tgpo_reg", "tgpo_adv"} <= set(full.methods)
    assert set(full.tune) == {"tgpo_reg", "tgpo_adv", "kdrl"} and all(c[0] == [] for c in full.tune.values())
    assert not set(full.tune_seeds) & set(full.seeds)
    plan = cells(full, tuned={m: {} for m in full.tune})
    teacher_methods = len(full.methods) - 1
    T = len(full.teachers)
    assert (
        T >= 2
        and any(t.style_b_frac == 0.0 for t in full.teachers)
        and any(t.style_b_frac > 0.5 for t in full.teachers)
    )
    assert len(plan) == len(full.seeds) * (1 + T * (teacher_methods + len(full.tune)))
    assert len(tuning_cells(full)) == len(full.tune_seeds) * T * sum(len(c) for c in full.tune.values())
    # the paper's TGPO-Reg schedule, not demo.yaml's scaled one; the prompts fit
    d = cell_train_dict(full, Cell("tgpo_reg", "t", 0), "/s", "/t", "/tr", "/ho")
    tc = load_train_config(d)
    assert tc.objective.schedule() == (0.002, 1e-5, 0.0) and tc.logging.grad_share_every > 0
    quick = load_experiment_config(HARD, quick=True)
    assert quick.seeds == (0,) and list(quick.tune) == ["tgpo_reg"] and quick.out_dir != full.out_dir


LONG_CLI = [  # the `long` variant as docs/experiments.md first gave it, all on the command line
    "variant=long",
    "methods=[grpo, tgpo_reg]",
    "tune={}",
    "teachers=[{name: same_style, style_b_frac: 1.0}, {name: style_a_only, style_b_frac: 0.0}]",
    "train_overrides=[data.max_prompt_len=72, 'rollout.prompt_buckets=[72]', rollout.max_new_tokens=64, "
    "eval.max_new_tokens=64, train.iterations=300, eval.every=50, logging.grad_share_every=25]",
    "method_overrides={grpo: [optimizer.lr=0.0003], tgpo_reg: [objective.lambda_0=1.0, objective.lambda_decay=0.0, "
    "optimizer.lr=0.003]}",
]


def test_bundled_variant_replaces_keys_and_the_command_still_wins():
    long = load_experiment_config(HARD, overrides=["variant=long"])
    assert long.methods == ("grpo", "tgpo_reg") and long.tune == {} and long.variant == "long"
    assert [t.name for t in long.teachers] == ["same_style", "style_a_only"]
    assert long.report_dir.endswith("variants/long")
    # the bundled form trains exactly the cells of the command-line form (same cell configs, so a
    # run started either way resumes under the other)
    cli = load_experiment_config(HARD, overrides=LONG_CLI)
    paths = ("/s", "/t", "/tr", "/ho")
    for cell in cells(long, tuned={}):
        assert cell_train_dict(long, cell, *paths) == cell_train_dict(cli, cell, *paths)
    tc = load_train_config(cell_train_dict(long, Cell("tgpo_reg", "same_style", 0), *paths))
    assert tc.train.iterations == 300 and tc.objective.schedule()[:2] == (1.0, 0.0) and tc.optimizer.lr == 0.003
    grpo = load_train_config(cell_train_dict(long, Cell("grpo", None, 0), *paths))
    assert grpo.optimizer.lr == 0.0003
    # overrides on the command line apply over the variant; an unbundled name is a plain variant
    assert load_experiment_config(HARD, overrides=["variant=long", "seeds=[7]"]).seeds == (7,)
    other = load_experiment_config(HARD, overrides=["variant=mine"])
    assert other.methods == load_experiment_config(HARD).methods and other.report_dir.endswith("variants/mine")
    assert load_experiment_config(HARD, overrides=["variant=long_grpo_lr3e3"]).methods == ("grpo",)
    reg = load_experiment_config(HARD, overrides=["variant=long_reg_lr3e4"])
    tc = load_train_config(cell_train_dict(reg, Cell("tgpo_reg", "same_style", 0), *paths))
    assert reg.methods == ("tgpo_reg",) and tc.train.iterations == 300 and tc.optimizer.lr == 0.0003
    assert tc.objective.schedule()[:2] == (1.0, 0.0)


def test_bundled_variant_errors(tmp_path):
    d = yaml.safe_load(open(HARD))
    for bad, message in (({"x": {"seedz": [1]}}, "seedz"), ({"x": {"variant": "y"}}, "cannot set")):
        d["variants"] = bad
        p = tmp_path / "exp.yaml"
        p.write_text(yaml.safe_dump(d))
        with pytest.raises(ConfigError, match=message):
            load_experiment_config(str(p), overrides=["variant=x"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"tune": {"tgpo_adv": [[]]}, "methods": ["grpo", "tgpo_reg"]}, "'tgpo_adv' is not in methods"),
        ({"tune": {"grpo": [[]]}}, "no teacher coefficient"),
        ({"tune": {"tgpo_reg": [[]]}, "tune_seeds": [0]}, "must differ from seeds"),
        ({"tune": {"tgpo_reg": [[]]}, "tune_seeds": [9], "task": {"validation": 0}}, "needs a validation split"),
        ({"interval": "sem"}, "interval"),
    ],
)
def test_config_errors(tmp_path, bad, message):
    d = yaml.safe_load(open(HARD))
    d.pop("quick")
    d.update(bad)
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=message):
        load_experiment_config(str(p))


def test_validation_split_is_disjoint(tmp_path):
    spec = TaskSpec(digits=2, rg_size=600, heldout=20, validation=10)
    train, heldout, stats = make_task_data(str(tmp_path), spec)
    rows = {p: [json.loads(x)["problem"] for x in open(p)] for p in (train, heldout, validation_path(str(tmp_path)))}
    sets = [set(v) for v in rows.values()]
    assert [len(v) for v in rows.values()][1:] == [20, 10] and stats["validation"] == 10
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    # without a validation split the data (and so every cached SFT model) is what it always was
    _, _, s0 = make_task_data(str(tmp_path / "b"), TaskSpec(digits=2, rg_size=600, heldout=20))
    assert "validation" not in s0 and s0["train"] == stats["train"] + 10


def _res(method, teacher, seed, acc, arm="", **signals):
    recs = [{"iteration": 1, **signals}, {"iteration": 2, "eval/score": acc}]
    label = f"{method}@{arm}" if arm else method
    return {"method": method, "teacher": teacher, "seed": seed, "arm": arm, "label": label, "records": recs}


def test_choose_tuned_on_validation_means():
    cfg = load_experiment_config(HARD)
    results = [
        _res("kdrl", "knows_student_style", 100, 0.10, "c0"),
        _res("kdrl", "knows_student_style", 100, 0.30, "c1"),
        _res("kdrl", "knows_student_style", 100, 0.30, "c2"),  # a tie keeps the earlier candidate
        _res("kdrl", "style_a_only", 100, 0.20, "c0"),
        _res("kdrl", "style_a_only", 100, 0.05, "c1"),
    ]
    ch = choose_tuned(cfg, results)["kdrl"]
    assert ch["knows_student_style"]["candidate"] == 1
    assert ch["knows_student_style"]["overrides"] == ["objective.kdrl_beta=0.02"]
    assert ch["style_a_only"]["candidate"] == 0 and ch["style_a_only"]["validation"] == {0: 0.2, 1: 0.05}


def test_ci95_and_paired_differences():
    assert ci95([0.5]) == 0.0
    # t_{0.975, 2} = 4.3027; stdev of (0.1, 0.2, 0.3) = 0.1
    assert ci95([0.1, 0.2, 0.3]) == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    results = [_res("grpo", None, s, a, **{"reward/all_equal_group_frac": 0.9}) for s, a in enumerate([0.1, 0.2, 0.3])]
    results += [_res("tgpo_reg", "a", s, a, **{"teacher/grad_share": 0.4}) for s, a in enumerate([0.2, 0.2, 0.5])]
    results += [_res("tgpo_reg", "a", s, a, arm="tuned") for s, a in enumerate([0.3, 0.4, 0.5])]
    agg = aggregate(results, ["a"], ["grpo", "tgpo_reg", "tgpo_reg@tuned"])
    assert agg["ci95"]["grpo"]["a"] == pytest.approx(ci95([0.1, 0.2, 0.3]))
    mean, half, n = agg["paired"]["tgpo_reg@tuned"]["a"]  # differences 0.2, 0.2, 0.2
    assert (mean, half, n) == (pytest.approx(0.2), pytest.approx(0.0, abs=1e-12), 3)
    assert agg["paired"]["tgpo_reg"]["a"][0] == pytest.approx(0.1) and "grpo" not in agg["paired"]
    assert agg["signals"]["grpo"]["a"]["reward/all_equal_group_frac"] == {1: pytest.approx(0.9)}
    assert agg["signals"]["tgpo_reg"]["a"]["teacher/grad_share"] == {1: pytest.approx(0.4)}
    table = paired_table(agg, ["a"], ["grpo", "tgpo_reg", "tgpo_reg@tuned"])
    assert "| tgpo_reg@tuned | +20.0 ± 0.0* |" in table
    v = verdict(agg, ["a"], ["grpo", "tgpo_reg", "tgpo_reg@tuned"])
    assert v[0] == "- Beats GRPO beyond seed noise: tgpo_reg@tuned with a (+20.0 ± 0.0 points)."
    assert v[1].endswith("none.") and "Best TGPO arm with a: tgpo_reg@tuned" in v[2]


def test_quick_end_to_end_with_tuning(tmp_path, capsys):
    tiny = {"hidden_size": 32, "intermediate_size": 64, "head_dim": 8, "steps": 3}
    d = yaml.safe_load(open(HARD))
    d.update(
        out_dir=str(tmp_path / "full"),
        methods=["grpo", "tgpo_reg"],
        teachers=[{"name": "knows", "style_b_frac": 0.2}],
        task={"min_terms": 2, "max_terms": 3, "digits": 2, "rg_size": 600, "heldout": 8, "validation": 8},
        quick={
            "out_dir": str(tmp_path / "quick"),
            "seeds": [0],
            "tune_seeds": [7],
            "tune": {"tgpo_reg": [[], ["objective.lambda_0=0.02"]]},
            "student": tiny,
            "teacher": tiny,
            "train_overrides": d["quick"]["train_overrides"][:4]
            + [
                "train.iterations=2",
                "eval.every=2",
                "eval.k=1",
                "rollout.prompts_per_iteration=4",
                "rollout.n=4",
                "train.micro_batch=8",
                "logging.grad_share_every=1",
            ],
        },
    )
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(d))
    assert main(["experiment", "hard", "--config", str(p), "--quick"]) == 0
    out = tmp_path / "quick"
    res = json.loads((out / "results.json").read_text())
    tuned = json.loads((out / "tuning.json").read_text())
    assert tuned["tgpo_reg"]["knows"]["candidate"] in (0, 1) and res["tuned"] == tuned
    for m in ("grpo", "tgpo_reg", "tgpo_reg@tuned"):
        mean, std, n = res["accuracy"][m]["knows"]
        assert 0.0 <= mean <= 1.0 and n == 1 and res["ci95"][m]["knows"] == 0.0
    assert set(res["paired"]) == {"tgpo_reg", "tgpo_reg@tuned"}
    sig = res["signals"]["tgpo_reg"]["knows"]
    assert set(sig["reward/all_equal_group_frac"]) == {"1", "2"}  # iterations (JSON keys)
    assert all(0.0 <= v <= 1.0 for v in sig["teacher/grad_share"].values()) and len(sig["teacher/grad_share"]) == 2
    assert "teacher/grad_share" not in res["signals"]["grpo"]["knows"]
    report = (out / "report.md").read_text()
    assert "| tgpo_reg@tuned |" in report and "validation split" in report and "all-equal" in report
    assert all((out / f"{n}.png").stat().st_size > 0 for n in ("training_curves", "signals", "accuracy_vs_divergence"))
    # tuning cells (2 candidates x 1 teacher x 1 seed) + grpo + tgpo_reg + tgpo_reg@tuned
    assert len(list((out / "cells").iterdir())) == 2 + 3
    capsys.readouterr()
    assert main(["experiment", "hard", "--config", str(p), "--quick", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("(cached)") == 5
    # an interim report from the finished cells: one cell "not finished yet" is left out, nothing trains
    import shutil

    shutil.rmtree(out / "cells" / "tgpo_reg@tuned__knows__seed0")
    assert main(["experiment", "hard", "--config", str(p), "--quick", "--no-progress", "--report-only"]) == 0
    assert (
        capsys.readouterr().out.count("(cached)") == 4 and not (out / "cells" / "tgpo_reg@tuned__knows__seed0").exists()
    )
    assert "tgpo_reg@tuned" not in json.loads((out / "results.json").read_text())["accuracy"]


def test_one_training_experiment_per_out_dir(tmp_path):
    from tgpo_jax.experiments.divergence import _lock_out_dir

    lock = _lock_out_dir(str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="another experiment is running"):
            _lock_out_dir(str(tmp_path))
    finally:
        lock.close()
    _lock_out_dir(str(tmp_path)).close()  # released: free again


def test_grad_share_is_measured_where_a_teacher_term_can_be_switched_off():
    from tgpo_jax.objectives.registry import ObjectiveConfig
    from tgpo_jax.train.grad_share import GradShare, make_grad_share, measurable

    assert [
        n for n in ("grpo", "rkl", "kdrl", "tgpo_reg", "tgpo_adv", "tgpo_mc") if measurable(ObjectiveConfig(n))
    ] == [
        "kdrl",
        "tgpo_reg",
        "tgpo_adv",
        "tgpo_mc",
    ]
    assert make_grad_share(None, obj_cfg=ObjectiveConfig("tgpo_reg"), micro_batch=8, chunk=16, every=0) is None
    assert make_grad_share(None, obj_cfg=ObjectiveConfig("grpo"), micro_batch=8, chunk=16, every=5) is None
    assert [it for it in range(1, 13) if GradShare(None, 5).due(it)] == [1, 6, 11]
