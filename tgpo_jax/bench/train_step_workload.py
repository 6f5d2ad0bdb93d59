"""What the train-step benchmark runs: its settings, the model shapes, the synthetic mini-batch,
the setup worker (the peer's HF export, old_logp) and our jitted train step. The peer's step is
bench/torch_reference.py; the processes that run them, bench/harness.py.

The synthetic mini-batch (no teacher model: the train step alone is measured): prompts [B, P] with
random left padding (0..P/4 pads), responses [B, T] with random lengths in [T/2, T] (mask 1 on the
prefix), adv_B ~ N(0, 1), teacher_ids uniform over the vocabulary, teacher_valid = 1, and old_logp
= the model's own log-probs of the response tokens at the initial weights (`old_logp="model"`, the
default: ratio = 1 at the first step, as in the first PPO epoch) or zeros (`old_logp="zeros"`: no
extra forward; the cost of the step does not depend on the values).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np

from tgpo_jax.bench.harness import hwm, rss_now
from tgpo_jax.demo import FULL

MODELS = ("demo", "qwen-vocab-tiny", "qwen2.5-1.5b")

# The objective of the timed step, fixed on both sides (tgpo_reg: symmetric PPO clip, entropy bonus).
ENTROPY_COEF = 0.001
CLIP_EPS = 0.2


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = "demo"
    batch: int = 16
    prompt_len: int = 64
    response_len: int = 256
    micro_batch: int = 4
    chunk: int = 64
    repeats: int = 3
    warmup: int = 1  # untimed steps after the compile (0: the first timed step is the first execution)
    dtype: str = "float32"  # our compute dtype
    param_dtype: str = "float32"  # our parameter / optimizer-state dtype
    peer: bool = True
    peer_grad_ckpt: bool = False
    # OpenMP wait policy of the peer's threads. PASSIVE by default: with ACTIVE (spinning) threads,
    # any other load on the cores makes every torch op wait out descheduled spinners (measured 20-40x
    # slower steps at load average 5 on 2 cores); XLA's thread pool blocks instead of spinning.
    peer_omp_wait: str = "passive"
    peer_threads: int | None = None  # torch intra-op threads; None: os.cpu_count()
    old_logp: str = "model"
    lambda_0: float = 0.002
    lambda_decay: float = 1e-5
    lr: float = 1e-6
    seed: int = 0
    peak_tflops: float | None = None  # None: train_step_bench.DEFAULT_PEAK_TFLOPS on accelerators, no MFU on CPU
    # ours: ModelConfig.attn_query_block; -1 (auto, the train config's default): query blocks on CPU
    # at P + T >= 96 positions, full scores otherwise (layers.auto_query_block); 0: full scores
    attn_query_block: int = -1
    attn_impl: str = "auto"  # ours: ModelConfig.attn_impl (auto: the train config's default)
    # ours: data-parallel over this many devices (on CPU: host devices, e.g. one per core), the
    # parameters replicated and the mini-batch split by rows; 1: a single device
    devices: int = 1
    # steps each side runs per turn of the lock-step: 1 alternates every step (each step then starts
    # with caches the other side's step has filled); N runs N steps back to back per turn, as a
    # training loop does, while a drifting background load still falls on both sides alike
    turn_steps: int = 1

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; accepted: {', '.join(MODELS)}")
        if min(self.batch, self.prompt_len, self.response_len, self.micro_batch, self.chunk, self.repeats) < 1:
            raise ValueError("batch, prompt_len, response_len, micro_batch, chunk and repeats must all be >= 1")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if self.turn_steps < 1:
            raise ValueError(f"turn_steps={self.turn_steps} must be >= 1")
        if self.batch % self.micro_batch:
            raise ValueError(f"micro_batch={self.micro_batch} does not divide batch={self.batch}")
        if self.devices < 1 or self.micro_batch % self.devices:
            raise ValueError(f"devices={self.devices} must be >= 1 and divide micro_batch={self.micro_batch}")
        if self.response_len % min(self.chunk, self.response_len):
            raise ValueError(f"response_len={self.response_len} is not a multiple of chunk={self.chunk}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name}={getattr(self, name)!r}; accepted: float32, bfloat16")
        if self.peer_omp_wait not in ("passive", "active"):
            raise ValueError(f"peer_omp_wait={self.peer_omp_wait!r}; accepted: passive, active")
        if self.old_logp not in ("model", "zeros"):
            raise ValueError(f"old_logp={self.old_logp!r}; accepted: model, zeros")

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


# ---------------------------------------------------------------------- model shapes (no jax import)
def model_config(s: Settings):
    from tgpo_jax.bench import shapes
    from tgpo_jax.models.tiny import tiny_config

    if s.model == "demo":  # the student `tgpo-jax demo` trains: tiny Qwen2, 512-token vocabulary
        cfg = tiny_config(FULL.student.arch, **FULL.student.model_kwargs())
    elif s.model == "qwen-vocab-tiny":  # tiny_config's Qwen2 body with Qwen's real vocabulary
        cfg = tiny_config("qwen2", vocab_size=shapes.QWEN_VOCAB)
    else:
        cfg = shapes.qwen2_5_1_5b()
    return cfg.replace(
        param_dtype=s.param_dtype,
        dtype=s.dtype,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
        max_position_embeddings=max(cfg.max_position_embeddings, s.seq_len),
        attn_query_block=s.attn_query_block,
        attn_impl=s.attn_impl,
    )


# ---------------------------------------------------------------------- the synthetic mini-batch
def make_minibatch(s: Settings, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(s.seed)
    B, P, T = s.batch, s.prompt_len, s.response_len
    pad = rng.integers(0, P // 4 + 1, B)
    prompt_mask = (np.arange(P)[None, :] >= pad[:, None]).astype(np.int32)
    prompt = rng.integers(1, vocab, (B, P)).astype(np.int32) * prompt_mask
    lengths = rng.integers(max(1, T // 2), T + 1, B)
    lengths[0] = T  # at least one full-length row
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    tokens = rng.integers(1, vocab, (B, T)).astype(np.int32) * mask
    return dict(
        prompt=prompt,
        prompt_mask=prompt_mask,
        tokens=tokens,
        mask=mask,
        adv_B=rng.normal(size=B).astype(np.float32),
        teacher_ids=rng.integers(0, vocab, (B, T)).astype(np.int32),
        teacher_valid=np.ones((B, T), np.float32),
        old_logp=np.zeros((B, T), np.float32),
    )


def init_model(cfg, seed: int):
    """A Decoder with our initialisation's distributions (params.py: N(0, 0.02) kernels and
    embeddings, zero biases, unit norms) drawn with numpy on the host: identical in every worker
    process and free of the per-parameter compiles of an eager init."""
    import jax.numpy as jnp

    from tgpo_jax.models.hf_import import model_from_flat
    from tgpo_jax.models.params import INIT_STD, param_specs

    rng = np.random.default_rng(seed)
    flat = {}
    for path, spec in param_specs(cfg).items():
        if spec.init == "normal":
            a = rng.standard_normal(spec.shape, dtype=np.float32)
            a *= INIT_STD
        else:
            a = (np.zeros if spec.init == "zeros" else np.ones)(spec.shape, np.float32)
        flat[path] = jnp.asarray(a.astype(cfg.jnp_param_dtype, copy=False))
        del a
    return model_from_flat(cfg, flat)


# ---------------------------------------------------------------------- setup worker (jax)
def worker_setup(s: Settings, work: str) -> dict:
    """Exports the weights for the peer and fills old_logp with the model's own log-probs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tgpo_jax.objectives.logprobs import student_old_stats
    from tgpo_jax.train.score import response_hidden

    out = {}
    if not s.peer and s.old_logp != "model":
        return out  # nothing to export or score: no model to build (1.5B: ~1 min of host init)
    cfg = model_config(s)
    model = init_model(cfg, s.seed)
    if s.peer:
        from tgpo_jax.models.hf_export import save_hf

        save_hf(model, os.path.join(work, "model"), dtype="float32")
    if s.old_logp == "model":
        mb = dict(np.load(os.path.join(work, "minibatch.npz")))
        graphdef, state = nnx.split(model)

        @jax.jit
        def old_logp(state, prompt, prompt_mask, tokens, mask):
            m = nnx.merge(graphdef, state)
            h = response_hidden(m, prompt, prompt_mask, tokens, mask)
            ids = jnp.zeros(tokens.shape + (0,), jnp.int32)
            return student_old_stats(
                h, m.lm_head_EV(), tokens, ids, chunk=s.chunk, valid_vocab=cfg.valid_vocab_size or cfg.vocab_size
            )[0]

        b = s.micro_batch
        rows = [
            np.asarray(old_logp(state, *(mb[k][i : i + b] for k in ("prompt", "prompt_mask", "tokens", "mask"))))
            for i in range(0, s.batch, b)
        ]
        mb["old_logp"] = (np.concatenate(rows) * mb["mask"]).astype(np.float32)
        np.savez(os.path.join(work, "minibatch.npz"), **mb)
        out["old_logp_mean"] = float(mb["old_logp"][mb["mask"] > 0].mean())
    return out


# ---------------------------------------------------------------------- ours (jax)
def prepare_ours(s: Settings, work: str) -> tuple[Callable[[], float], dict]:
    """Builds and compiles our step; returns (one step -> loss, info)."""
    import jax
    import jax.numpy as jnp

    from tgpo_jax.objectives.batch import Batch
    from tgpo_jax.objectives.registry import ObjectiveConfig
    from tgpo_jax.train.step import OptimizerConfig, init_train_state, make_optimizer, make_train_step

    cfg = model_config(s)
    if s.devices > 1:
        jax.config.update("jax_num_cpu_devices", s.devices)  # before the first backend use; CPU only
    dev = jax.devices()[0]
    opt = make_optimizer(OptimizerConfig(lr=s.lr))
    graphdef, state = init_train_state(init_model(cfg, s.seed), opt)
    mb = {k: jnp.asarray(v) for k, v in np.load(os.path.join(work, "minibatch.npz")).items()}
    if s.devices > 1:
        state, mb = _data_parallel(state, mb, s.devices)
    mb = Batch.from_arrays(mb)  # the .npz's names are Batch fields without the shape suffix
    obj = ObjectiveConfig(
        name="tgpo_reg",
        lambda_0=s.lambda_0,
        lambda_decay=s.lambda_decay,
        clip_eps_low=CLIP_EPS,
        clip_eps_high=CLIP_EPS,
        entropy_coef=ENTROPY_COEF,
    )
    step = make_train_step(graphdef, opt, obj_cfg=obj, micro_batch=s.micro_batch, chunk=s.chunk)
    it = jnp.asarray(1, jnp.int32)  # lambda_1 = lambda_0 at every timed step
    jax.block_until_ready((state, mb))
    rss_before = rss_now()
    t0 = time.perf_counter()
    compiled = step.lower(state, mb, it).compile()
    compile_s = time.perf_counter() - t0
    info = dict(
        compile_s=compile_s,
        rss_before_bytes=rss_before,
        compile_peak_bytes=hwm(),
        xla_temp_bytes=getattr(compiled.memory_analysis(), "temp_size_in_bytes", None),
        device=dev.platform,
        device_kind=dev.device_kind,
    )
    holder = [state]

    def one_step() -> float:
        new_state, met = compiled(holder[0], mb, it)
        holder[0] = new_state
        jax.block_until_ready((new_state, met))
        return float(met["loss/total"])

    def finish(info: dict) -> None:
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        if stats:
            info["device_peak_bytes"] = int(stats.get("peak_bytes_in_use", 0)) or None

    info["_finish"] = finish
    return one_step, info


def _data_parallel(state, mb: dict, n: int):
    """The state replicated and the mini-batch split by rows over a data mesh of n devices."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh
    from tgpo_jax.sharding.distributed import put_batch

    mesh = build_mesh(MeshConfig.from_dict({"data": n, "fsdp": 1, "tensor": 1}), jax.devices()[:n])
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return state, {k: put_batch(np.asarray(v), mesh, ShardingRules()) for k, v in mb.items()}


# ---------------------------------------------------------------------- peer (PyTorch + transformers)
def prepare_peer(s: Settings, work: str) -> tuple[Callable[[], float], dict]:
    """The PyTorch reference step on the setup worker's HF export and mini-batch."""
    from tgpo_jax.bench.torch_reference import TorchStepSpec, prepare_torch_step

    iteration = 1  # lambda_1 = lambda_0, as in our timed steps
    spec = TorchStepSpec(
        prompt_len=s.prompt_len,
        micro_batch=s.micro_batch,
        lr=s.lr,
        lam=max(s.lambda_0 - (iteration - 1) * s.lambda_decay, 0.0),
        clip_eps=CLIP_EPS,
        entropy_coef=ENTROPY_COEF,
        seed=s.seed,
        threads=s.peer_threads,
        grad_ckpt=s.peer_grad_ckpt,
    )
    minibatch = dict(np.load(os.path.join(work, "minibatch.npz")))
    return prepare_torch_step(os.path.join(work, "model"), minibatch, spec)


PREPARE = {"ours": prepare_ours, "peer": prepare_peer}
