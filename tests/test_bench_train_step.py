"""`tgpo-jax bench train-step`: runs end to end on tiny settings (fresh worker processes); the last
stdout line is the JSON report. No timing assertions (CPU load varies)."""

import json
import math

import pytest

from tgpo_jax.bench.flops import full_logits_bytes, model_flops, param_count
from tgpo_jax.bench.train_step_workload import Settings, model_config
from tgpo_jax.cli import main

SMALL = [
    "--batch",
    "4",
    "--prompt-len",
    "8",
    "--response-len",
    "16",
    "--micro-batch",
    "2",
    "--chunk",
    "8",
    "--repeats",
    "3",
]


def _last_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def _positive(r, *keys):
    for k in keys:
        assert isinstance(r[k], (int, float)) and r[k] > 0 and math.isfinite(r[k]), (k, r[k])


def test_quick_no_peer_reports_json(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "train-step",
                "--quick",
                "--no-peer",
                *SMALL,
                "--old-logp",
                "zeros",
                "--turn-steps",
                "3",
                "--json-out",
                str(out_file),
            ]
        )
        == 0
    )
    r = _last_json(capsys)
    for k in ("ours_tokens_per_s", "peer_tokens_per_s", "ratio", "ours_peak_bytes", "peer_peak_bytes"):
        assert k in r, k
    _positive(r, "ours_tokens_per_s", "ours_peak_bytes", "ours_median_s", "ours_compile_s", "ours_rss_before_bytes")
    assert math.isfinite(r["ours_first_loss"])
    assert r["peer_tokens_per_s"] is None and r["ratio"] is None and r["peer_peak_bytes"] is None
    assert r["model"] == "demo" and r["batch"] == 4 and r["tokens_per_step"] == 4 * (8 + 16)
    assert r["device"] == "cpu" and "mfu" not in r  # CPU without --peak-tflops: no MFU
    assert len(r["ours_runs_s"]) == 3 and r["turn_steps"] == 3  # 1 warm-up + 3 timed steps in turns of 3
    assert json.loads(out_file.read_text()) == r


def test_with_pytorch_peer_same_loss(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    # ours data-parallel over 2 host devices: the same loss as the single-process peer
    assert main(["bench", "train-step", "--quick", *SMALL, "--peak-tflops", "1", "--devices", "2"]) == 0
    r = _last_json(capsys)
    assert r["devices"] == 2
    _positive(r, "ours_tokens_per_s", "peer_tokens_per_s", "ratio", "ours_peak_bytes", "peer_peak_bytes", "mfu")
    assert r["ratio"] == pytest.approx(r["ours_tokens_per_s"] / r["peer_tokens_per_s"])
    # same weights, same batch, same loss: the first (pre-update) step's loss agrees
    assert r["first_loss_abs_diff"] < 1e-5, r
    assert r["old_logp"] == "model"


def test_demo_model_is_the_demo_student():
    """`--model demo` is the student `tgpo-jax demo` trains (DemoSettings.student), not another tiny
    body: 2 layers of q 64x64 + 64, k and v 64x32 + 32, o 64x64, gate / up / down 64x192, two norms
    of 64 = 49,408 each; the tied 512 x 64 embedding 32,768; the final norm 64."""
    from tgpo_jax.demo import FULL

    cfg = model_config(Settings(model="demo"))
    st = FULL.student
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        st.hidden_size,
        st.intermediate_size,
        st.num_layers,
        st.num_heads,
        st.num_kv_heads,
        st.head_dim,
    )
    assert cfg.vocab_size == 512 and cfg.tie_word_embeddings and cfg.qkv_bias
    assert param_count(cfg) == 2 * 49_408 + 32_768 + 64 == 131_648


def test_flops_and_full_logits_formulas():
    s = Settings(model="qwen-vocab-tiny", batch=8, prompt_len=64, response_len=4096, micro_batch=1, chunk=256)
    cfg = model_config(s)
    assert cfg.vocab_size == 151936 and cfg.hidden_size == 64 and cfg.max_position_embeddings >= 4160
    fl = full_logits_bytes(cfg, s)
    assert fl["full_logits_tensor_bytes"] == 8 * 4160 * 151936 * 4 > 20e9
    assert fl["full_logits_lower_bound_bytes"] == 3 * fl["full_logits_tensor_bytes"]
    q = Settings(model="qwen2.5-1.5b", batch=16, prompt_len=256, response_len=1792, micro_batch=4, chunk=256)
    qc = model_config(q)
    assert 1.54e9 < param_count(qc) < 1.55e9  # Qwen2.5-1.5B: 1.54B with the tied embedding
    mf = model_flops(qc, q)
    assert mf["params_layers"] == param_count(qc) - 151936 * 1536 - 1536
    assert mf["flops_attention"] == 12 * 28 * 12 * 128 * 2048**2 * 16
    assert mf["flops_per_step"] == mf["flops_body"] + mf["flops_lm_head"] + mf["flops_attention"]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        Settings(batch=6, micro_batch=4)
    with pytest.raises(ValueError):
        Settings(response_len=100, chunk=64)
    with pytest.raises(ValueError, match="devices=3 must be >= 1 and divide micro_batch=4"):
        Settings(devices=3)
    with pytest.raises(ValueError, match="turn_steps=0 must be >= 1"):
        Settings(turn_steps=0)
