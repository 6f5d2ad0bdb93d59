"""`tgpo-jax bench attention`: what one layer's attention costs in device memory on a TPU, by the
TPU compiler (libtpu, the tpu-aot extra; no TPU needed), for each attention implementation.

For each case (a model's attention shape, training = forward + backward or scoring = forward) and
each implementation, it compiles `kernels.causal_attention` alone on one chip of the topology, at
`--rows` rows of `--seq` positions in bf16 with left-padded rows, and reads the compiled program's
temporaries (`memory_analysis().temp_size_in_bytes`): the memory the attention itself adds to a
layer, beyond its inputs (q, k, v) and outputs (the attention output, or q / k / v gradients).
Reported per row, with each implementation's ratio to einsum (full fp32 scores) measured in the
same run. JSON summary last.
"""

from __future__ import annotations

import dataclasses
import json
import time

GIB = 2**30
# (case name, bundled model, training?): the paper's headline student trained, its teacher scoring
DEFAULT_CASES = (
    ("student_train", "Qwen2.5-Math-1.5B", True),
    ("teacher_score", "Qwen3-30B-A3B-Thinking-2507", False),
)
DEFAULT_IMPLS = ("einsum", "splash")


@dataclasses.dataclass
class Measurement:
    case: str
    model: str
    impl: str
    train: bool
    rows: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    temp_bytes: int = 0
    compile_s: float = 0.0
    error: str | None = None

    @property
    def temp_gib_per_row(self) -> float:
        return self.temp_bytes / GIB / self.rows


def _program(impl: str, train: bool):
    import jax

    from tgpo_jax.kernels import causal_attention

    def forward(q, k, v, mask):
        return causal_attention(q, k, v, mask, impl=impl, platform="tpu")

    if not train:
        return forward

    def forward_backward(q, k, v, mask, cotangent):
        out, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, mask), q, k, v)
        return vjp(cotangent.astype(out.dtype))

    return forward_backward


def measure(case: str, model: str, train: bool, impl: str, *, device, rows: int, seq: int) -> Measurement:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from tgpo_jax.aot.compile import _first_line, _no_persistent_cache
    from tgpo_jax.presets import bundled_hf_config

    hf = bundled_hf_config(model)
    H, K = hf["num_attention_heads"], hf["num_key_value_heads"]
    D = hf.get("head_dim") or hf["hidden_size"] // H
    m = Measurement(case, model, impl, train, rows, seq, H, K, D)
    on = NamedSharding(Mesh(np.array([device]), ("data",)), P())
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=on)  # noqa: E731
    args = [spec((rows, seq, H, D)), spec((rows, seq, K, D)), spec((rows, seq, K, D)), spec((rows, seq), jnp.int32)]
    if train:
        args.append(spec((rows, seq, H, D)))
    t0 = time.perf_counter()
    try:
        with _no_persistent_cache():
            compiled = jax.jit(_program(impl, train)).lower(*args).compile()
        m.temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    except Exception as e:  # the compiler's out-of-memory error, above all
        m.error = f"{type(e).__name__}: {_first_line(str(e))}"
    m.compile_s = time.perf_counter() - t0
    return m


def add_arguments(p) -> None:
    p.add_argument("--topology", default="v5p-8", help="the TPU whose compiler is used (default v5p-8; one chip)")
    p.add_argument(
        "--seq", type=int, default=None, help="positions per row (default 9216 = 1,024 + 8,192; --quick 1024)"
    )
    p.add_argument("--rows", type=int, default=1, help="rows on the chip (default 1)")
    p.add_argument(
        "--impl", action="append", default=None, help=f"implementation (repeatable; default {', '.join(DEFAULT_IMPLS)})"
    )
    p.add_argument("--quick", action="store_true", help="1,024 positions: a smoke run in about a minute")


def _line(m: Measurement, ref: Measurement | None) -> str:
    what = "fwd+bwd" if m.train else "fwd"
    head = f"{m.case:14s} {m.model} {what} H={m.heads} K={m.kv_heads} D={m.head_dim} {m.impl:7s}"
    if m.error:
        return f"{head} does not compile: {m.error}"
    ratio = (
        ""
        if ref is None or ref is m or ref.error or not ref.temp_bytes
        else f"  {m.temp_bytes / ref.temp_bytes:.4f}x einsum"
    )
    return f"{head} temps {m.temp_gib_per_row:8.3f} GiB per row{ratio}  (compile {m.compile_s:.0f} s)"


def main(args) -> int:
    from tgpo_jax.aot.topology import parse_topology, tpu_devices

    seq = args.seq or (1024 if args.quick else 9216)
    impls = tuple(args.impl or DEFAULT_IMPLS)
    device = tpu_devices(parse_topology(args.topology))[0]
    print(
        f"[bench attention] one chip of {args.topology} ({device.device_kind}), "
        f"{args.rows} row(s) x {seq} positions, bf16"
    )
    results = []
    for case, model, train in DEFAULT_CASES:
        ref = None
        for impl in impls:
            m = measure(case, model, train, impl, device=device, rows=args.rows, seq=seq)
            ref = m if impl == "einsum" else ref
            print(_line(m, ref), flush=True)
            results.append(m)
    summary = {"topology": args.topology, "seq": seq, "rows": args.rows, "cases": {}}
    for m in results:
        entry = summary["cases"].setdefault(m.case, {"model": m.model, "train": m.train})
        entry[m.impl] = None if m.error else round(m.temp_gib_per_row, 4)
    for entry in summary["cases"].values():
        if entry.get("einsum") and entry.get("splash") is not None:
            entry["ratio_splash"] = round(entry["splash"] / entry["einsum"], 5)
    print(json.dumps(summary))
    return 1 if any(m.error for m in results if m.impl != "einsum") else 0
