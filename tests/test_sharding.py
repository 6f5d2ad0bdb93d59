"""Sharding on an 8-device CPU mesh: rules -> shardings, sharded == unsharded, bad configs."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tgpo_jax.models import Decoder, left_pad_positions
from tgpo_jax.models.hf_export import flat_params
from tgpo_jax.models.params import param_specs
from tgpo_jax.models.tiny import make_tiny_checkpoint, tiny_config
from tgpo_jax.sharding import (
    MeshConfig,
    ShardingConfigError,
    ShardingRules,
    abstract_sharded_params,
    build_mesh,
    init_sharded,
    load_sharded,
    param_shardings,
)

STUDENT = tiny_config("qwen2")
TEACHER = tiny_config("qwen3", num_layers=3, num_heads=8, num_kv_heads=4, intermediate_size=192)
# The teacher is replicated over the batch axes (embed unsharded) when it fits: its own rules.
TEACHER_RULES = ShardingRules.from_dict({"embed": None})
MESHES = [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 1, "fsdp": 4, "tensor": 2},
]


def _batch(vocab, B=8, T=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, T + 1, B)
    mask = (np.arange(T)[None] >= (T - lengths)[:, None]).astype(np.int32)
    return jnp.asarray(rng.integers(0, vocab, (B, T)) * mask, jnp.int32), jnp.asarray(mask)


@jax.jit
def _forward(model, tokens, mask):
    return model(tokens, left_pad_positions(mask), mask)[0]


def _expected_spec(axes, rules, mesh):
    out = []
    used = set()
    for a in axes:
        m = rules.mesh_axes(a)
        m = (m,) if isinstance(m, str) else tuple(m or ())
        m = tuple(x for x in m if x not in used and mesh.shape[x] > 0)
        used.update(m)
        out.append(None if not m else m[0] if len(m) == 1 else m)
    return P(*out)


@pytest.mark.parametrize("mesh_dict", MESHES, ids=lambda d: "x".join(map(str, d.values())))
def test_student_and_teacher_on_one_mesh(mesh_dict):
    mesh = build_mesh(MeshConfig.from_dict(mesh_dict))
    assert mesh.devices.size == 8
    for cfg, rules, seed in ((STUDENT, ShardingRules(), 0), (TEACHER, TEACHER_RULES, 1)):
        sharded = init_sharded(cfg, mesh, rules, seed=seed)
        plain = Decoder(cfg, nnx.Rngs(seed))
        specs = param_specs(cfg)
        for path, arr in flat_params(sharded).items():
            assert arr.sharding.mesh == mesh
            assert arr.sharding.spec == _expected_spec(specs[path].axes, rules, mesh), path
        tokens, mask = _batch(cfg.vocab_size)
        got, want = _forward(sharded, tokens, mask), _forward(plain, tokens, mask)
        valid = np.asarray(mask).astype(bool)
        assert np.abs(np.asarray(got) - np.asarray(want))[valid].max() <= 1e-5
        assert got.sharding.spec[0] is not None or mesh_dict["data"] * mesh_dict["fsdp"] == 1


def test_init_is_created_sharded_without_a_replica():
    mesh = build_mesh(MeshConfig.from_dict({"data": 1, "fsdp": 4, "tensor": 2}))
    abstract = abstract_sharded_params(STUDENT, mesh, ShardingRules())
    want = param_shardings(STUDENT, ShardingRules(), mesh)
    for path, sds in abstract.items():
        assert isinstance(sds, jax.ShapeDtypeStruct) and sds.sharding == want[path], path
    embed = init_sharded(STUDENT, mesh, ShardingRules()).embed[...]
    # each device holds 1/8 of the table: vocab over tensor (2), embed over fsdp (4)
    assert {s.data.shape for s in embed.addressable_shards} == {(STUDENT.vocab_size // 2, STUDENT.hidden_size // 4)}


def test_checkpoint_loads_straight_into_rule_shardings(tmp_path):
    path = make_tiny_checkpoint(str(tmp_path / "m"), arch="llama")
    mesh = build_mesh(MeshConfig.from_dict({"data": 2, "fsdp": 2, "tensor": 2}))
    rules = ShardingRules()
    model = load_sharded(path, mesh, rules)
    want = param_shardings(model.cfg, rules, mesh)
    for p, arr in flat_params(model).items():
        assert arr.sharding == want[p]
    from tgpo_jax.models.hf_import import load_model

    ref = load_model(path)
    tokens, mask = _batch(model.cfg.vocab_size)
    valid = np.asarray(mask).astype(bool)
    assert np.abs(np.asarray(_forward(model, tokens, mask)) - np.asarray(_forward(ref, tokens, mask)))[valid].max() <= 1e-5


@pytest.mark.parametrize("mesh_dict", MESHES[2:], ids=["2x2x2", "1x4x2"])
def test_compiles_without_involuntary_rematerialization(mesh_dict):
    """XLA's SPMD partitioner logs this warning to stderr: compile in a fresh process and read it."""
    code = textwrap.dedent(f"""
        import jax
        jax.config.update("jax_num_cpu_devices", 8)
        import jax.numpy as jnp
        from tgpo_jax.models import left_pad_positions
        from tgpo_jax.models.tiny import tiny_config
        from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, init_sharded
        mesh = build_mesh(MeshConfig.from_dict({mesh_dict!r}))
        for cfg in (tiny_config("qwen2"), tiny_config("qwen3", num_heads=8, num_kv_heads=4)):
            m = init_sharded(cfg, mesh, ShardingRules())
            t = jnp.ones((8, 16), jnp.int32)
            jax.jit(lambda m, t: m(t, left_pad_positions(t), t)[0]).lower(m, t).compile()
        print("compiled")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------------- bad config
def test_mesh_sizes_must_match_device_count():
    with pytest.raises(ShardingConfigError, match=r"has 6 devices but 8 are available"):
        build_mesh(MeshConfig.from_dict({"data": 3, "fsdp": 2, "tensor": 1}))
    with pytest.raises(ShardingConfigError, match=r"fixed axes \(3 devices\) do not divide the 8 devices"):
        build_mesh(MeshConfig.from_dict({"data": 3, "fsdp": -1}))
    with pytest.raises(ShardingConfigError, match="at most one mesh axis may be -1"):
        build_mesh(MeshConfig.from_dict({"data": -1, "fsdp": -1}))
    with pytest.raises(ShardingConfigError, match="positive integer or -1"):
        MeshConfig.from_dict({"data": 0})


def test_unknown_axis_names_in_rules():
    mesh = build_mesh(MeshConfig.from_dict({"data": 2, "fsdp": 4}))
    with pytest.raises(ShardingConfigError, match=r"rule vocab -> 'tensor' names an axis the mesh does not have; mesh axes: data, fsdp"):
        param_shardings(STUDENT, ShardingRules(), mesh)
    with pytest.raises(ShardingConfigError, match=r"unknown logical axis 'hidden'.*valid: vocab, embed"):
        ShardingRules.from_dict({"hidden": "fsdp"})


def test_indivisible_dimension_names_the_parameter():
    mesh = build_mesh(MeshConfig.from_dict({"data": 1, "fsdp": 1, "tensor": 8}))
    # tiny student: 4 query heads cannot be split 8 ways
    with pytest.raises(ShardingConfigError, match=r"parameter layers.q_kernel dim 2 \(heads=4\) is not divisible by mesh axes tensor of size 8; change the rule for .heads."):
        param_shardings(STUDENT, ShardingRules(), mesh)
