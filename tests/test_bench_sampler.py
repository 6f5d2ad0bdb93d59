"""`tgpo-jax bench sampler`: runs end to end on tiny settings; the last stdout line is the JSON report.
No timing assertions (CPU load varies)."""

import json
import math

import pytest

from tgpo_jax.bench.sampler_bench import BenchSettings, model_config, param_count, roofline
from tgpo_jax.cli import main

REQUIRED = (
    "ours_tokens_per_s",
    "peer_tokens_per_s",
    "ratio",
    "model",
    "batch",
    "new_tokens",
    "prompt_len",
    "dtype",
    "compile_s",
    "device",
)
SMALL = ["--prompts", "2", "--n", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "3"]


def _last_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def test_quick_no_peer_reports_json(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    assert main(["bench", "sampler", "--quick", "--no-peer", *SMALL, "--json-out", str(out_file)]) == 0
    r = _last_json(capsys)
    for k in REQUIRED:
        assert k in r, k
    assert r["model"] == "tiny" and r["batch"] == 4 and r["new_tokens"] == 4 and r["prompt_len"] == 8
    assert r["dtype"] == "float32" and r["device"] == "cpu"
    for k in ("ours_tokens_per_s", "compile_s", "ours_median_s"):
        assert isinstance(r[k], float) and r[k] > 0 and math.isfinite(r[k]), k
    assert r["ours_decode_tokens_per_s"] is None  # --quick skips the prefill-alone timing
    assert r["compiles"] == 1  # one executable for the warm-up and every timed call
    assert r["peer_tokens_per_s"] is None and r["ratio"] is None
    assert "roofline_fraction" not in r  # CPU without --hbm-gbps: no roofline
    assert json.loads(out_file.read_text()) == r


def test_with_transformers_peer_and_roofline(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    # Decode time is a difference of two medians (full call minus prefill alone): with 4 new tokens on a
    # loaded CI machine it can drown in timing noise, so generate enough tokens for decode to dominate.
    args = [*SMALL[:-4], "--new-tokens", "48", "--repeats", "3"]
    assert main(["bench", "sampler", "--quick", *args, "--hbm-gbps", "50"]) == 0
    r = _last_json(capsys)
    for k in (
        "ours_tokens_per_s",
        "peer_tokens_per_s",
        "ratio",
        "ours_decode_tokens_per_s",
        "roofline_fraction",
        "roofline_tokens_per_s",
    ):
        assert isinstance(r[k], float) and r[k] > 0, k
    assert r["ratio"] == pytest.approx(r["ours_tokens_per_s"] / r["peer_tokens_per_s"])
    assert r["compiles"] == 2  # the full call and the prefill-only split, each compiled once


def test_model_shapes_and_roofline_formula():
    smol = model_config("smollm2-135m")
    assert 134e6 < param_count(smol) < 136e6  # SmolLM2-135M: 134.5M
    qwen = model_config("qwen2.5-1.5b", "bfloat16")
    assert qwen.param_dtype == "bfloat16" and qwen.tie_word_embeddings and qwen.qkv_bias
    s = BenchSettings(model="qwen2.5-1.5b", prompts=32, n=8, prompt_len=64, new_tokens=1024, dtype="bfloat16")
    rf = roofline(qwen, s, 4800.0)
    kv = 2 * 28 * 256 * (64 + 512) * 2 * 128 * 2
    assert rf["kv_bytes_per_step"] == kv
    assert rf["roofline_tokens_per_s"] == pytest.approx(256 / ((rf["param_bytes_per_step"] + kv) / 4.8e12))


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        BenchSettings(new_tokens=0)
