"""Multi-process JAX: config parsing / environment detection, and a 2-process loopback run on CPU
(4 devices each, one 8-device global mesh) that must reproduce the single-process logits and
parameters exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from multihost_worker import BATCH, MESH, forward_logits, make_batch, param_checksums

from tgpo_jax.models.tiny import make_tiny_checkpoint
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, load_sharded
from tgpo_jax.sharding import distributed as D
from tgpo_jax.sharding.distributed import DistributedConfig, DistributedConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
TIMEOUT_S = 240
_CLEARED_ENV = ("XLA_FLAGS",) + D.TPU_ENV_VARS + tuple(v for vs in D.ENV_VARS.values() for v in vs)


# ------------------------------------------------------------------ config parsing and detection
@pytest.fixture
def clean_env(monkeypatch):
    for v in _CLEARED_ENV:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def test_single_process_when_nothing_is_set(clean_env):
    mode, cfg = D.plan()
    assert mode == "single" and cfg == DistributedConfig()


def test_explicit_from_config():
    mode, cfg = D.plan(DistributedConfig("10.0.0.1:1234", 4, 3), environ={})
    assert mode == "explicit" and (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == (
        "10.0.0.1:1234",
        4,
        3,
    )


def test_explicit_from_our_env(clean_env):
    clean_env.setenv("TGPO_COORDINATOR_ADDRESS", "h:1")
    clean_env.setenv("TGPO_NUM_PROCESSES", "2")
    clean_env.setenv("TGPO_PROCESS_ID", "1")
    assert D.plan() == ("explicit", DistributedConfig("h:1", 2, 1))


def test_jax_env_names_accepted_and_ours_win():
    env = {"JAX_COORDINATOR_ADDRESS": "jax:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "TGPO_PROCESS_ID": "1"}
    assert D.plan(environ=env) == ("explicit", DistributedConfig("jax:1", 2, 1))


def test_config_wins_over_env():
    env = {"TGPO_COORDINATOR_ADDRESS": "env:1", "TGPO_NUM_PROCESSES": "8", "TGPO_PROCESS_ID": "5"}
    _, cfg = D.plan(DistributedConfig(process_id=2), environ=env)
    assert cfg == DistributedConfig("env:1", 8, 2)


@pytest.mark.parametrize(
    "cfg, env, missing",
    [
        (DistributedConfig(coordinator_address="h:1"), {}, ["num_processes", "process_id"]),
        (DistributedConfig(num_processes=2), {}, ["coordinator_address", "process_id"]),
        (DistributedConfig(), {"TGPO_PROCESS_ID": "0"}, ["coordinator_address", "num_processes"]),
    ],
)
def test_partial_settings_name_the_missing(cfg, env, missing):
    with pytest.raises(DistributedConfigError, match="missing") as e:
        D.plan(cfg, environ=env)
    for m in missing:
        assert m in str(e.value)
    present = {"coordinator_address", "num_processes", "process_id"} - set(missing)
    assert not any(f"missing {p}" in str(e.value) or f", {p} (" in str(e.value) for p in present)


@pytest.mark.parametrize("pid, n", [(2, 2), (5, 4), (-1, 2)])
def test_process_id_out_of_range(pid, n):
    with pytest.raises(DistributedConfigError, match=rf"process_id must be in \[0, num_processes={n}\)"):
        D.plan(DistributedConfig("h:1", n, pid), environ={})


def test_bad_values():
    with pytest.raises(DistributedConfigError, match="TGPO_NUM_PROCESSES='two' is not an integer"):
        D.plan(environ={"TGPO_NUM_PROCESSES": "two"})
    with pytest.raises(DistributedConfigError, match="num_processes must be >= 1"):
        D.plan(DistributedConfig("h:1", 0, 0), environ={})
    with pytest.raises(DistributedConfigError, match="host:port"):
        D.plan(DistributedConfig("localhost", 2, 0), environ={})


@pytest.mark.parametrize(
    "var", ["TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE", "MEGASCALE_COORDINATOR_ADDRESS"]
)
def test_cloud_tpu_detected(var):
    env = {var: "x"}
    assert D.is_cloud_tpu_env(env)
    assert D.plan(environ=env) == ("tpu", DistributedConfig())


def test_cloud_tpu_lets_jax_fill_partial_settings_but_checks_complete_ones():
    env = {"TPU_WORKER_ID": "0", "TGPO_COORDINATOR_ADDRESS": "h:1"}
    assert D.plan(environ=env)[0] == "tpu"
    with pytest.raises(DistributedConfigError, match="process_id must be in"):
        D.plan(DistributedConfig("h:1", 2, 2), environ={"TPU_WORKER_ID": "0"})


def test_not_tpu_on_empty_values():
    assert not D.is_cloud_tpu_env({"TPU_WORKER_ID": "", "OTHER": "1"})


def test_initialize_calls_jax_only_when_multi_process(monkeypatch, clean_env):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(D, "_state", {})
    assert D.initialize() is False and calls == []
    assert D.initialize(DistributedConfig("h:1", 2, 0)) is False and calls == []  # idempotent: no-op

    monkeypatch.setattr(D, "_state", {})
    assert D.initialize(DistributedConfig("h:1", 2, 1, local_device_ids=(0, 1))) is True
    assert calls == [dict(coordinator_address="h:1", num_processes=2, process_id=1, local_device_ids=[0, 1])]
    assert D.initialize() is True and len(calls) == 1

    monkeypatch.setattr(D, "_state", {})
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "a,b")
    assert D.initialize() is True
    assert calls[-1] == dict(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None)


def test_initialize_rejects_partial_before_touching_jax(monkeypatch, clean_env):
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("must not be called"))
    monkeypatch.setattr(D, "_state", {})
    with pytest.raises(DistributedConfigError, match="missing num_processes"):
        D.initialize(DistributedConfig(coordinator_address="h:1", process_id=0))
    assert D._state == {}


# ------------------------------------------------------------------ single-process helpers
def test_single_process_batch_helpers():
    mesh = build_mesh(MeshConfig.from_dict(MESH))
    spec = ShardingRules().spec(("batch", "seq"))
    assert D.process_batch_slice(BATCH) == slice(0, BATCH)
    assert D.process_batch_slice(BATCH, mesh, spec) == slice(0, BATCH)
    x = np.arange(BATCH * 3, dtype=np.float32).reshape(BATCH, 3)
    g = D.host_local_to_global(x, mesh, spec)
    assert g.shape == x.shape and g.sharding.spec == spec
    assert np.array_equal(D.global_to_host(g), x)
    assert D.process_batch_slice(7) == slice(0, 7)  # one process feeds every row


# ------------------------------------------------------------------ 2-process loopback
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
    env.update(
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
    )
    return env


def _run_workers(ckpt: str, out: str, n: int = 2) -> list[tuple[int, str]]:
    """Starts n workers, waits for all (TIMEOUT_S in total); returns [(returncode, stderr)]."""
    coord = f"127.0.0.1:{_free_port()}"
    procs = []
    try:
        for i in range(n):
            cmd = [
                sys.executable,
                WORKER,
                "--ckpt",
                ckpt,
                "--out",
                out,
                "--coordinator",
                coord,
                "--num-processes",
                str(n),
                "--process-id",
                str(i),
            ]
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        results = []
        for p in procs:
            try:
                stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                errs = [q.communicate()[1] for q in procs]
                pytest.fail(
                    f"workers timed out after {TIMEOUT_S}s; stderr:\n"
                    + "\n".join(f"--- process {j}\n{e[-4000:]}" for j, e in enumerate(errs))
                )
            results.append((p.returncode, stdout + stderr))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(
        str(tmp_path_factory.mktemp("mh") / "ckpt"),
        arch="qwen2",
        seed=3,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
    )


def test_two_processes_match_single_process(tiny_ckpt, tmp_path):
    # Reference: this process, 8 CPU devices, same mesh, rules, checkpoint and batch.
    assert jax.device_count() == 8
    mesh = build_mesh(MeshConfig.from_dict(MESH))
    rules = ShardingRules()
    model = load_sharded(tiny_ckpt, mesh, rules)
    tokens, mask = make_batch(model.cfg.vocab_size)
    assert mask.min() == 0  # really left-padded
    ref_logits = forward_logits(model, tokens, mask, mesh, rules)
    ref_sums = param_checksums(model)

    out = tmp_path / "out"
    out.mkdir()
    results = _run_workers(tiny_ckpt, str(out))
    failed = [(i, rc, log) for i, (rc, log) in enumerate(results) if rc != 0]
    assert not failed, "\n".join(f"--- process {i} exited {rc}\n{log[-6000:]}" for i, rc, log in failed)

    for pid in range(2):
        logits = np.load(out / f"logits_p{pid}.npy")
        assert logits.shape == ref_logits.shape == (BATCH, tokens.shape[1], model.cfg.vocab_size)
        assert logits.dtype == np.float32
        assert np.isfinite(logits).all()
        diff = np.abs(logits - ref_logits).max()
        assert diff <= 1e-5, f"process {pid}: max abs logit diff {diff}"
        meta = json.loads((out / f"meta_p{pid}.json").read_text())
        assert (meta["process_index"], meta["process_count"], meta["local_devices"], meta["devices"]) == (pid, 2, 4, 8)
        assert meta["rows"] == [pid * BATCH // 2, (pid + 1) * BATCH // 2]
        for path, rep in meta["shards"].items():
            # the mesh spans both processes: no parameter is fully held by one process, and each
            # process materialised only its 4 devices' shards
            assert not rep["fully_addressable"] and len(rep["local_shard_sizes"]) == 4, path
        assert meta["shards"]["layers.q_kernel"]["local_shard_sizes"][0] < meta["shards"]["layers.q_kernel"]["size"]

    assert json.loads((out / "checksums.json").read_text()) == ref_sums
