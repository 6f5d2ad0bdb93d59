"""Writing an EvalReport: JSON (everything, per-item accuracies included) and a Markdown table."""

from __future__ import annotations

import json
import os


def markdown_table(report) -> str:
    """| data source | items | k | accuracy | +- | mean length | truncated | plus the unweighted mean."""
    lines = [
        "| data source | items | k | accuracy (%) | std err (%) | mean length | truncated (%) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.sources.values():
        lines.append(
            f"| {r.data_source} | {r.n_items} | {r.k} | {100 * r.accuracy:.1f} | {100 * r.std_error:.1f} "
            f"| {r.mean_length:.1f} | {100 * r.truncation_rate:.1f} |"
        )
    lines.append(
        f"| **mean (unweighted)** | {sum(r.n_items for r in report.sources.values())} | | "
        f"**{100 * report.mean_accuracy:.1f}** | | {report.mean_length:.1f} | "
        f"{100 * report.truncation_rate:.1f} |"
    )
    if report.dropped_prompts:
        lines.append(f"\n{report.dropped_prompts} item(s) not evaluated: prompt longer than max_prompt_len.")
    return "\n".join(lines) + "\n"


def write_report(report, out_dir: str, name: str = "eval") -> tuple[str, str]:
    """Writes OUT_DIR/NAME.json and OUT_DIR/NAME.md; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report.to_dict(), f, indent=2, default=str)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown_table(report))
    return json_path, md_path


__all__ = ["markdown_table", "write_report"]
