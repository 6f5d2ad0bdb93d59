"""The memory estimator: a tiny model computed by hand, the CLI verdict / exit codes, config errors,
and the real Qwen2.5-Math-7B parameter count."""

import copy
import json
import os

import pytest
import yaml

from tgpo_jax.cli import main
from tgpo_jax.sharding.estimate import GIB, EstimateConfigError, estimate, load_estimate_config
from tgpo_jax.sharding.mesh import ShardingConfigError

TINY_HF = {
    "architectures": ["Qwen2ForCausalLM"],  # Qwen2: q/k/v biases, no o bias
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "tie_word_embeddings": False,
}
TINY = {
    "mesh": {"data": 1, "fsdp": 2, "tensor": 2},
    "num_devices": 4,
    "device_memory_gb": 1,
    "student": {"hf": TINY_HF, "param_dtype": "bfloat16", "dtype": "bfloat16"},
    "teacher": {"hf": {**TINY_HF, "architectures": ["LlamaForCausalLM"]}},  # same dims, no biases
    "batch": {
        "rollout_batch": 8,
        "micro_batch": 4,
        "prompt_len": 16,
        "response_len": 48,
        "logits_chunk": 32,
        "samples_per_prompt": 2,
    },
    "optimizer": {"state_dtype": "float32", "master_dtype": "float32", "grad_dtype": "float32"},
    "remat": "full",
    "attention": "materialized",
}


def tiny(**changes):
    d = copy.deepcopy(TINY)
    for path, v in changes.items():
        *head, last = path.split("__")
        node = d
        for k in head:
            node = node[k]
        node[last] = v
    return d


def test_tiny_model_by_hand():
    est = estimate(load_estimate_config(TINY))
    # Default rules: vocab->tensor(2), embed->fsdp(2), heads/kv_heads/mlp->tensor(2), layers/head_dim
    # replicated. Per-device elements of each parameter (L=2 leading layer axis):
    embed = (256 // 2) * (64 // 2)  # [V, E] -> 128 x 32 = 4096
    attn_norm = mlp_norm = 2 * (64 // 2)  # [L, E] = 64
    q = 2 * (64 // 2) * (4 // 2) * 16  # [L, E, H, D] = 2048
    k = v = 2 * (64 // 2) * (2 // 2) * 16  # [L, E, K, D] = 1024
    o = 2 * (4 // 2) * 16 * (64 // 2)  # [L, H, D, E] = 2048
    gate = up = 2 * (64 // 2) * (128 // 2)  # [L, E, F] = 4096
    down = 2 * (128 // 2) * (64 // 2)  # [L, F, E] = 4096
    q_bias = 2 * (4 // 2) * 16  # [L, H, D] = 64
    k_bias = v_bias = 2 * (2 // 2) * 16  # [L, K, D] = 32
    final_norm = 64 // 2  # [E] = 32
    lm_head = (64 // 2) * (256 // 2)  # [E, V] = 4096
    n_teacher = embed + attn_norm + q + k + v + o + mlp_norm + gate + up + down + final_norm + lm_head
    n_student = n_teacher + q_bias + k_bias + v_bias
    assert (n_student, n_teacher) == (26912, 26784)

    s = est.models["student"].items
    assert s["params"] == n_student * 2  # bf16
    assert s["grads"] == 2 * n_student * 4  # fp32 accumulator + one micro-batch's gradient
    assert s["optimizer"] == n_student * (2 * 4 + 4)  # mu + nu fp32, fp32 master (param is bf16)
    # KV cache: the engine's auto slots, half the 8 requests = 4 rows over (data*fsdp=2):
    # L * 2 * (R=4 / 2) * (S=16+48) * (K=2 / tensor 2) * D * 2 bytes
    assert s["kv_cache"] == 2 * 2 * 2 * 64 * 1 * 16 * 2 == 16384
    # rollout.slots given: 6 slots, 3 per device; more slots than requests: the 8 requests
    for slots, rows in ((6, 3), (64, 4)):
        got = estimate(load_estimate_config(tiny(batch__decode_slots=slots))).models["student"].items["kv_cache"]
        assert got == 2 * 2 * rows * 64 * 1 * 16 * 2, slots
    # Activations, B = 4 / 2 = 2, T = 64, E = 64, H = 2, K = 1, D = 16, F = 64, a = 2:
    r = 2 * 64 * 64 * 2  # one residual = 16384
    w = 2 * 2 * 64 * (2 * 64 + 2 * 2 * 16 + 2 * 1 * 16 + 3 * 64) + 2 * 2 * 64 * 64 * (4 + 2)  # = 204800
    assert w == 204800
    assert s["activations"] == 2 * r + 2 * w  # remat full: L residuals + 2 working sets
    o = 2 * 64 * 2 * 16 * 2  # one attention output [B, T, H / tensor, D] in bf16 = 8192
    kept = estimate(load_estimate_config(tiny(remat="attn_out"))).models["student"].items["activations"]
    assert kept == 2 * (r + o) + 2 * w  # remat attn_out: each layer's attention output kept too
    # Logits: B 2 x chunk 32 x V/tensor 128 x 4 bytes, x2 (forward + backward)
    assert s["logits"] == 2 * 32 * 128 * 4 * 2 == 65536
    # Prefill: 8 rows / n 2 = 4 prompts, B = 4 / 2 = 2, T = Tk = 16, forward only (fp32 scores alone):
    r_p = 2 * 16 * 64 * 2
    w_p = 2 * 2 * 16 * (2 * 64 + 2 * 2 * 16 + 2 * 1 * 16 + 3 * 64) + 2 * 2 * 16 * 16 * 4
    cache_p = 2 * 2 * 2 * 16 * 1 * 16 * 2  # L * (k, v) * B * T * K * D * a: the prompts' own cache
    assert s["prefill"] == r_p + w_p + cache_p == 38912
    assert "sampler_weights" not in s  # bf16 params, bf16 compute: the sampler reads them as they are

    t = est.models["teacher"].items
    assert set(t) == {"params", "activations", "logits"}
    assert t["params"] == n_teacher * 2
    w_fwd = w - 2 * 2 * 64 * 64 * 2  # forward only: the fp32 scores, no probs kept for a backward pass
    assert t["activations"] == r + w_fwd == 16384 + 172032  # the running residual + one layer
    assert t["logits"] == 2 * 32 * 128 * 4

    resident = s["params"] + s["optimizer"] + t["params"]
    train = s["grads"] + s["activations"] + s["logits"]
    assert est.phases == {
        "resident": resident,
        "rollout": s["kv_cache"] + s["prefill"],
        "teacher scoring": t["activations"] + t["logits"],
        "train step": train,
        "evaluation": 0,  # no eval section in this view
    }
    assert est.peak_bytes == resident + train
    assert est.sum_bytes == sum(s.values()) + sum(t.values())
    assert est.fits is True and est.capacity_bytes == GIB
    assert est.models["student"].n_params == 256 * 64 * 2 + 64 + 2 * (
        2 * 64 + 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 64 + 2 * 32
    )


def test_remat_none_flash_and_rules_override():
    base = estimate(load_estimate_config(TINY)).models
    est = estimate(load_estimate_config(tiny(remat="none", attention="flash", teacher__rules={"embed": None})))
    r = 2 * 64 * 64 * 2
    w = 2 * 2 * 64 * (2 * 64 + 2 * 2 * 16 + 2 * 1 * 16 + 3 * 64) + 2 * 2 * 64 * 4  # flash: fp32 logsumexp only
    assert est.models["student"].items["activations"] == 2 * (r + w) + w
    assert est.models["teacher"].items["activations"] == r + w
    # Teacher embed / lm_head / norms no longer split over fsdp: their bytes double.
    doubled = 4096 + 64 + 64 + 32 + 4096 + (2048 + 1024 + 1024 + 2048 + 3 * 4096)  # every embed-axis param
    assert est.models["teacher"].items["params"] == base["teacher"].items["params"] + doubled * 2


def write(tmp_path, d):
    p = tmp_path / "est.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def test_cli_fits_and_does_not_fit(tmp_path, capsys):
    path = write(tmp_path, TINY)
    assert main(["estimate", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "student:" in out and "teacher:" in out and "\nfits: needs" in out
    assert main(["estimate", "--config", path, "--device-memory-gb", "0.0001"]) == 3
    out = capsys.readouterr().out
    assert "DOES NOT FIT: needs 0.00 GiB, has 0.00 GiB per device; biggest items: student activations" in out


def test_cli_hf_config_path_and_no_memory(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY_HF))
    d = tiny(student={"hf_config": "m"})
    del d["device_memory_gb"], d["teacher"]
    assert main(["estimate", "--config", write(tmp_path, d)]) == 0
    assert "no verdict" in capsys.readouterr().out


@pytest.mark.parametrize(
    "changes, err, msg",
    [
        (
            {"batch__micro_batchh": 8},
            EstimateConfigError,
            "unknown key 'micro_batchh' in batch; valid keys: rollout_batch, micro_batch, prompt_len, response_len, logits_chunk",
        ),
        ({"typo": 1}, EstimateConfigError, "unknown key 'typo' in config; valid keys: mesh, num_devices, student"),
        (
            {"student__trainables": True},
            EstimateConfigError,
            "unknown key 'trainables' in student; valid keys: hf_config, hf,",
        ),
        ({"batch__micro_batch": "eight"}, EstimateConfigError, "batch.micro_batch: expected int, got str 'eight'"),
        ({"student__trainable": "yes"}, EstimateConfigError, "student.trainable: expected bool, got str 'yes'"),
        ({"batch__micro_batch": 3}, EstimateConfigError, "batch.micro_batch=3 does not divide batch.rollout_batch=8"),
        ({"remat": "some"}, EstimateConfigError, "remat='some'; accepted: full, attn_out, none"),
        ({"student__dtype": "fp8"}, EstimateConfigError, "student.dtype='fp8'; accepted: float32, bfloat16, float16"),
        ({"num_devices": 8}, ShardingConfigError, "has 4 devices but 8 are available"),
        (
            {"mesh": {"data": 1, "fsdp": -1, "tensor": 3}},
            ShardingConfigError,
            "the fixed axes (3 devices) do not divide the 4",
        ),
        (
            {"student__rules": {"embd": "fsdp"}},
            ShardingConfigError,
            "unknown logical axis 'embd' in sharding rules (student.rules); valid:",
        ),
        (
            {"teacher__rules": {"mlp": "model"}},
            ShardingConfigError,
            "teacher: sharding rule mlp -> 'model' names an axis the mesh does not have; mesh axes: data, fsdp, tensor",
        ),
        (
            {"student__hf": {**TINY_HF, "num_key_value_heads": 1}},
            ShardingConfigError,
            "student: parameter layers.k_kernel dim 2 (kv_heads=1) is not divisible by mesh axes tensor of size 2",
        ),
        ({"student__hf_config": "x.json"}, EstimateConfigError, "student: give exactly one of hf_config"),
    ],
)
def test_bad_configs(changes, err, msg, tmp_path, capsys):
    with pytest.raises(err) as e:
        load_estimate_config(tiny(**changes))
    assert msg in str(e.value)
    assert main(["estimate", "--config", write(tmp_path, tiny(**changes))]) == 2
    assert msg in capsys.readouterr().err


def test_missing_file_exits_2(capsys):
    assert main(["estimate", "--config", "/nonexistent/est.yaml"]) == 2
    assert "estimate config not found" in capsys.readouterr().err


def test_qwen25_math_7b_param_bytes():
    hf = {
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    }
    cfg = {"mesh": {"data": 1, "fsdp": 4, "tensor": 2}, "num_devices": 8, "student": {"hf": hf}}
    est = estimate(load_estimate_config(cfg))
    m = est.models["student"]
    assert abs(m.n_params - 7.6e9) / 7.6e9 < 0.01
    assert abs(m.items["params"] * 8 - 7.6e9 * 2) / (7.6e9 * 2) < 0.01


def test_example_config_runs(capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "estimate_example.yaml")
    assert main(["estimate", "--config", path]) == 0  # fits a 32 GiB device
    out = capsys.readouterr().out
    assert "peak (resident + largest phase)" in out and "mesh: data=1 fsdp=2 tensor=2 (4 devices)" in out
    assert main(["estimate", "--config", path, "--num-devices", "8", "sharding.mesh.fsdp=4"]) == 0
    assert "mesh: data=1 fsdp=4 tensor=2 (8 devices)" in capsys.readouterr().out


def _train_config(tmp_path, **estimate_section) -> dict:
    """A train config of the TINY run: rollout 2 x 4 = 8 sequences, micro-batch 4, prompts of 16
    tokens, responses of 48, log-prob chunks of 16, both models in bf16 in directories here."""
    for name, hf in (("student", TINY_HF), ("teacher", TINY["teacher"]["hf"])):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text(json.dumps(hf))
    d = {
        "models": {"student": "student", "teacher": "teacher", "param_dtype": "bfloat16", "dtype": "bfloat16"},
        "sharding": {"mesh": {"data": 1, "fsdp": 2, "tensor": 2}},
        "rollout": {"prompts_per_iteration": 2, "n": 4, "max_new_tokens": 48, "prompt_buckets": [16]},
        "train": {"mini_batches": 2, "micro_batch": 4, "logprob_chunk": 16},
        "data": {"files": ["prompts.jsonl"], "max_prompt_len": 16},
    }
    return {**d, "estimate": estimate_section} if estimate_section else d


def test_train_config_is_estimated_as_its_view(tmp_path, capsys):
    """A train config plus the target's hardware gives the estimate of the view it implies: the batch
    from rollout / train / data, the mesh and rules from sharding, the train step's buffers in the
    student's param_dtype (no master copy), the teacher frozen."""
    view = tiny(
        batch__logits_chunk=16,
        batch__samples_per_prompt=4,
        optimizer={"state_dtype": "bfloat16", "master_dtype": None, "grad_dtype": "bfloat16"},
    )
    want = estimate(load_estimate_config(view))
    path = write(tmp_path, _train_config(tmp_path, num_devices=4, device_memory_gb=1))
    got = estimate(load_estimate_config(path))
    assert got == want
    assert main(["estimate", "--config", path]) == 0
    assert want.report() in capsys.readouterr().out
    # the hardware as flags instead of an `estimate:` section; a CLI override of the train config
    path = write(tmp_path, _train_config(tmp_path))
    assert main(["estimate", "--config", path, "--num-devices", "4", "--device-memory-gb", "1"]) == 0
    assert want.report() in capsys.readouterr().out
    assert main(["estimate", "--config", path, "--num-devices", "4", "--device-memory-gb", "1", "rollout.n=8"]) == 0
    assert "rollout" in capsys.readouterr().out
    assert main(["estimate", "--config", path]) == 2
    assert "estimate.num_devices: the target's device count is required" in capsys.readouterr().err
    for bad, msg in (
        ({"num_device": 4}, "unknown key 'num_device' in estimate; valid keys: num_devices"),
        ({"num_devices": 4, "remat": "some"}, "remat='some'; accepted: full, attn_out, none"),
    ):
        assert main(["estimate", "--config", write(tmp_path, _train_config(tmp_path, **bad))]) == 2
        assert msg in capsys.readouterr().err
    d = _train_config(tmp_path, num_devices=4)
    d["models"]["student"] = "elsewhere/student"  # not here: the estimate section names its config.json
    d["estimate"]["student_hf_config"] = "student"
    assert estimate(load_estimate_config(write(tmp_path, d), device_memory_gb=1)) == want


def test_score_micro_batch_sizes_teacher_scoring_only(tmp_path):
    """batch.score_micro_batch (train.score_micro_batch in a train config) sets the rows of the
    teacher scoring forward; 0 is micro_batch; the student's train step keeps micro_batch."""
    base = estimate(load_estimate_config(tiny()))
    assert estimate(load_estimate_config(tiny(batch__score_micro_batch=4))).models == base.models
    half = estimate(load_estimate_config(tiny(batch__score_micro_batch=2)))
    assert half.models["student"] == base.models["student"]
    for item in ("activations", "logits"):  # every term is linear in the local rows (2 -> 1 per device)
        assert 2 * half.models["teacher"].items[item] == base.models["teacher"].items[item], item
    d = _train_config(tmp_path, num_devices=4, device_memory_gb=1)
    d["train"]["score_micro_batch"] = 2
    view = estimate(load_estimate_config(tiny(batch__score_micro_batch=2, batch__logits_chunk=16)))
    assert estimate(load_estimate_config(write(tmp_path, d))).models["teacher"] == view.models["teacher"]
    with pytest.raises(EstimateConfigError, match=r"batch.score_micro_batch=3 must be 0 \(= micro_batch\) or divide"):
        load_estimate_config(tiny(batch__score_micro_batch=3))


def test_indivisible_activation_stays_whole_and_is_noted():
    est = estimate(load_estimate_config(tiny(batch__micro_batch=1)))
    assert (
        "student: activation batch=1 does not divide mesh axes ('data', 'fsdp') (2); kept whole on each device"
        in est.notes
    )
    assert "note: student: activation batch=1" in est.report()
    r = 1 * 64 * 64 * 2  # B stays 1 on every device
    w = 2 * 1 * 64 * (2 * 64 + 2 * 2 * 16 + 2 * 1 * 16 + 3 * 64) + 1 * 2 * 64 * 64 * 6
    assert est.models["student"].items["activations"] == 2 * r + 2 * w


def test_missing_keys_are_named(tmp_path, capsys):
    d = copy.deepcopy(TINY)
    del d["num_devices"], d["mesh"]
    with pytest.raises(EstimateConfigError, match="missing keys mesh, num_devices"):
        load_estimate_config(d)
    assert main(["estimate", "--config", write(tmp_path, d), "--num-devices", "4"]) == 2  # the mesh still
    assert "missing key mesh" in capsys.readouterr().err
