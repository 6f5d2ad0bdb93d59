"""The experiments' report (divergence, hard): aggregation over seeds, report.md, results.json, PNGs.

Input: one result per cell (method or label <method>@<arm>, teacher, seed, the run's metrics
records). Pure aggregation plus file writing; no training here. Intervals over seeds: the sample
std, or the 95% t-interval half-width t_{0.975, n-1} * std / sqrt(n)."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict

from tgpo_jax.objectives.registry import get_objective

GAP_KEYS = ("gap/reverse_kl_k1", "gap/mismatch_ratio")
# per-iteration signals averaged over seeds: the share of prompt groups with all-equal rewards
# (no GRPO advantage), the share with none solved, the teacher term's gradient share, the reward
SIGNAL_KEYS = (
    "reward/all_equal_group_frac",
    "reward/all_zero_group_frac",
    "teacher/grad_share",
    "reward/mean",
)
NO_TEACHER_BASELINE = "grpo"  # the paired differences are taken against this label


def _objective(label: str):
    return get_objective(label.split("@")[0])


def _label(r: dict) -> str:
    return r.get("label") or r["method"]


def ci95(xs: list[float]) -> float:
    """Half-width of the two-sided 95% t-interval of the mean (0 for a single value)."""
    if len(xs) < 2:
        return 0.0
    from scipy.stats import t

    return float(t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)))


def final_accuracy(records: list[dict]) -> float | None:
    return next((r["eval/score"] for r in reversed(records) if "eval/score" in r), None)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(results: list[dict], teacher_names: list[str], methods: list[str]) -> dict:
    """{"divergence": {teacher: {gap key: mean at iteration 1 (arms with default coefficients)}},
    "accuracy": {label: {teacher: (mean, std, n)}}, "ci95": {label: {teacher: half-width}},
    "curves" / "curve_ci95": {label: {teacher: {iteration: mean eval/score / its half-width}}},
    "signals": {label: {teacher: {key: {iteration: mean}}}}, "paired": {label: {teacher: (mean of
    the per-seed difference to GRPO, its half-width, n)}}}. `methods` are labels. GRPO has no
    teacher: its row repeats the same runs under every teacher."""
    gaps: dict = defaultdict(lambda: defaultdict(list))
    acc: dict = defaultdict(lambda: defaultdict(list))
    by_seed: dict = defaultdict(lambda: defaultdict(dict))
    curves: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    lengths: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    signals: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for r in results:
        label = _label(r)
        teachers = teacher_names if r["teacher"] is None else [r["teacher"]]
        first = r["records"][0] if r["records"] else {}
        if r["teacher"] is not None and "@" not in label:
            for k in GAP_KEYS:
                if k in first:
                    gaps[r["teacher"]][k].append(first[k])
        fa = final_accuracy(r["records"])
        for t in teachers:
            if fa is not None:
                acc[label][t].append(fa)
                by_seed[label][t][r["seed"]] = fa
            for rec in r["records"]:
                if "eval/score" in rec:
                    curves[label][t][rec["iteration"]].append(rec["eval/score"])
                lengths[label][t][rec["iteration"]].append(rec.get("response/length_mean", math.nan))
                for k in SIGNAL_KEYS:
                    if k in rec:
                        signals[label][t][k][rec["iteration"]].append(rec[k])
    paired: dict = {}
    base = by_seed.get(NO_TEACHER_BASELINE, {})
    for m in methods:
        for t in teacher_names:
            seeds = sorted(set(by_seed[m][t]) & set(base.get(t, {})))
            if m != NO_TEACHER_BASELINE and seeds:
                d = [by_seed[m][t][s] - base[t][s] for s in seeds]
                paired.setdefault(m, {})[t] = (statistics.fmean(d), ci95(d), len(d))
    return {
        "ci95": {m: {t: ci95(acc[m][t]) for t in teacher_names if acc[m][t]} for m in methods},
        "curve_ci95": {
            m: {t: {it: ci95(v) for it, v in sorted(curves[m][t].items())} for t in teacher_names} for m in methods
        },
        "signals": {
            m: {
                t: {k: {it: statistics.fmean(v) for it, v in sorted(its.items())} for k, its in signals[m][t].items()}
                for t in teacher_names
            }
            for m in methods
        },
        "paired": paired,
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


def _fmt_acc(cell, half: float | None = None) -> str:
    if not cell:
        return "n/a"
    mean, std, n = cell
    return f"{100 * mean:.1f} ± {100 * (std if half is None else half):.1f} (n={n})"


def markdown_table(
    agg: dict, teacher_names: list[str], methods: list[str], baseline: dict | None = None, interval: str = "std"
) -> str:
    """method x teacher -> final held-out accuracy (mean ± std, or ± the 95% t-interval half-width
    with interval="ci95"); teachers ordered as given (by divergence)."""
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
        label = m if _objective(m).needs_teacher else f"{m} (no teacher)"

        def half(t, m=m):
            return agg["ci95"].get(m, {}).get(t) if interval == "ci95" else None

        rows.append(
            f"| {label} | "
            + " | ".join(_fmt_acc(agg["accuracy"].get(m, {}).get(t), half(t)) for t in teacher_names)
            + " |"
        )
    return "\n".join(rows)


def paired_table(agg: dict, teacher_names: list[str], methods: list[str]) -> str:
    """method x teacher -> final accuracy minus GRPO's with the same seed: mean ± 95% half-width;
    an interval that excludes 0 marks a difference beyond seed noise (*)."""
    rows = [
        f"| method − {NO_TEACHER_BASELINE} (points) | " + " | ".join(teacher_names) + " |",
        "|---|" + "---:|" * len(teacher_names),
    ]
    for m in methods:
        if m not in agg["paired"]:
            continue
        cells = []
        for t in teacher_names:
            c = agg["paired"][m].get(t)
            if not c:
                cells.append("n/a")
                continue
            mean, half, n = c
            star = "*" if n > 1 and abs(mean) > half else ""
            cells.append(f"{100 * mean:+.1f} ± {100 * half:.1f}{star}")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def verdict(agg: dict, teacher_names: list[str], methods: list[str]) -> list[str]:
    """Plain sentences: which teacher-guided arms beat / trail GRPO beyond seed noise (the paired 95%
    t-interval of the per-seed difference excludes 0), and the best TGPO arm per teacher."""
    better, worse = [], []
    for m in methods:
        for t in teacher_names:
            c = agg["paired"].get(m, {}).get(t)
            if c and c[2] > 1 and abs(c[0]) > c[1]:
                (better if c[0] > 0 else worse).append(f"{m} with {t} ({100 * c[0]:+.1f} ± {100 * c[1]:.1f} points)")
    out = [
        "- Beats GRPO beyond seed noise: " + ("; ".join(better) if better else "none") + ".",
        "- Trails GRPO beyond seed noise: " + ("; ".join(worse) if worse else "none") + ".",
    ]
    for t in teacher_names:
        tgpo = [(agg["paired"][m][t], m) for m in methods if m.startswith("tgpo") and t in agg["paired"].get(m, {})]
        if tgpo:
            (mean, half, n), m = max(tgpo, key=lambda x: x[0][0])
            out.append(
                f"- Best TGPO arm with {t}: {m}, {100 * mean:+.1f} ± {100 * half:.1f} points vs GRPO (n={n} seeds)."
            )
    return out


def _window_mean(curve: dict, lo: int, hi: int) -> float:
    xs = [v for it, v in curve.items() if lo <= it <= hi]
    return statistics.fmean(xs) if xs else math.nan


def signal_table(agg: dict, teacher_names: list[str], methods: list[str], early: int = 10) -> str:
    """Per method and teacher: the share of all-equal-reward groups (no GRPO advantage) and of
    all-zero groups over the first `early` iterations and the whole run, and the teacher term's
    gradient share (over the iterations it was measured on)."""
    rows = [
        "| method | teacher | all-equal groups, it 1-"
        + f"{early} | all-equal, all | all-zero, it 1-{early} | teacher grad share, it 1-{early} "
        "| teacher grad share, all |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def pct(x):
        return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"

    for m in methods:
        for t in teacher_names if _objective(m).needs_teacher else teacher_names[:1]:
            sig = agg["signals"].get(m, {}).get(t, {})
            if not sig:
                continue
            eq = sig.get("reward/all_equal_group_frac", {})
            z = sig.get("reward/all_zero_group_frac", {})
            gs = sig.get("teacher/grad_share", {})
            rows.append(
                f"| {m} | {t if _objective(m).needs_teacher else '-'} | {pct(_window_mean(eq, 1, early))} "
                f"| {pct(_window_mean(eq, 0, 10**9))} | {pct(_window_mean(z, 1, early))} "
                f"| {pct(_window_mean(gs, 1, early))} | {pct(_window_mean(gs, 0, 10**9))} |"
            )
    return "\n".join(rows)


def plot_accuracy_vs_divergence(
    agg: dict,
    teacher_names: list[str],
    methods: list[str],
    out_png: str,
    student_acc: float | None = None,
    interval: str = "std",
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Teachers at evenly spaced positions in order of divergence (the measured gaps can differ by
    # orders of magnitude), each labelled with its gap.
    gaps = [agg["divergence"][t].get("gap/reverse_kl_k1", math.nan) for t in teacher_names]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in methods:
        pts = [
            (i, agg["accuracy"][m][t][0], agg["ci95"][m][t] if interval == "ci95" else agg["accuracy"][m][t][1])
            for i, t in enumerate(teacher_names)
            if t in agg["accuracy"].get(m, {})
        ]
        if not pts:
            continue
        x, y, e = zip(*pts)
        x = [xi + 0.04 * (methods.index(m) - len(methods) / 2) for xi in x]  # side by side, not on top
        ax.errorbar(
            x,
            [100 * v for v in y],
            yerr=[100 * v for v in e],
            marker="o",
            capsize=3,
            ls="-" if _objective(m).needs_teacher else "--",
            label=m,
        )
    if student_acc is not None:
        ax.axhline(100 * student_acc, color="gray", lw=0.8, ls=":", label="student before RL")
    ax.set_xticks(range(len(teacher_names)), [f"{t}\n{g:.3g}" for t, g in zip(teacher_names, gaps)], fontsize=8)
    ax.set_xlabel("teacher, and its divergence from the student (gap/reverse_kl_k1 at iteration 1)")
    ax.set_ylabel(f"final held-out accuracy (%), ± {'95% CI' if interval == 'ci95' else 'std'} over seeds")
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
            band = agg.get("curve_ci95", {}).get(m, {}).get(t, {})
            if c and student_acc is not None:  # iteration 0: the SFT student every run starts from
                c, band = {0: student_acc, **c}, {0: 0.0, **band}
            if c:
                (line,) = axes[0, j].plot(
                    list(c), [100 * v for v in c.values()], marker="o", ms=3, color=f"C{methods.index(m) % 10}", label=m
                )
                if any(band.get(it, 0.0) for it in c):  # the 95% t-interval over seeds
                    lo = [100 * (v - band.get(it, 0.0)) for it, v in c.items()]
                    hi = [100 * (v + band.get(it, 0.0)) for it, v in c.items()]
                    axes[0, j].fill_between(list(c), lo, hi, color=line.get_color(), alpha=0.12, lw=0)
            if ln:
                axes[1, j].plot(list(ln), list(ln.values()), color=f"C{methods.index(m) % 10}", label=m)
        axes[0, j].set_title(f"teacher: {t}")
        axes[0, j].set_ylabel("held-out accuracy (%), band: 95% CI")
        axes[1, j].set_ylabel("response/length_mean")
    return _save_teacher_grid(fig, axes, out_png)


def _save_teacher_grid(fig, axes, out_png: str) -> str:
    """The common finish of the 2-row, one-column-per-teacher figures: iteration x-axes, grids, the
    legend, the PNG."""
    import matplotlib.pyplot as plt

    for ax in axes.flat:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_signals(agg: dict, teacher_names: list[str], methods: list[str], out_png: str) -> str:
    """Per teacher: the share of all-equal-reward groups (no GRPO advantage) and the teacher term's
    gradient share vs iteration, means over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (
        ("reward/all_equal_group_frac", "groups with all-equal rewards (%)\n(mean over seeds, 5-iteration window)"),
        ("teacher/grad_share", None),
    )
    fig, axes = plt.subplots(2, len(teacher_names), figsize=(4.2 * len(teacher_names), 6.4), squeeze=False)
    for j, t in enumerate(teacher_names):
        for m in methods:
            sig = agg["signals"].get(m, {}).get(t, {})
            color = f"C{methods.index(m) % 10}"  # one colour per method in both rows
            for i, (k, _) in enumerate(keys):
                c = sig.get(k, {})
                if c:
                    y = [100 * v for v in c.values()]
                    if i == 0:  # one iteration has 16 groups: a centred 5-iteration mean reads better
                        y = [statistics.fmean(y[max(0, n - 2) : n + 3]) for n in range(len(y))]
                    axes[i, j].plot(list(c), y, marker="." if i else None, color=color, label=m)
        axes[0, j].set_title(f"teacher: {t}")
        axes[0, j].set_ylabel(keys[0][1])
        axes[1, j].set_ylabel("teacher term's gradient share (%)\n||g_T|| / (||g_T|| + ||g_rest||)")
    return _save_teacher_grid(fig, axes, out_png)


def report_labels(cfg) -> list[str]:
    """The report's rows: each method, then <method>@tuned after a tuned method."""
    out = []
    for m in cfg.methods:
        out.append(m)
        if m in getattr(cfg, "tune", {}):
            out.append(f"{m}@tuned")
    return out


def tuning_table(cfg, tuned: dict) -> str:
    """Per tuned method and teacher: every candidate's mean final VALIDATION accuracy, the choice."""
    rows = [
        "| method | teacher | candidate | overrides | validation accuracy (%) | chosen |",
        "|---|---|---:|---|---:|:-:|",
    ]
    for m, per_teacher in tuned.items():
        for t, ch in per_teacher.items():
            for i, cand in enumerate(cfg.tune[m]):
                v = ch["validation"].get(i, ch["validation"].get(str(i)))
                rows.append(
                    f"| {m} | {t} | {i} | {' '.join(cand) or '(defaults)'} "
                    f"| {'n/a' if v is None else f'{100 * v:.1f}'} | {'✓' if i == ch['candidate'] else ''} |"
                )
    return "\n".join(rows)


def write_report(
    cfg, results: list[dict], times: dict, baseline: dict | None = None, log=print, tuned: dict | None = None
) -> dict:
    """report.md + results.json + accuracy_vs_divergence.png + training_curves.png + signals.png
    under cfg.report_dir."""
    names = [t.name for t in cfg.teachers]
    labels = [m for m in report_labels(cfg) if any(_label(r) == m for r in results)]
    interval = getattr(cfg, "interval", "std")
    agg = aggregate(results, names, labels)
    order = sorted(names, key=lambda t: agg["divergence"][t].get("gap/reverse_kl_k1", math.inf))
    student_acc = baseline["student"] if baseline else None
    pngs = {
        "accuracy_vs_divergence": plot_accuracy_vs_divergence(
            agg,
            order,
            labels,
            os.path.join(cfg.report_dir, "accuracy_vs_divergence.png"),
            student_acc,
            interval,
        ),
        "training_curves": plot_training_curves(
            agg, order, labels, os.path.join(cfg.report_dir, "training_curves.png"), student_acc
        ),
        "signals": plot_signals(agg, order, labels, os.path.join(cfg.report_dir, "signals.png")),
    }
    table = markdown_table(agg, order, labels, baseline, interval)
    spread = "mean ± 95% t-interval half-width" if interval == "ci95" else "mean ± std"
    title = getattr(cfg, "name", "divergence").capitalize()
    lines = [
        f"# {title} experiment: final held-out accuracy (%), {spread} over seeds",
        "",
        f"Student before RL: {100 * baseline['student']:.1f}%." if baseline else "",
        f"Seeds: {list(cfg.seeds)}; teachers ordered by measured divergence (left: smallest).",
        f"Total time {times.get('total_s', 0) / 60:.1f} min (SFT models {times.get('models_s', 0) / 60:.1f} min).",
        "",
        table,
        "",
    ]
    if agg["paired"]:
        lines += ["## Verdict (computed from the table below)", "", *verdict(agg, order, labels), ""]
        lines += [
            f"Final accuracy minus {NO_TEACHER_BASELINE}'s with the same seed (points, mean ± 95% t-interval; "
            "* = the interval excludes 0):",
            "",
            paired_table(agg, order, labels),
            "",
        ]
    lines += [
        "Reward signal and teacher share per iteration (means over seeds; the teacher term's gradient share is "
        "measured every `logging.grad_share_every` iterations, train/grad_share.py):",
        "",
        signal_table(agg, order, labels),
        "",
    ]
    if tuned:
        lines += [
            f"Tuning on the validation split (seeds {list(cfg.tune_seeds)}; held-out never used to choose):",
            "",
            tuning_table(cfg, tuned),
            "",
        ]
    lines += [
        f"![accuracy vs divergence]({os.path.basename(pngs['accuracy_vs_divergence'])})",
        f"![training curves]({os.path.basename(pngs['training_curves'])})",
        f"![signals]({os.path.basename(pngs['signals'])})",
    ]
    with open(os.path.join(cfg.report_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    out = {
        "teachers_by_divergence": order,
        "times": times,
        "baseline": baseline,
        "tuned": tuned,
        **{k: agg[k] for k in ("divergence", "accuracy", "ci95", "paired", "curves", "curve_ci95", "signals")},
        "pngs": pngs,
    }
    with open(os.path.join(cfg.report_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    log("\n" + table)
    log(f"[{getattr(cfg, 'name', 'divergence')}] report: {os.path.join(cfg.report_dir, 'report.md')}")
    return out


__all__ = ["aggregate", "ci95", "final_accuracy", "markdown_table", "paired_table", "signal_table", "write_report"]
