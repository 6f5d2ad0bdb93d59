"""Sharding on an 8-device CPU mesh: rules -> shardings, sharded == unsharded, bad configs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tgpo_jax.models import Decoder, left_pad_positions
from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.decoder import abstract_model
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
from tgpo_jax.sharding.rules import PARAM_AXES

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
    # The init program itself: per device it outputs just its shards, and its scratch memory is far
    # below one full copy of the parameters (the random values are generated partitioned).
    from tgpo_jax.sharding.placement import _sharded_init_fn

    mem = _sharded_init_fn(STUDENT, mesh, ShardingRules(), 0).lower().compile().memory_analysis()
    full = sum(int(np.prod(s.shape)) * 4 for s in param_specs(STUDENT).values())
    local = sum(int(np.prod(want[p].shard_shape(s.shape))) * 4 for p, s in param_specs(STUDENT).items())
    # (the output size also counts the result tuple's table: one 8-byte pointer per parameter)
    assert local <= mem.output_size_in_bytes <= local + 8 * len(want) and local < full / 7
    assert mem.temp_size_in_bytes + mem.output_size_in_bytes < full / 2, (mem.temp_size_in_bytes, full)


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
    assert (
        np.abs(np.asarray(_forward(model, tokens, mask)) - np.asarray(_forward(ref, tokens, mask)))[valid].max() <= 1e-5
    )


def test_minus_one_takes_the_rest_of_all_devices():
    mesh = build_mesh(MeshConfig.from_dict({"data": 2, "fsdp": -1, "tensor": 2}))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    default = build_mesh(MeshConfig.from_dict({"data": 1, "fsdp": -1, "tensor": 1}))  # the train config's default
    assert dict(default.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    # a pod's device count (e.g. a 256-chip slice over many hosts)
    assert MeshConfig.from_dict({"data": 2, "fsdp": -1, "tensor": 4}).resolve(256) == (2, 32, 4)


MOE = ModelConfig(
    "Qwen3MoeForCausalLM",
    256,
    32,
    48,
    2,
    4,
    2,
    8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    mlp_only_layers=(0,),
)


@pytest.mark.parametrize("cfg", [STUDENT, TEACHER, MOE], ids=["qwen2", "qwen3", "qwen3_moe"])
def test_every_parameter_carries_logical_axis_names(cfg):
    """Each nnx.Param of the module holds its logical axis names (metadata `out_sharding`), one per
    dimension, all of them known parameter axes, and the same as the parameter table."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    names = {".".join(map(str, path)): v.get_metadata()["out_sharding"] for path, v in nnx.to_flat_state(state)}
    assert set(names) == set(param_specs(cfg))
    for path, axes in names.items():
        assert len(axes) == len(param_specs(cfg)[path].shape) and set(axes) <= set(PARAM_AXES), (path, axes)
        assert axes == param_specs(cfg)[path].axes, path
    want = {
        "embed": ("vocab", "embed"),
        "layers.q_kernel": ("layers", "embed", "heads", "head_dim"),
        "layers.k_kernel": ("layers", "embed", "kv_heads", "head_dim"),
        "layers.o_kernel": ("layers", "heads", "head_dim", "embed"),
    }
    if cfg is MOE:
        want.update(
            {
                "moe.gate_kernel": ("layers", "expert", "embed", "moe_mlp"),
                "moe.router_kernel": ("layers", "embed", "router"),
                "dense_mlp.down_kernel": ("layers", "mlp", "embed"),
            }
        )
    else:
        want.update({"layers.up_kernel": ("layers", "embed", "mlp"), "layers.down_kernel": ("layers", "mlp", "embed")})
    assert {k: names[k] for k in want} == want


# A fresh process (no persistent compilation cache: a cached program skips the partitioner and its
# log) compiles, on each standard mesh, both models' forward (each with its own rules) and the
# student's train step on a mini-batch sharded over the batch axes, with "@@ <what>" marks on stderr
# between the compiles. Parameters are zeros put in the rule shardings: nothing is compiled but the
# programs checked. Last, a positive control: a reshard XLA cannot do efficiently, whose warning
# must show up (so the capture itself is checked).
_REMAT_SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_compilation_cache", False)
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tgpo_jax.models import left_pad_positions
from tgpo_jax.models.hf_import import model_from_flat
from tgpo_jax.models.tiny import tiny_config
from tgpo_jax.objectives.batch import Batch
from tgpo_jax.objectives.registry import ObjectiveConfig
from tgpo_jax.sharding import MeshConfig, ShardingRules, abstract_sharded_params, build_mesh
from tgpo_jax.sharding.rules import ActivationSharding
from tgpo_jax.train.score import score
from tgpo_jax.train.step import OptimizerConfig, init_train_state, make_optimizer, make_train_step

MESHES = json.loads(sys.argv[1])
STUDENT = tiny_config("qwen2")
TEACHER = tiny_config("qwen3", num_layers=3, num_heads=8, num_kv_heads=4, intermediate_size=192)
RULES = {"student": ShardingRules(), "teacher": ShardingRules.from_dict({"embed": None})}
B, PL, TL = 8, 8, 8


def mark(s):
    print("@@", s, file=sys.stderr, flush=True)


def zeros_model(cfg, mesh, rules):
    flat = {p: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding)
            for p, s in abstract_sharded_params(cfg, mesh, rules).items()}
    return model_from_flat(cfg, flat, ActivationSharding(mesh, rules))


hlo = {}
for name, md in MESHES.items():
    mesh = build_mesh(MeshConfig.from_dict(md))
    student, teacher = zeros_model(STUDENT, mesh, RULES["student"]), zeros_model(TEACHER, mesh, RULES["teacher"])
    bsh = lambda nd: NamedSharding(mesh, RULES["student"].spec(("batch",) + (None,) * (nd - 1)))
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=bsh(len(shape)))
    fwd = jax.jit(lambda m, t: m(t, left_pad_positions(t), t)[0])
    for role, m in (("student", student), ("teacher", teacher)):
        mark(f"{name} forward {role}")
        hlo[f"{name} {role}"] = fwd.lower(m, sds((B, PL + TL), jnp.int32)).compile().as_text()
    batch = Batch(prompt_BP=sds((B, PL), jnp.int32), prompt_mask_BP=sds((B, PL), jnp.int32),
                  tokens_BT=sds((B, TL), jnp.int32), mask_BT=sds((B, TL), jnp.int32))
    obj = ObjectiveConfig(name="tgpo_reg", lambda_0=0.5)
    (sg, ss), (tg, ts) = nnx.split(student), nnx.split(teacher)
    scored, _ = jax.eval_shape(lambda *a: score(*a, obj_cfg=obj, chunk=8), sg, ss, tg, ts, batch, jax.random.key(0))
    mb = jax.tree.map(lambda v: sds(v.shape, v.dtype), scored).replace(adv_B=sds((B,), jnp.float32))
    opt = make_optimizer(OptimizerConfig())
    graphdef, state = init_train_state(student, opt)
    mark(f"{name} train_step")
    make_train_step(graphdef, opt, obj_cfg=obj, micro_batch=4, chunk=8, state=state).lower(
        state, mb, 1).compile()
mark("control")
mesh = build_mesh(MeshConfig.from_dict({"data": 2, "fsdp": 2, "tensor": 2}))
wsc = lambda x, *s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*s)))
jax.jit(lambda x: wsc(jnp.sin(wsc(x, "data", "fsdp")), None, ("data", "fsdp", "tensor"))).lower(jnp.ones((8, 8))).compile()
mark("end")
print(json.dumps(hlo))
"""
_REMAT = "Involuntary full rematerialization"


@pytest.fixture(scope="module")
def standard_compiles():
    """(stderr split by mark: {what: text logged during that compile}, {"<mesh> <role>": forward HLO})."""
    meshes = {"x".join(map(str, d.values())): d for d in MESHES}
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _REMAT_SCRIPT, json.dumps(meshes)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections, what = {}, None
    for line in proc.stderr.splitlines():
        if line.startswith("@@ "):
            what = line[3:]
            sections[what] = ""
        elif what is not None:
            sections[what] += line + "\n"
    return sections, json.loads(proc.stdout.strip().splitlines()[-1])


def test_standard_meshes_compile_without_involuntary_rematerialization(standard_compiles):
    """Forward of both models (own rules) and the train step on 8x1x1, 1x8x1, 2x2x2 and 1x4x2."""
    sections, _ = standard_compiles
    programs = [
        f"{'x'.join(map(str, d.values()))} {p}"
        for d in MESHES
        for p in ("forward student", "forward teacher", "train_step")
    ]
    assert set(sections) == set(programs) | {"control", "end"}
    bad = {p: sections[p][:600] for p in programs if _REMAT in sections[p]}
    assert not bad, bad
    assert _REMAT in sections["control"]  # the warning is logged and captured when it happens


def test_forward_runs_fsdp_gathers_and_tensor_parallel_heads_and_mlp(standard_compiles):
    """Mesh 1x4x2, student (E=64, H=4, K=2, D=16, F=128; default rules), batch 8 x 16 over fsdp:
    each device gathers its weights over `fsdp` at use and keeps half the heads and half the MLP
    over `tensor`; no device ever holds all heads or the whole MLP, weights or activations."""
    _, hlo = standard_compiles
    h = hlo["1x4x2 student"]
    assert "all-gather(" in h or "all-gather-start(" in h
    # The projections are 2-D matmuls (layers.dense), so kernels appear flattened: q [E, H*D],
    # k/v [E, K*D], o [H*D, E], each gathered over fsdp with its tensor half of the heads.
    assert "f32[64,32]" in h  # q kernel: all of E, 4/2 heads x 16 (the whole one would be [64,64])
    assert "f32[64,16]" in h  # k/v kernels: 2/2 kv heads x 16
    assert "f32[32,64]" in h  # o kernel: 4/2 heads x 16 rows
    assert "f32[2,16,2,16]" in h  # q activations: batch 8/4, T 16, heads 4/2, D
    for full in ("f32[64,4,16]", "f32[4,16,64]", "f32[64,128]", "f32[128,64]", "f32[2,16,4,16]", "f32[2,16,128]"):
        assert full not in h, full  # all heads (activations), the whole MLP (gate, up, down kernels, hidden)


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
    with pytest.raises(
        ShardingConfigError, match=r"rule vocab -> 'tensor' names an axis the mesh does not have; mesh axes: data, fsdp"
    ):
        param_shardings(STUDENT, ShardingRules(), mesh)
    with pytest.raises(ShardingConfigError, match=r"unknown logical axis 'hidden'.*valid: vocab, embed"):
        ShardingRules.from_dict({"hidden": "fsdp"})


def test_indivisible_dimension_names_the_parameter():
    mesh = build_mesh(MeshConfig.from_dict({"data": 1, "fsdp": 1, "tensor": 8}))
    # tiny student: 4 query heads cannot be split 8 ways
    with pytest.raises(
        ShardingConfigError,
        match=r"parameter layers.q_kernel dim 2 \(heads=4\) is not divisible by mesh axes tensor of size 8; change the rule for .heads.",
    ):
        param_shardings(STUDENT, ShardingRules(), mesh)
