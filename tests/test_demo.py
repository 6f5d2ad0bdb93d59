"""`tgpo-jax demo --quick`: the embedded default end to end (data -> two SFT models -> held-out
accuracy -> TGPO-Reg -> summary), at smoke scale; and its pieces against hand-made expectations."""

import json
import os

from tgpo_jax.cli import main
from tgpo_jax.demo import QUICK, make_task_data, style_a, style_b


def test_solution_styles_are_correct_and_different():
    assert style_a("2 + 2 + 9") == "2 + 2 = 4\n4 + 9 = 13\n</think>\n\\boxed{13}"
    assert style_b("2 + 2 + 9") == "From the right: 9 + 2 is 11, 11 + 2 is 13.\n</think>\n\\boxed{13}"


def test_task_data_split_is_disjoint_and_correct(tmp_path):
    train, heldout, stats = make_task_data(str(tmp_path), QUICK.task)
    rows = {p: [json.loads(line) for line in open(p)] for p in (train, heldout)}
    assert len(rows[heldout]) == QUICK.task.heldout == stats["heldout"] and len(rows[train]) == stats["train"]
    assert not {r["problem"] for r in rows[train]} & {r["problem"] for r in rows[heldout]}
    for r in rows[train][:50] + rows[heldout]:
        expr = r["problem"].removeprefix("What is ").removesuffix("?")
        assert int(r["answer"]) == sum(int(x) for x in expr.split("+"))
        assert r["teacher_solution"].endswith(f"\\boxed{{{r['answer']}}}")
    # cached: a second call returns the same files without rewriting them
    mtime = os.path.getmtime(train)
    assert make_task_data(str(tmp_path), QUICK.task)[2] == stats and os.path.getmtime(train) == mtime


def test_quick_demo_end_to_end_then_cached(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["cached_sft"] == {"teacher": False, "student": False}
    for k in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= summary[k] <= 1.0, k
    assert [it for it, _ in summary["eval_curve"]] == [0, 1, 2]
    assert summary["gap_iteration_1"]["gap/mismatch_ratio"] is not None
    assert (out / "tgpo" / "curves.png").exists() and (out / "summary.md").exists()
    assert "student after TGPO-Reg" in capsys.readouterr().out
    # the SFT models are cached: asking for them again trains nothing
    from tgpo_jax.demo import sft_model
    from tgpo_jax.configtree import load_yaml

    data = {k: v for k, v in load_yaml("configs/demo.yaml")["data"].items() if k != "files"}
    train_path = str(out / "data" / "train.jsonl")
    for name, spec in (("teacher", QUICK.teacher), ("student", QUICK.student)):
        assert sft_model(str(out), name, spec, train_path, data) == (summary[name], True)
    assert "cached SFT model" in capsys.readouterr().out
