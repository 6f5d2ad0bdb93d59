"""`tgpo-jax bench train-step`: our jitted TGPO-Reg train step against the same loss written plainly
in PyTorch on transformers' model, same weights, same mini-batch.

Ours: `make_train_step` (micro-batch `lax.scan`, per-layer remat, chunked log-probs that never hold
[B, T, V] logits, global-norm clip, optax AdamW). Peer: our random weights exported with `save_hf`
and loaded by `AutoModelForCausalLM` (fp32, CPU); per micro-batch full logits [b, P+T, V] ->
log_softmax over the response positions -> gather log pi(y), log pi(teacher id), full-vocab entropy
-> PPO clip + lambda * CE - 0.001 * H, token mean over the mini-batch's valid tokens, backward,
gradients accumulated over micro-batches, `clip_grad_norm_(1.0)`, `torch.optim.AdamW`.

The synthetic mini-batch (no teacher model: the train step alone is measured): prompts [B, P] with
random left padding (0..P/4 pads), responses [B, T] with random lengths in [T/2, T] (mask 1 on the
prefix), adv_B ~ N(0, 1), teacher_ids uniform over the vocabulary, teacher_valid = 1, and old_logp
= the model's own log-probs of the response tokens at the initial weights (`--old-logp model`, the
default: ratio = 1 at the first step, as in the first PPO epoch) or zeros (`--old-logp zeros`: no
extra forward; the cost of the step does not depend on the values).

tokens/s = B * (P + T) / median seconds of one optimizer step (prompt and response positions,
padding included: both sides run the forward and backward over all of them), after one compile +
warm-up step, median of `repeats` steps. Same definition for both sides.

Each side runs in its own fresh subprocess so that peak memories do not mix; peak = the process's
`ru_maxrss` (bytes; it includes the interpreter, the framework import, the model, optimizer state,
the mini-batch and, for ours, XLA's compilation); `*_step_peak_bytes` is the peak RSS while stepping
only (VmHWM reset after the compile). The two processes are prepared one after the other and then
stepped in lock-step (ours, peer, ours, peer, ...): a background load that changes over the run
(a shared machine) falls on both sides alike. `--turn-steps N` lets each side run N steps per turn
(ours x N, peer x N, ...): with N = 1 every step starts from caches the other process has just
filled, which a training loop never sees. Per-step process CPU time is reported as well. The HF
export and old_logp are made before, in a third subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from tgpo_jax.bench import emit_table
from tgpo_jax.demo import FULL

MODELS = ("demo", "qwen-vocab-tiny", "qwen2.5-1.5b")
QWEN_VOCAB = 151936

# Per-model defaults of a full run; --quick (the demo model only) uses QUICK_DEFAULTS. Flags override.
MODEL_DEFAULTS = {
    "demo": dict(batch=16, prompt_len=64, response_len=256, micro_batch=4, chunk=64, repeats=10),
    "qwen-vocab-tiny": dict(batch=8, prompt_len=64, response_len=4096, micro_batch=1, chunk=256, repeats=3),
    "qwen2.5-1.5b": dict(batch=16, prompt_len=256, response_len=1792, micro_batch=4, chunk=256, repeats=3),
}
QUICK_DEFAULTS = dict(batch=8, prompt_len=16, response_len=48, micro_batch=4, chunk=16, repeats=3)

DEFAULT_PEAK_TFLOPS = 989.0  # NVIDIA H100 / H200 SXM, dense bf16
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
    peak_tflops: float | None = None  # None: DEFAULT_PEAK_TFLOPS on accelerators, no MFU on CPU
    # ours: ModelConfig.attn_query_block; -1 (auto, the train config's default): query blocks on CPU
    # at T >= 96, full scores otherwise; 0: full scores
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
    from tgpo_jax.models.config import ModelConfig
    from tgpo_jax.models.tiny import tiny_config

    if s.model == "demo":  # the student `tgpo-jax demo` trains: tiny Qwen2, 512-token vocabulary
        cfg = tiny_config(FULL.student.arch, **FULL.student.model_kwargs())
    elif s.model == "qwen-vocab-tiny":  # tiny_config's Qwen2 body with Qwen's real vocabulary
        cfg = tiny_config("qwen2", vocab_size=QWEN_VOCAB)
    else:  # Qwen2.5-1.5B shape
        cfg = ModelConfig(
            architecture="Qwen2ForCausalLM",
            vocab_size=QWEN_VOCAB,
            hidden_size=1536,
            intermediate_size=8960,
            num_layers=28,
            num_heads=12,
            num_kv_heads=2,
            head_dim=128,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            max_position_embeddings=32768,
            qkv_bias=True,
            tie_word_embeddings=True,
        )
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


def param_count(cfg) -> int:
    from tgpo_jax.models.params import param_specs

    return sum(math.prod(spec.shape) for spec in param_specs(cfg).values())


def model_flops(cfg, s: Settings) -> dict:
    """Model FLOPs of one optimizer step (forward + backward = 3 x forward), rematerialisation NOT
    counted (per-layer remat and the chunked log-prob recompute add about one more forward):

        body      = 6 * N_layers * B * (P + T)      N_layers = all decoder-layer weights
        lm_head   = 6 * E * V * B * T               logits only at the T response positions
        attention = 12 * layers * H * D * (P + T)^2 * B   QK^T and PV over the whole score matrix
                                                        (our attention does not skip the causal half)
    """
    E, V = cfg.hidden_size, cfg.vocab_size
    n_embed = V * E * (1 if cfg.tie_word_embeddings else 2)
    n_layers = param_count(cfg) - n_embed - E  # minus the final norm
    L = s.seq_len
    body = 6 * n_layers * s.batch * L
    head = 6 * E * V * s.batch * s.response_len
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * L * L * s.batch
    return dict(
        flops_body=body,
        flops_lm_head=head,
        flops_attention=attn,
        flops_per_step=body + head + attn,
        params_layers=n_layers,
    )


def full_logits_bytes(cfg, s: Settings) -> dict:
    """What the full-logits path must hold, analytically (fp32): the logits tensor [b, P+T, V] of
    one forward; a lower bound on its peak is three such tensors (logits, log_softmax, and the
    gradient flowing back through them), before any activation, weight or optimizer memory."""
    one_batch = s.batch * s.seq_len * cfg.vocab_size * 4
    one_micro = s.micro_batch * s.seq_len * cfg.vocab_size * 4
    return dict(
        full_logits_tensor_bytes=one_batch,
        full_logits_lower_bound_bytes=3 * one_batch,
        full_logits_micro_batch_tensor_bytes=one_micro,
        full_logits_micro_batch_lower_bound_bytes=3 * one_micro,
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


def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _hwm() -> int | None:
    """The process's peak RSS so far (VmHWM), resettable with `_reset_hwm`; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    obj = ObjectiveConfig(
        name="tgpo_reg",
        lambda_0=s.lambda_0,
        lambda_decay=s.lambda_decay,
        clip_eps_low=CLIP_EPS,
        clip_eps_high=CLIP_EPS,
        entropy_coef=ENTROPY_COEF,
    )
    step = make_train_step(graphdef, opt, obj_cfg=obj, micro_batch=s.micro_batch, chunk=s.chunk)
    key = jax.random.key(s.seed)
    it = jnp.asarray(1, jnp.int32)  # lambda_1 = lambda_0 at every timed step
    jax.block_until_ready((state, mb))
    rss_before = _rss_now()
    t0 = time.perf_counter()
    compiled = step.lower(state, mb, key, it).compile()
    compile_s = time.perf_counter() - t0
    info = dict(
        compile_s=compile_s,
        rss_before_bytes=rss_before,
        compile_peak_bytes=_hwm(),
        xla_temp_bytes=getattr(compiled.memory_analysis(), "temp_size_in_bytes", None),
        device=dev.platform,
        device_kind=dev.device_kind,
    )
    holder = [state]

    def one_step() -> float:
        new_state, met = compiled(holder[0], mb, key, it)
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
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(s.peer_threads or os.cpu_count() or 1)
    torch.manual_seed(s.seed)
    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(work, "model"), dtype=torch.float32)
    hf.train()  # dropout is 0 in these configs; train mode is needed for gradient checkpointing
    if s.peer_grad_ckpt:
        hf.gradient_checkpointing_enable()
    hf.config.use_cache = False
    opt = torch.optim.AdamW(hf.parameters(), lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    d = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(work, "minibatch.npz")).items()}
    P, T, b = s.prompt_len, s.response_len, s.micro_batch
    input_ids = torch.cat([d["prompt"], d["tokens"]], 1).long()
    attn = torch.cat([d["prompt_mask"], d["mask"]], 1).long()
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    mask = d["mask"].float()
    denom = mask.sum().clamp(min=1.0)  # token mean over the whole mini-batch (our default aggregation)
    iteration = 1
    lam = max(s.lambda_0 - (iteration - 1) * s.lambda_decay, 0.0)

    def one_step() -> float:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, s.batch, b):
            sl = slice(i, i + b)
            logits = hf(
                input_ids=input_ids[sl], attention_mask=attn[sl], position_ids=position_ids[sl], use_cache=False
            ).logits  # [b, P+T, V]: the full logits
            logp_all = torch.log_softmax(logits[:, P - 1 : P + T - 1].float(), -1)
            logp = logp_all.gather(-1, d["tokens"][sl].long()[..., None])[..., 0]
            logp_teacher = logp_all.gather(-1, d["teacher_ids"][sl].long()[..., None])[..., 0]
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            ratio = torch.exp(logp - d["old_logp"][sl])
            adv = d["adv_B"][sl][:, None]
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS))
            ce = -logp_teacher * d["teacher_valid"][sl]
            per_token = pg + lam * ce - ENTROPY_COEF * entropy
            loss = (per_token * mask[sl]).sum() / denom
            loss.backward()
            total += float(loss.detach())
            del logits, logp_all, loss
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        return total

    return one_step, dict(
        rss_before_bytes=_rss_now(),
        threads=torch.get_num_threads(),
        attn_implementation=getattr(hf.config, "_attn_implementation", None),
    )


PREPARE = {"ours": prepare_ours, "peer": prepare_peer}


def _serve(role: str, s: Settings, work: str) -> dict:
    """Lock-step worker: prepare, say READY, then run one step per STEP line (answering DONE) until
    END. The parent alternates the two workers step by step, so that a slowly changing background
    load on a shared machine hits both sides alike."""
    one_step, info = PREPARE[role](s, work)
    finish = info.pop("_finish", None)
    prepare_peak = _hwm() or 0  # resetting VmHWM also resets what ru_maxrss reports: keep this peak
    step_hwm = _reset_hwm()  # peak RSS of the steps alone: VmHWM reset after preparation / compile
    times, cpu, losses = [], [], []
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "END":
            break
        if cmd != "STEP":
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(one_step())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print("DONE", flush=True)
    w = s.warmup
    info.update(
        warmup_s=times[0] if w else None,
        runs_s=times[w:],
        median_s=statistics.median(times[w:]),
        cpu_median_s=statistics.median(cpu[w:]),
        first_loss=losses[0],
        last_loss=losses[-1],
        peak_bytes=max(_peak_rss(), prepare_peak),
        step_peak_bytes=_hwm() if step_hwm else None,
        load_avg=os.getloadavg()[0],
    )
    if finish:
        finish(info)
    return info


def _worker_main(argv: list[str]) -> int:
    role, settings_path, work = argv
    with open(settings_path) as f:
        s = Settings(**json.load(f))
    out = worker_setup(s, work) if role == "setup" else _serve(role, s, work)
    with open(os.path.join(work, f"{role}.json"), "w") as f:
        json.dump(out, f)
    return 0


def _worker_cmd(role: str, settings_path: str, work: str, s: Settings | None = None) -> tuple[list[str], dict]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if role == "peer" and s is not None:
        env["OMP_WAIT_POLICY"] = s.peer_omp_wait.upper()
    return [sys.executable, "-m", "tgpo_jax.bench.train_step_bench", "_worker", role, settings_path, work], env


def _run_setup(settings_path: str, work: str, emit: Callable[[str], None]) -> dict:
    cmd, env = _worker_cmd("setup", settings_path, work)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"bench train-step: the setup worker failed (exit {proc.returncode}):\n"
            f"{(proc.stdout + proc.stderr)[-4000:]}"
        )
    emit(f"  [setup] export + old_logp in {time.perf_counter() - t0:.1f}s (fresh process)")
    with open(os.path.join(work, "setup.json")) as f:
        return json.load(f)


class _Worker:
    """One lock-step worker process (its stderr goes to a file, read back on failure)."""

    def __init__(self, role: str, settings_path: str, work: str, s: Settings):
        cmd, env = _worker_cmd(role, settings_path, work, s)
        self.role, self.work = role, work
        self.err_path = os.path.join(work, f"{role}.stderr")
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1
        )

    def _fail(self, what: str):
        self.proc.kill()
        self.proc.wait()
        self._err.close()
        with open(self.err_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"bench train-step: the {self.role} worker {what} (exit {self.proc.returncode}):\n{tail}")

    def expect(self, token: str):
        for line in self.proc.stdout:
            if line.strip() == token:
                return
        self._fail(f"ended before {token}")

    def send(self, cmd: str):
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._fail("closed its input")

    def result(self) -> dict:
        self.send("END")
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            self._fail("failed")
        self._err.close()
        with open(os.path.join(self.work, f"{self.role}.json")) as f:
            return json.load(f)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._err.closed:
            self._err.close()


def _run_lockstep(s: Settings, roles: list[str], settings_path: str, work: str, emit: Callable[[str], None]) -> dict:
    workers: dict[str, _Worker] = {}
    try:
        for role in roles:  # prepared one after the other: our compile time is not shared with the peer's load
            t0 = time.perf_counter()
            workers[role] = _Worker(role, settings_path, work, s)
            workers[role].expect("READY")
            emit(f"  [{role}] ready in {time.perf_counter() - t0:.1f}s (fresh process)")
        total, done = s.warmup + s.repeats, 0
        while done < total:
            n = min(s.turn_steps, total - done)
            for role in roles:
                for _ in range(n):
                    workers[role].send("STEP")
                    workers[role].expect("DONE")
            done += n
        return {role: workers[role].result() for role in roles}
    finally:
        for w in workers.values():
            w.kill()


# ---------------------------------------------------------------------- driver
def _measure(s: Settings, cfg, emit: Callable[[str], None]) -> tuple[dict, dict | None]:
    """Runs the setup and the lock-step workers in a scratch directory; (ours, peer or None)."""
    with tempfile.TemporaryDirectory(prefix="tgpo-bench-step-") as work:
        settings_path = os.path.join(work, "settings.json")
        with open(settings_path, "w") as f:
            json.dump(dataclasses.asdict(s), f)
        np.savez(os.path.join(work, "minibatch.npz"), **make_minibatch(s, cfg.valid_vocab_size or cfg.vocab_size))
        if s.peer or s.old_logp == "model":
            _run_setup(settings_path, work, emit)
        res = _run_lockstep(s, ["ours", "peer"] if s.peer else ["ours"], settings_path, work, emit)
    return res["ours"], res.get("peer")


def _table(s: Settings, ours: dict, peer: dict | None, emit: Callable[[str], None]) -> None:
    gib = 1024**3
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    rows = [
        (
            "ours (jax, jit step)",
            f"{ours['compile_s']:.2f}",
            fmt(ours["warmup_s"], ".2f"),
            f"{ours['median_s']:.3f}",
            f"{s.tokens / ours['median_s']:,.0f}",
            f"{ours['peak_bytes'] / gib:.2f}",
        )
    ]
    if peer:
        rows.append(
            (
                f"peer (torch {peer['threads']} thr, full logits)",
                "-",
                fmt(peer["warmup_s"], ".2f"),
                f"{peer['median_s']:.3f}",
                f"{s.tokens / peer['median_s']:,.0f}",
                f"{peer['peak_bytes'] / gib:.2f}",
            )
        )
    emit_table(("implementation", "compile_s", "warmup_s", "median_s", "tokens/s", "peak_GiB"), rows, emit)


def _result(s: Settings, cfg, ours: dict, peer: dict | None, fl: dict) -> dict:
    """The JSON report: the required fields first, then settings and per-side details."""
    ours_tps = s.tokens / ours["median_s"]
    peer_tps = s.tokens / peer["median_s"] if peer else None
    pv = lambda k: peer[k] if peer else None  # noqa: E731
    result = dict(
        ours_tokens_per_s=ours_tps,
        peer_tokens_per_s=peer_tps,
        ratio=ours_tps / peer_tps if peer_tps else None,
        ours_peak_bytes=ours["peak_bytes"],
        peer_peak_bytes=pv("peak_bytes"),
        model=s.model,
        vocab_size=cfg.vocab_size,
        params=param_count(cfg),
        batch=s.batch,
        prompt_len=s.prompt_len,
        response_len=s.response_len,
        micro_batch=s.micro_batch,
        chunk=s.chunk,
        repeats=s.repeats,
        warmup=s.warmup,
        dtype=s.dtype,
        param_dtype=s.param_dtype,
        old_logp=s.old_logp,
        attn_query_block=s.attn_query_block,
        attn_impl=s.attn_impl,
        devices=s.devices,
        turn_steps=s.turn_steps,
        tokens_per_step=s.tokens,
        cpu_time_ratio=peer["cpu_median_s"] / ours["cpu_median_s"] if peer else None,
        ours_compile_s=ours["compile_s"],
        ours_warmup_s=ours["warmup_s"],
        ours_median_s=ours["median_s"],
        ours_runs_s=ours["runs_s"],
        ours_cpu_median_s=ours["cpu_median_s"],
        ours_load_avg=ours["load_avg"],
        ours_first_loss=ours["first_loss"],
        ours_rss_before_bytes=ours["rss_before_bytes"],
        ours_compile_peak_bytes=ours["compile_peak_bytes"],
        ours_step_peak_bytes=ours["step_peak_bytes"],
        ours_xla_temp_bytes=ours["xla_temp_bytes"],
        peer_warmup_s=pv("warmup_s"),
        peer_median_s=pv("median_s"),
        peer_runs_s=pv("runs_s"),
        peer_cpu_median_s=pv("cpu_median_s"),
        peer_load_avg=pv("load_avg"),
        peer_first_loss=pv("first_loss"),
        peer_rss_before_bytes=pv("rss_before_bytes"),
        peer_step_peak_bytes=pv("step_peak_bytes"),
        peer_threads=pv("threads"),
        peer_attn_implementation=pv("attn_implementation"),
        peer_grad_ckpt=s.peer_grad_ckpt if peer else None,
        peer_omp_wait=s.peer_omp_wait if peer else None,
        first_loss_abs_diff=abs(ours["first_loss"] - peer["first_loss"]) if peer else None,
        device=ours["device"],
        device_kind=ours["device_kind"],
        **fl,
    )
    if "device_peak_bytes" in ours:
        result["ours_device_peak_bytes"] = ours["device_peak_bytes"]
    return result


def run(s: Settings, emit: Callable[[str], None] = print) -> dict:
    cfg = model_config(s)
    emit(
        f"bench train-step: model={s.model} ({cfg.architecture}, V={cfg.vocab_size}, "
        f"{param_count(cfg) / 1e6:.2f}M params) dtype={s.dtype} params={s.param_dtype}; TGPO-Reg "
        f"lambda_0={s.lambda_0}, AdamW lr={s.lr}"
    )
    emit(
        f"  B={s.batch} P={s.prompt_len} T={s.response_len} micro_batch={s.micro_batch} chunk={s.chunk} "
        f"repeats={s.repeats} (median after compile + {s.warmup} warm-up step(s)); "
        f"tokens/step = B*(P+T) = {s.tokens:,}"
    )
    ours, peer = _measure(s, cfg, emit)
    _table(s, ours, peer, emit)
    fl = full_logits_bytes(cfg, s)
    emit(
        f"  full-logits path (analytic, fp32): logits [B, P+T, V] = {fl['full_logits_tensor_bytes'] / 1e9:.2f} GB, "
        f">= {fl['full_logits_lower_bound_bytes'] / 1e9:.2f} GB with log_softmax + gradient; per micro-batch of "
        f"{s.micro_batch}: {fl['full_logits_micro_batch_lower_bound_bytes'] / 1e9:.2f} GB"
    )
    result = _result(s, cfg, ours, peer, fl)
    if peer:
        emit(
            f"  first-step loss: ours {ours['first_loss']:.6f}  peer {peer['first_loss']:.6f}  "
            f"(|diff| {result['first_loss_abs_diff']:.2e}; same weights, same batch)"
        )
    peak = s.peak_tflops if s.peak_tflops is not None else (DEFAULT_PEAK_TFLOPS if ours["device"] != "cpu" else None)
    if peak:
        mf = model_flops(cfg, s)
        achieved = mf["flops_per_step"] / ours["median_s"]
        result.update(mf, peak_tflops=peak, achieved_tflops=achieved / 1e12, mfu=achieved / (peak * 1e12))
        emit(
            f"  model FLOPs/step {mf['flops_per_step'] / 1e12:.4g} T (remat not counted): {achieved / 1e12:.4g} "
            f"TFLOP/s = MFU {result['mfu']:.1%} of {peak:.0f} TFLOP/s"
        )
    return result


def add_arguments(p) -> None:
    p.add_argument("--model", choices=MODELS, default=None, help="model shape, random weights (default demo)")
    p.add_argument("--batch", type=int, default=None, help="sequences per mini-batch (B)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt positions P")
    p.add_argument("--response-len", type=int, default=None, help="response positions T")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (both sides)")
    p.add_argument("--chunk", type=int, default=None, help="our log-prob chunk along T")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed steps after the warm-up (default 10 for the demo model, else 3)",
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps after the compile (default 1; 0 for long memory-only runs)"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="our compute dtype (the transformers peer is always float32)",
    )
    p.add_argument(
        "--param-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="our parameter + optimizer-state dtype",
    )
    p.add_argument(
        "--old-logp",
        choices=["model", "zeros"],
        default="model",
        help="old_logp of the mini-batch: the model's own log-probs (default) or zeros",
    )
    p.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer (accelerators, memory runs)")
    p.add_argument("--peer-grad-ckpt", action="store_true", help="gradient checkpointing in the peer")
    p.add_argument("--peer-threads", type=int, default=None, help="torch threads of the peer (default: all cores)")
    p.add_argument(
        "--peer-omp-wait",
        choices=["passive", "active"],
        default="passive",
        help="OMP_WAIT_POLICY of the peer (default passive: spinning threads collapse under any other load)",
    )
    p.add_argument("--quick", action="store_true", help="demo model, small batch: well under a minute on CPU")
    p.add_argument("--lambda-0", type=float, default=0.002, help="TGPO-Reg teacher coefficient lambda_0 of the step")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate of the timed steps")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=f"peak for the MFU (default {DEFAULT_PEAK_TFLOPS:.0f}, H100/H200 bf16 dense, on accelerators; "
        "no MFU on CPU unless given)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and batch")
    p.add_argument(
        "--attn-query-block",
        type=int,
        default=-1,
        help="our causal attention in query blocks of this many rows (0: full scores; "
        "-1: auto, the train config's default)",
    )
    p.add_argument(
        "--attn-impl",
        choices=["einsum", "sdpa", "cudnn", "cpu", "auto"],
        default="auto",
        help="our cache-free attention kernel (ModelConfig.attn_impl; cudnn: GPU only; cpu: the fused "
        "CPU kernel; auto, the default: cpu where it applies, else einsum)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="ours data-parallel over this many devices (CPU: host devices, e.g. one per core; default 1)",
    )
    p.add_argument(
        "--turn-steps",
        type=int,
        default=1,
        help="steps each side runs per lock-step turn (default 1: alternate every step)",
    )
    p.add_argument("--json-out", default=None, help="also write the result JSON to this file")


def settings_from_args(args) -> Settings:
    model = args.model or "demo"
    base = QUICK_DEFAULTS if args.quick and model == "demo" else MODEL_DEFAULTS[model]
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    return Settings(
        model=model,
        **pick,
        warmup=args.warmup,
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        peer=not args.no_peer,
        peer_grad_ckpt=args.peer_grad_ckpt,
        peer_omp_wait=args.peer_omp_wait,
        peer_threads=args.peer_threads,
        old_logp=args.old_logp,
        lambda_0=args.lambda_0,
        lr=args.lr,
        seed=args.seed,
        peak_tflops=args.peak_tflops,
        attn_query_block=args.attn_query_block,
        attn_impl=args.attn_impl,
        devices=args.devices,
        turn_steps=args.turn_steps,
    )


def main(args) -> int:
    s = settings_from_args(args)
    result = run(s, emit=lambda line: print(line, flush=True))
    line = json.dumps(result)
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    sys.stdout.flush()
    print(line, flush=True)  # the LAST line of stdout: one JSON object
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        sys.exit(_worker_main(sys.argv[2:]))
    parser = argparse.ArgumentParser(prog="python -m tgpo_jax.bench.train_step_bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
