"""`tgpo-jax demo --quick`: the embedded default end to end (data -> two SFT models -> held-out
accuracy -> TGPO-Reg -> summary), at smoke scale, interrupted and rerun; and its pieces against
hand-made expectations."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tgpo_jax.cli import main
from tgpo_jax.configtree import load_yaml
from tgpo_jax.demo import QUICK
from tgpo_jax.demo_dirs import KEY_FILE, MARKER, claim_dir
from tgpo_jax.tasks.chain_sum import make_task_data, style_a, style_b
from tgpo_jax.train.sft_cache import sft_checkpoint_every, sft_model


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


def _demo_env() -> dict[str, str]:
    """The demo subprocesses' environment: this process's (XLA_FLAGS from conftest included), offline."""
    return dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _demo_held_at(out, stage: str, step: int, sig: int, tmp_path) -> subprocess.CompletedProcess:
    """`tgpo-jax demo --quick --out OUT` in a subprocess, sent `sig` from here while it holds still
    right after the checkpoint of `step` of `stage`'s SFT (tests/demo_interrupt_driver.py)."""
    trigger = tmp_path / f"held_{stage}_{step}"
    cmd = [
        sys.executable,
        os.path.join(os.path.dirname(__file__), "demo_interrupt_driver.py"),
        stage,
        str(step),
        str(trigger),
        "--",
        "demo",
        "--quick",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_demo_env())
    deadline = time.monotonic() + 600
    while not trigger.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert trigger.exists(), f"the demo never reached {stage} step {step}:\n{stdout}\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _sft_steps_on_disk(out, stage: str) -> list[int]:
    latest = out / stage / "sft" / "checkpoints" / "latest"
    return sorted(int(d) for d in os.listdir(latest) if d.isdigit())


def test_quick_demo_interrupted_twice_then_completes_and_caches(tmp_path, capsys):
    """Ctrl-C during the teacher's SFT, then the same command killed (SIGKILL) during the student's:
    each rerun continues the SFT from its last checkpoint, and the third run finishes the demo."""
    out = tmp_path / "demo"
    every = sft_checkpoint_every(QUICK.teacher.steps)
    first = _demo_held_at(out, "teacher", every, signal.SIGINT, tmp_path)
    assert first.returncode == 130 and "Traceback" not in first.stderr, first.stderr[-3000:]
    assert "continues an unfinished SFT from its last checkpoint" in first.stderr
    assert re.search(rf"sft: .*\d/{QUICK.teacher.steps}", first.stderr)  # the SFT progress bar, on stderr
    assert (out / "teacher" / MARKER).exists() and not (out / "teacher" / KEY_FILE).exists()
    assert _sft_steps_on_disk(out, "teacher") == [every]

    second = _demo_held_at(out, "student", every, signal.SIGKILL, tmp_path)
    assert second.returncode == -signal.SIGKILL
    assert "[demo] teacher: continuing the unfinished SFT" in second.stdout
    assert f"[sft] resumed from step {every} " in second.stdout, second.stdout
    assert (out / "teacher" / KEY_FILE).exists() and not (out / "student" / KEY_FILE).exists()
    assert _sft_steps_on_disk(out, "student") == [every]

    # the third run in a subprocess too: a native abort there fails this test with its stderr,
    # instead of killing the whole pytest process with the reason lost to output capture
    cmd = [sys.executable, "-m", "tgpo_jax.cli", "demo", "--out", str(out), "--quick"]
    third = subprocess.run(cmd, capture_output=True, text=True, env=_demo_env(), timeout=1200)
    assert third.returncode == 0, third.stderr[-3000:]
    printed = third.stdout
    assert "[demo] teacher: cached SFT model" in printed and "[demo] student: continuing the unfinished SFT" in printed
    assert f"[sft] resumed from step {every} " in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["cached_sft"] == {"teacher": True, "student": False}
    for k in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= summary[k] <= 1.0, k
    assert [it for it, _ in summary["eval_curve"]] == [0, 1, 2]
    assert summary["gap_iteration_1"]["gap/mismatch_ratio"] is not None
    assert (out / "tgpo" / "curves.png").exists() and (out / "summary.md").exists()
    assert "student after TGPO-Reg" in printed
    # the SFT models are cached: asking for them again trains nothing
    data = {k: v for k, v in load_yaml("configs/demo.yaml")["data"].items() if k != "files"}
    train_path = str(out / "data" / "train.jsonl")
    for name, spec in (("teacher", QUICK.teacher), ("student", QUICK.student)):
        assert sft_model(str(out), name, spec, train_path, data) == (summary[name], True)
    assert "cached SFT model" in capsys.readouterr().out


def test_foreign_directory_under_out_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "notes.txt").write_text("mine")
    (out / "teacher" / "config.json").write_text("{}")  # an earlier demo's config.json alone is no proof
    assert main(["demo", "--out", str(out), "--quick"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'teacher'} exists and was not written by the demo" in err and "choose another --out" in err
    assert sorted(os.listdir(out / "teacher")) == ["config.json", "notes.txt"]


def test_claim_dir_marks_continues_and_refuses(tmp_path):
    key = {"spec": {"steps": 3}}
    d = tmp_path / "teacher"
    assert claim_dir(str(d), "sft", key) is False and json.loads((d / MARKER).read_text()) == {"key": key}
    (d / "sft").mkdir()
    (d / ".export-abc").mkdir()  # an export a kill interrupted
    assert claim_dir(str(d), "sft", key) is True  # same key: the work in it is continued
    assert sorted(os.listdir(d)) == [MARKER, "sft"]
    assert claim_dir(str(d), "sft", {"spec": {"steps": 4}}) is False  # another key: started over
    assert os.listdir(d) == [MARKER]
    # left half-written by a demo from before the marker: only names the demo writes there
    legacy = tmp_path / "student"
    legacy.mkdir()
    (legacy / "sft_data.jsonl").write_text("")
    (legacy / "init").mkdir()
    assert claim_dir(str(legacy), "sft", key) is False and os.listdir(legacy) == [MARKER]
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "train.jsonl").write_text("")
    (foreign / "mine.txt").write_text("")
    with pytest.raises(ValueError, match="was not written by the demo"):
        claim_dir(str(foreign), "data")
    assert sorted(os.listdir(foreign)) == ["mine.txt", "train.jsonl"]
    (tmp_path / "tgpo").write_text("a file")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        claim_dir(str(tmp_path / "tgpo"), "tgpo")


def test_full_demo_shows_tgpo_progress_and_quick_does_not():
    from tgpo_jax.demo import DEFAULT_CONFIG, FULL, train_config_dict
    from tgpo_jax.train.config import load_train_config

    def progress(settings):
        d = train_config_dict(DEFAULT_CONFIG, "/tmp/x", "s", "t", "a.jsonl", "b.jsonl", settings.train_overrides)
        return load_train_config(d).logging.progress

    assert progress(FULL) is True and progress(QUICK) is False
    assert sft_checkpoint_every(FULL.teacher.steps) == 50 and sft_checkpoint_every(QUICK.teacher.steps) == 2
