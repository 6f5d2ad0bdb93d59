"""HF import/export: round trips through transformers, sharded checkpoints, sharded placement and
every bad-input case (clear error, nothing half-built)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_tiny import TINY, hf_logits, left_padded_batch, make_hf_model
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from tgpo_jax.models import ModelConfigError, left_pad_positions
from tgpo_jax.models.hf_export import flat_params, save_hf
from tgpo_jax.models.hf_import import CheckpointError, load_model


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    hf = make_hf_model("qwen2", str(d))
    return str(d), hf


def _logits(model, tokens, mask):
    return np.asarray(model(jnp.asarray(tokens), left_pad_positions(jnp.asarray(mask)), jnp.asarray(mask))[0])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama_tied"])
def test_export_then_transformers_load_gives_identical_logits(kind, tmp_path):
    import transformers

    src = tmp_path / "src"
    hf = make_hf_model(kind, str(src))
    model = load_model(str(src))
    out = save_hf(model, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32")
    tokens, mask = left_padded_batch(TINY["vocab_size"])
    a, b = hf_logits(hf, tokens, mask), hf_logits(reloaded, tokens, mask)
    assert np.array_equal(a, b), np.abs(a - b).max()
    # and back into JAX: bitwise-identical parameters
    again = load_model(out)
    for k, v in flat_params(model).items():
        assert np.array_equal(np.asarray(v), np.asarray(flat_params(again)[k])), k


def test_sharded_index_export_and_load(qwen2_dir, tmp_path):
    path, hf = qwen2_dir
    model = load_model(path)
    out = save_hf(model, str(tmp_path / "sharded"), max_shard_bytes=40_000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and len(shards) > 2 and "model.safetensors" not in files
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(shards)
    tokens, mask = left_padded_batch(TINY["vocab_size"])
    assert np.array_equal(_logits(load_model(out), tokens, mask), _logits(model, tokens, mask))
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32")
    assert np.array_equal(hf_logits(reloaded, tokens, mask), hf_logits(hf, tokens, mask))


def test_bf16_and_fp16_checkpoints_load(qwen2_dir, tmp_path):
    path, _ = qwen2_dir
    model = load_model(path)
    for dt, np_dt in (("bfloat16", "bfloat16"), ("float16", "float16")):
        out = save_hf(model, str(tmp_path / dt), dtype=dt)
        stored = load_file(os.path.join(out, "model.safetensors"))
        assert str(stored["model.embed_tokens.weight"].dtype) == np_dt
        m = load_model(out)  # upcast to fp32 params
        emb = np.asarray(m.embed[...])
        assert np.array_equal(emb, stored["model.embed_tokens.weight"].astype(np.float32))


def test_loads_straight_into_given_shardings(qwen2_dir):
    path, _ = qwen2_dir
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shardings = {
        "embed": NamedSharding(mesh, P("fsdp", "tensor")),
        "layers.q_kernel": NamedSharding(mesh, P(None, "fsdp", "tensor", None)),
        "layers.down_kernel": NamedSharding(mesh, P(None, "tensor", "fsdp")),
        "layers.gate_kernel": NamedSharding(mesh, P(None, None, ("fsdp", "tensor"))),
    }
    from tgpo_jax.models.hf_import import load_params

    cfg = load_model(path).cfg
    sharded = load_params(path, cfg, shardings)
    plain = load_params(path, cfg)
    for k, s in shardings.items():
        assert sharded[k].sharding == s
        # each device holds only its shard
        shard = sharded[k].addressable_shards[0]
        assert shard.data.size < sharded[k].size
        assert np.array_equal(np.asarray(sharded[k]), np.asarray(plain[k])), k


def test_transformers_sharded_checkpoint_loads(tmp_path):
    """A sharded checkpoint written by transformers itself (not by our exporter) loads with parity."""
    hf = make_hf_model("qwen3", None)
    hf.save_pretrained(str(tmp_path / "m"), max_shard_size="40KB")
    files = os.listdir(tmp_path / "m")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    tokens, mask = left_padded_batch(TINY["vocab_size"])
    diff = np.abs(_logits(load_model(str(tmp_path / "m")), tokens, mask) - hf_logits(hf, tokens, mask))
    assert diff[mask.astype(bool)].max() <= 1e-4


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_legacy_top_level_rope_fields(kind, tmp_path):
    """Older config.json files keep RoPE as top-level rope_theta (+ rope_scaling with 'type'), not
    rope_parameters: both layouts give the logits transformers computes from that same file."""
    import transformers

    d = str(tmp_path / kind)
    make_hf_model(kind, d)
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    params = cfg.pop("rope_parameters")
    if kind == "qwen2":
        cfg["rope_theta"] = 50.0  # far from every default: ignoring it changes the logits
    else:
        cfg["rope_theta"] = params.pop("rope_theta")
        params["type"] = params.pop("rope_type")  # the oldest spelling
        cfg["rope_scaling"] = params
    json.dump(cfg, open(path, "w"))
    ours = load_model(d)
    assert ours.cfg.rope_theta == cfg["rope_theta"]
    assert ours.cfg.rope_scaling.rope_type == ("llama3" if kind == "llama3" else "default")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype="float32").eval()
    assert hf.config.rope_parameters["rope_theta"] == cfg["rope_theta"]
    tokens, mask = left_padded_batch(TINY["vocab_size"])
    diff = np.abs(_logits(ours, tokens, mask) - hf_logits(hf, tokens, mask))
    assert diff[mask.astype(bool)].max() <= 1e-4


class _SpyHandle:
    """A safetensors handle that records every get_tensor call."""

    def __init__(self, handle, reads):
        self._h, self._reads = handle, reads

    def __enter__(self):
        self._h.__enter__()
        return self

    def __exit__(self, *exc):
        return self._h.__exit__(*exc)

    def get_tensor(self, name):
        self._reads.append(name)
        return self._h.get_tensor(name)

    def __getattr__(self, k):
        return getattr(self._h, k)


def test_import_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Loading never holds a second copy of the checkpoint: each parameter is built by one callback
    that reads only its own HF tensors, once, and needs on top of its result at most one HF tensor
    of host memory (numpy allocations, measured with tracemalloc). With shardings, a device's
    callback reads only the layers of its own shard."""
    import tracemalloc

    from tgpo_jax.models import hf_import
    from tgpo_jax.models.config import ModelConfig
    from tgpo_jax.models.hf_rules import expected_hf_tensors
    from tgpo_jax.models.params import param_specs

    cfg = ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=512,
        num_layers=8,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        qkv_bias=True,
    )
    rng = np.random.default_rng(0)
    tensors = {
        n: rng.standard_normal(shape).astype(np.float32) for n, (_, _, shape) in expected_hf_tensors(cfg).items()
    }
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    json.dump(cfg.to_hf_dict(), open(d / "config.json", "w"))
    sizes = {n: t.nbytes for n, t in tensors.items()}
    del tensors

    reads, calls = [], []
    real_open, real_make = hf_import._open, jax.make_array_from_callback
    monkeypatch.setattr(hf_import, "_open", lambda f: _SpyHandle(real_open(f), reads))

    def make_array(shape, sharding, callback):
        def measured(index):
            n_before = len(reads)
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            out = callback(index)
            extra = tracemalloc.get_traced_memory()[1] - before - out.nbytes
            calls.append((shape, index, reads[n_before:], extra))
            return out

        return real_make(shape, sharding, measured)

    monkeypatch.setattr(hf_import.jax, "make_array_from_callback", make_array)
    tracemalloc.start()
    try:
        flat = hf_import.load_params(str(d), cfg)
    finally:
        tracemalloc.stop()
    assert len(calls) == len(param_specs(cfg)) == len(flat)  # one callback per parameter (one device)
    assert sorted(reads) == sorted(sizes)  # every HF tensor read exactly once
    for shape, _, names, extra in calls:
        assert names, shape
        assert extra <= max(sizes[n] for n in names) + 64 * 1024, (shape, names[0], extra)

    # Sharded: layers over 4 devices -> each device's callback reads only its own 2 layers.
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    reads.clear()
    calls.clear()
    sharded = hf_import.load_params(str(d), cfg, {"layers.gate_kernel": NamedSharding(mesh, P("fsdp", None, "tensor"))})
    gate = [c for c in calls if c[2][0].endswith("gate_proj.weight")]
    assert len(gate) == 8
    for _, index, names, _ in gate:
        own = range(8)[index[0]]
        assert len(own) == 2
        assert names == [f"model.layers.{i}.mlp.gate_proj.weight" for i in own]
    assert np.array_equal(np.asarray(sharded["layers.gate_kernel"]), np.asarray(flat["layers.gate_kernel"]))


# ------------------------------------------------------------------------------- bad input
def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model("/nonexistent/model")


def test_missing_config(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir[0], tmp_path / "m")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(d)


def test_missing_weights_file(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir[0], tmp_path / "m")
    os.remove(os.path.join(d, "model.safetensors"))
    open(os.path.join(d, "pytorch_model.bin"), "wb").close()
    with pytest.raises(CheckpointError, match=r"no model.safetensors.*pickled .bin"):
        load_model(d)


def test_unsupported_architecture_lists_supported(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir[0], tmp_path / "m")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(
        ModelConfigError, match=r"GPT2LMHeadModel.*Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM"
    ):
        load_model(d)


def _rewrite(d, fn):
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_wrong_shape_named(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir[0], tmp_path / "m")
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(d, lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[111, 64\], expected \[112, 64\]"):
        load_model(d)


def test_missing_weight_named(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir[0], tmp_path / "m")
    _rewrite(d, lambda t: t.pop("model.layers.2.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing weights: model.layers.2.self_attn.k_proj.bias"):
        load_model(d)


def test_unexpected_weight_named(qwen2_dir, tmp_path):
    d = _copy(qwen2_dir[0], tmp_path / "m")
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected weights: model.layers.0.extra.weight"):
        load_model(d)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_safetensors(qwen2_dir, tmp_path, how):
    d = _copy(qwen2_dir[0], tmp_path / "m")
    path = os.path.join(d, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(b"\x00garbage" if how == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or unreadable safetensors file"):
        load_model(d)


def test_index_naming_missing_shard(qwen2_dir, tmp_path):
    model = load_model(qwen2_dir[0])
    out = save_hf(model, str(tmp_path / "sharded"), max_shard_bytes=40_000)
    victim = sorted(f for f in os.listdir(out) if f.startswith("model-00002-of-"))[0]
    os.remove(os.path.join(out, victim))
    with pytest.raises(CheckpointError, match="shard files that do not exist: model-00002-of"):
        load_model(out)


def test_export_failure_keeps_previous_export(qwen2_dir, tmp_path):
    model = load_model(qwen2_dir[0])
    out = save_hf(model, str(tmp_path / "out"))
    before = open(os.path.join(out, "model.safetensors"), "rb").read()
    with pytest.raises(ValueError, match="accepted: float32, bfloat16, float16"):
        save_hf(model, out, dtype="int8")
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".export-")]
