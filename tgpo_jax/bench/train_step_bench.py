"""`tgpo-jax bench train-step`: our jitted TGPO-Reg train step against the same loss written plainly
in PyTorch on transformers' model, same weights, same mini-batch. This module is the driver and the
CLI; what runs is in train_step_workload.py (settings, mini-batch, our step), torch_reference.py
(the peer's step), harness.py (worker processes, memory probes) and flops.py (MFU, memory model).

Ours: `make_train_step` (micro-batch `lax.scan`, per-layer remat, chunked log-probs that never hold
[B, T, V] logits, global-norm clip, optax AdamW). Peer: our random weights exported with `save_hf`
and loaded by `AutoModelForCausalLM` (fp32, CPU), full logits per micro-batch (torch_reference.py).

tokens/s = B * (P + T) / median seconds of one optimizer step (prompt and response positions,
padding included: both sides run the forward and backward over all of them), after the compile and
`--warmup` untimed steps (default 1), median of `repeats` steps. Same definition for both sides.

Each side runs in its own fresh subprocess so that peak memories do not mix; peak = the process's
`ru_maxrss` (bytes; it includes the interpreter, the framework import, the model, optimizer state,
the mini-batch and, for ours, XLA's compilation); `*_step_peak_bytes` is the peak RSS while stepping
only (VmHWM reset after the compile). The two processes are prepared one after the other and then
stepped in lock-step (ours, peer, ours, peer, ...): a background load that changes over the run
(a shared machine) falls on both sides alike. `--turn-steps N` lets each side run N steps per turn
(ours x N, peer x N, ...): with N = 1 every step starts from caches the other process has just
filled, which a training loop never sees. Per-step process CPU time is reported as well. The HF
export and old_logp are made before, in a third subprocess (the setup worker).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from tgpo_jax.bench import emit_table
from tgpo_jax.bench.flops import full_logits_bytes, model_flops, param_count
from tgpo_jax.bench.harness import (
    LockstepWorker,
    print_result,
    run_lockstep,
    run_to_end,
    serve,
    worker_env,
    write_role_result,
)
from tgpo_jax.bench.train_step_workload import MODELS, Settings, make_minibatch, model_config

LABEL = "bench train-step"  # prefixes the workers' failure messages
# Per-model defaults of a full run; --quick (the demo model only) uses QUICK_DEFAULTS. Flags override.
MODEL_DEFAULTS = {
    "demo": dict(batch=16, prompt_len=64, response_len=256, micro_batch=4, chunk=64, repeats=10),
    "qwen-vocab-tiny": dict(batch=8, prompt_len=64, response_len=4096, micro_batch=1, chunk=256, repeats=3),
    "qwen2.5-1.5b": dict(batch=16, prompt_len=256, response_len=1792, micro_batch=4, chunk=256, repeats=3),
}
QUICK_DEFAULTS = dict(batch=8, prompt_len=16, response_len=48, micro_batch=4, chunk=16, repeats=3)

DEFAULT_PEAK_TFLOPS = 989.0  # NVIDIA H100 / H200 SXM, dense bf16


# ---------------------------------------------------------------------- worker processes
def _worker_cmd(role: str, settings_path: str, work: str) -> list[str]:
    return [sys.executable, "-m", "tgpo_jax.bench.train_step_bench", "_worker", role, settings_path, work]


def _worker_main(argv: list[str]) -> int:
    """A worker process (`python -m tgpo_jax.bench.train_step_bench _worker ROLE SETTINGS WORK`):
    setup runs once; ours and peer serve the lock-step protocol (bench/harness.py)."""
    from tgpo_jax.bench.train_step_workload import PREPARE, worker_setup

    role, settings_path, work = argv
    with open(settings_path) as f:
        s = Settings(**json.load(f))
    if role == "setup":
        out = worker_setup(s, work)
    else:
        one_step, info = PREPARE[role](s, work)
        out = serve(one_step, info, s.warmup, finish=info.pop("_finish", None))
    write_role_result(work, role, out)
    return 0


def _start_worker(role: str, s: Settings, settings_path: str, work: str) -> LockstepWorker:
    # The peer's OpenMP threads wait as Settings.peer_omp_wait says (see there why passive).
    extra = {"OMP_WAIT_POLICY": s.peer_omp_wait.upper()} if role == "peer" else None
    return LockstepWorker(LABEL, role, _worker_cmd(role, settings_path, work), worker_env(extra), work)


# ---------------------------------------------------------------------- driver
def _measure(s: Settings, cfg, emit: Callable[[str], None]) -> tuple[dict, dict | None]:
    """Runs the setup and the lock-step workers in a scratch directory; (ours, peer or None)."""
    with tempfile.TemporaryDirectory(prefix="tgpo-bench-step-") as work:
        settings_path = os.path.join(work, "settings.json")
        with open(settings_path, "w") as f:
            json.dump(dataclasses.asdict(s), f)
        np.savez(os.path.join(work, "minibatch.npz"), **make_minibatch(s, cfg.valid_vocab_size or cfg.vocab_size))
        if s.peer or s.old_logp == "model":
            t0 = time.perf_counter()
            run_to_end(LABEL, "setup", _worker_cmd("setup", settings_path, work), worker_env(), work)
            emit(f"  [setup] export + old_logp in {time.perf_counter() - t0:.1f}s (fresh process)")
        res = run_lockstep(
            lambda role: _start_worker(role, s, settings_path, work),
            ["ours", "peer"] if s.peer else ["ours"],
            s.warmup + s.repeats,
            s.turn_steps,
            emit,
        )
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
    from tgpo_jax.kernels.attention import IMPLS as ATTN_IMPLS

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
        choices=list(ATTN_IMPLS),
        default="auto",
        help="our cache-free attention kernel (ModelConfig.attn_impl; cudnn: GPU only; cpu: the fused "
        "CPU kernel; splash: the Pallas TPU kernel; auto, the default: the platform's kernel where it "
        "applies, else einsum)",
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
    print_result(run(s, emit=lambda line: print(line, flush=True)), args.json_out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        sys.exit(_worker_main(sys.argv[2:]))
    parser = argparse.ArgumentParser(prog="python -m tgpo_jax.bench.train_step_bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
