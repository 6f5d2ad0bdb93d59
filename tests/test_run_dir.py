"""Run directories never lose or mix work: a resume with a config that changes the math is refused
(or accepted and recorded with --resume-with-changes), a second process is locked out, corrupt or
bit-flipped checkpoints are detected, moved aside and saved again, and metrics.jsonl keeps one
record per iteration across kills, resumes, partial lines and full disks."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from tgpo_jax.configtree import from_dict, to_dict
from tgpo_jax.train import run_dir as rd
from tgpo_jax.train.checkpoint import RunCheckpoints, abstract_of
from tgpo_jax.train.config import TrainConfig
from tgpo_jax.train.metrics import MetricsWriter, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(run_dir: str, **sections) -> dict:
    d = {"run_dir": run_dir, "models": {"student": "/models/a"}, "optimizer": {"lr": 1e-3}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return to_dict(from_dict(TrainConfig, d))


# ---------------------------------------------------------------- config check and history


def test_math_changes_are_refused_naming_each_key(tmp_path):
    run = str(tmp_path)
    rd.record_start(run, _cfg(run), 1, {})
    new = _cfg(run, models={"student": "/models/b"}, optimizer={"lr": 2e-3}, objective={"name": "grpo"})
    with pytest.raises(rd.RunDirConflict) as e:
        rd.check_config(run, new, resume=True)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)  # the CLI prints it as one error
    assert '  models.student: "/models/a" -> "/models/b"' in msg
    assert "  optimizer.lr: 0.001 -> 0.002" in msg
    assert '  objective.name: "tgpo_reg" -> "grpo"' in msg
    assert "new run_dir" in msg and "--resume-with-changes" in msg
    # accepted with the flag: every change is returned for the history
    changes = rd.check_config(run, new, resume=True, resume_with_changes=True)
    assert changes["optimizer.lr"] == (1e-3, 2e-3) and changes["models.student"] == ("/models/a", "/models/b")


def test_neutral_keys_resume_silently(tmp_path):
    run = str(tmp_path)
    rd.record_start(run, _cfg(run), 1, {})
    new = _cfg(
        str(tmp_path / "elsewhere"),
        train={"iterations": 900},
        logging={"progress": False},
        checkpoint={"every": 5, "keep": 9},
        eval={"every": 3},
        rewards={"workers": 8},
        sharding={"mesh": {"data": 2, "fsdp": 4, "tensor": 1}},
        models={"attn_impl": "einsum"},
    )
    changes = rd.check_config(run, new, resume=True)
    assert set(changes) == {
        "run_dir",
        "train.iterations",
        "logging.progress",
        "checkpoint.every",
        "checkpoint.keep",
        "eval.every",
        "rewards.workers",
        "sharding.mesh.data",
        "sharding.mesh.fsdp",
        "models.attn_impl",
    }
    assert all(rd.is_neutral(k) for k in changes)
    assert not rd.is_neutral("train.seed") and not rd.is_neutral("eval.k") and not rd.is_neutral("rewards.think_format")
    # scoring micro-batches change no score (tests/test_score_microbatch.py); eval batches change the draws
    assert rd.is_neutral("train.score_micro_batch") and not rd.is_neutral("eval.batch_size")


def test_a_run_without_resume_does_not_write_over_checkpoints(tmp_path):
    run = str(tmp_path)
    os.makedirs(tmp_path / "checkpoints" / "latest" / "4")
    with pytest.raises(rd.RunDirConflict, match="no config.json"):
        rd.check_config(run, _cfg(run), resume=True)
    rd.record_start(run, _cfg(run), 5, {})
    with pytest.raises(rd.RunDirConflict, match=r"checkpoint.resume=false.*up to iteration 4"):
        rd.check_config(run, _cfg(run, checkpoint={"resume": False}), resume=False)
    history = rd.read_history(run)
    assert [(h["event"], h["start_iteration"]) for h in history] == [("resume", 5)]


# ---------------------------------------------------------------- lock


_HOLDER = textwrap.dedent("""
    import sys, time
    from tgpo_jax.train.run_dir import run_dir_lock
    with run_dir_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def _hold_lock(run: str) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, run],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_process_fails_fast_and_a_killed_holder_frees_the_run_dir(tmp_path, capsys):
    from tgpo_jax.cli import main

    run = str(tmp_path / "run")
    os.makedirs(run)
    holder = _hold_lock(run)
    try:
        with pytest.raises(rd.RunDirBusy, match=rf"run_dir {run} is in use by another process \(pid {holder.pid} "):
            with rd.run_dir_lock(run):
                pass
        # through the CLI: refused before anything is loaded (the student path does not exist)
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {"run_dir": run, "models": {"student": str(tmp_path / "nowhere")}, "objective": {"name": "grpo"}}
            )
        )
        t0 = time.perf_counter()
        assert main(["train", "--config", str(cfg)]) == 2
        assert time.perf_counter() - t0 < 10
        err = capsys.readouterr().err
        assert f"tgpo-jax train: error: run_dir {run} is in use by another process (pid {holder.pid}" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with rd.run_dir_lock(run) as path:  # the kernel dropped the lock with the process
        assert open(path).read().startswith(f"{os.getpid()} ")


# ---------------------------------------------------------------- checkpoints


def _state(i: int) -> dict:
    return {"w": jnp.asarray(np.random.default_rng(i).random(4096), jnp.float32)}


def _saved(root: str, steps=(1, 2, 3)) -> str:
    ckpt = RunCheckpoints(root, keep=5, keep_best=0, async_save=True)
    for i in steps:
        ckpt.save(i, _state(i), {"iteration": i})
    ckpt.close()  # writes the manifest of the last step
    return os.path.join(root, "checkpoints", "latest")


def _array_file(step_dir: str) -> str:
    """The largest file of the step's state: the array chunks."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    return max(files, key=os.path.getsize)


def _flip(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [_flip, _truncate, os.remove])
def test_damaged_checkpoint_is_moved_aside_and_saved_again(tmp_path, damage):
    latest = _saved(str(tmp_path))
    assert all(os.path.isfile(os.path.join(latest, str(s), "tgpo_checksums.json")) for s in (1, 2, 3))
    bad = _array_file(os.path.join(latest, "3"))
    damage(bad)
    ckpt = RunCheckpoints(str(tmp_path), keep=5, keep_best=0, async_save=True)
    rel = os.path.relpath(bad, os.path.join(latest, "3"))
    with pytest.warns(UserWarning, match=rf"checkpoint 3 .* could not be restored \(file {rel} .*moved aside to "):
        step, state, meta = ckpt.restore_latest(abstract_of(_state(0)))
    assert step == 2 and meta == {"iteration": 2}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(2)["w"]))
    (aside,) = os.listdir(tmp_path / "checkpoints" / "corrupt")
    assert aside.startswith("3-") and sorted(os.listdir(latest)) == ["1", "2"]
    ckpt.save(3, _state(3), {"iteration": 3})  # the re-run iteration is saved again
    ckpt.close()
    again = RunCheckpoints(str(tmp_path), keep=5, keep_best=0, async_save=True)
    step, state, _ = again.restore_latest(abstract_of(_state(0)))
    again.close()
    assert step == 3
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(3)["w"]))


@pytest.mark.parametrize("async_save", [True, False])
def test_a_step_gets_its_manifest_once_finalized_not_at_the_next_save(tmp_path, async_save):
    """A run killed right after a save (no next save, no close) still leaves it verifiable."""
    ckpt = RunCheckpoints(str(tmp_path), keep=5, keep_best=0, async_save=async_save)
    ckpt.save(1, _state(1), {"iteration": 1})
    ckpt.wait()
    step_dir = tmp_path / "checkpoints" / "latest" / "1"
    deadline = time.monotonic() + 10  # a watcher thread writes it once the step has its final name
    while not (step_dir / "tgpo_checksums.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (step_dir / "tgpo_checksums.json").exists()
    _flip(_array_file(str(step_dir)))
    with pytest.warns(UserWarning, match=r"checkpoint 1 .* could not be restored \(file "):
        assert ckpt.restore_latest(abstract_of(_state(0))) is None
    ckpt.close()


def test_read_only_access_skips_a_damaged_step_and_leaves_it_in_place(tmp_path):
    """What `tgpo-jax export` uses: it may run beside a live training process, so it moves nothing."""
    latest = _saved(str(tmp_path))
    _flip(_array_file(os.path.join(latest, "3")))
    ckpt = RunCheckpoints(str(tmp_path), keep=5, keep_best=0, async_save=False, read_only=True)
    with pytest.warns(UserWarning, match=r"checkpoint 3 .* could not be restored .*left in place"):
        step, state, _ = ckpt.restore_latest(abstract_of(_state(0)))
    ckpt.close()
    assert step == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(2)["w"]))
    assert sorted(os.listdir(latest)) == ["1", "2", "3"]
    assert not os.path.exists(tmp_path / "checkpoints" / "corrupt")


def test_without_a_manifest_a_flipped_byte_restores_silently_so_it_warns(tmp_path):
    """Why the manifest exists: Orbax restores the flipped array without complaint."""
    latest = _saved(str(tmp_path), steps=(1,))
    os.remove(os.path.join(latest, "1", "tgpo_checksums.json"))
    _flip(_array_file(os.path.join(latest, "1")))
    ckpt = RunCheckpoints(str(tmp_path), keep=5, keep_best=0)
    with pytest.warns(UserWarning, match="checkpoint 1 .* has no checksum manifest"):
        step, state, _ = ckpt.restore_latest(abstract_of(_state(0)))
    ckpt.close()
    assert step == 1
    assert not np.array_equal(np.asarray(state["w"]), np.asarray(_state(1)["w"]))


def test_a_step_orbax_declines_is_not_silently_lost(tmp_path):
    _saved(str(tmp_path), steps=(1, 2))
    ckpt = RunCheckpoints(str(tmp_path), keep=5, keep_best=0)
    with pytest.warns(UserWarning, match="checkpoint 1 was NOT saved: .* already holds step 2"):
        ckpt.save(1, _state(1), {"iteration": 1})
    ckpt.close()


# ---------------------------------------------------------------- metrics.jsonl


def _write(run: str, its, initial: int = 0) -> None:
    w = MetricsWriter(run, tensorboard=False, progress=False, initial_iteration=initial)
    for i in its:
        w.write(i, 2 * i, {"loss/total": float(i)})
    w.close()


def _iterations(run: str) -> list[int]:
    return [r["iteration"] for r in read_jsonl(os.path.join(run, "metrics.jsonl"))]


def test_resume_replaces_rerun_iterations_and_drops_partial_lines(tmp_path):
    run = str(tmp_path)
    _write(run, [1, 2, 3, 4])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "optimizer_step": 1')  # a crash mid-write: no closing brace, no newline
    with pytest.warns(UserWarning, match=r"skipping a partial last line: .*metrics.jsonl:5: "):
        assert _iterations(run) == [1, 2, 3, 4]
    with pytest.warns(UserWarning, match=r"dropping a metrics line .*metrics.jsonl:5: "):
        _write(run, [3, 4, 5], initial=2)  # resumed from the checkpoint of iteration 2
    assert _iterations(run) == [1, 2, 3, 4, 5]
    _write(run, [1], initial=0)  # a fresh start replaces everything
    assert _iterations(run) == [1]


def test_read_jsonl_names_file_and_line_of_a_bad_middle_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"iteration": 1}\n{"iteration": 2, oops\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match=rf"{p}:2: "):
        read_jsonl(str(p))


def test_enospc_during_a_metrics_write_names_the_file_and_the_next_run_recovers(tmp_path, monkeypatch):
    from tgpo_jax.train import metrics

    run = str(tmp_path)
    _write(run, [1, 2])
    real = metrics._LineAppender._write_bytes

    def disk_full(self, data: bytes) -> None:  # half the line reaches the disk, then it is full
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    w = MetricsWriter(run, tensorboard=False, progress=False, initial_iteration=2)
    monkeypatch.setattr(metrics._LineAppender, "_write_bytes", disk_full)
    with pytest.raises(
        OSError,
        match=rf"could not append a metrics record to {tmp_path}/metrics.jsonl: "
        "No space left on device",
    ) as e:
        w.write(3, 6, {"loss/total": 3.0})
    assert e.value.errno == errno.ENOSPC
    w.close()
    monkeypatch.undo()
    assert not (tmp_path / "metrics.jsonl").read_text().endswith("\n")  # the partial line is there
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: "):
        _write(run, [3], initial=2)
    assert _iterations(run) == [1, 2, 3]


def test_a_really_full_disk_leaves_a_recoverable_metrics_file(small_tmpfs):
    tiny_fs = small_tmpfs("16k")
    ballast = os.path.join(tiny_fs, "ballast")
    with open(ballast, "wb") as f:
        f.write(b"x" * 8192)  # half the filesystem, deleted below to make room as a user would
    w = MetricsWriter(tiny_fs, tensorboard=False, progress=False)
    written = 0
    with pytest.raises(
        OSError, match=f"could not append a metrics record to {tiny_fs}/metrics.jsonl: No space left on device"
    ):
        for i in range(1, 10_000):
            w.write(i, i, {f"k{j}": j * 0.5 for j in range(20)})
            written = i
    w.close()
    text = open(os.path.join(tiny_fs, "metrics.jsonl")).read()
    assert written > 5 and text.count("\n") == written and not text.endswith("\n")  # one partial line
    os.remove(ballast)
    with pytest.warns(UserWarning, match=rf"dropping a metrics line .*metrics.jsonl:{written + 1}: "):
        MetricsWriter(tiny_fs, tensorboard=False, progress=False, initial_iteration=written).close()
    assert _iterations(tiny_fs) == list(range(1, written + 1))


# ---------------------------------------------------------------- end to end (tiny models, 8-device CPU mesh)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("run_dir_e2e"))


def _history(run: str) -> list[tuple[str, int]]:
    return [(h["event"], h["start_iteration"]) for h in rd.read_history(run)]


def test_changed_config_refused_then_accepted_and_a_flipped_checkpoint_rerun(root, monkeypatch):
    from train_e2e_helpers import tiny_config

    import tgpo_jax.train.loop as loop
    from tgpo_jax.train.config import load_train_config

    run = os.path.join(root, "changes")
    cfg = lambda it, lr: load_train_config(
        tiny_config(
            root,
            "changes",
            iterations=it,  # noqa: E731
            optimizer={"lr": lr},
            logging={"plot": False},
        )
    )
    loop.train(cfg(2, 1e-3))
    with monkeypatch.context() as m:
        m.setattr(loop, "build_run", lambda *_: pytest.fail("models were built before the config check"))
        with pytest.raises(rd.RunDirConflict, match=r"(?m)^  optimizer.lr: 0.001 -> 0.002$"):
            loop.train(cfg(3, 2e-3))
    loop.train(cfg(3, 2e-3), resume_with_changes=True)
    last = rd.read_history(run)[-1]
    assert last["changes"]["optimizer.lr"] == {"old": 1e-3, "new": 2e-3, "neutral": False}
    assert last["changes"]["train.iterations"] == {"old": 2, "new": 3, "neutral": True}
    assert json.load(open(os.path.join(run, "config.json")))["optimizer"]["lr"] == 2e-3

    _flip(_array_file(os.path.join(run, "checkpoints", "latest", "3")))
    with pytest.warns(UserWarning, match=r"checkpoint 3 .* could not be restored \(file state/.* fails its checksum"):
        loop.train(cfg(4, 2e-3))  # an allowed change only (train.iterations)
    assert [d.split("-")[0] for d in os.listdir(os.path.join(run, "checkpoints", "corrupt"))] == ["3"]
    steps = sorted(int(d) for d in os.listdir(os.path.join(run, "checkpoints", "latest")))
    assert steps == [2, 3, 4]  # 3 saved again
    assert _iterations(run) == [1, 2, 3, 4]
    assert _history(run) == [("start", 1), ("resume", 3), ("resume", 3)]


def test_sigkill_mid_run_then_rerun_keeps_one_record_per_iteration(root):
    from train_e2e_helpers import eight_cpu_device_env, tiny_config

    from tgpo_jax.train.config import load_train_config
    from tgpo_jax.train.loop import train

    n = 5
    cfg = tiny_config(root, "killed", iterations=n, logging={"plot": False, "tensorboard": False})
    path = os.path.join(root, "killed.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    cache = os.environ.get("TGPO_TEST_COMPILE_CACHE") or os.path.join(
        __import__("tempfile").gettempdir(), f"tgpo_jax_test_compile_cache_{os.getuid()}"
    )
    env = eight_cpu_device_env(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tgpo_jax.cli", "train", "--config", path],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = os.path.join(cfg["run_dir"], "checkpoints", "latest", "2", "commit_success.txt")
    deadline = time.time() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    try:
        assert proc.poll() is None, "the run ended before it could be killed"
        with pytest.raises(rd.RunDirBusy, match=rf"in use by another process \(pid {proc.pid} "):
            train(load_train_config(cfg))  # a second process in the same run_dir
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    metrics = os.path.join(cfg["run_dir"], "metrics.jsonl")
    before = _iterations(cfg["run_dir"])
    assert 2 <= len(before) < n
    with open(metrics, "a") as f:
        f.write('{"iteration": 9, "optimizer_st')  # as if killed mid-write
    with pytest.warns(UserWarning, match="dropping a metrics line"):
        train(load_train_config(cfg))
    assert _iterations(cfg["run_dir"]) == list(range(1, n + 1))
    (start, _), (resume, at) = _history(cfg["run_dir"])
    assert (start, resume) == ("start", "resume") and 3 <= at <= len(before) + 1
