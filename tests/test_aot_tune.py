"""The preset tuner's search and its in-place edit of a preset file (the compiles themselves are
tests/test_aot_compile.py's)."""

import yaml

from tgpo_jax.aot.tune import _walk, write_entry
from tgpo_jax.presets import load_preset, render


def test_walk_finds_the_largest_power_of_two_step_that_fits():
    calls = []

    def fits(v):
        calls.append(v)
        return v <= 40

    assert _walk(32, 1, 128, fits, lambda v: True) == 32 and calls == [32, 64]
    calls.clear()
    assert _walk(4, 1, 128, fits, lambda v: True) == 32 and calls == [4, 8, 16, 32, 64]
    calls.clear()
    assert _walk(128, 1, 128, fits, lambda v: True) == 32 and calls == [128, 64, 32]
    assert _walk(16, 1, 16, fits, lambda v: True) == 16  # capped at hi
    assert _walk(8, 4, 128, lambda v: False, lambda v: True) is None  # nothing down to lo fits
    # values the config would reject are skipped, not compiled
    calls.clear()
    assert _walk(128, 1, 128, fits, lambda v: v != 32) == 16 and calls == [128, 64, 16]


PRESET = """# a preset
base: _paper_base.yaml
student: Qwen2.5-Math-1.5B
teacher: Qwen2.5-7B-Instruct
train:
  models: {student: models/s, teacher: models/t}
hardware:
  v4-8:
    # why this mesh
    sharding.mesh: {data: 1, fsdp: -1, tensor: 1}
    rollout.prompts_per_iteration: 32
    train.micro_batch: 4
  v5p-8:
    sharding.mesh: {data: 1, fsdp: -1, tensor: 1}
    rollout.prompts_per_iteration: 128
"""


def test_write_entry_changes_only_its_hardware_block(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PRESET)
    (tmp_path / "_paper_base.yaml").write_text(open(load_preset("qwen2.5-math-1.5b__qwen2.5-7b-instruct").path).read())
    write_entry(str(path), "v5p-8", {"rollout.prompts_per_iteration": 64, "train.micro_batch": 8})
    write_entry(str(path), "v4-8", {"rollout.prompts_per_iteration": 16})
    text = path.read_text()
    assert "# a preset" in text and "    # why this mesh" in text
    hw = yaml.safe_load(text)["hardware"]
    assert hw["v4-8"] == {
        "sharding.mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "rollout.prompts_per_iteration": 16,
        "train.micro_batch": 4,
    }
    assert hw["v5p-8"]["rollout.prompts_per_iteration"] == 64 and hw["v5p-8"]["train.micro_batch"] == 8
    assert render(str(path), "v5p-8")["train"]["micro_batch"] == 8


def test_batch_shards_are_the_data_and_fsdp_axes():
    from tgpo_jax.aot.tune import _batch_shards

    assert _batch_shards({"sharding": {"mesh": {"data": 1, "fsdp": -1, "tensor": 2}}}, 8) == 4
    assert _batch_shards({"sharding": {"mesh": {"data": 2, "fsdp": 2, "tensor": 4}}}, 16) == 4
    assert _batch_shards({}, 8) == 8  # the default mesh: fsdp over every device
