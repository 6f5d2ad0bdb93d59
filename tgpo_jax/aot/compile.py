"""AOT-compiles a run's programs for a TPU slice and reports each one's memory per device, by the
TPU compiler's own figures (`compiled.memory_analysis()`), beside the buffers that stay alive
around it. The CLI is `tgpo-jax compile` (cmd_compile below) and `tgpo-jax preset compile`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time

import jax

from tgpo_jax.aot.programs import Program, abstract_run, device_bytes, iteration_programs
from tgpo_jax.aot.topology import DEFAULT_HEADROOM, Topology, parse_topology, tpu_devices

GIB = 1024**3


@dataclasses.dataclass
class ProgramResult:
    name: str
    arguments: int = 0  # bytes per device, from the compiler
    outputs: int = 0
    aliased: int = 0  # outputs written into donated arguments (counted once)
    temps: int = 0
    code: int = 0
    resident: dict[str, int] = dataclasses.field(default_factory=dict)  # other live buffers, bytes per device
    compile_s: float = 0.0
    error: str | None = None  # the compiler's message where it failed (out of memory, ...)

    @property
    def program_bytes(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temps + self.code

    @property
    def total_bytes(self) -> int:
        return self.program_bytes + sum(self.resident.values())

    def fits(self, usable_bytes: float) -> bool:
        return self.error is None and self.total_bytes <= usable_bytes


@dataclasses.dataclass
class CompileReport:
    topology: Topology
    devices: int
    headroom: float
    programs: list[ProgramResult]

    @property
    def usable_bytes(self) -> float:
        return self.topology.hbm_gib * GIB * self.headroom

    def fits(self, p: ProgramResult) -> bool:
        return p.fits(self.usable_bytes)

    @property
    def all_fit(self) -> bool:
        return all(self.fits(p) for p in self.programs)

    def summary(self) -> dict:
        return {
            "fits": self.all_fit,
            "topology": self.topology.name,
            "devices": self.devices,
            "hbm_gib": self.topology.hbm_gib,
            "headroom": self.headroom,
            "programs": {
                p.name: {
                    "fits": self.fits(p),
                    "total_gib": round(p.total_bytes / GIB, 3),
                    "program_gib": round(p.program_bytes / GIB, 3),
                    "temp_gib": round(p.temps / GIB, 3),
                    "resident_gib": round(sum(p.resident.values()) / GIB, 3),
                    "hbm_gib": self.topology.hbm_gib,
                    "compile_s": round(p.compile_s, 1),
                    **({"error": p.error} if p.error else {}),
                }
                for p in self.programs
            },
        }


def compile_program(p: Program) -> ProgramResult:
    """Lowers and compiles one program; an error of the compiler (out of memory above all) is
    recorded with its first line, not raised, so the other programs are still reported."""
    out = ProgramResult(p.name, resident={k: device_bytes(v) for k, v in p.resident().items()})
    t0 = time.perf_counter()
    try:
        with _no_persistent_cache():
            compiled = p.lower().compile()
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED and friends
        out.error = f"{type(e).__name__}: {_first_line(str(e))}"
        out.compile_s = time.perf_counter() - t0
        return out
    out.compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    out.arguments, out.outputs = m.argument_size_in_bytes, m.output_size_in_bytes
    out.aliased, out.temps = m.alias_size_in_bytes, m.temp_size_in_bytes
    out.code = m.generated_code_size_in_bytes
    return out


@contextlib.contextmanager
def _no_persistent_cache():
    """A compile-only TPU executable cannot be stored in or loaded from JAX's persistent cache (it
    has no client to load into): reading one back fails with a warning, and writing one would fill
    a CPU process's cache with programs it can never run. JAX decides whether the cache is used
    once per process, so the decision is reset on the way in and out (jax._src: no public API)."""
    from jax._src import compilation_cache

    prev = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", prev)
        compilation_cache.reset_cache()


def _first_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return lines[0][:400] if lines else "(no message)"


def compile_run(
    cfg,
    student_hf: dict,
    teacher_hf: dict | None,
    topology: Topology | str,
    *,
    headroom: float = DEFAULT_HEADROOM,
    only: tuple[str, ...] = (),
    on_result=None,
) -> CompileReport:
    """Compiles every program of one iteration of `cfg` for `topology` (`only`: these names).
    `on_result(ProgramResult)` is called as each program finishes (compiles take minutes)."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    devices = tpu_devices(topo)
    run = abstract_run(cfg, student_hf, teacher_hf, devices)
    results = []
    for p in iteration_programs(run):
        if only and p.name not in only:
            continue
        r = compile_program(p)
        results.append(r)
        if on_result is not None:
            on_result(r)
    return CompileReport(topo, len(devices), headroom, results)


# ------------------------------------------------------------------------------------------ output
HEADER = (
    f"{'program':<13} {'args':>7} {'outputs':>7} {'aliased':>7} {'temps':>7} {'program':>8} {'resident':>8} "
    f"{'total':>8} {'HBM':>6}  compile  verdict  (GiB per device)"
)


def format_line(p: ProgramResult, report_hbm_gib: float, usable: float) -> str:
    g = lambda n: f"{n / GIB:7.2f}"  # noqa: E731
    if p.error:
        return f"{p.name:<13} {'-':>7} {'-':>7} {'-':>7} {'-':>7} {'-':>8} {'-':>8} {'-':>8} {report_hbm_gib:6.1f} " + (
            f"{p.compile_s:6.0f} s  FAILS: {p.error}"
        )
    verdict = "fits" if p.fits(usable) else "DOES NOT FIT"
    return (
        f"{p.name:<13} {g(p.arguments)} {g(p.outputs)} {g(p.aliased)} {g(p.temps)} {g(p.program_bytes):>8} "
        f"{g(sum(p.resident.values())):>8} {g(p.total_bytes):>8} {report_hbm_gib:6.1f} {p.compile_s:6.0f} s  {verdict}"
    )


def resident_note(p: ProgramResult) -> str:
    if not p.resident:
        return ""
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in p.resident.items())
    return f"{'':<13} resident beside it: {parts}"


def print_run(cfg, student_hf, teacher_hf, topo: Topology, *, headroom: float, only=(), what: str) -> int:
    """Compiles with a line per program as it finishes; the JSON summary is the last line. Returns
    the exit code: 0 when every program fits, 1 naming the ones that do not."""
    usable = topo.hbm_gib * headroom * GIB
    print(f"[compile] {what} for {topo.name} ({topo.hbm_gib:g} GiB HBM per device, {headroom:.0%} usable)", flush=True)
    print(HEADER, flush=True)

    def show(r: ProgramResult):
        print(format_line(r, topo.hbm_gib, usable), flush=True)
        if note := resident_note(r):
            print(note, flush=True)

    report = compile_run(cfg, student_hf, teacher_hf, topo, headroom=headroom, only=only, on_result=show)
    bad = [p.name for p in report.programs if not report.fits(p)]
    if bad:
        print(f"[compile] does not fit {topo.name}: {', '.join(bad)}", file=sys.stderr, flush=True)
    print(json.dumps(report.summary()), flush=True)
    return 1 if bad else 0


def read_hf_config(model_dir: str, key: str) -> dict:
    """The config.json of the model directory `key` names, as a dict. It is parsed as a model
    config first, so a missing, corrupt or unsupported one fails in one line naming the key and the
    file, before any compile."""
    from tgpo_jax.models.config import read_model_config

    read_model_config(model_dir, key)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)
