"""Fused causal self-attention for XLA:CPU: a C++ kernel (forward and backward) called through the
XLA FFI, built on first use with the host's C++ compiler and cached.

Why a kernel: at the demo's training shapes (T ~ 100, head_dim 16) XLA:CPU runs attention as
batched matmuls with a contraction of 16 (one thread per op) plus elementwise passes that write
and re-read every score tensor; the query-blocked XLA path (`kernels/blocked.py`) was the best of
many XLA formulations and still took ~30% of the train step. The kernel keeps one (batch row, kv
head)'s keys and values in cache, holds a block of query rows' scores in a small scratch, and runs
its tasks on XLA's intra-op thread pool. Source: `cpu_kernels/causal_attention.cc`.

Semantics are `reference.attention` with a causal mask and a [B, T] key mask (left padding): query t
reads key s iff s <= t and key s is real. A query row with no allowed key returns 0 (the XLA paths
return an arbitrary average there; no caller reads pad rows). fp32 only; head_dim 8, 16, 32, 64 or
128. The library is built with -march=native and cached per source, flags, compiler, jax version
and CPU model (`TGPO_KERNEL_CACHE`, default ~/.cache/tgpo_jax/kernels).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tgpo_jax.kernels.common import ATTN_OUT

SOURCE = Path(__file__).with_name("cpu_kernels") / "causal_attention.cc"
HEAD_DIMS = (8, 16, 32, 64, 128)
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
_FWD, _BWD = "tgpo_causal_attention_fwd", "tgpo_causal_attention_bwd"


class CpuKernelUnavailable(RuntimeError):
    """The fused CPU attention kernel cannot be built or loaded here (the message says why)."""


def _cpu_model() -> str:
    """The CPU's model name and feature flags: a -march=native library must not be reused on a host
    with other instructions (a home directory shared by several hosts, a VM that masks AVX-512)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = {}
    for line in lines:
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags") and key not in wanted:
            wanted[key] = line
    return "\n".join(wanted.values()) or platform.processor() or platform.machine()


def _compiler() -> str:
    """$CXX if set, else c++ / g++ / clang++ from PATH."""
    named = os.environ.get("CXX")
    cxx = shutil.which(named) if named else (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"))
    if not cxx:
        raise CpuKernelUnavailable(
            f"C++ compiler {named!r} (from CXX) not found"
            if named
            else "no C++ compiler found (set CXX, or install g++ or clang++)"
        )
    return cxx


def library_path(cxx: str) -> Path:
    """Where the built library for this source, compiler, flags, jax version and CPU lives."""
    key = hashlib.sha256(
        b"\0".join(
            [
                SOURCE.read_bytes(),
                " ".join(_FLAGS).encode(),
                cxx.encode(),
                jax.__version__.encode(),
                _cpu_model().encode(),
            ]
        )
    ).hexdigest()[:20]
    root = Path(os.environ.get("TGPO_KERNEL_CACHE") or Path.home() / ".cache" / "tgpo_jax" / "kernels")
    return root / f"libtgpo_causal_attention_{key}.so"


def build() -> Path:
    """Compile the kernel unless a library for this exact setting exists; returns its path. The
    library is written to a temporary name and renamed, so concurrent builders never see half a file."""
    cxx = _compiler()
    out = library_path(cxx)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home: build into the temp dir instead
        out = Path(tempfile.gettempdir()) / f"tgpo_jax_kernels_{os.getuid()}" / out.name
        out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        return out
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise CpuKernelUnavailable(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


@functools.cache
def _load() -> str | None:
    """Build, load and register the FFI targets once per process; None on success, else why not."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (CpuKernelUnavailable, OSError) as e:
        return str(e)
    jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.TgpoCausalAttentionFwd), platform="cpu")
    jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.TgpoCausalAttentionBwd), platform="cpu")
    return None


def unavailable_reason() -> str | None:
    """None if the kernel is built and registered (building it on the first call), else why not."""
    return _load()


def supports_shape(q_shape, dtype, platform: str | None = None) -> str | None:
    """None if the kernel handles this platform, dtype and head_dim (without building it), else why
    not."""
    if (backend := platform or jax.default_backend()) != "cpu":
        return f"the fused attention kernel is for the CPU backend, not {backend}"
    if jnp.dtype(dtype) != jnp.float32:
        return f"the fused CPU attention kernel is fp32 only, got {jnp.dtype(dtype).name}"
    if q_shape[-1] not in HEAD_DIMS:
        return f"the fused CPU attention kernel needs head_dim in {HEAD_DIMS}, got {q_shape[-1]}"
    return None


def supports(q_BTHD: jax.Array, platform: str | None = None) -> str | None:
    """None if the kernel can run this attention on `platform` (default: the default backend's),
    else the reason (platform, dtype, head_dim, build)."""
    return supports_shape(q_BTHD.shape, q_BTHD.dtype, platform) or unavailable_reason()


def _forward(q, k, v, key_mask_BT):
    B, T, H, _ = q.shape
    return jax.ffi.ffi_call(
        _FWD,
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, H, T), jnp.float32)),
        vmap_method="sequential",
    )(q, k, v, key_mask_BT)


@jax.custom_vjp
def _attention(q, k, v, key_mask_BT):
    return _forward(q, k, v, key_mask_BT)[0]


def _attention_fwd(q, k, v, key_mask_BT):
    out, lse = _forward(q, k, v, key_mask_BT)
    # Named like the blocked kernel's residuals: the decoder's "attn_out" remat policy keeps them,
    # so the backward pass never re-runs the forward kernel.
    out, lse = checkpoint_name(out, ATTN_OUT), checkpoint_name(lse, ATTN_OUT)
    return out, (q, k, v, key_mask_BT, out, lse)


def _attention_bwd(res, dout):
    q, k, v, key_mask_BT, out, lse = res
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(_BWD, shapes, vmap_method="sequential")(q, k, v, key_mask_BT, out, lse, dout)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, key_mask_BT: jax.Array) -> jax.Array:
    """Grouped-query causal self-attention [B, T, H, D] (query head h reads kv head h // (H / K))
    with key_mask [B, T] (nonzero: real token), through the fused CPU kernel. Raises
    CpuKernelUnavailable (with the reason) where `supports` says no."""
    if (why := supports(q_BTHD)) is not None:
        raise CpuKernelUnavailable(why)
    if k_BTKD.shape != v_BTKD.shape or k_BTKD.shape[:2] != q_BTHD.shape[:2] or q_BTHD.shape[2] % k_BTKD.shape[2]:
        raise ValueError(
            f"causal_attention: q {q_BTHD.shape}, k {k_BTKD.shape}, v {v_BTKD.shape} are not "
            "[B, T, H, D], [B, T, K, D], [B, T, K, D] with H % K == 0"
        )
    return _attention(q_BTHD, k_BTKD.astype(jnp.float32), v_BTKD.astype(jnp.float32), key_mask_BT.astype(jnp.int32))
