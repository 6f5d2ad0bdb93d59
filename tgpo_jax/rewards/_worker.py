"""The body of a verifier worker process (kept import-light so a forkserver can preload it).

Protocol over one Pipe: the worker sends ("ready", pid) once its imports are done, then answers each
(task_id, text, answer, options) with (task_id, score, error-or-None); None or a closed pipe ends it.
Scoring runs in this process's MAIN thread, so math-verify's signal.alarm timeouts work here.
"""

from __future__ import annotations

import os
import signal


def _mapped_bytes() -> int:
    """This process's current address-space size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _limit_memory(limit_bytes: int | None) -> None:
    """Caps the address space at what is mapped now plus `limit_bytes`, so a pathological answer
    fails with MemoryError instead of eating the host (relative, so big hosts' thread arenas fit)."""
    if not limit_bytes:
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _mapped_bytes() + limit_bytes
    cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the parent goes away, even mid-way through a hung item."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(conn, memory_limit_bytes: int | None = None) -> None:
    """Serve scoring requests until told to stop. Never raises on bad input: errors score 0."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    _die_with_parent()
    _limit_memory(memory_limit_bytes)
    # Warm the heavy imports before announcing readiness: the pool's per-item clock starts at
    # hand-off, and a first item that paid a multi-second import would time out (and so would the
    # next one, in the replacement worker).
    import math_verify  # noqa: F401
    import reasoning_gym  # noqa: F401

    from tgpo_jax.rewards import sandbox
    from tgpo_jax.rewards.scorers import score_one

    sandbox.install()  # scorers that eval / sympify the answer: literals and sympy math only
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, text, answer, options = msg
        try:
            score, err = float(score_one(text, answer, options)), None
        except Exception as e:  # noqa: BLE001 -- any failure on model output is a 0, not a crash
            score, err = 0.0, f"{type(e).__name__}: {str(e)[:200]}"
        except BaseException as e:  # noqa: BLE001 -- e.g. math-verify's TimeoutException
            score, err = 0.0, f"{type(e).__name__}"
        conn.send((task_id, score, err))


if __name__ == "__main__":  # `python -m tgpo_jax.rewards._worker FD MEMORY_LIMIT_BYTES` (start_method 'subprocess')
    import sys
    from multiprocessing.connection import Connection

    worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]) or None)
