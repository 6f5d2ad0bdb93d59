"""The TPU compiler (libtpu, the tpu-aot extra) compiles every program of an iteration on this CPU
machine: a 2-layer dense student and a 2-layer MoE teacher for a v5e and a v5p slice. A change
that breaks TPU lowering, picks a CPU-only path for a TPU mesh, drops a donation or blows up a
program's memory fails here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("CI"):
    import libtpu  # noqa: F401  (CI installs the tpu-aot extra: a missing compiler is a failure there)
else:
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[tpu-aot]"')

from tgpo_jax.aot.compile import GIB, compile_program, compile_run  # noqa: E402
from tgpo_jax.aot.programs import (
    abstract_run,
    device_bytes,
    iteration_programs,
    mini_batch,
    rollout_batch,
    scored_batch,
)  # noqa: E402
from tgpo_jax.aot.topology import parse_topology, tpu_devices  # noqa: E402
from tgpo_jax.configtree import ConfigError  # noqa: E402
from tgpo_jax.presets import HARDWARE, bundled_hf_config  # noqa: E402
from tgpo_jax.train.config import load_train_config  # noqa: E402

SMALL = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    max_position_embeddings=4096,
)
STUDENT_HF = bundled_hf_config("Qwen2.5-Math-1.5B", SMALL)
TEACHER_HF = bundled_hf_config(
    "Qwen3-30B-A3B-Thinking-2507", {**SMALL, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2}
)
OVERRIDES = [
    "models.student=unused",
    "models.teacher=unused",
    "data.files=[train.jsonl]",
    "eval.data.files=[eval.jsonl]",
    "models.dtype=bfloat16",
    "sharding.teacher_rules={expert: fsdp}",
]


def _cfg(*extra):
    return load_train_config("configs/demo.yaml", OVERRIDES + list(extra))


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_each_hardware_entry_has_its_device_and_host_count(name):
    devices = tpu_devices(parse_topology(name))
    hw = HARDWARE[name]
    assert len(devices) == hw.devices
    assert len({d.process_index for d in devices}) == hw.hosts
    assert {d.platform for d in devices} == {"tpu"}


def test_the_process_still_looks_like_what_it_is_after_libtpu_started():
    """libtpu is told it runs on no TPU VM only while it starts: left in the environment, those
    variables would make a later `train` in this process start jax.distributed as on a TPU VM."""
    from tgpo_jax.sharding.distributed import is_cloud_tpu_env

    before = dict(os.environ)
    tpu_devices(parse_topology("v5p:2x2x2"))
    assert dict(os.environ) == before
    assert not is_cloud_tpu_env()


def test_without_libtpu_compile_says_how_to_install_it(monkeypatch, capsys):
    from tgpo_jax.cli import main

    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    assert main(["preset", "compile", "qwen2.5-math-1.5b__qwen2.5-7b-instruct", "v5p-8"]) == 2
    err = capsys.readouterr().err
    assert "compiling for a TPU needs the TPU compiler, libtpu" in err and 'pip install -e ".[tpu-aot]"' in err


def test_an_unknown_topology_names_the_accepted_forms():
    with pytest.raises(ConfigError, match=r"unknown TPU topology 'v9-8'.*v5p-8.*v5p:2x2x1"):
        parse_topology("v9-8")


@pytest.mark.parametrize("topology", ["v5e:2x4", "v5p:2x2x1"])
def test_every_program_of_an_iteration_compiles_and_fits(topology):
    report = compile_run(_cfg(), STUDENT_HF, TEACHER_HF, topology)
    assert [p.name for p in report.programs] == ["rollout", "score", "train_step", "eval_rollout"]
    for p in report.programs:
        assert p.error is None, p.error
        assert report.fits(p)
        assert 0 < p.program_bytes < 0.1 * GIB
    assert report.summary()["fits"] is True


def test_the_compiler_sees_the_arguments_and_donations_we_size():
    """At real widths (Qwen2.5-Math-1.5B's, two layers) the per-device argument bytes of the TPU
    programs equal the shard arithmetic of their inputs up to the TPU's tile padding (a 12-row
    bias is stored as 16), and the donated train state is written in place: the outputs beyond it
    are the metrics alone."""
    student = bundled_hf_config("Qwen2.5-Math-1.5B", {"num_hidden_layers": 2})
    cfg = _cfg("train.micro_batch=8", "models.param_dtype=float32")
    run = abstract_run(cfg, student, TEACHER_HF, tpu_devices(parse_topology("v5p:2x2x1")))
    progs = {p.name: p for p in iteration_programs(run)}
    train = compile_program(progs["train_step"])
    state = device_bytes(run.train_state)
    assert train.arguments == pytest.approx(state + device_bytes(mini_batch(run, scored_batch(run))) + 4, rel=1e-3)
    assert train.aliased == pytest.approx(state, rel=1e-3)
    assert train.outputs - train.aliased < 64 * 1024  # the metrics
    rollout = compile_program(progs["rollout"])
    kv = device_bytes(run.sampler.cache_shapes(16 * 8, 64 + 48))  # 16 prompts x n = 8, 64-token bucket + 48 new
    prompts = 2 * device_bytes(rollout_batch(run).prompt_BP) // 8  # tokens + mask of the 16 prompts (not x n)
    assert rollout.arguments == pytest.approx(device_bytes(run.train_state.params) + prompts + 8, rel=1e-3)
    assert rollout.temps >= kv  # the cache lives inside the program, freed when it returns
    assert set(rollout.resident) == {"opt_state", "teacher_params"}


def test_a_tpu_program_never_calls_the_cpu_attention_kernel():
    run = abstract_run(_cfg("models.dtype=float32"), STUDENT_HF, TEACHER_HF, tpu_devices(parse_topology("v5e:2x4")))
    for p in iteration_programs(run):
        text = p.lower().as_text()
        assert "tgpo_cpu" not in text and "cpu_attention" not in text, p.name


def test_the_authors_matching_settings_lower_for_tpu():
    """rollout.temperature != 1 and the token-budget aggregation (per-row denominators in the
    mini-batch) reach the programs the TPU compiler is given: score and train step lower, the train
    step with agg_denom_B among its inputs."""
    extra = ("rollout.temperature=0.6", "objective.name=kdrl_k1", "objective.loss_agg=microbatch_sum")
    budget = ("train.micro_batch_tokens=100000", "train.micro_batch_ranks=2")
    run = abstract_run(_cfg(*extra, *budget), STUDENT_HF, TEACHER_HF, tpu_devices(parse_topology("v5e:2x4")))
    assert scored_batch(run).agg_denom_B is not None
    lowered = {p.name: p.lower() for p in iteration_programs(run)}
    assert {"score", "train_step"} <= set(lowered)
    plain = abstract_run(_cfg(*extra), STUDENT_HF, TEACHER_HF, tpu_devices(parse_topology("v5e:2x4")))
    assert scored_batch(plain).agg_denom_B is None


def test_cli_exits_1_naming_the_program_that_does_not_fit(tmp_path):
    for role, hf in (("student", STUDENT_HF), ("teacher", TEACHER_HF)):
        (tmp_path / role).mkdir()
        (tmp_path / role / "config.json").write_text(json.dumps(hf))
    cmd = [sys.executable, "-m", "tgpo_jax.cli", "compile", "--config", "configs/demo.yaml", "--topology", "v5e-8"]
    cmd += ["--only", "train_step", "--headroom", "1e-9"] + OVERRIDES[2:]
    cmd += [f"models.student={tmp_path / 'student'}", f"models.teacher={tmp_path / 'teacher'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "does not fit v5e:2x4: train_step" in r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["fits"] is False and list(summary["programs"]) == ["train_step"]
    p = summary["programs"]["train_step"]
    assert p["hbm_gib"] == 16.0 and p["total_gib"] > 0 and p["compile_s"] > 0
    assert np.isclose(summary["headroom"], 1e-9)


def test_tpu_training_and_scoring_run_splash_attention_at_128_wide_heads():
    """On a TPU mesh `attn_impl: auto` takes the splash kernel where head_dim fills the 128 lanes
    (Qwen2.5-Math-1.5B's widths, two layers): the score and train-step programs call it (forward,
    and the dq / dkv kernels in the train step) and hold no [T, T] score tensor; rollouts (KV
    cache) keep the einsum path. At 16-wide heads auto keeps einsum (control)."""
    import re

    student = bundled_hf_config("Qwen2.5-Math-1.5B", {"num_hidden_layers": 2})
    run = abstract_run(_cfg(), student, TEACHER_HF, tpu_devices(parse_topology("v5p:2x2x1")))
    texts = {p.name: p.lower().as_text() for p in iteration_programs(run)}
    T = 64 + 48  # the demo's prompt bucket + new tokens
    kernels = {name: set(re.findall(r"splash_mha_\w+", text)) for name, text in texts.items()}
    assert any("fwd" in k for k in kernels["score"]) and any("fwd" in k for k in kernels["train_step"])
    assert any("dq" in k for k in kernels["train_step"]) and any("dkv" in k for k in kernels["train_step"])
    assert not kernels["rollout"] and not kernels["eval_rollout"]
    assert not re.search(rf"x{T}x{T}xf32", texts["train_step"])
    small = abstract_run(_cfg(), STUDENT_HF, TEACHER_HF, tpu_devices(parse_topology("v5p:2x2x1")))
    assert not any("splash" in p.lower().as_text() for p in iteration_programs(small))


def test_bench_attention_splash_temps_grow_linearly_einsums_quadratically(capsys):
    """`tgpo-jax bench attention` at 1,024 and 2,048 positions: einsum's temps per row hold at
    least the fp32 scores H * T^2 * 4 bytes and grow about 4x when T doubles; splash's hold no
    [T, T] tensor, so they grow about 2x (at most 2.2x)."""
    from tgpo_jax.cli import main

    def run(seq):
        assert main(["bench", "attention", "--seq", str(seq)]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cases"]

    short, long = run(1024), run(2048)
    for case, heads in (("student_train", 12), ("teacher_score", 32)):
        assert long[case]["einsum"] >= heads * 2048**2 * 4 / GIB
        assert long[case]["einsum"] / short[case]["einsum"] >= 3.5
        assert long[case]["splash"] / short[case]["splash"] <= 2.2, (case, short[case], long[case])


def test_compile_rejects_a_corrupt_config_json_in_one_line(tmp_path, capsys):
    from tgpo_jax.cli import main

    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"],')
    argv = ["compile", "--config", "configs/demo.yaml", "--topology", "v5e-8"]
    argv += [f"models.student={tmp_path / 'student'}", "models.teacher=unused"] + OVERRIDES[2:]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "models.student:" in err and "config.json is not valid JSON" in err


def test_the_paged_engine_compiles_for_tpu_and_calls_the_pallas_paged_kernel():
    """rollout.kv_pages > 0 on a TPU mesh (Qwen2.5-Math-1.5B's 128-wide heads, two layers, bf16):
    the rollout program decodes through jax's Pallas `paged_attention` kernel (its kernel name is
    in the lowered text), compiles, and holds at least its pool (256 pages of 16 tokens over the 4
    page groups); the dense engine's program calls no such kernel and holds at least its cache
    (32 slots x (64 + 48) tokens over the 4 batch shards)."""
    student = bundled_hf_config("Qwen2.5-Math-1.5B", {"num_hidden_layers": 2})
    devices = tpu_devices(parse_topology("v5p:2x2x1"))
    texts, results = {}, {}
    for name, extra in (("dense", ()), ("paged", ("rollout.kv_pages=256", "rollout.page_size=16"))):
        run = abstract_run(_cfg("rollout.slots=32", *extra), student, TEACHER_HF, devices)
        (prog,) = [p for p in iteration_programs(run) if p.name == "rollout"]
        texts[name] = prog.lower().as_text()
        results[name] = compile_program(prog)
        assert results[name].error is None, results[name].error
    assert "paged_flash_attention_kernel" in texts["paged"]
    assert "paged_flash_attention_kernel" not in texts["dense"]
    # the pool stays in the kernel's row-major layout: no step copies it (a scatter whose window
    # spanned the kv heads made the compiler keep it K-minor and copy it for the kernel per layer)
    run = abstract_run(
        _cfg("rollout.slots=32", "rollout.kv_pages=256", "rollout.page_size=16"), student, TEACHER_HF, devices
    )
    (prog,) = [p for p in iteration_programs(run) if p.name == "rollout"]
    hlo = prog.lower().compile().as_text()
    pool = "bf16[2,128,16,128]"  # one device's k or v pool: 2 kv heads x (2 layers x 64 pages) x 16 x 128
    assert pool in hlo
    assert not [line for line in hlo.splitlines() if f"= {pool}" in line and " copy(" in line]
    kv_token = 2 * 2 * 128 * 2 * 2  # k and v x 2 kv heads x 128 x bf16 x 2 layers, per token
    assert results["paged"].temps >= 4096 * kv_token // 4  # the pool, split over the 4 page groups
    assert results["dense"].temps >= 32 * (64 + 48) * kv_token // 4
