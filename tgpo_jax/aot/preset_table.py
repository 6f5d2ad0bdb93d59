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

# compiler program -> the estimator's phase for the same moment of an iteration
ESTIMATOR_PHASE = {"rollout": "rollout", "score": "teacher scoring", "train_step": "train step"}


def entry_record(name: str, hw: str, headroom: float = DEFAULT_HEADROOM) -> dict:
    """Compiles one preset entry (supported or not) and records both figures per program (GiB per device)."""
    from tgpo_jax.presets import bundled_hf_config, estimate_config, load_preset, render, unsupported_reason
    from tgpo_jax.sharding.estimate import estimate
    from tgpo_jax.train.config import load_train_config

    preset = load_preset(name)
    cfg = load_train_config(render(preset, hw, allow_unsupported=True))
    student = bundled_hf_config(preset.student, preset.student_context)
    teacher = bundled_hf_config(preset.teacher) if preset.teacher else None
    report = compile_run(cfg, student, teacher, parse_topology(hw), headroom=headroom)
    est = estimate(estimate_config(preset, cfg, _hardware(hw)))
    estimated = {p: (est.phases["resident"] + est.phases[phase]) / GIB for p, phase in ESTIMATOR_PHASE.items()}
    summary = report.summary()
    for prog, rec in summary["programs"].items():
        if prog in estimated:
            rec["estimate_gib"] = round(estimated[prog], 3)
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


def done_entries(path: str) -> set[tuple[str, str]]:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {(r["preset"], r["hardware"]) for r in map(json.loads, filter(str.strip, f))}


def run_all(path: str, names: list[str] | None = None, hardware: list[str] | None = None, **kw) -> list[dict]:
    """Compiles every entry not yet in `path`, appending a line per entry; returns all records."""
    from tgpo_jax.presets import list_presets, load_preset

    have = done_entries(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for name in names or list_presets():
        for hw in hardware or list(load_preset(name).hardware):
            if (name, hw) in have:
                continue
            rec = entry_record(name, hw, **kw)
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(entry_line(rec), flush=True)
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
