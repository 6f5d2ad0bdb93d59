"""launch/tpu.sh --dry-run against golden outputs (tests/golden/launch/*.txt, checked by hand), the
argv of key commands against hand-written expectations, errors, and the worker-side script."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "launch")
PRESET = "qwen2.5-math-1.5b__r1-distill-qwen-7b"

CASES = {
    "create_v5e_spot": "create --name tgpo --hardware v5e-8 --spot",
    "create_v4_32_project": "create --name pod --hardware v4-32 --zone us-central2-b --project my-proj --preemptible",
    "install": "install --name tgpo --hardware v5p-8",
    "models": f"models --name tgpo --hardware v5p-8 --preset {PRESET} --models-from gs://bkt/models --data-from gs://bkt/data",
    "run_preset": f"run --name tgpo --hardware v5p-8 --preset {PRESET} --run-dir gs://bkt/runs/r1 -- train.iterations=300 objective.name=tgpo_reg",
    "run_config": "run --name tgpo --zone us-east5-a --config configs/demo.yaml --run-dir runs/demo",
    "logs": "logs --name tgpo --zone us-east5-a --worker 1 --follow",
    "fetch": "fetch --name tgpo --zone us-east5-a --run-dir gs://bkt/runs/r1 --to runs/r1",
    "status": "status --name tgpo --hardware v4-8",
    "stop": "stop --name tgpo --hardware v4-32",
    "delete": "delete --name tgpo --hardware v4-32",
    "babysit_pod": f"babysit --name pod --hardware v4-32 --spot --preset {PRESET} --run-dir gs://bkt/runs/r1 "
    "--models-from gs://bkt/models --interval 600 -- train.iterations=300",
}


def tpu_sh(args: list[str]) -> subprocess.CompletedProcess:
    """launch/tpu.sh COMMAND --dry-run ARGS. --dry-run goes right after the command (anything after
    `--` is an override), and TPU_DRY_RUN=1 in the environment guarantees nothing is executed."""
    argv = [args[0], "--dry-run", *args[1:]]
    return subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "tpu.sh"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": "/tmp", "TPU_DRY_RUN": "1"},
        timeout=60,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_matches_golden(case):
    out = tpu_sh(shlex.split(CASES[case]))
    assert out.returncode == 0, out.stderr
    path = os.path.join(GOLDEN, f"{case}.txt")
    if os.environ.get("UPDATE_GOLDEN"):
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:
            f.write(out.stdout)
    with open(path) as f:
        assert out.stdout == f.read(), f"launch/tpu.sh {CASES[case]} --dry-run differs from {path}"


def test_sweep_tpu_plan_matches_golden():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tgpo_jax.cli",
            "sweep",
            "configs/sweeps/objectives_1p5b.yaml",
            "--tpu",
            "obj",
            "--run-root",
            "gs://bkt/sweeps/obj",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    with open(os.path.join(GOLDEN, "sweep_objectives_tpu.txt")) as f:
        assert out.stdout == f.read()


def _lines(case: str) -> list[list[str]]:
    out = tpu_sh(shlex.split(CASES[case]))
    return [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]


def test_create_argv():
    (argv,) = _lines("create_v5e_spot")
    assert argv == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "tgpo",
        "--zone=us-west4-a",
        "--accelerator-type=v5litepod-8",
        "--version=v2-alpha-tpuv5-lite",
        "--spot",
    ]


def test_run_reaches_every_worker_with_overrides_intact():
    out = tpu_sh(
        [
            "run",
            "--name",
            "t",
            "--hardware",
            "v4-32",
            "--preset",
            PRESET,
            "--run-dir",
            "gs://b/r",
            "--",
            "eval.data={files: [data/a b.jsonl]}",
            "train.iterations=3",
        ]
    )
    (argv,) = [shlex.split(x) for x in out.stdout.splitlines()]
    assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t", "--zone=us-central2-b", "--worker=all"]
    remote = shlex.split(argv[8].removeprefix("--command="))
    assert remote == [
        "bash",
        "~/tgpo_jax/launch/tpu_worker.sh",
        "start",
        "preset",
        "train",
        PRESET,
        "v4-32",
        "run_dir=gs://b/r",
        "eval.data={files: [data/a b.jsonl]}",
        "train.iterations=3",
    ]


def test_hardware_table_matches_presets():
    from tgpo_jax.presets import HARDWARE

    src = (
        "source launch/tpu_lib.sh; for h in $HW_NAMES; do "
        "echo $h ${HW_ACCEL[$h]} ${HW_RUNTIME[$h]} ${HW_HOSTS[$h]} ${HW_ZONE[$h]}; done"
    )
    out = subprocess.run(["bash", "-c", src], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    got = [line.split() for line in out.splitlines()]
    assert got == [[h.name, h.accelerator_type, h.runtime_version, str(h.hosts), h.zone] for h in HARDWARE.values()]


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "--name", "t", "--hardware", "v9-8"], "unknown hardware 'v9-8'; accepted: v4-8 v5e-8 v5p-8 v4-32"),
        (["create", "--hardware", "v4-8"], "--name TPU_NAME is required"),
        (
            ["babysit", "--name", "t", "--hardware", "v4-8", "--preset", PRESET, "--run-dir", "runs/x"],
            "babysit needs --run-dir gs://",
        ),
        (["run", "--name", "t", "--hardware", "v4-8"], "run needs --preset NAME --hardware HW, or --config FILE"),
        (["frobnicate", "--name", "t", "--hardware", "v4-8"], "unknown command 'frobnicate'"),
        (
            ["create", "--name", "t", "--hardware", "v4-8", "--spot", "--preemptible"],
            "--spot or --preemptible, not both",
        ),
    ],
)
def test_errors(args, message):
    out = tpu_sh(args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_worker_script_start_status_stop(tmp_path):
    """tpu_worker.sh on this machine, with `sleep` / `true` standing in for tgpo-jax."""
    script = os.path.join(ROOT, "launch", "tpu_worker.sh")

    def worker(*args, bin_="sleep"):
        env = {**os.environ, "TGPO_RUN_STATE": str(tmp_path), "TGPO_BIN": bin_}
        return subprocess.run(
            ["bash", script, *args], capture_output=True, text=True, env=env, timeout=30
        ).stdout.strip()

    assert worker("status") == "idle"
    assert worker("start", "30").startswith("started")
    assert worker("status") == "running"
    assert worker("stop") == "stopped"
    for _ in range(50):
        if worker("status") != "running":
            break
        time.sleep(0.1)
    assert worker("status") == "stopped"
    assert worker("start", bin_="true").startswith("started")
    for _ in range(50):
        if worker("status") == "done":
            break
        time.sleep(0.1)
    assert worker("status") == "done"
