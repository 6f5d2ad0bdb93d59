"""The divergence experiment's report: aggregation over seeds, report.md, results.json, PNGs.

Input: one result per cell (method, teacher, seed, the run's metrics records). Pure aggregation
plus file writing; no training here."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict

from tgpo_jax.objectives.registry import get_objective

GAP_KEYS = ("gap/reverse_kl_k1", "gap/mismatch_ratio")


def final_accuracy(records: list[dict]) -> float | None:
    return next((r["eval/score"] for r in reversed(records) if "eval/score" in r), None)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(results: list[dict], teacher_names: list[str], methods: list[str]) -> dict:
    """{"divergence": {teacher: {gap key: mean at iteration 1}}, "accuracy": {method: {teacher:
    (mean, std, n)}}, "curves": {method: {teacher: {iteration: mean eval/score}}}}. GRPO has no
    teacher: its row repeats the same runs under every teacher."""
    gaps: dict = defaultdict(lambda: defaultdict(list))
    acc: dict = defaultdict(lambda: defaultdict(list))
    curves: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    lengths: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        teachers = teacher_names if r["teacher"] is None else [r["teacher"]]
        first = r["records"][0] if r["records"] else {}
        if r["teacher"] is not None:
            for k in GAP_KEYS:
                if k in first:
                    gaps[r["teacher"]][k].append(first[k])
        fa = final_accuracy(r["records"])
        for t in teachers:
            if fa is not None:
                acc[r["method"]][t].append(fa)
            for rec in r["records"]:
                if "eval/score" in rec:
                    curves[r["method"]][t][rec["iteration"]].append(rec["eval/score"])
                lengths[r["method"]][t][rec["iteration"]].append(rec.get("response/length_mean", math.nan))
    return {
        "divergence": {t: {k: statistics.fmean(v) for k, v in gaps[t].items()} for t in teacher_names},
        "accuracy": {
            m: {t: (*_mean_std(acc[m][t]), len(acc[m][t])) for t in teacher_names if acc[m][t]} for m in methods
        },
        "curves": {
            m: {t: {it: statistics.fmean(v) for it, v in sorted(curves[m][t].items())} for t in teacher_names}
            for m in methods
        },
        "lengths": {
            m: {t: {it: statistics.fmean(v) for it, v in sorted(lengths[m][t].items())} for t in teacher_names}
            for m in methods
        },
    }


def _fmt_acc(cell) -> str:
    if not cell:
        return "n/a"
    mean, std, n = cell
    return f"{100 * mean:.1f} ± {100 * std:.1f} (n={n})"


def markdown_table(agg: dict, teacher_names: list[str], methods: list[str], baseline: dict | None = None) -> str:
    """method x teacher -> final held-out accuracy; teachers ordered as given (by divergence)."""
    div = agg["divergence"]
    head = "| method | " + " | ".join(teacher_names) + " |"
    sep = "|---|" + "---:|" * len(teacher_names)
    rows = [head, sep]
    for k in GAP_KEYS:
        rows.append(
            f"| *{k} at iteration 1* | "
            + " | ".join(f"{div[t][k]:.3f}" if k in div.get(t, {}) else "n/a" for t in teacher_names)
            + " |"
        )
    if baseline:
        rows.append(
            "| *teacher accuracy (SFT)* | "
            + " | ".join(f"{100 * baseline['teachers'][t]:.1f}" for t in teacher_names)
            + " |"
        )
    for m in methods:
        label = m if get_objective(m).needs_teacher else f"{m} (no teacher)"
        rows.append(
            f"| {label} | " + " | ".join(_fmt_acc(agg["accuracy"].get(m, {}).get(t)) for t in teacher_names) + " |"
        )
    return "\n".join(rows)


def plot_accuracy_vs_divergence(
    agg: dict, teacher_names: list[str], methods: list[str], out_png: str, student_acc: float | None = None
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Teachers at evenly spaced positions in order of divergence (the measured gaps can differ by
    # orders of magnitude), each labelled with its gap.
    gaps = [agg["divergence"][t].get("gap/reverse_kl_k1", math.nan) for t in teacher_names]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in methods:
        pts = [(i, *agg["accuracy"][m][t][:2]) for i, t in enumerate(teacher_names) if t in agg["accuracy"].get(m, {})]
        if not pts:
            continue
        x, y, e = zip(*pts)
        ax.errorbar(
            x,
            [100 * v for v in y],
            yerr=[100 * v for v in e],
            marker="o",
            capsize=3,
            ls="-" if get_objective(m).needs_teacher else "--",
            label=m,
        )
    if student_acc is not None:
        ax.axhline(100 * student_acc, color="gray", lw=0.8, ls=":", label="student before RL")
    ax.set_xticks(range(len(teacher_names)), [f"{t}\n{g:.3g}" for t, g in zip(teacher_names, gaps)], fontsize=8)
    ax.set_xlabel("teacher, and its divergence from the student (gap/reverse_kl_k1 at iteration 1)")
    ax.set_ylabel("final held-out accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_training_curves(
    agg: dict, teacher_names: list[str], methods: list[str], out_png: str, student_acc: float | None = None
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(teacher_names), figsize=(4.2 * len(teacher_names), 6.4), squeeze=False)
    for j, t in enumerate(teacher_names):
        for m in methods:
            c, ln = agg["curves"][m][t], agg["lengths"][m][t]
            if c and student_acc is not None:  # iteration 0: the SFT student every run starts from
                c = {0: student_acc, **c}
            if c:
                axes[0, j].plot(list(c), [100 * v for v in c.values()], marker="o", ms=3, label=m)
            if ln:
                axes[1, j].plot(list(ln), list(ln.values()), label=m)
        axes[0, j].set_title(f"teacher: {t}")
        axes[0, j].set_ylabel("held-out accuracy (%)")
        axes[1, j].set_ylabel("response/length_mean")
        for i in range(2):
            axes[i, j].set_xlabel("iteration")
            axes[i, j].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_report(cfg, results: list[dict], times: dict, baseline: dict | None = None, log=print) -> dict:
    """report.md + results.json + accuracy_vs_divergence.png + training_curves.png under cfg.report_dir."""
    names = [t.name for t in cfg.teachers]
    agg = aggregate(results, names, list(cfg.methods))
    order = sorted(names, key=lambda t: agg["divergence"][t].get("gap/reverse_kl_k1", math.inf))
    pngs = {
        "accuracy_vs_divergence": plot_accuracy_vs_divergence(
            agg,
            order,
            list(cfg.methods),
            os.path.join(cfg.report_dir, "accuracy_vs_divergence.png"),
            baseline["student"] if baseline else None,
        ),
        "training_curves": plot_training_curves(
            agg,
            order,
            list(cfg.methods),
            os.path.join(cfg.report_dir, "training_curves.png"),
            baseline["student"] if baseline else None,
        ),
    }
    table = markdown_table(agg, order, list(cfg.methods), baseline)
    lines = [
        "# Divergence experiment: final held-out accuracy (%), mean ± std over seeds",
        "",
        f"Student before RL: {100 * baseline['student']:.1f}%." if baseline else "",
        f"Seeds: {list(cfg.seeds)}; teachers ordered by measured divergence (left: smallest).",
        f"Total time {times.get('total_s', 0) / 60:.1f} min (SFT models {times.get('models_s', 0) / 60:.1f} min).",
        "",
        table,
        "",
        f"![accuracy vs divergence]({os.path.basename(pngs['accuracy_vs_divergence'])})",
        f"![training curves]({os.path.basename(pngs['training_curves'])})",
    ]
    with open(os.path.join(cfg.report_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    out = {
        "teachers_by_divergence": order,
        "times": times,
        "baseline": baseline,
        **{k: agg[k] for k in ("divergence", "accuracy", "curves")},
        "pngs": pngs,
    }
    with open(os.path.join(cfg.report_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    log("\n" + table)
    log(f"[divergence] report: {os.path.join(cfg.report_dir, 'report.md')}")
    return out


__all__ = ["aggregate", "final_accuracy", "markdown_table", "write_report"]
