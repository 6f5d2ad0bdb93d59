"""The training loop over a mesh that spans 2 processes (loopback, CPU): every iteration's
metrics equal those of a single process with the same 8-device mesh, only process 0 writes
metrics, and the checkpoint both processes saved together resumes in a single process."""

from __future__ import annotations

import os
import sys

import pytest
import yaml
from test_multihost import REPO, _free_port, _worker_env
from train_e2e_helpers import comparable, last_per_iteration, tiny_config

from tgpo_jax.train.config import load_train_config
from tgpo_jax.train.loop import train

WORKER = os.path.join(REPO, "tests", "multihost_train_worker.py")
TIMEOUT_S = 420


def _run_two(config_path: str) -> list[tuple[int, str]]:
    import subprocess

    coord = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(2):
        # process 0 is told by the environment, process 1 by its config (sharding.distributed)
        env = dict(_worker_env(), WORKER_LOCAL_DEVICES="4")
        args = []
        if i == 0:
            env.update(TGPO_COORDINATOR_ADDRESS=coord, TGPO_NUM_PROCESSES="2", TGPO_PROCESS_ID="0")
        else:
            args = [
                f"sharding.distributed.coordinator_address={coord}",
                "sharding.distributed.num_processes=2",
                "sharding.distributed.process_id=1",
            ]
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, config_path, *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        return [(p.wait(timeout=TIMEOUT_S), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_process_training_matches_single_process(tmp_path):
    # TGPO-Reg exercises every cross-process path: sampling (gathered rollouts), teacher scoring,
    # mini-batch updates with FSDP/tensor collectives, eval, and a jointly written checkpoint.
    extra = {
        "eval": {
            "every": 2,
            "k": 1,
            "max_new_tokens": 8,
            "data": {"rg_tasks": ["chain_sum"], "rg_size": 4, "rg_seed": 7},
        },
        "checkpoint": {"every": 2, "async_save": False},
        "logging": {"tensorboard": False, "plot": False},
    }
    multi = tiny_config(str(tmp_path), "multi", iterations=2, **extra)
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(multi))
    results = _run_two(str(path))
    failed = [(i, rc, log) for i, (rc, log) in enumerate(results) if rc != 0]
    assert not failed, "\n".join(f"--- process {i} exited {rc}\n{log[-6000:]}" for i, rc, log in failed)

    train(load_train_config(tiny_config(str(tmp_path), "single", iterations=2, **extra)))
    got = last_per_iteration(os.path.join(multi["run_dir"], "metrics.jsonl"))
    want = last_per_iteration(str(tmp_path / "single" / "metrics.jsonl"))
    assert sorted(got) == sorted(want) == [1, 2]  # one record per iteration: only process 0 wrote
    assert "eval/score" in got[2]
    for it in want:
        g, w = comparable(got[it]), comparable(want[it])
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (it, k, g[k], w[k])
    assert (tmp_path / "multi" / "checkpoints").exists()

    # The checkpoint written jointly by the two processes resumes in one process with the same mesh.
    resumed = tiny_config(str(tmp_path), "multi", iterations=3, **extra)
    train(load_train_config(resumed))
    tail = last_per_iteration(os.path.join(multi["run_dir"], "metrics.jsonl"))
    assert sorted(tail) == [1, 2, 3] and tail[3]["optimizer_step"] == 2 * 3
