"""What the benchmarks measure with, apart from what they measure: memory probes of the current
process (/proc, getrusage), worker subprocesses stepped in lock-step over a line protocol, and the
one-JSON-line result.

Lock-step protocol (parent -> worker on stdin, worker -> parent on stdout, one token a line): the
worker prepares (builds, compiles), says READY, then runs one step per STEP and answers DONE, until
END; it then writes its result JSON to <work>/<role>.json and exits 0. Its stderr goes to
<work>/<role>.stderr, whose tail is shown when it fails.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


# ---------------------------------------------------------------------- memory probes
def rss_now() -> int:
    """The process's resident set size now (bytes); 0 off Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss() -> int:
    """The process's peak RSS (bytes) by getrusage; macOS reports bytes, Linux KiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def hwm() -> int | None:
    """The process's peak RSS so far (VmHWM), resettable with `reset_hwm`; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------- worker side
def serve(one_step: Callable[[], float], info: dict, warmup: int, finish: Callable[[dict], None] | None = None) -> dict:
    """The worker's loop, once prepared: READY, one `one_step` per STEP (answering DONE) until END.
    Returns `info` with the step times (the first `warmup` untimed), CPU times, losses and peaks."""
    prepare_peak = hwm() or 0  # resetting VmHWM also resets what ru_maxrss reports: keep this peak
    step_hwm = reset_hwm()  # peak RSS of the steps alone: VmHWM reset after preparation / compile
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
    info.update(
        warmup_s=times[0] if warmup else None,
        runs_s=times[warmup:],
        median_s=statistics.median(times[warmup:]),
        cpu_median_s=statistics.median(cpu[warmup:]),
        first_loss=losses[0],
        last_loss=losses[-1],
        peak_bytes=max(peak_rss(), prepare_peak),
        step_peak_bytes=hwm() if step_hwm else None,
        load_avg=os.getloadavg()[0],
    )
    if finish:
        finish(info)
    return info


def write_role_result(work: str, role: str, result: dict) -> None:
    with open(os.path.join(work, f"{role}.json"), "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------- parent side
def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: this checkout first on PYTHONPATH (a worker runs `python -m`
    from any directory), tokenizers' thread pool off unless set, and `extra`."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


def run_to_end(label: str, role: str, cmd: list[str], env: dict, work: str) -> dict:
    """Runs a one-shot worker (no lock-step) to its end; its <work>/<role>.json."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{label}: the {role} worker failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    with open(os.path.join(work, f"{role}.json")) as f:
        return json.load(f)


class LockstepWorker:
    """One lock-step worker process (its stderr goes to a file, read back on failure)."""

    def __init__(self, label: str, role: str, cmd: list[str], env: dict, work: str):
        self.label, self.role, self.work = label, role, work
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
        raise RuntimeError(f"{self.label}: the {self.role} worker {what} (exit {self.proc.returncode}):\n{tail}")

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


def run_lockstep(
    start: Callable[[str], LockstepWorker],
    roles: Sequence[str],
    steps: int,
    turn_steps: int,
    emit: Callable[[str], None],
) -> dict[str, dict]:
    """Starts one worker per role, one after the other (one side's compile does not run under the
    other's load), then steps them in turns of `turn_steps` steps each (A x N, B x N, A x N, ...)
    until each has run `steps`: a background load that drifts over the run falls on all sides
    alike. Returns each role's result."""
    workers: dict[str, LockstepWorker] = {}
    try:
        for role in roles:
            t0 = time.perf_counter()
            workers[role] = start(role)
            workers[role].expect("READY")
            emit(f"  [{role}] ready in {time.perf_counter() - t0:.1f}s (fresh process)")
        done = 0
        while done < steps:
            n = min(turn_steps, steps - done)
            for role in roles:
                for _ in range(n):
                    workers[role].send("STEP")
                    workers[role].expect("DONE")
            done += n
        return {role: workers[role].result() for role in roles}
    finally:
        for w in workers.values():
            w.kill()


def print_result(result: dict, json_out: str | None) -> None:
    """The benchmarks' report: one JSON object, written to `json_out` if given and printed as the
    LAST line of stdout (what scripts and tests parse)."""
    line = json.dumps(result)
    if json_out:
        os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
        with open(json_out, "w") as f:
            f.write(line + "\n")
    sys.stdout.flush()
    print(line, flush=True)
