"""`tgpo-jax bench rollout`: the continuous-batching engine (rollout/engine.py, `engine_fn`) against
the static sampler (rollout/decode_loop.py, `rollout_fn`) on response-length distributions.

The static sampler decodes all B = prompts x n rows until the longest is done; the engine decodes
`slots` rows and refills a slot from the queue as soon as its request ends. Which wins depends on
how the lengths spread, so the lengths are forced: each request r stops after exactly stop_at[r]
tokens (the `stop_at_B` argument both functions take for this benchmark), drawn from a seeded
distribution (`stop_lengths`) over [1, T], T = new_tokens:

- fixed:     every request runs to T (no spread: the engine can only lose, by its overhead);
- uniform:   uniform integers on [max(1, T // 16), T];
- long_tail: like reasoning traces, most answers short and a tail at the cap. Exactly
             round(0.15 B) requests (at least 1) run to T; every other request has
             L = min(T // 4, lo + G), lo = max(1, T // 16), G ~ Geometric(p = 1 / (lo + 1)) - 1
             (mean lo, so the short answers sit between T/16 and T/4, mostly near T/8); the
             requests are then shuffled, so the long ones fall anywhere in the queue.

Both sides get the same random weights, prompts (random ids, all prompt_len long: no padding), key
and stop lengths, and sample at temperature 1 (top_p 1, no top-k), no stop ids. Each side is
compiled once (stop_at_B is an argument, not a constant) and run once untimed (the warm-up), then,
per distribution, `repeats` times alternately (static, engine, static, ...: a drifting background
load falls on both alike); the figure is the median. Both must return exactly the forced lengths
with FINISH_STOP, or the benchmark fails.

useful tokens/s = sum of stop_at over the B requests / median seconds of one call (prefill
included); ratio = engine tokens/s / static tokens/s (the same tokens: the ratio of the times).

Two static peers, both timed in every run:
- `static`: all B rows in one call (twice the engine's KV cache at the default slots);
- `static_matched`: the static sampler at the engine's KV-cache rows, the requests in consecutive
  calls of `slots // n` whole prompts each (at least one prompt); what a static sampler does when
  its cache, not the request count, sets its batch (the paper's shapes). Equal rows per step, so
  the ratio counts the row-steps batching saves: up to max(stop_at) / mean(stop_at) (about 1.9 for
  `uniform`) as the requests per slot grow. `ratio_matched_*` in the JSON.

Decode bandwidth (accelerators; `--hbm-gbps` anywhere): the bytes the engine's decode must read at
least (`engine_bytes`: the weights once per step, each generated token's cached positions) over its
median time, as a fraction of the device's data-sheet peak (tgpo_jax/bench/device_peaks.py).
`engine_hbm_fraction_*` in the JSON.

Default slots: the rollout's own default, half the requests (B // 2 rounded up). slots >= B gives
the engine nothing to refill (every request is inserted at step 0 and the loop runs to the longest,
as the static one does): that would measure only the engine's per-step overhead. B // 2 keeps
refilling busy while holding half the static sampler's KV cache, so a ratio >= 1 means as many
tokens as fast with half the decode memory. Where decode is bound by reading the weights
(accelerators, small batches), fewer slots cost more steps at nearly
the same step time; try --slots B/4 .. B to see the trade. The report adds each side's decode
steps (the static one: max(stop_at) - 1; the engine's: its schedule, simulated here exactly).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import statistics
import time
from collections.abc import Callable

import numpy as np

from tgpo_jax.bench import device_peaks, emit_table
from tgpo_jax.bench.flops import param_count
from tgpo_jax.bench.harness import print_result

MODELS = ("demo", "smollm2-135m", "qwen2.5-1.5b")
DISTS = ("fixed", "uniform", "long_tail")
LONG_TAIL_CAP_FRAC = 0.15  # long_tail: the fraction of requests that run to the cap

# Defaults of a full run and of --quick (explicit flags override either).
FULL_DEFAULTS = dict(model="demo", prompts=16, n=8, prompt_len=32, new_tokens=256, repeats=3)
QUICK_DEFAULTS = dict(model="demo", prompts=4, n=4, prompt_len=16, new_tokens=32, repeats=2)


@dataclasses.dataclass(frozen=True)
class RolloutBenchSettings:
    model: str = "demo"
    prompts: int = 16
    n: int = 8
    prompt_len: int = 32
    new_tokens: int = 256
    slots: int | None = None  # None: the rollout's default, half the requests (rollout/slots.py)
    dists: tuple[str, ...] = DISTS
    repeats: int = 3
    dtype: str = "float32"
    cache_layers: str = "auto"  # ModelConfig.cache_layers (unroll | scan | auto)
    seed: int = 0
    hbm_gbps: float | None = None  # the roofline's bandwidth; None: the device's peak (device_peaks.py)

    def __post_init__(self):
        from tgpo_jax.models.runtime_options import runtime_option_problems

        if problems := runtime_option_problems(cache_layers=self.cache_layers):
            raise ValueError(problems[0])
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; accepted: {', '.join(MODELS)}")
        if min(self.prompts, self.n, self.prompt_len, self.new_tokens, self.repeats) < 1:
            raise ValueError("prompts, n, prompt_len, new_tokens and repeats must all be >= 1")
        if self.slots is not None and self.slots < 1:
            raise ValueError(f"slots={self.slots}: the engine needs at least one decode slot")
        if not self.dists or any(d not in DISTS for d in self.dists):
            raise ValueError(f"dists={self.dists!r}; accepted: one or more of {', '.join(DISTS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}; accepted: float32, bfloat16")
        if self.hbm_gbps is not None and not self.hbm_gbps > 0:
            raise ValueError(f"hbm_gbps={self.hbm_gbps}: a bandwidth in GB/s must be > 0")

    @property
    def batch(self) -> int:
        return self.prompts * self.n

    @property
    def engine_slots(self) -> int:
        from tgpo_jax.rollout.slots import engine_slots

        return engine_slots(self.batch, self.slots or 0, 1)  # None: the engine's own default


# ---------------------------------------------------------------------- workload
def stop_lengths(dist: str, B: int, T: int, seed: int) -> np.ndarray:
    """The forced response length of each of B requests (int32 [B], each in [1, T]) under `dist`
    (see the module docstring for the exact rules); the same for the same (dist, B, T, seed)."""
    rng = np.random.default_rng((seed, DISTS.index(dist)))
    lo = max(1, T // 16)
    if dist == "fixed":
        out = np.full(B, T)
    elif dist == "uniform":
        out = rng.integers(lo, T + 1, B)
    elif dist == "long_tail":
        n_cap = max(1, round(LONG_TAIL_CAP_FRAC * B))
        short = np.minimum(max(lo, T // 4), lo + rng.geometric(1.0 / (lo + 1), B - n_cap) - 1)
        out = rng.permutation(np.concatenate([np.full(n_cap, T), short]))
    else:
        raise ValueError(f"unknown length distribution {dist!r}; accepted: {', '.join(DISTS)}")
    return out.astype(np.int32)


def engine_steps(stop_at_B: np.ndarray, slots: int) -> int:
    """Decode steps (forwards of all slots) the engine runs for these lengths: token 0 comes from
    the prefill, so request r holds a slot for stop_at[r] - 1 steps; requests take the slot freed
    first, in request order (the engine's queue). List scheduling on a heap of slot free times."""
    free = [0] * min(slots, len(stop_at_B))
    for need in (int(x) - 1 for x in stop_at_B if x > 1):
        heapq.heappush(free, heapq.heappop(free) + need)
    return max(free, default=0)


def engine_bytes(cfg, s: RolloutBenchSettings, stop_at_B: np.ndarray) -> int:
    """The bytes the engine's decode steps must read from memory at least: the weights once per step
    (`engine_steps`; sampler_bench.decode_param_bytes) plus, for each generated token j = 1 .. L-1
    of a request of length L, the prompt_len + j cached positions its attention reads. Token 0
    comes from the prefill, whose reads are not counted (its time is: a lower bound on the
    fraction)."""
    from tgpo_jax.bench.sampler_bench import decode_param_bytes, kv_bytes_per_position

    L = stop_at_B.astype(np.int64)
    positions = int(((L - 1) * s.prompt_len + (L - 1) * L // 2).sum())
    weights = engine_steps(stop_at_B, s.engine_slots) * decode_param_bytes(cfg, s.dtype)
    return weights + positions * kv_bytes_per_position(cfg, s.dtype)


def model_config(name: str, s: RolloutBenchSettings):
    """The ModelConfig of a benchmark model (random weights; no checkpoint needed; the sampler
    bench's shapes, `demo` the student `tgpo-jax demo` trains), long enough for the prompt and the
    new tokens, in the settings' cache layout."""
    from tgpo_jax.bench.sampler_bench import model_config as bench_model_config

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")
    cfg = bench_model_config(name, s.dtype)
    return cfg.replace(
        max_position_embeddings=max(cfg.max_position_embeddings, s.prompt_len + s.new_tokens),
        cache_layers=s.cache_layers,
    )


# ---------------------------------------------------------------------- timing
def _samplers(s: RolloutBenchSettings, inputs: tuple) -> dict[str, Callable]:
    """The jitted samplers, by side; graphdef static, stop_at_B a traced argument. The matched
    static side is the static function called per chunk of prompts (`_chunked`)."""
    import jax

    from tgpo_jax.rollout.decode_loop import rollout_fn
    from tgpo_jax.rollout.engine import engine_fn
    from tgpo_jax.rollout.sampling import SamplingParams

    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, max_new_tokens=s.new_tokens, n=s.n)
    static = jax.jit(functools.partial(rollout_fn, params=params, stop_ids=()), static_argnums=0)
    return dict(
        static=static,
        static_matched=_chunked(static, s, inputs),
        engine=jax.jit(
            functools.partial(engine_fn, params=params, stop_ids=(), slots=s.engine_slots), static_argnums=0
        ),
    )


def matched_prompts(s: RolloutBenchSettings) -> int:
    """Prompts per call of the matched static side: slots // n whole prompts, at least one."""
    return max(1, s.engine_slots // s.n)


def matched_chunks(s: RolloutBenchSettings) -> list[tuple[int, int]]:
    """(first prompt, prompts) of each call of the matched static side, `matched_prompts` each, in
    order; the last call takes the remainder."""
    per = matched_prompts(s)
    return [(p, min(per, s.prompts - p)) for p in range(0, s.prompts, per)]


def _chunked(static_fn: Callable, s: RolloutBenchSettings, inputs: tuple) -> Callable:
    """The static sampler run chunk by chunk (`matched_chunks`) on `inputs`, sliced here once so the
    timed calls do no device slicing; each chunk gets its own key. Returns (lengths, finish) of all
    requests in order, as the other sides' outputs 3 and 4."""
    import jax

    graphdef, state, prompt_PT, mask_PT, key = inputs
    parts = [
        (prompt_PT[p0 : p0 + k], mask_PT[p0 : p0 + k], jax.random.fold_in(key, i), slice(p0 * s.n, (p0 + k) * s.n))
        for i, (p0, k) in enumerate(matched_chunks(s))
    ]

    def call(*_inputs, stop_at_B):
        stop_B = np.asarray(stop_at_B)
        outs = [static_fn(graphdef, state, p, m, k, stop_at_B=stop_B[rows]) for p, m, k, rows in parts]
        jax.block_until_ready(outs)
        lengths, finish = (np.concatenate([np.asarray(o[i]) for o in outs]) for i in (3, 4))
        return None, None, None, lengths, finish

    return call


def matched_steps(stop_at_B: np.ndarray, s: RolloutBenchSettings) -> int:
    """Decode steps of the matched static side: each call runs to its longest request."""
    return sum(int(stop_at_B[p0 * s.n : (p0 + np_) * s.n].max()) - 1 for p0, np_ in matched_chunks(s))


def _call(fn, inputs: tuple, stop_at) -> tuple[float, np.ndarray, np.ndarray]:
    """One synchronous call: (seconds, lengths [B], finish [B])."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*inputs, stop_at_B=stop_at))
    dt = time.perf_counter() - t0
    return dt, np.asarray(out[3]), np.asarray(out[4])


def _check(side: str, dist: str, stop_at: np.ndarray, lengths: np.ndarray, finish: np.ndarray) -> None:
    """Both samplers must honour the forced lengths exactly, each as a stop."""
    from tgpo_jax.rollout.decode_loop import FINISH_STOP

    if not np.array_equal(lengths, stop_at) or not (finish == FINISH_STOP).all():
        bad = np.flatnonzero((lengths != stop_at) | (finish != FINISH_STOP))
        raise RuntimeError(
            f"{side} sampler, {dist}: forced lengths not honoured at requests {bad[:8].tolist()} "
            f"(wanted {stop_at[bad[:8]].tolist()}, got {lengths[bad[:8]].tolist()}, finish {finish[bad[:8]].tolist()})"
        )


def bench_dist(fns: dict, inputs: tuple, dist: str, s: RolloutBenchSettings) -> dict:
    """Times both sides on one length distribution (already compiled and warmed up)."""
    import jax

    stop_at = stop_lengths(dist, s.batch, s.new_tokens, s.seed)
    stop_dev = jax.device_put(stop_at)
    runs = {side: [] for side in fns}
    for _ in range(s.repeats):
        for side, fn in fns.items():  # alternating: a drifting load falls on both sides alike
            dt, lengths, finish = _call(fn, inputs, stop_dev)
            _check(side, dist, stop_at, lengths, finish)
            runs[side].append(dt)
    useful = int(stop_at.sum())
    med = {side: statistics.median(r) for side, r in runs.items()}
    per_side = {}
    for side in fns:
        per_side[f"{side}_median_s"] = med[side]
        per_side[f"{side}_runs_s"] = runs[side]
        per_side[f"{side}_tokens_per_s"] = useful / med[side]
    return dict(
        useful_tokens=useful,
        mean_len=float(stop_at.mean()),
        max_len=int(stop_at.max()),
        static_steps=int(stop_at.max()) - 1,
        static_matched_steps=matched_steps(stop_at, s),
        engine_steps=engine_steps(stop_at, s.engine_slots),
        **per_side,
        ratio=med["static"] / med["engine"],
        ratio_matched=med["static_matched"] / med["engine"],
    )


# ---------------------------------------------------------------------- driver
def _table(per: dict[str, dict], emit: Callable[[str], None]) -> None:
    rows = [
        (
            dist,
            f"{r['mean_len']:.1f}",
            f"{r['static_steps']} / {r['static_matched_steps']} / {r['engine_steps']}",
            f"{r['static_median_s']:.3f}",
            f"{r['static_matched_median_s']:.3f}",
            f"{r['engine_median_s']:.3f}",
            f"{r['engine_tokens_per_s']:,.0f}",
            f"{r['ratio']:.2f}",
            f"{r['ratio_matched']:.2f}",
        )
        for dist, r in per.items()
    ]
    head = (
        "dist",
        "mean len",
        "steps st/matched/eng",
        "static_s",
        "matched_s",
        "engine_s",
        "engine tok/s",
        "ratio",
        "ratio matched",
    )
    emit_table(head, rows, emit)


def _result(s: RolloutBenchSettings, cfg, dev, warm: dict, per: dict[str, dict]) -> dict:
    """The JSON report: the ratios and per-side rates first, then settings and per-distribution details."""
    import jax

    from tgpo_jax.models.kv_cache import scans_cache

    out = {f"ratio_{d}": per[d]["ratio"] if d in per else None for d in DISTS}
    out |= {f"ratio_matched_{d}": per[d]["ratio_matched"] if d in per else None for d in DISTS}
    out |= {f"engine_hbm_fraction_{d}": per[d].get("engine_hbm_fraction") if d in per else None for d in DISTS}
    for d in DISTS:
        for side in ("static", "static_matched", "engine"):
            out[f"{side}_tokens_per_s_{d}"] = per[d][f"{side}_tokens_per_s"] if d in per else None
    return dict(
        out,
        model=s.model,
        prompts=s.prompts,
        n=s.n,
        batch=s.batch,
        slots=s.engine_slots,
        prompt_len=s.prompt_len,
        new_tokens=s.new_tokens,
        repeats=s.repeats,
        seed=s.seed,
        dtype=s.dtype,
        cache_layers="scan" if scans_cache(cfg) else "unroll",
        matched_calls=len(matched_chunks(s)),
        matched_rows=matched_prompts(s) * s.n,
        static_warmup_s=warm["static"],  # the first call: compile + one run
        static_matched_warmup_s=warm["static_matched"],
        engine_warmup_s=warm["engine"],
        params=param_count(cfg),
        dists={d: per[d] for d in s.dists},
        jax_version=jax.__version__,
        device=dev.platform,
        device_kind=dev.device_kind,
    )


def run(s: RolloutBenchSettings, emit: Callable[[str], None] = print) -> dict:
    import jax
    from flax import nnx

    from tgpo_jax.models.decoder import Decoder

    cfg = model_config(s.model, s)
    dev = jax.devices()[0]
    emit(
        f"bench rollout: model={s.model} ({cfg.architecture}, {param_count(cfg) / 1e6:.2f}M params) "
        f"dtype={s.dtype} device={dev.platform} ({dev.device_kind}) jax {jax.__version__}"
    )
    emit(
        f"  prompts={s.prompts} x n={s.n} = {s.batch} requests, prompt_len={s.prompt_len}, new_tokens (cap)="
        f"{s.new_tokens}; static: {s.batch} rows; static matched: {len(matched_chunks(s))} calls of <= "
        f"{matched_prompts(s) * s.n} rows; engine: {s.engine_slots} slots; repeats={s.repeats} "
        "(median after 1 warm-up)"
    )
    graphdef, state = nnx.split(Decoder(cfg, nnx.Rngs(s.seed)))
    rng = np.random.default_rng(s.seed)
    prompt_PT = rng.integers(1, cfg.valid_vocab_size or cfg.vocab_size, (s.prompts, s.prompt_len)).astype(np.int32)
    # on the device once: the timed calls transfer nothing but their stop lengths' handle
    inputs = (graphdef, state, *jax.device_put((prompt_PT, np.ones_like(prompt_PT))), jax.random.key(s.seed))
    fns = _samplers(s, inputs)
    first = jax.device_put(stop_lengths(s.dists[0], s.batch, s.new_tokens, s.seed))
    warm = {}
    for side, fn in fns.items():  # compile + one run, untimed in the figures
        warm[side], lengths, finish = _call(fn, inputs, first)
        _check(side, s.dists[0], np.asarray(first), lengths, finish)
    emit("  warm-up (compile + 1 run): " + ", ".join(f"{side} {t:.2f}s" for side, t in warm.items()))
    per = {d: bench_dist(fns, inputs, d, s) for d in s.dists}
    _table(per, emit)
    hbm = s.hbm_gbps if s.hbm_gbps is not None else device_peaks.hbm_gbps(dev.device_kind, dev.platform)
    if hbm is not None:
        _add_bandwidth(cfg, s, per, hbm, emit)
    return dict(_result(s, cfg, dev, warm, per), hbm_gbps=hbm)


def _add_bandwidth(cfg, s: RolloutBenchSettings, per: dict[str, dict], hbm: float, emit) -> None:
    """The engine's decode bandwidth per distribution (`engine_bytes` / its median time) and its
    fraction of the peak `hbm` GB/s, into each distribution's entry."""
    for d, r in per.items():
        nbytes = engine_bytes(cfg, s, stop_lengths(d, s.batch, s.new_tokens, s.seed))
        gbps = nbytes / r["engine_median_s"] / 1e9
        r.update(engine_bytes=nbytes, engine_gbps=gbps, engine_hbm_fraction=gbps / hbm)
        emit(f"  {d}: engine reads >= {nbytes / 1e9:,.1f} GB, {gbps:,.0f} GB/s = {gbps / hbm:.1%} of {hbm:,.0f} GB/s")


def add_arguments(p) -> None:
    p.add_argument("--model", choices=MODELS, default=None, help="model shape, random weights (default demo)")
    p.add_argument("--prompts", type=int, default=None, help="distinct prompts (default 16; --quick 4)")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default 8; --quick 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32; --quick 16)")
    p.add_argument(
        "--new-tokens", type=int, default=None, help="the length cap T of every response (default 256; --quick 32)"
    )
    p.add_argument(
        "--slots",
        type=int,
        default=None,
        help="the engine's decode rows (default prompts x n // 2: half the static sampler's rows; at "
        "prompts x n the engine has nothing to refill)",
    )
    p.add_argument(
        "--dist",
        nargs="+",
        choices=DISTS,
        default=None,
        help="response-length distributions, each timed on both samplers (default all three)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed calls per side and distribution (default 3)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="param + compute dtype")
    p.add_argument(
        "--cache-layers",
        choices=["auto", "unroll", "scan"],
        default="auto",
        help="KV-cache layout (ModelConfig.cache_layers); auto = unroll on CPU, scan on accelerators",
    )
    p.add_argument("--quick", action="store_true", help="small batch and cap: well under a minute on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts, key and stop lengths")
    p.add_argument(
        "--hbm-gbps",
        type=float,
        default=None,
        help="memory bandwidth (GB/s) for the engine's roofline fraction (default: the device's data-sheet "
        "peak, tgpo_jax/bench/device_peaks.py; none on CPU or an unknown device unless given)",
    )
    p.add_argument("--json-out", default=None, help="also write the result JSON to this file")


def settings_from_args(args) -> RolloutBenchSettings:
    base = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    return RolloutBenchSettings(
        **pick,
        slots=args.slots,
        dists=tuple(dict.fromkeys(args.dist)) if args.dist else DISTS,
        dtype=args.dtype,
        cache_layers=args.cache_layers,
        seed=args.seed,
        hbm_gbps=args.hbm_gbps,
    )


def main(args) -> int:
    s = settings_from_args(args)
    print_result(run(s, emit=lambda line: print(line, flush=True)), args.json_out)
    return 0
