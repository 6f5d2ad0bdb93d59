"""Every preset in configs/presets: it parses, both models build abstractly (jax.eval_shape) from
the bundled config.json files, and the memory estimator says each supported hardware entry fits
(and each `unsupported` one really does not)."""

from __future__ import annotations

import json

import pytest

from tgpo_jax import presets
from tgpo_jax.configtree import ConfigError

# Published sizes of the bundled checkpoints (model cards: 1.54B, 7.62B, 32.76B).
PUBLISHED_PARAMS = {
    "Qwen2.5-Math-1.5B": 1_543_714_304,
    "Qwen2.5-Math-7B": 7_615_616_512,
    "Qwen2.5-Math-7B-Instruct": 7_615_616_512,
    "Qwen2.5-7B-Instruct": 7_615_616_512,
    "DeepSeek-R1-Distill-Qwen-7B": 7_615_616_512,
    "DeepSeek-R1-Distill-Qwen-32B": 32_763_876_352,
}
PAIRS = [(p, h) for p in presets.list_presets() for h in presets.load_preset(p).hardware]


def test_every_student_and_dense_teacher_of_the_ladder_has_a_preset():
    names = set(presets.list_presets())
    for s in ("qwen2.5-math-1.5b", "qwen2.5-math-7b"):
        for t in ("qwen2.5-math-7b-instruct", "qwen2.5-7b-instruct", "r1-distill-qwen-7b", "r1-distill-qwen-32b"):
            p = presets.load_preset(f"{s}__{t}")
            assert f"{s}__{t}" in names and set(p.hardware) >= {"v4-8", "v5e-8", "v5p-8", "v4-32"}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_bundled_config_parameter_counts(name):
    hf = presets.bundled_hf_config(name)
    assert presets.abstract_param_count(hf, "bfloat16", "bfloat16") == PUBLISHED_PARAMS[name]


def _memory_floor_gib(preset, hw) -> float:
    """Independent lower bound per device: the student's params + grads + 2 AdamW moments in its
    param dtype and the frozen teacher's params, spread evenly over the devices."""
    p = presets.load_preset(preset)
    n_s = PUBLISHED_PARAMS.get(p.student)
    n_t = PUBLISHED_PARAMS.get(p.teacher, 0)
    if n_s is None or (p.teacher and p.teacher not in PUBLISHED_PARAMS):
        return 0.0
    m = presets.render(p, hw, allow_unsupported=True)["models"]
    bytes_s = {"float32": 4, "bfloat16": 2}[m["param_dtype"]] * 4
    return (n_s * bytes_s + n_t * 2) / presets.HARDWARE[hw].devices / 1024**3


@pytest.mark.parametrize("preset, hw", PAIRS)
def test_preset_fits_its_hardware(preset, hw):
    """Supported entries fit by the TPU compiler's own figures, recorded for the entry as it is now
    (a preset changed since its compile has no matching record: rerun `tgpo-jax preset compile
    --all` or `preset tune`); unsupported ones do not fit by the compiler or the estimator."""
    r = presets.check(preset, hw)
    assert r.ok, f"{r.line()}\n{r.report}"
    assert r.peak_gib >= _memory_floor_gib(preset, hw) * 0.999
    if r.supported:
        assert r.compiled_gib is not None, f"{preset} on {hw}: no compiled record matches the preset as it is now"
        assert r.compiled_gib <= presets.HARDWARE[hw].hbm_gib * presets.HEADROOM


def test_a_compiled_record_holds_only_for_the_preset_it_was_compiled_from(tmp_path):
    name, hw = "qwen2.5-math-1.5b__qwen2.5-7b-instruct", "v5p-8"
    fp = presets.programs_fingerprint(name, hw)
    rec = {"preset": name, "hardware": hw, "fingerprint": fp, "fits": True, "programs": {}}
    path = tmp_path / "compiled.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    assert presets.compiled_record(name, hw, str(path)) == rec
    # the same programs under another ladder teacher (same architecture): the same fingerprint
    assert presets.programs_fingerprint("qwen2.5-math-1.5b__r1-distill-qwen-7b", hw) == fp
    assert presets.programs_fingerprint(name, "v4-32") != fp
    path.write_text(json.dumps({**rec, "fingerprint": fp.replace('"micro_batch"', '"micro_batch_"')}) + "\n")
    assert presets.compiled_record(name, hw, str(path)) is None


def test_render_applies_hardware_settings_and_base():
    d = presets.render("qwen2.5-math-1.5b__r1-distill-qwen-32b", "v4-8", allow_unsupported=True)
    assert d["sharding"]["mesh"] == {"data": 1, "fsdp": -1, "tensor": 4}
    assert d["rollout"]["prompts_per_iteration"] == 4 and d["rollout"]["n"] == 8
    assert d["optimizer"]["lr"] == 1e-6 and d["train"]["iterations"] == 300
    assert d["models"]["teacher"] == "models/DeepSeek-R1-Distill-Qwen-32B"


def test_unsupported_entry_is_refused_with_its_reason():
    with pytest.raises(ConfigError, match="does not fit v5e-8: the 7B student's fp32"):
        presets.render("qwen2.5-math-7b__r1-distill-qwen-7b", "v5e-8")


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: presets.render("qwen2.5-math-1.5b__r1-distill-qwen-7b", "v6e-8"),
            "unknown hardware 'v6e-8'; accepted: v4-8",
        ),
        (lambda: presets.load_preset("no-such-preset"), "preset 'no-such-preset' not found; available: "),
        (lambda: presets.bundled_hf_config("Llama-9B"), "no bundled config.json for 'Llama-9B'"),
    ],
)
def test_errors_name_the_problem(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_patch_student_config(tmp_path):
    d = tmp_path / "models" / "Qwen2.5-Math-1.5B"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(presets.bundled_hf_config("Qwen2.5-Math-1.5B")))
    presets.patch_student_config("qwen2.5-math-1.5b__qwen2.5-math-7b-instruct", str(tmp_path))
    hf = json.loads((d / "config.json").read_text())
    assert hf["max_position_embeddings"] == 16384 and hf["rope_theta"] == 40000.0
    assert hf["max_position_embeddings"] >= 1024 + 8192


def test_cli_check_and_show(capsys):
    from tgpo_jax.cli import main

    assert main(["preset", "check", "qwen2.5-math-7b__r1-distill-qwen-32b", "--hardware", "v4-32"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["preset", "show", "qwen2.5-math-7b__r1-distill-qwen-32b", "v4-32", "run_dir=gs://b/x"]) == 0
    out = capsys.readouterr().out
    prompts = presets.load_preset("qwen2.5-math-7b__r1-distill-qwen-32b").hardware["v4-32"][
        "rollout.prompts_per_iteration"
    ]
    assert "run_dir: gs://b/x" in out and f"prompts_per_iteration: {prompts}" in out
