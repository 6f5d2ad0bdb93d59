"""Every preset x hardware entry compiled by the TPU compiler, beside the memory estimator's figure
for the same program: `tgpo-jax preset compile --all --jsonl FILE [--markdown FILE]`.

One JSON line per entry is appended to the jsonl as it finishes (a rerun skips the entries already
there, so an interrupted sweep resumes); the markdown table is rendered from the whole file.
"""

from __future__ import annotations

import json
import os

from tgpo_jax.aot.compile import GIB, compile_run
from tgpo_jax.aot.topology import DEFAULT_HEADROOM, parse_topology
from tgpo_jax.presets import programs_fingerprint

# compiler program -> the estimator's phase for the same moment of an iteration
ESTIMATOR_PHASE = {
    "rollout": "rollout",
    "score": "teacher scoring",
    "train_step": "train step",
    "eval_rollout": "evaluation",
}


def estimated_gib(name: str, hw: str) -> dict[str, float]:
    """The memory estimator's per-device peak for each program's moment of the iteration (GiB)."""
    from tgpo_jax.presets import estimate_config, load_preset, render
    from tgpo_jax.sharding.estimate import estimate
    from tgpo_jax.train.config import load_train_config

    preset = load_preset(name)
    cfg = load_train_config(render(preset, hw, allow_unsupported=True))
    est = estimate(estimate_config(preset, cfg, _hardware(hw)))
    return {p: (est.phases["resident"] + est.phases[phase]) / GIB for p, phase in ESTIMATOR_PHASE.items()}


def with_current_estimates(records: list[dict]) -> list[dict]:
    """The records with estimate_gib recomputed by the estimator as it is now (the compiler's
    figures stay as recorded): how a change to the estimator compares, without recompiling."""
    for r in records:
        est = estimated_gib(r["preset"], r["hardware"])
        for prog, rec in r["programs"].items():
            if prog in est:
                rec["estimate_gib"] = round(est[prog], 3)
    return records


def entry_record(name: str, hw: str, headroom: float = DEFAULT_HEADROOM) -> dict:
    """Compiles one preset entry (supported or not) and records both figures per program (GiB per device)."""
    from tgpo_jax.presets import bundled_hf_config, load_preset, render, unsupported_reason
    from tgpo_jax.train.config import load_train_config

    preset = load_preset(name)
    cfg = load_train_config(render(preset, hw, allow_unsupported=True))
    student = bundled_hf_config(preset.student, preset.student_context)
    teacher = bundled_hf_config(preset.teacher) if preset.teacher else None
    report = compile_run(cfg, student, teacher, parse_topology(hw), headroom=headroom)
    summary = report.summary()
    with_estimates = {"preset": name, "hardware": hw, "programs": summary["programs"]}
    with_current_estimates([with_estimates])
    return {
        "preset": name,
        "hardware": hw,
        "supported": unsupported_reason(preset, hw) is None,
        "prompts_per_iteration": cfg.rollout.prompts_per_iteration,
        "micro_batch": cfg.train.micro_batch,
        "score_micro_batch": cfg.score_micro_batch_rows,
        **summary,
    }


def _hardware(hw: str):
    from tgpo_jax.presets import hardware

    return hardware(hw)


def run_all(
    path: str, names: list[str] | None = None, hardware: list[str] | None = None, include_unsupported: bool = False
) -> list[dict]:
    """Compiles every entry without a current record in `path` (supported ones, unless
    `include_unsupported`), appending a line per entry. A record whose preset changed since
    (programs_fingerprint) is dropped first; an entry whose programs another one already compiled
    reuses its figures, naming it. Returns all records."""
    from tgpo_jax.presets import list_presets, load_preset, unsupported_reason

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    current = [r for r in _read(path) if r.get("fingerprint") == programs_fingerprint(r["preset"], r["hardware"])]
    _write(path, current)
    have = {(r["preset"], r["hardware"]) for r in current}
    by_print = {r["fingerprint"]: r for r in current}
    for name in names or list_presets():
        preset = load_preset(name)
        for hw in hardware or list(preset.hardware):
            if (name, hw) in have or (unsupported_reason(preset, hw) and not include_unsupported):
                continue
            fp = programs_fingerprint(name, hw)
            if fp in by_print:
                same = by_print[fp]
                rec = {**same, "preset": name, "hardware": hw, "same_programs_as": same["preset"]}
            else:
                rec = by_print[fp] = {**entry_record(name, hw), "fingerprint": fp}
            rec["supported"] = unsupported_reason(preset, hw) is None
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(entry_line(rec), flush=True)
    return _read(path)


def _write(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def entry_line(rec: dict) -> str:
    worst = max(rec["programs"].items(), key=lambda kv: kv[1].get("total_gib", float("inf")))
    verdict = "fits" if rec["fits"] else "DOES NOT FIT"
    marked = "" if rec["supported"] else " (marked unsupported)"
    return (
        f"{rec['preset']:<48} {rec['hardware']:<6} largest: {worst[0]} {worst[1].get('total_gib', float('nan')):.2f} "
        f"/ {rec['hbm_gib'] * rec['headroom']:.1f} GiB  {verdict}{marked}"
    )


def markdown(records: list[dict]) -> str:
    """Per preset, hardware and program: the compiler's total per device beside the estimator's."""
    lines = [
        "| preset | hardware | prompts / micro-batch | program | compiler: program + resident = total GiB "
        "| estimator GiB | estimator / compiler | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        for prog, p in r["programs"].items():
            if "error" in p:
                cells = f"fails to compile: {p['error'][:80]}", "", ""
            else:
                est = p.get("estimate_gib")
                ratio = f"{est / p['total_gib']:.2f}" if est else ""
                cells = (
                    f"{p['program_gib']:.1f} + {p['resident_gib']:.1f} = {p['total_gib']:.1f}",
                    f"{est:.1f}" if est else "",
                    ratio,
                )
            lines.append(
                f"| {r['preset']} | {r['hardware']} | {r['prompts_per_iteration']} / {r['micro_batch']} | {prog} | "
                + " | ".join(cells)
                + f" | {'yes' if p['fits'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"
