"""A pool of verifier worker processes with a hard per-item timeout.

Each worker scores one item at a time. An item that does not finish within `timeout_s` of being
handed to its worker scores 0: the worker is killed (SIGKILL: C code such as a huge integer power
cannot be interrupted otherwise) and replaced. A worker that crashes (segfault, out of memory)
scores its item 0 and is replaced too. Workers are fresh interpreters by default ('subprocess'), or
multiprocessing 'forkserver' / 'spawn' processes; never a fork of a JAX process.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import multiprocessing.connection as mpc
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_WORKER_MODULE = "tgpo_jax.rewards._worker"
START_METHODS = ("subprocess", "forkserver", "spawn")


@dataclasses.dataclass
class PoolResult:
    """Per-item outcome of one `VerifierPool.run` call (N items)."""

    scores: np.ndarray  # float32 [N]
    timed_out: np.ndarray  # bool [N]: killed at the deadline, score 0
    failed: np.ndarray  # bool [N]: the scorer raised or the worker died, score 0
    seconds: np.ndarray  # float64 [N]: from hand-off to the worker until its answer (or the kill)
    errors: list  # [N] str | None


class _Worker:
    """One worker process and the parent's end of its pipe.

    'subprocess' (default) runs a fresh interpreter (`python -m tgpo_jax.rewards._worker FD`) that
    never imports the parent's __main__, so a script without an `if __name__ == "__main__"` guard
    works; 'forkserver' / 'spawn' use multiprocessing (forkserver restarts faster: the scorers are
    preloaded) and need that guard in the main script.
    """

    def __init__(self, ctx, memory_limit_bytes: int | None):
        self.ready, self.task, self.t0 = False, None, 0.0
        if ctx is None:
            self.conn, self.proc = _launch_subprocess(memory_limit_bytes)
            return
        from tgpo_jax.rewards._worker import worker_main

        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = _MPProc(
            ctx.Process(target=worker_main, args=(child, memory_limit_bytes), daemon=True, name="tgpo-verifier")
        )
        child.close()

    def kill(self) -> None:
        self.proc.kill()
        self.conn.close()

    def stop(self) -> None:
        """Polite stop (finish nothing more), then kill if it lingers."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.wait(timeout=1)
        self.kill()


class _MPProc:
    """multiprocessing.Process behind the small interface of _PopenProc."""

    def __init__(self, proc):
        self._p = proc
        proc.start()

    @property
    def exitcode(self):
        return self._p.exitcode

    def wait(self, timeout: float) -> None:
        self._p.join(timeout)

    def kill(self) -> None:
        if self._p.is_alive():
            self._p.kill()
        self._p.join(timeout=5)


class _PopenProc:
    """subprocess.Popen with the same small interface."""

    def __init__(self, popen: subprocess.Popen):
        self._p = popen

    @property
    def exitcode(self):
        return self._p.poll()

    def wait(self, timeout: float) -> None:
        try:
            self._p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self._p.poll() is None:
            self._p.kill()
        try:
            self._p.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _launch_subprocess(memory_limit_bytes: int | None):
    """A fresh interpreter running the worker on one end of a socketpair (the other end returned)."""
    parent_sock, child_sock = socket.socketpair()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core's worth per worker
        env.setdefault(var, "1")
    cmd = [sys.executable, "-m", _WORKER_MODULE, str(child_sock.fileno()), str(memory_limit_bytes or 0)]
    popen = subprocess.Popen(cmd, pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=env)
    child_sock.close()
    return mpc.Connection(parent_sock.detach()), _PopenProc(popen)


class VerifierPool:
    """`num_workers` scoring processes; `run` scores a batch with a hard per-item timeout."""

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        *,
        start_method: str = "subprocess",
        memory_limit_mb: int | None = 4096,
        startup_timeout_s: float = 120.0,
    ):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"need num_workers >= 1 and timeout_s > 0 (got {num_workers}, {timeout_s})")
        self.num_workers, self.timeout_s = num_workers, float(timeout_s)
        self.memory_limit_bytes = memory_limit_mb * 2**20 if memory_limit_mb else None
        self.startup_timeout_s = startup_timeout_s
        if start_method not in START_METHODS:
            raise ValueError(f"start_method={start_method!r}; accepted: {', '.join(START_METHODS)}")
        self._ctx = None if start_method == "subprocess" else multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload([_WORKER_MODULE, "tgpo_jax.rewards.scorers", "math_verify"])
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0  # workers replaced after a timeout or a crash, over the pool's life
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def _start_workers(self) -> None:
        if self._closed:
            raise RuntimeError("the verifier pool is closed")
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.memory_limit_bytes))

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self._ctx, self.memory_limit_bytes)
        self.restarts += 1

    def close(self) -> None:
        """Stops every worker. Idempotent."""
        with self._lock:
            self._closed = True
            for w in self._workers:
                w.stop()
            self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ scoring
    def run(self, texts: Sequence[str], answers: Sequence[Any], options: Mapping[str, Any]) -> PoolResult:
        """Scores texts[i] against answers[i]; every item gets an answer within timeout_s of being
        handed to a worker. Thread-safe (one batch at a time)."""
        if len(texts) != len(answers):
            raise ValueError(f"{len(texts)} texts but {len(answers)} answers")
        with self._lock:
            self._start_workers()
            return _BatchRun(self, list(texts), list(answers), dict(options)).run()


class _BatchRun:
    """The dispatch loop of one batch: hand out items, collect answers, enforce deadlines."""

    def __init__(self, pool: VerifierPool, texts: list, answers: list, options: dict):
        n = len(texts)
        self.pool, self.texts, self.answers, self.options = pool, texts, answers, options
        self.pending = collections.deque(range(n))
        self.scores = np.zeros(n, np.float32)
        self.timed_out = np.zeros(n, bool)
        self.failed = np.zeros(n, bool)
        self.seconds = np.zeros(n, np.float64)
        self.errors: list = [None] * n
        self.last_progress = time.monotonic()
        self.startup_deaths = 0

    def run(self) -> PoolResult:
        while self.pending or any(w.task is not None for w in self.pool._workers):
            self._dispatch()
            self._collect()
            self._enforce_deadlines()
            self._check_startup()
        return PoolResult(self.scores, self.timed_out, self.failed, self.seconds, self.errors)

    def _dispatch(self) -> None:
        for w in self.pool._workers:
            if w.ready and w.task is None and self.pending:
                i = self.pending.popleft()
                try:
                    w.conn.send((i, self.texts[i], self.answers[i], self.options))
                except (OSError, ValueError):  # died while idle: retry the item elsewhere
                    self.pending.appendleft(i)
                    self.pool._replace(w)
                    continue
                w.task, w.t0 = i, time.monotonic()

    def _wait_timeout(self) -> float:
        busy = [w.t0 + self.pool.timeout_s for w in self.pool._workers if w.task is not None]
        return max(0.0, min(busy) - time.monotonic()) if busy else 0.5

    def _collect(self) -> None:
        ready = mpc.wait([w.conn for w in self.pool._workers], timeout=self._wait_timeout())
        for w in list(self.pool._workers):
            if w.conn not in ready:
                continue
            try:
                while w.conn.poll():
                    self._handle(w, w.conn.recv())
            except (EOFError, OSError):  # the worker died (crash, OOM kill)
                self._finish_dead(w)

    def _handle(self, w: _Worker, msg) -> None:
        if msg[0] == "ready":
            w.ready = True
            self.last_progress = time.monotonic()
            return
        i, score, err = msg
        if i == w.task:
            self.scores[i], self.errors[i] = score, err
            self.failed[i] = err is not None
            self.seconds[i] = time.monotonic() - w.t0
            w.task = None
            self.last_progress = time.monotonic()

    def _finish_dead(self, w: _Worker) -> None:
        if not w.ready:
            self.startup_deaths += 1
            if self.startup_deaths > 3 * self.pool.num_workers:
                raise RuntimeError(
                    f"verifier workers keep dying at start-up (last exit code {w.proc.exitcode}); "
                    "check that math-verify imports in a fresh process"
                )
        if w.task is not None:
            i = w.task
            self.failed[i], self.errors[i] = True, f"worker died (exit code {w.proc.exitcode})"
            self.seconds[i] = time.monotonic() - w.t0
        self.pool._replace(w)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for w in list(self.pool._workers):
            if w.task is not None and now - w.t0 >= self.pool.timeout_s:
                i = w.task
                self.timed_out[i], self.errors[i] = True, f"timed out after {self.pool.timeout_s:g}s"
                self.seconds[i] = now - w.t0
                self.pool._replace(w)
                self.last_progress = now

    def _check_startup(self) -> None:
        if any(w.ready for w in self.pool._workers):
            return
        if time.monotonic() - self.last_progress > self.pool.startup_timeout_s:
            codes = [w.proc.exitcode for w in self.pool._workers]
            raise RuntimeError(
                f"no verifier worker became ready within {self.pool.startup_timeout_s:g}s "
                f"(exit codes {codes}); check that math-verify imports in a fresh process"
            )


__all__ = ["VerifierPool", "PoolResult"]
