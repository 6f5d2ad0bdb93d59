"""Every `auto` choice of a model resolves against the platform of the mesh it is built on (its
ModelConfig.platform), not the process's default backend: a program built in this CPU process for a
TPU or GPU mesh (AOT compilation) must never pick a CPU-only path such as the fused C++ kernel."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tests.jaxpr_helpers import iter_eqns
from tgpo_jax.kernels import auto_query_block
from tgpo_jax.kernels import cpu as CA
from tgpo_jax.models.decoder import Decoder, left_pad_positions, remat_policy
from tgpo_jax.models.kv_cache import scans_cache
from tgpo_jax.models.moe import resolve_impl
from tgpo_jax.models.tiny import tiny_config
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh
from tgpo_jax.sharding.rules import ActivationSharding


def test_platform_defaults_to_the_backend_and_follows_the_mesh():
    cfg = tiny_config("qwen2")
    assert cfg.platform == "" and cfg.target_platform() == jax.default_backend() == "cpu"
    mesh = build_mesh(MeshConfig.from_dict({"data": 2, "fsdp": 1, "tensor": 1}), jax.devices()[:2])
    model = Decoder(cfg, nnx.Rngs(0), sharding=ActivationSharding(mesh, ShardingRules.from_dict(None)))
    assert model.cfg.platform == "cpu"
    # an explicit platform is kept (the mesh does not override what the caller chose)
    assert (
        Decoder(cfg.replace(platform="tpu"), nnx.Rngs(0), ActivationSharding(mesh, ShardingRules())).cfg.platform
        == "tpu"
    )


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_auto_choices_for_an_accelerator_platform(platform):
    cfg = tiny_config("qwen2", attn_impl="auto", attn_query_block=-1, remat_policy="auto", cache_layers="auto")
    on_cpu, on_acc = cfg, cfg.replace(platform=platform)
    assert remat_policy(on_cpu) is not jax.checkpoint_policies.nothing_saveable  # attn_out on CPU
    assert remat_policy(on_acc) is jax.checkpoint_policies.nothing_saveable
    assert (scans_cache(on_cpu), scans_cache(on_acc)) == (False, True)
    assert auto_query_block(-1, 320, on_cpu.target_platform()) == 32
    assert auto_query_block(-1, 320, on_acc.target_platform()) == 0
    assert (resolve_impl("auto", "cpu"), resolve_impl("auto", platform)) == ("blocks", "ragged")
    q = jnp.zeros((1, 8, 4, 16), jnp.float32)
    assert CA.supports(q, platform) == f"the fused attention kernel is for the CPU backend, not {platform}"


def _ffi_targets(cfg) -> list[str]:
    B, T = 2, 8
    tokens, mask = jnp.ones((B, T), jnp.int32), jnp.ones((B, T), jnp.int32)
    graph, state = nnx.split(Decoder(cfg, nnx.Rngs(0)))
    fn = lambda st: nnx.merge(graph, st).hidden_states(tokens, left_pad_positions(mask), mask)[0]  # noqa: E731
    return [
        e.params["target_name"] for e in iter_eqns(jax.make_jaxpr(fn)(state).jaxpr) if e.primitive.name == "ffi_call"
    ]


def test_a_tpu_model_traced_here_never_calls_the_cpu_kernel():
    if CA.unavailable_reason() is not None:
        pytest.skip(f"the CPU kernel is not built here: {CA.unavailable_reason()}")
    cfg = tiny_config("qwen2", attn_impl="auto")
    assert _ffi_targets(cfg) == [CA._FWD]  # this CPU process, no platform given: the kernel
    assert _ffi_targets(dataclasses.replace(cfg, platform="tpu")) == []
    with pytest.raises(CA.CpuKernelUnavailable, match="not tpu"):
        _ffi_targets(dataclasses.replace(cfg, attn_impl="cpu", platform="tpu"))
