"""`tgpo-jax` command line: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _offline_env():
    # The project never reaches a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # transformers announces at import that PyTorch is absent ("Models won't be available"): we use
    # only its tokenizers and configs, so a plain install would greet every user with a false alarm
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def cmd_info(args) -> int:
    from tgpo_jax.models.config import ModelConfig
    from tgpo_jax.models.params import param_specs

    cfg = ModelConfig.from_hf_dir(args.model)
    n = sum(int(__import__("math").prod(s.shape)) for s in param_specs(cfg).values())
    print(json.dumps({"config": _jsonable(cfg), "parameters": n}, indent=2))
    return 0


def _jsonable(cfg):
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def cmd_convert(args) -> int:
    from tgpo_jax.models.hf_export import check_out_dir, save_hf
    from tgpo_jax.models.hf_import import load_model

    names = ("--to-hf", "--overwrite")
    check_out_dir(args.to_hf, overwrite=args.overwrite, name=names[0], overwrite_flag=names[1])  # before loading
    model = load_model(args.from_hf, param_dtype=args.dtype)
    out = save_hf(
        model,
        args.to_hf,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
        tokenizer_dir=args.from_hf if _has_tokenizer(args.from_hf) else None,
        overwrite=args.overwrite,
        names=names,
    )
    print(f"wrote {out}")
    return 0


def _has_tokenizer(path: str) -> bool:
    from tgpo_jax.models.hf_import import TOKENIZER_FILES

    return any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


def cmd_sample(args) -> int:
    from tgpo_jax.rollout.text import run_sample

    for line in run_sample(
        args.model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        chat=not args.no_chat,
        stop_ids=args.stop_ids,
    ):
        print(line)
    return 0


def cmd_demo(args) -> int:
    from tgpo_jax.demo import run_demo

    try:
        run_demo(args.out, quick=args.quick, config_path=args.config, overrides=args.overrides)
    except KeyboardInterrupt:
        # Ctrl-C is not a crash: no traceback, but what a rerun does with the work kept
        print(
            "tgpo-jax demo: interrupted; the same command keeps the finished stages, continues an unfinished "
            "SFT from its last checkpoint and starts the TGPO stage over",
            file=sys.stderr,
        )
        return 130
    return 0


def cmd_estimate(args) -> int:
    """Per-device memory estimate; exit 0 if it fits (or no memory given), 3 if it does not."""
    from tgpo_jax.sharding.estimate import estimate, load_estimate_config

    cfg = load_estimate_config(
        args.config, num_devices=args.num_devices, device_memory_gb=args.device_memory_gb, overrides=args.overrides
    )
    est = estimate(cfg)
    print(est.report())
    return 3 if est.fits is False else 0


def cmd_bench_sampler(args) -> int:
    from tgpo_jax.bench.sampler_bench import main as bench_sampler_main

    return bench_sampler_main(args)


def cmd_bench_rollout(args) -> int:
    from tgpo_jax.bench.rollout_bench import main as bench_rollout_main

    return bench_rollout_main(args)


def cmd_bench_attention(args) -> int:
    from tgpo_jax.bench.attention_memory import main as bench_attention_main

    return bench_attention_main(args)


def cmd_bench_train_step(args) -> int:
    from tgpo_jax.bench.train_step_bench import main as bench_train_step_main

    return bench_train_step_main(args)


def cmd_eval(args) -> int:
    from tgpo_jax.eval.cli import main as eval_main

    return eval_main(args)


def cmd_train(args) -> int:
    from tgpo_jax.train.config import load_train_config
    from tgpo_jax.train.loop import train

    cfg = load_train_config(args.config, args.overrides)
    final = train(cfg, resume_with_changes=args.resume_with_changes)
    print(json.dumps({k: v for k, v in final.items() if k.startswith(("reward/", "eval/", "loss/total"))}))
    return 0


def cmd_export(args) -> int:
    from tgpo_jax.train.export import export_run

    out, iteration = export_run(args.checkpoint, args.to_hf, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} (student at iteration {iteration})")
    return 0


def cmd_sft(args) -> int:
    from tgpo_jax.models.config import read_model_config
    from tgpo_jax.train.sft import load_sft_config, sft

    cfg = load_sft_config(args.config, args.overrides)
    read_model_config(cfg.model, "model")  # a missing dir / corrupt config.json: one line naming `model`
    try:
        out = sft(cfg)
    except KeyboardInterrupt:
        rerun = (
            "resumes from the last checkpoint"
            if cfg.checkpoint_every
            else "starts again at step 1 (checkpoint_every=0 keeps no checkpoint)"
        )
        print(f"tgpo-jax sft: interrupted; the same command {rerun}", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


def cmd_sweep(args) -> int:
    from tgpo_jax.sweep import main as sweep_main

    return sweep_main(args)


def cmd_experiment(args) -> int:
    from tgpo_jax.experiments.divergence import load_experiment_config, run_experiment

    cfg = load_experiment_config(
        args.config or EXPERIMENT_CONFIGS[args.experiment], quick=args.quick, out_dir=args.out, overrides=args.overrides
    )
    if args.report_only:
        import dataclasses

        cfg = dataclasses.replace(cfg, report_only=True)
    run_experiment(cfg, progress=not args.no_progress)
    return 0


# the default config of each `tgpo-jax experiment <name>` (one module runs them all: experiments/divergence.py)
EXPERIMENT_CONFIGS = {
    "divergence": "configs/experiment_divergence.yaml",
    "hard": "configs/experiment_hard.yaml",
}


def cmd_preset(args) -> int:
    from tgpo_jax.presets import main as preset_main

    return preset_main(args)


def cmd_compile(args) -> int:
    from tgpo_jax.aot.cli import cmd_compile as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tgpo-jax", description="Teacher-Guided Policy Optimization in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    _add_model_commands(sub)
    _add_run_commands(sub)
    _add_tool_commands(sub)
    _add_study_commands(sub)
    return p


_OVERWRITE_HELP = (
    "replace a previous model export in --to-hf (config.json, safetensors, tokenizer files and "
    "nothing else); without it --to-hf must be new or empty, and any other directory is refused"
)


def _add_model_commands(sub) -> None:
    from tgpo_jax.rollout.flags import add_sampling_arguments

    """info, convert, sample: HF checkpoints in and out."""
    s = sub.add_parser("info", help="print a HF checkpoint's parsed config and parameter count")
    s.add_argument("--model", required=True, help="local HF model directory")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("convert", help="import a HF checkpoint and write it back (dtype / shard size)")
    s.add_argument("--from-hf", required=True, help="local HF model directory to read")
    s.add_argument("--to-hf", required=True, help="output HF model directory")
    s.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the written weights"
    )
    s.add_argument(
        "--max-shard-gb",
        type=float,
        default=5.0,
        help="largest safetensors shard in GiB (bigger models get an index + several shards)",
    )
    s.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("sample", help="generate from a local HF checkpoint with the jitted KV-cache sampler")
    s.add_argument("--model", required=True, help="local HF model directory (weights + tokenizer)")
    s.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="prompt text, non-empty (repeatable: one response per prompt, sampled as one batch)",
    )
    add_sampling_arguments(s, max_new_tokens=32, temperature=0.0, top_k=True)
    s.add_argument("--seed", type=int, default=0, help="sampling seed (unused when greedy)")
    s.add_argument("--no-chat", action="store_true", help="feed the raw prompt, no chat template")
    s.set_defaults(fn=cmd_sample)


def _add_run_commands(sub) -> None:
    """train, sft, export, demo: training runs and their outputs."""
    s = sub.add_parser("train", help="TGPO (or a baseline) training run from a YAML config")
    s.add_argument(
        "--config",
        required=True,
        help="training YAML (sections models, rollout, objective, optimizer, "
        "train, data, rewards, eval, checkpoint, ...)",
    )
    s.add_argument(
        "--resume-with-changes",
        action="store_true",
        help="resume a run_dir whose config.json differs from this config in keys that change the "
        "math (model, objective, optimizer, ...; see RESUME_NEUTRAL_KEYS in train/run_dir.py for "
        "the keys that may differ without it); the changes are recorded in RUN_DIR/history.jsonl",
    )
    s.add_argument("overrides", nargs="*", help="key.path=value overrides (values parsed as YAML)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("sft", help="supervised fine-tuning on (prompt, solution) pairs; exports a HF directory")
    s.add_argument(
        "--config", required=True, help="SFT YAML (model, data with a solution_column, steps, optimizer, ...)"
    )
    s.add_argument("overrides", nargs="*", help="key.path=value overrides")
    s.set_defaults(fn=cmd_sft)

    s = sub.add_parser("export", help="a run's latest student checkpoint as a HF directory")
    s.add_argument("--checkpoint", required=True, help="run directory (or its checkpoints/ folder)")
    s.add_argument("--to-hf", required=True, help="output HF model directory")
    s.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the written weights (default: the run's models.param_dtype)",
    )
    s.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser(
        "demo",
        help="the embedded default: SFT a tiny teacher and a weaker student (different "
        "reasoning style) on reasoning-gym arithmetic, then TGPO-Reg; CPU, offline, minutes",
    )
    s.add_argument(
        "--out",
        default="runs/demo",
        help="output directory (SFT models there are cached across runs; the same command after an "
        "interruption continues an unfinished SFT from its last checkpoint)",
    )
    s.add_argument("--quick", action="store_true", help="a much shorter smoke version (tests)")
    s.add_argument("--config", default=None, help="TGPO stage config (default: configs/demo.yaml)")
    s.add_argument("overrides", nargs="*", help="key.path=value overrides of the TGPO stage config")
    s.set_defaults(fn=cmd_demo)


def _add_tool_commands(sub) -> None:
    """estimate, sweep, preset, eval."""
    s = sub.add_parser(
        "estimate", help="per-device memory of student + teacher on a target mesh (exit 3: does not fit)"
    )
    s.add_argument(
        "--config",
        required=True,
        help="a train config (a preset render, configs/demo.yaml, ...) with the target's hardware from the flags "
        "or an `estimate:` section (see configs/estimate_example.yaml), or the estimator's own view",
    )
    s.add_argument("--num-devices", type=int, default=None, help="the target's device count (overrides the config)")
    s.add_argument(
        "--device-memory-gb", type=float, default=None, help="per-device memory in GiB (overrides the config)"
    )
    s.add_argument("overrides", nargs="*", help="key.path=value overrides of the config")
    s.set_defaults(fn=cmd_estimate)

    s = sub.add_parser(
        "sweep",
        help="a grid / list of config overrides -> named runs: run locally one after another, "
        "or print TPU launch commands (--tpu); --dry-run prints the plan; writes a summary",
    )
    from tgpo_jax.sweep import add_arguments as _sweep_args

    _sweep_args(s)
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser(
        "compile",
        help="AOT-compile every program of a training iteration for a TPU slice on this machine (needs the "
        "tpu-aot extra): per-device memory by the TPU compiler's figures; exit 1 naming a program that does not fit",
    )
    from tgpo_jax.aot.cli import add_arguments as _compile_args

    _compile_args(s)
    s.set_defaults(fn=cmd_compile)

    s = sub.add_parser(
        "preset", help="presets for the paper's runs on TPU hardware: list | check | compile | show | train"
    )
    from tgpo_jax.presets import add_arguments as _preset_args

    _preset_args(s)
    s.set_defaults(fn=cmd_preset)

    s = sub.add_parser("eval", help="avg@k accuracy of a HF checkpoint on eval files (JSON + Markdown report)")
    from tgpo_jax.eval.cli import add_arguments as _eval_args

    _eval_args(s)
    s.set_defaults(fn=cmd_eval)


def _add_study_commands(sub) -> None:
    """experiment, bench."""
    s = sub.add_parser(
        "experiment",
        help="experiments: divergence (TGPO vs RKL vs KDRL vs GRPO across a ladder "
        "of teachers of growing divergence), hard (the sparse-reward regime); report.md + PNGs",
    )
    exp = s.add_subparsers(dest="experiment", required=True)
    helps = {
        "divergence": "the paper's central claim in miniature, on CPU",
        "hard": "the regime where the student rarely succeeds and the teacher often does (issue 26): "
        "two-digit sums, a weak student, coefficients tuned on a validation split",
    }
    for name, help_text in helps.items():
        s = exp.add_parser(name, help=help_text)
        s.add_argument(
            "--config",
            default=None,
            help=f"experiment YAML (default: the bundled {EXPERIMENT_CONFIGS[name]})",
        )
        s.add_argument("--quick", action="store_true", help="the config's `quick` section: one seed, fewer iterations")
        s.add_argument(
            "--out", default=None, help="output directory (overrides out_dir; cells and SFT models are cached)"
        )
        s.add_argument("--no-progress", action="store_true", help="no progress bar over the cells")
        s.add_argument(
            "--report-only",
            action="store_true",
            help="write the report from the cells finished so far (trains nothing; e.g. while a run is going)",
        )
        s.add_argument(
            "overrides",
            nargs="*",
            help="key.path=value overrides of the experiment config, e.g. variant=lam002 'methods=[tgpo_reg]' "
            "'seeds=[0]'; variant=NAME with NAME under the config's `variants:` applies that bundled variant "
            "(e.g. `experiment hard variant=long`)",
        )
        s.set_defaults(fn=cmd_experiment)

    s = sub.add_parser(
        "bench",
        help="benchmarks: sampler | rollout | train-step | attention (our sampler vs transformers generate; "
        "the continuous-batching engine vs the static sampler; the TGPO-Reg train step vs PyTorch full "
        "logits; TPU attention memory, splash vs einsum)",
    )
    bench = s.add_subparsers(dest="bench_command", required=True)
    s = bench.add_parser("sampler", help="tokens/s of the jitted sampler vs transformers generate, same weights")
    from tgpo_jax.bench.sampler_bench import add_arguments as _bench_sampler_args

    _bench_sampler_args(s)
    s.set_defaults(fn=cmd_bench_sampler)
    s = bench.add_parser(
        "rollout",
        help="useful tokens/s of the continuous-batching engine vs the static sampler, on forced "
        "response-length distributions (fixed, uniform, long_tail)",
    )
    from tgpo_jax.bench.rollout_bench import add_arguments as _bench_rollout_args

    _bench_rollout_args(s)
    s.set_defaults(fn=cmd_bench_rollout)
    s = bench.add_parser("train-step", help="tokens/s + peak memory of the TGPO-Reg train step vs PyTorch full logits")
    from tgpo_jax.bench.train_step_bench import add_arguments as _bench_train_step_args

    _bench_train_step_args(s)
    s.set_defaults(fn=cmd_bench_train_step)
    s = bench.add_parser(
        "attention",
        help="device memory one layer's attention adds per row on a TPU, by the TPU compiler: splash vs einsum",
    )
    from tgpo_jax.bench.attention_memory import add_arguments as _bench_attention_args

    _bench_attention_args(s)
    s.set_defaults(fn=cmd_bench_attention)


def main(argv: list[str] | None = None) -> int:
    _offline_env()
    args = build_parser().parse_args(argv)
    from tgpo_jax.aot.topology import AotUnavailable

    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, AotUnavailable) as e:
        print(f"tgpo-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`tgpo-jax preset list | head`): not an error of ours; stdout is
        # pointed at /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
