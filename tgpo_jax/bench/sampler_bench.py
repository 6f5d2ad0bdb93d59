"""`tgpo-jax bench sampler`: our jitted rollout sampler against transformers' `generate`.

Both sides get the same random weights (our init, exported with `save_hf` and loaded by
transformers), the same prompts (random token ids, all `prompt_len` long, so neither side pads)
and produce exactly `new_tokens` tokens per row (no stop ids, no EOS): pure ancestral sampling at
temperature 1, top_p 1, no top-k. Each side gets one warm-up call, then `repeats` timed calls; the
figure is the median. Our compile time is reported apart (from `Sampler.stats`).

tokens/s = prompts * n * new_tokens / median seconds of one full `sample` / `generate` call
(prefill included). On accelerators the report adds the decode-only rate and its fraction of the
HBM-bandwidth roofline (see docs/benchmarks.md for the formula).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

from tgpo_jax.bench import device_peaks, emit_table
from tgpo_jax.bench.flops import param_count
from tgpo_jax.bench.harness import print_result

MODELS = ("tiny", "smollm2-135m", "qwen2.5-1.5b")

# Defaults of a full run and of --quick (explicit flags override either).
FULL_DEFAULTS = dict(model="tiny", prompts=16, n=8, prompt_len=32, new_tokens=64, repeats=3)
QUICK_DEFAULTS = dict(model="tiny", prompts=4, n=4, prompt_len=16, new_tokens=16, repeats=3)


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    model: str = "tiny"
    prompts: int = 16
    n: int = 8
    prompt_len: int = 32
    new_tokens: int = 64
    repeats: int = 3
    dtype: str = "float32"
    peer: bool = True
    hbm_gbps: float | None = None  # None: the device's peak (device_peaks.py); none on CPU
    seed: int = 0
    decode_split: bool = True  # also time prefill alone, for the decode-only rate (one more compile)
    peer_threads: int | None = None  # torch intra-op threads; None: os.cpu_count()
    cache_layers: str = "auto"  # ours: ModelConfig.cache_layers (unroll | scan | auto)

    def __post_init__(self):
        from tgpo_jax.models.runtime_options import runtime_option_problems

        if problems := runtime_option_problems(cache_layers=self.cache_layers):
            raise ValueError(problems[0])
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; accepted: {', '.join(MODELS)}")
        if min(self.prompts, self.n, self.prompt_len, self.new_tokens, self.repeats) < 1:
            raise ValueError("prompts, n, prompt_len, new_tokens and repeats must all be >= 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}; accepted: float32, bfloat16")

    @property
    def batch(self) -> int:
        return self.prompts * self.n


def model_config(name: str, dtype: str = "float32"):
    """The ModelConfig of a benchmark model shape (random weights; no checkpoint needed)."""
    from tgpo_jax.bench import shapes

    if name == "tiny":
        from tgpo_jax.models.tiny import tiny_config  # imports tokenizers / transformers: tiny only

        cfg = tiny_config("qwen2")
    elif name == "demo":  # the student `tgpo-jax demo` trains (bench rollout)
        from tgpo_jax.demo import FULL
        from tgpo_jax.models.tiny import tiny_config

        cfg = tiny_config(FULL.student.arch, **FULL.student.model_kwargs())
    elif name == "smollm2-135m":
        cfg = shapes.smollm2_135m()
    elif name == "qwen2.5-1.5b":
        cfg = shapes.qwen2_5_1_5b()
    else:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODELS + ('demo',))}")
    return cfg.replace(param_dtype=dtype, dtype=dtype, eos_token_id=None, bos_token_id=None, pad_token_id=None)


def decode_param_bytes(cfg, dtype: str) -> int:
    """Bytes of weights one decode step must read: all parameters, less an untied embedding table
    (only its B rows are gathered); a tied table is read whole, as the head."""
    params = param_count(cfg)
    if not cfg.tie_word_embeddings:
        params -= cfg.vocab_size * cfg.hidden_size
    return int(params * (2 if dtype == "bfloat16" else 4))


def kv_bytes_per_position(cfg, dtype: str) -> int:
    """Bytes of K and V that one cached position holds over all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (2 if dtype == "bfloat16" else 4)


def roofline(cfg, s: BenchSettings, hbm_gbps: float) -> dict:
    """HBM-bandwidth bound on decode tokens/s: every decode step must read the weights used by a
    one-token forward once, plus the valid part of every row's KV cache.

        param_bytes = all parameters x bytes/param, minus the embedding table when it is not tied
                      (an untied table is only gathered, B rows); a tied table is read as lm_head
        kv_bytes    = 2 (k, v) x layers x batch x ctx x kv_heads x head_dim x bytes/elem,
                      ctx = prompt_len + new_tokens / 2 (the mean context over the decode steps)
        bound       = batch / ((param_bytes + kv_bytes) / (hbm_gbps x 1e9))   [tokens/s]
    """
    param_bytes = decode_param_bytes(cfg, s.dtype)
    ctx = s.prompt_len + s.new_tokens / 2
    kv_bytes = s.batch * ctx * kv_bytes_per_position(cfg, s.dtype)
    step_s = (param_bytes + kv_bytes) / (hbm_gbps * 1e9)
    return dict(
        hbm_gbps=hbm_gbps,
        param_bytes_per_step=int(param_bytes),
        kv_bytes_per_step=int(kv_bytes),
        roofline_tokens_per_s=s.batch / step_s,
    )


def random_prompts(cfg, s: BenchSettings) -> list[list[int]]:
    rng = np.random.default_rng(s.seed)
    return rng.integers(1, cfg.valid_vocab_size or cfg.vocab_size, (s.prompts, s.prompt_len)).tolist()


# ---------------------------------------------------------------------- ours
def bench_ours(model, prompts, s: BenchSettings, decode_split: bool = True) -> dict:
    import jax

    from tgpo_jax.rollout.sampler import Sampler
    from tgpo_jax.rollout.sampling import SamplingParams

    # One bucket of exactly prompt_len: the compiled shapes are the peer's (no padding). One decode
    # slot per row, as `generate` decodes the whole batch at once: every row runs to new_tokens
    # here, so the engine's refilling (`bench rollout` measures it) has nothing to gain.
    sampler = Sampler(model, stop_ids=(), pad_id=0, prompt_buckets=(s.prompt_len,), slots=s.batch)
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, max_new_tokens=s.new_tokens, n=s.n)

    def timed(p, key):
        t0 = time.perf_counter()
        out = sampler.sample(prompts, p, key)  # returns host numpy arrays: the call is synchronous
        return time.perf_counter() - t0, out

    warmup_s, out = timed(params, jax.random.key(s.seed))
    compile_s = sampler.stats.compile_s
    if out.tokens_BT.shape != (s.batch, s.new_tokens) or not (out.lengths_B == s.new_tokens).all():
        raise RuntimeError(f"our sampler did not produce exactly {s.new_tokens} tokens per row")
    runs = [timed(params, jax.random.key(s.seed + 1 + i))[0] for i in range(s.repeats)]
    result = dict(
        compile_s=compile_s,
        warmup_s=warmup_s,
        runs_s=runs,
        median_s=statistics.median(runs),
        prefill_compile_s=None,
        prefill_median_s=None,
        compiles=sampler.stats.compiles,
    )
    if not decode_split:
        return result
    # Prefill alone (max_new_tokens=1: prefill + one token draw, no decode forward): the decode-only
    # time of a full call is its time minus this.
    pre = dataclasses.replace(params, max_new_tokens=1)
    timed(pre, jax.random.key(s.seed))
    prefill_compile_s = sampler.stats.compile_s - compile_s
    prefill_runs = [timed(pre, jax.random.key(s.seed + 1 + i))[0] for i in range(s.repeats)]
    return dict(
        result,
        prefill_compile_s=prefill_compile_s,
        prefill_median_s=statistics.median(prefill_runs),
        compiles=sampler.stats.compiles,
    )


# ---------------------------------------------------------------------- peer (transformers, PyTorch CPU)
def bench_peer(model, prompts, s: BenchSettings) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tgpo_jax.models.hf_export import save_hf

    torch.set_num_threads(s.peer_threads or os.cpu_count() or 1)
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="tgpo-bench-") as tmp:
        path = save_hf(model, os.path.join(tmp, "model"), dtype="float32")
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    input_ids = torch.tensor(prompts, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    def generate(new_tokens: int, seed: int) -> tuple[float, torch.Tensor]:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                num_return_sequences=s.n,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                pad_token_id=0,
                eos_token_id=None,
                use_cache=True,
            )
        return time.perf_counter() - t0, out

    # Warm-up: a short generate (first-call allocations, thread pools); nothing is compiled.
    warmup_s, _ = generate(min(s.new_tokens, 8), s.seed)
    runs = []
    for i in range(s.repeats):
        dt, out = generate(s.new_tokens, s.seed + 1 + i)
        if tuple(out.shape) != (s.batch, s.prompt_len + s.new_tokens):
            raise RuntimeError(
                f"transformers generated shape {tuple(out.shape)}, expected {(s.batch, s.prompt_len + s.new_tokens)}"
            )
        runs.append(dt)
    return dict(warmup_s=warmup_s, runs_s=runs, median_s=statistics.median(runs), threads=torch.get_num_threads())


# ---------------------------------------------------------------------- driver
def _table(ours: dict, peer: dict | None, tokens: int, decode_tps: float | None, emit: Callable[[str], None]) -> None:
    ours_tps = tokens / ours["median_s"]
    peer_tps = tokens / peer["median_s"] if peer else None
    rows = [
        (
            "ours (jax Sampler)",
            f"{ours['compile_s']:.2f}",
            f"{ours['warmup_s']:.2f}",
            f"{ours['median_s']:.3f}",
            f"{ours_tps:,.0f}",
        )
    ]
    if peer:
        rows.append(
            (
                f"peer (transformers, torch {peer['threads']} thr)",
                "-",
                f"{peer['warmup_s']:.2f}",
                f"{peer['median_s']:.3f}",
                f"{peer_tps:,.0f}",
            )
        )
    emit_table(("implementation", "compile_s", "warmup_s", "median_s", "tokens/s"), rows, emit)
    if ours["prefill_median_s"] is not None:
        emit(
            f"  ours: prefill alone {ours['prefill_median_s']:.3f}s (compile {ours['prefill_compile_s']:.2f}s); "
            f"decode {'-' if decode_tps is None else f'{decode_tps:,.0f}'} tokens/s"
        )


def _result(s: BenchSettings, cfg, dev, ours: dict, peer: dict | None, tokens: int, decode_tps) -> dict:
    """The JSON report: the required fields first, then settings and per-side details."""
    from tgpo_jax.models.kv_cache import scans_cache

    ours_tps = tokens / ours["median_s"]
    peer_tps = tokens / peer["median_s"] if peer else None
    return dict(
        ours_tokens_per_s=ours_tps,
        peer_tokens_per_s=peer_tps,
        ratio=ours_tps / peer_tps if peer_tps else None,
        model=s.model,
        batch=s.batch,
        prompts=s.prompts,
        n=s.n,
        new_tokens=s.new_tokens,
        prompt_len=s.prompt_len,
        dtype=s.dtype,
        cache_layers="scan" if scans_cache(cfg) else "unroll",
        peer_dtype="float32" if peer else None,
        compile_s=ours["compile_s"],
        compiles=ours["compiles"],  # executables compiled over all calls: 1, or 2 with the prefill-only split
        ours_warmup_s=ours["warmup_s"],
        ours_median_s=ours["median_s"],
        ours_runs_s=ours["runs_s"],
        ours_prefill_s=ours["prefill_median_s"],
        ours_decode_tokens_per_s=decode_tps,
        peer_median_s=peer["median_s"] if peer else None,
        peer_runs_s=peer["runs_s"] if peer else None,
        peer_threads=peer["threads"] if peer else None,
        repeats=s.repeats,
        params=param_count(cfg),
        device=dev.platform,
        device_kind=dev.device_kind,
    )


def run(s: BenchSettings, emit: Callable[[str], None] = print) -> dict:
    import jax
    from flax import nnx

    from tgpo_jax.models.decoder import Decoder

    cfg = model_config(s.model, s.dtype).replace(cache_layers=s.cache_layers)
    dev = jax.devices()[0]
    emit(
        f"bench sampler: model={s.model} ({cfg.architecture}, {param_count(cfg) / 1e6:.1f}M params) "
        f"dtype={s.dtype} device={dev.platform} ({dev.device_kind})"
    )
    emit(
        f"  prompts={s.prompts} x n={s.n} = {s.batch} rows, prompt_len={s.prompt_len}, "
        f"new_tokens={s.new_tokens}, repeats={s.repeats} (median after 1 warm-up)"
    )
    model = Decoder(cfg, nnx.Rngs(s.seed))
    prompts = random_prompts(cfg, s)
    tokens = s.batch * s.new_tokens

    hbm = s.hbm_gbps if s.hbm_gbps is not None else device_peaks.hbm_gbps(dev.device_kind, dev.platform)
    ours = bench_ours(model, prompts, s, decode_split=s.decode_split or hbm is not None)
    decode_tps = None
    if ours["prefill_median_s"] is not None and s.new_tokens > 1:
        decode_s = ours["median_s"] - ours["prefill_median_s"]
        decode_tps = s.batch * (s.new_tokens - 1) / decode_s if decode_s > 0 else None

    peer = bench_peer(model, prompts, s) if s.peer else None

    _table(ours, peer, tokens, decode_tps, emit)
    result = _result(s, cfg, dev, ours, peer, tokens, decode_tps)
    if hbm is not None:
        rf = roofline(cfg, s, hbm)
        result.update(rf, roofline_fraction=decode_tps / rf["roofline_tokens_per_s"] if decode_tps else None)
        emit(
            f"  roofline ({hbm:.0f} GB/s): {rf['roofline_tokens_per_s']:,.0f} decode tokens/s; reached "
            f"{result['roofline_fraction']:.1%}"
            if decode_tps
            else "  roofline: needs new_tokens > 1"
        )
    return result


def add_arguments(p) -> None:
    p.add_argument("--model", choices=MODELS, default=None, help="model shape, random weights (default tiny)")
    p.add_argument("--prompts", type=int, default=None, help="distinct prompts (default 16; --quick 4)")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default 8; --quick 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32; --quick 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 64; --quick 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 3)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="our param + compute dtype (the transformers peer is always float32)",
    )
    p.add_argument("--no-peer", action="store_true", help="skip transformers (accelerator runs)")
    p.add_argument("--quick", action="store_true", help="tiny model, small batch: well under a minute on CPU")
    p.add_argument(
        "--hbm-gbps",
        type=float,
        default=None,
        help="memory bandwidth for the roofline (default: the device's data-sheet peak, "
        "tgpo_jax/bench/device_peaks.py; no roofline on CPU or an unknown device unless given)",
    )
    p.add_argument(
        "--decode-split",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time prefill alone to report the decode-only rate (default on, off with --quick; "
        "always on when a roofline is computed)",
    )
    p.add_argument(
        "--peer-threads",
        type=int,
        default=None,
        help="torch threads for the transformers peer (default os.cpu_count())",
    )
    p.add_argument(
        "--cache-layers",
        choices=["auto", "unroll", "scan"],
        default="auto",
        help="KV-cache layout (ModelConfig.cache_layers): unroll = per-layer buffers, layers unrolled; "
        "scan = one stacked cache, one layer body (compile time flat in depth); auto = unroll on CPU",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and the sampling keys")
    p.add_argument("--json-out", default=None, help="also write the result JSON to this file")


def settings_from_args(args) -> BenchSettings:
    base = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    split = args.decode_split if args.decode_split is not None else not args.quick
    return BenchSettings(
        **pick,
        dtype=args.dtype,
        peer=not args.no_peer,
        hbm_gbps=args.hbm_gbps,
        seed=args.seed,
        decode_split=split,
        peer_threads=args.peer_threads,
        cache_layers=args.cache_layers,
    )


def main(args) -> int:
    s = settings_from_args(args)
    print_result(run(s, emit=lambda line: print(line, flush=True)), args.json_out)
    return 0
