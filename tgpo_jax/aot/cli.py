"""`tgpo-jax compile --config FILE --topology NAME` and `tgpo-jax preset compile NAME HW`."""

from __future__ import annotations

import sys

# only light imports here: the parser is built on every tgpo-jax command
from tgpo_jax.aot.topology import DEFAULT_HEADROOM, HARDWARE_TOPOLOGY, parse_topology

PROGRAM_NAMES = ("rollout", "score", "train_step", "eval_rollout")


def add_compile_flags(p) -> None:
    p.add_argument(
        "--headroom",
        type=float,
        default=DEFAULT_HEADROOM,
        help="share of each device's HBM a program and the buffers alive beside it may use "
        f"(default {DEFAULT_HEADROOM})",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=PROGRAM_NAMES,
        default=None,
        help="compile only this program (repeatable; default: every program of an iteration)",
    )


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="a train config (YAML); its models' config.json files are read")
    p.add_argument(
        "--topology",
        required=True,
        help=f"a TPU slice: a hardware name ({', '.join(HARDWARE_TOPOLOGY)}) or <generation>:<dims>, e.g. v5p:2x2x1",
    )
    add_compile_flags(p)
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the config")


def _headroom_ok(h: float) -> None:
    from tgpo_jax.configtree import ConfigError

    if not 0 < h <= 1:
        raise ConfigError(f"--headroom={h}: must be in (0, 1]")


def cmd_compile(args) -> int:
    from tgpo_jax.aot.compile import print_run, read_hf_config
    from tgpo_jax.train.config import load_train_config

    _headroom_ok(args.headroom)
    topo = parse_topology(args.topology)
    cfg = load_train_config(args.config, args.overrides)
    student = read_hf_config(cfg.models.student, "models.student")
    teacher = read_hf_config(cfg.models.teacher, "models.teacher") if cfg.objective.objective.needs_teacher else None
    only = tuple(args.only or ())
    return print_run(cfg, student, teacher, topo, headroom=args.headroom, only=only, what=args.config)


def _compile_all(args) -> int:
    from tgpo_jax.aot.preset_table import markdown, run_all

    records = run_all(
        args.jsonl,
        [args.name] if args.name else None,
        [args.hardware] if args.hardware else None,
        include_unsupported=args.include_unsupported,
    )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(records))
    bad = [f"{r['preset']} on {r['hardware']}" for r in records if r["fits"] != r["supported"]]
    for b in bad:
        print(f"[compile] supported but does not fit, or marked unsupported but fits: {b}", file=sys.stderr)
    return 1 if bad else 0


def cmd_preset_compile(args) -> int:
    """A preset on one hardware entry, with the bundled config.json of each model (no checkpoint)."""
    from tgpo_jax.configtree import ConfigError

    if args.all:
        return _compile_all(args)
    if not (args.name and args.hardware):
        raise ConfigError("preset compile needs NAME and HARDWARE, or --all (every entry; NAME / HARDWARE narrow it)")
    from tgpo_jax.aot.compile import print_run
    from tgpo_jax.configtree import apply_overrides
    from tgpo_jax.presets import bundled_hf_config, load_preset, render
    from tgpo_jax.train.config import load_train_config

    _headroom_ok(args.headroom)
    preset = load_preset(args.name)
    topo = parse_topology(args.hardware)
    cfg = load_train_config(apply_overrides(render(preset, args.hardware, allow_unsupported=True), args.overrides))
    student = bundled_hf_config(preset.student, preset.student_context)
    teacher = bundled_hf_config(preset.teacher) if preset.teacher else None
    what = f"preset {preset.name} on {args.hardware}"
    return print_run(cfg, student, teacher, topo, headroom=args.headroom, only=tuple(args.only or ()), what=what)


def cmd_preset_tune(args) -> int:
    """Prints the tuned values (and writes them with --write); exit 1 when nothing fits."""
    from tgpo_jax.aot.tune import tune_entry, write_entry
    from tgpo_jax.presets import load_preset

    preset = load_preset(args.name)
    print(f"[tune] {preset.name} on {args.hardware}", flush=True)
    r = tune_entry(preset.name, args.hardware, log=lambda line: print(line, flush=True))
    if r.prompts is None or r.micro_batch is None:
        print(f"[tune] nothing fits {args.hardware}, not even the smallest batch", file=sys.stderr)
        return 1
    values = {"rollout.prompts_per_iteration": r.prompts, "train.micro_batch": r.micro_batch}
    print(f"[tune] largest that fit: {values}", flush=True)
    if args.write:
        write_entry(preset.path, args.hardware, values)
        print(f"[tune] wrote {preset.path}", flush=True)
    return 0
