"""Presets for the paper's runs (TGPO_SPEC section 6) on named Cloud TPU hardware.

A preset file (configs/presets/<name>.yaml) names a student and a teacher by their bundled
config.json (configs/hf_configs/<model>/config.json), a `train` mapping (a TrainConfig, merged over
the file named by `base`), and per-hardware settings: dotted TrainConfig keys (mesh, batch) for each
entry of HARDWARE, or `unsupported: <reason>` where the pair cannot fit.

`render(preset, hardware)` gives the TrainConfig dict of one (preset, hardware) pair; `check(...)`
is what CI runs: the rendered config validates, both models build abstractly (jax.eval_shape, no
weights) from the bundled config.json files, and the memory estimator says the pair fits the named
hardware (with HEADROOM), or, for an `unsupported` entry, that it does not.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Any

import yaml

from tgpo_jax.bundled import config_path
from tgpo_jax.configtree import ConfigError

PRESET_DIR = config_path("presets")
HF_CONFIG_DIR = config_path("hf_configs")
# The estimator does not count XLA temporaries, fragmentation or the runtime's reserve: a preset
# must fit in this fraction of each device's HBM.
HEADROOM = 0.90


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One Cloud TPU slice shape. `devices` = JAX devices (one per chip on v4 / v5e / v5p)."""

    name: str
    accelerator_type: str  # gcloud --accelerator-type
    runtime_version: str  # gcloud --version
    devices: int
    hosts: int
    hbm_gib: float  # per device
    zone: str  # a zone that offers it (override with --zone)


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("v4-8", "v4-8", "tpu-ubuntu2204-base", 4, 1, 32.0, "us-central2-b"),
        Hardware("v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite", 8, 1, 16.0, "us-west4-a"),
        Hardware("v5p-8", "v5p-8", "v2-alpha-tpuv5", 4, 1, 95.0, "us-east5-a"),
        Hardware("v4-32", "v4-32", "tpu-ubuntu2204-base", 16, 4, 32.0, "us-central2-b"),
    )
}


def hardware(name: str) -> Hardware:
    if name not in HARDWARE:
        raise ConfigError(f"unknown hardware {name!r}; accepted: {', '.join(HARDWARE)}")
    return HARDWARE[name]


# ------------------------------------------------------------------------------------------ loading
@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    path: str
    student: str  # a directory name under HF_CONFIG_DIR
    teacher: str | None
    student_context: dict  # config.json fields the student's checkpoint is patched with
    train: dict
    hardware: dict  # hardware name -> {dotted key: value} | {"unsupported": reason}
    notes: str = ""


PRESET_KEYS = ("base", "student", "teacher", "student_context", "train", "hardware", "notes")


def preset_path(name_or_path: str) -> str:
    """A path as given, else configs/presets/<name>.yaml."""
    if os.path.isfile(name_or_path):
        return name_or_path
    p = os.path.join(PRESET_DIR, name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if not os.path.isfile(p):
        raise ConfigError(f"preset {name_or_path!r} not found; available: {', '.join(list_presets())}")
    return p


def list_presets() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml") and not f.startswith("_"))


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return d


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_preset(name_or_path: str) -> Preset:
    path = preset_path(name_or_path)
    d = _read_yaml(path)
    unknown = sorted(set(d) - set(PRESET_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(PRESET_KEYS)}")
    train = d.get("train") or {}
    if d.get("base"):
        base = _read_yaml(os.path.join(os.path.dirname(path), d["base"]))
        train = deep_merge(base.get("train", base), train)
    for key in ("student", "hardware"):
        if not d.get(key):
            raise ConfigError(f"{path}: missing key {key!r}")
    hw = d["hardware"]
    if not isinstance(hw, dict):
        raise ConfigError(f"{path}: hardware must map hardware names to settings")
    for name, entry in hw.items():
        hardware(name)
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{path}: hardware.{name} must be a mapping of dotted config keys, or unsupported: reason"
            )
    name = os.path.basename(path)[:-5]
    return Preset(
        name, path, d["student"], d.get("teacher"), dict(d.get("student_context") or {}), train, hw, d.get("notes", "")
    )


# ------------------------------------------------------------------------------------------ render
def set_dotted(d: dict, key: str, value: Any) -> None:
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {key!r}: {p!r} is not a section")
    node[parts[-1]] = copy.deepcopy(value)


def unsupported_reason(preset: Preset, hw_name: str) -> str | None:
    entry = preset.hardware.get(hw_name)
    if entry is None:
        raise ConfigError(f"preset {preset.name} has no settings for {hw_name!r}; it has: {', '.join(preset.hardware)}")
    return entry.get("unsupported")


def render(preset: Preset | str, hw_name: str, *, allow_unsupported: bool = False) -> dict:
    """The TrainConfig dict of `preset` on `hw_name` (before CLI overrides)."""
    preset = load_preset(preset) if isinstance(preset, str) else preset
    hardware(hw_name)
    reason = unsupported_reason(preset, hw_name)
    if reason and not allow_unsupported:
        raise ConfigError(f"preset {preset.name} does not fit {hw_name}: {reason}")
    out = copy.deepcopy(preset.train)
    for key, value in preset.hardware[hw_name].items():
        if key != "unsupported":
            set_dotted(out, key, value)
    out.setdefault("run_dir", f"runs/{preset.name}-{hw_name}")
    return out


def bundled_hf_config(name: str, patch: dict | None = None) -> dict:
    path = os.path.join(HF_CONFIG_DIR, name, "config.json")
    if not os.path.isfile(path):
        have = sorted(os.listdir(HF_CONFIG_DIR))
        raise ConfigError(f"no bundled config.json for {name!r} ({path}); bundled: {', '.join(have)}")
    with open(path) as f:
        return {**json.load(f), **(patch or {})}


# ------------------------------------------------------------------------------------------ checks
# The TPU compiler's figures for every entry (`tgpo-jax preset compile --all`, `preset tune`): one
# JSON line per entry with the fingerprint of the programs it compiled.
COMPILED_RECORDS = config_path("presets/compiled.jsonl")
# config.json fields that change no program's memory (constants in the program at most)
_SHAPE_NEUTRAL = (
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "sliding_window",  # read only with use_sliding_window, which the decoder refuses
    "use_mrope",
)


def programs_fingerprint(name: str, hw: str) -> str:
    """Two entries with the same fingerprint compile to the same programs (the 7B teachers of the
    ladder share one architecture): model shapes, the rendered config (paths left out), the
    attention kernel `auto` resolves to on a TPU for each model and the sampling program. A compiled record holds only
    while its entry's fingerprint is unchanged."""
    preset = load_preset(name)
    cfg = render(preset, hw, allow_unsupported=True)
    cfg = {k: v for k, v in cfg.items() if k not in ("run_dir", "data")} | {
        "models": {
            k: v
            for k, v in cfg.get("models", {}).items()
            if k not in ("student", "teacher", "tokenizer", "allow_tokenizer_mismatch")
        }
    }
    shapes = [
        {k: v for k, v in bundled_hf_config(m).items() if k not in _SHAPE_NEUTRAL}
        for m in (preset.student, preset.teacher)
        if m
    ]
    from tgpo_jax.sharding.estimate import hf_attention_impl

    attn_impl = cfg.get("models", {}).get("attn_impl", "auto")
    kernels = [hf_attention_impl(hf, attn_impl, "tpu", "bfloat16") for hf in shapes]
    # "rollout": the sampling program the rollout and eval_rollout records measured (the engine
    # since rollout.slots: 0 means auto slots; records of the static sampler no longer count)
    return json.dumps([cfg, shapes, hw, {"attention": kernels, "rollout": "engine"}], sort_keys=True)


def compiled_record(name: str, hw: str, path: str = COMPILED_RECORDS) -> dict | None:
    """The TPU compiler's record of this entry as it is now, or None (never compiled, or the preset
    changed since: its fingerprint differs)."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        records = [json.loads(ln) for ln in f if ln.strip()]
    fp = programs_fingerprint(name, hw)
    return next((r for r in records if r["preset"] == name and r["hardware"] == hw and r["fingerprint"] == fp), None)


def estimate_config(preset: Preset, train_cfg, hw: Hardware):
    """The memory estimator's view of a rendered TrainConfig on `hw`, with the bundled config.json
    of each model (the preset's student context patch applied)."""
    from tgpo_jax.sharding import estimate as est

    target = est.TargetHardware(
        num_devices=hw.devices, device_memory_gb=hw.hbm_gib * HEADROOM, remat="full", platform="tpu"
    )
    teacher = bundled_hf_config(preset.teacher) if preset.teacher else None
    return est.from_train_config(train_cfg, target, bundled_hf_config(preset.student, preset.student_context), teacher)


def abstract_param_count(hf: dict, param_dtype: str, dtype: str) -> int:
    """Builds the decoder with jax.eval_shape (no memory) and counts its parameters."""
    from flax import nnx

    from tgpo_jax.models.config import ModelConfig
    from tgpo_jax.models.decoder import abstract_model

    model = abstract_model(ModelConfig.from_hf_dict(hf, param_dtype=param_dtype, dtype=dtype))
    leaves = [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    return sum(math.prod(v.shape) for v in leaves)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    preset: str
    hardware: str
    supported: bool
    fits: bool  # the TPU compiler's verdict where it has a record of the entry as it is, else the estimator's
    peak_gib: float  # the estimator's
    usable_gib: float
    params: dict[str, int]  # role -> parameter count (abstract build)
    report: str
    compiled_gib: float | None = None  # the largest program + what stays alive beside it, by the TPU compiler

    @property
    def ok(self) -> bool:
        """Supported entries must fit; `unsupported` ones must really not fit."""
        return self.fits == self.supported

    def line(self) -> str:
        status = ("fits" if self.fits else "DOES NOT FIT") + ("" if self.supported else " (marked unsupported)")
        flag = "ok " if self.ok else "BAD"
        by = f"compiler {self.compiled_gib:6.2f}" if self.compiled_gib is not None else "compiler    -  "
        return (
            f"{flag} {self.preset:<48} {self.hardware:<6} estimate {self.peak_gib:6.2f}  {by} / {self.usable_gib:6.2f} "
            f"GiB  {status}"
        )


def check(preset: Preset | str, hw_name: str, compile_missing: bool = False) -> CheckResult:
    """Parses + validates the rendered config, builds both models abstractly, runs the estimator;
    the verdict is the TPU compiler's where configs/presets/compiled.jsonl holds the entry as it is
    now (`tgpo-jax preset compile --all`) or, with `compile_missing` (needs the tpu-aot extra),
    where it compiles the entry here; else the estimator's."""
    from tgpo_jax.sharding.estimate import estimate
    from tgpo_jax.train.config import load_train_config

    preset = load_preset(preset) if isinstance(preset, str) else preset
    hw = hardware(hw_name)
    supported = unsupported_reason(preset, hw_name) is None
    cfg = load_train_config(render(preset, hw_name, allow_unsupported=True))
    if cfg.rollout.prompts_per_iteration % hw.hosts:
        raise ConfigError(
            f"{preset.name} on {hw_name}: rollout.prompts_per_iteration={cfg.rollout.prompts_per_iteration} "
            f"is not divisible by the {hw.hosts} hosts (each host loads an equal share)"
        )
    ecfg = estimate_config(preset, cfg, hw)
    params = {"student": abstract_param_count(ecfg.student.hf, ecfg.student.param_dtype, ecfg.student.dtype)}
    if ecfg.teacher is not None:
        params["teacher"] = abstract_param_count(ecfg.teacher.hf, ecfg.teacher.param_dtype, ecfg.teacher.dtype)
    est = estimate(ecfg)
    for role, n in params.items():
        if est.models[role].n_params != n:
            raise AssertionError(f"{role}: estimator counts {est.models[role].n_params} params, abstract build {n}")
    rec = compiled_record(preset.name, hw_name)
    if rec is None and compile_missing:
        from tgpo_jax.aot.preset_table import entry_record

        rec = entry_record(preset.name, hw_name)
    compiled = None if rec is None else max(p.get("total_gib", math.inf) for p in rec["programs"].values())
    return CheckResult(
        preset.name,
        hw_name,
        supported,
        bool(est.fits) if rec is None else bool(rec["fits"]),
        est.peak_bytes / 1024**3,
        ecfg.device_memory_gb,
        params,
        est.report(),
        compiled,
    )


def check_all(
    names: list[str] | None = None, hardware_names: list[str] | None = None, compile_missing: bool = False
) -> list[CheckResult]:
    out = []
    for name in names or list_presets():
        p = load_preset(name)
        for hw in hardware_names or list(p.hardware):
            out.append(check(p, hw, compile_missing))
    return out


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="preset_command", required=True)
    sub.add_parser("list", help="the presets and their hardware entries")
    s = sub.add_parser(
        "check",
        help="validate presets: config, abstract model build, memory estimate; the fit verdict is the TPU "
        "compiler's recorded one (configs/presets/compiled.jsonl) where the entry is unchanged since (exit 1 on a "
        "problem)",
    )
    s.add_argument("names", nargs="*", help="preset names (default: all)")
    s.add_argument(
        "--hardware",
        action="append",
        default=None,
        choices=list(HARDWARE),
        help="check only this hardware entry (repeatable; default: every entry)",
    )
    s.add_argument("--verbose", action="store_true", help="print the full estimate report of each entry")
    s.add_argument(
        "--compile",
        action="store_true",
        help="compile the entries without a current record here (the tpu-aot extra; a minute or more each)",
    )
    from tgpo_jax.aot.cli import add_compile_flags

    s = sub.add_parser(
        "compile",
        help="AOT-compile a preset's programs for its hardware with the TPU compiler (the tpu-aot extra); "
        "per-device memory of each program, exit 1 naming one that does not fit",
    )
    s.add_argument("name", nargs="?", help="preset name (tgpo-jax preset list) or a preset YAML path")
    s.add_argument("hardware", nargs="?", help=f"one of: {', '.join(HARDWARE)}")
    add_compile_flags(s)
    s.add_argument(
        "--all",
        action="store_true",
        help="every preset x hardware entry (or those of NAME), one JSON line each appended to --jsonl "
        "(entries already there are skipped: a rerun resumes)",
    )
    s.add_argument(
        "--jsonl",
        default="runs/preset_compile.jsonl",
        help="with --all: the records file (configs/presets/compiled.jsonl is the one `preset check` reads)",
    )
    s.add_argument("--include-unsupported", action="store_true", help="with --all: compile unsupported entries too")
    s.add_argument("--markdown", default=None, help="with --all: write the table of every record here")
    s.add_argument(
        "overrides",
        nargs="*",
        help="key.path=value overrides (values parsed as YAML), right after NAME HW, before any option",
    )
    s = sub.add_parser(
        "tune",
        help="the largest prompts per iteration and micro-batch of a preset entry that fit its hardware by the "
        "TPU compiler (the tpu-aot extra); --write sets them in the preset file",
    )
    s.add_argument("name", help="preset name (tgpo-jax preset list) or a preset YAML path")
    s.add_argument("hardware", help=f"one of: {', '.join(HARDWARE)}")
    s.add_argument("--write", action="store_true", help="write the values into the preset's hardware entry")
    for name, help_ in (
        ("show", "print the rendered TrainConfig YAML of a preset on a hardware"),
        ("train", "train a preset on a hardware (what launch/tpu.sh runs on every worker)"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("name", help="preset name (tgpo-jax preset list) or a preset YAML path")
        s.add_argument("hardware", help=f"one of: {', '.join(HARDWARE)}")
        s.add_argument("overrides", nargs="*", help="key.path=value overrides (values parsed as YAML)")


def main(args) -> int:
    cmd = args.preset_command
    if cmd == "list":
        for n in list_presets():
            p = load_preset(n)
            hw = ", ".join(h + ("" if unsupported_reason(p, h) is None else " (unsupported)") for h in p.hardware)
            print(f"{n:<48} {hw}")
        return 0
    if cmd == "check":
        results = check_all(args.names or None, args.hardware, compile_missing=args.compile)
        for r in results:
            print(r.line())
            if args.verbose:
                print("    " + r.report.replace("\n", "\n    "))
        return 0 if all(r.ok for r in results) else 1
    if cmd == "compile":
        from tgpo_jax.aot.cli import cmd_preset_compile

        return cmd_preset_compile(args)
    if cmd == "tune":
        from tgpo_jax.aot.cli import cmd_preset_tune

        return cmd_preset_tune(args)
    from tgpo_jax.configtree import apply_overrides, to_dict
    from tgpo_jax.train.config import load_train_config

    cfg = load_train_config(apply_overrides(render(args.name, args.hardware), args.overrides))
    if cmd == "show":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from tgpo_jax.train.loop import train

    final = train(cfg)
    print(json.dumps({k: v for k, v in final.items() if k.startswith(("reward/", "eval/", "loss/total"))}))
    return 0


# ------------------------------------------------------------------------------------------ workers
def preset_models(name: str) -> list[str]:
    """The model directory names a preset needs on the workers (student first)."""
    p = load_preset(name)
    return [p.student] + ([p.teacher] if p.teacher else [])


def patch_student_config(name: str, root: str = ".") -> str:
    """Writes the preset's student_context into the student checkpoint's config.json (the path in
    train.models.student, relative to `root`); returns a one-line description."""
    p = load_preset(name)
    path = os.path.join(root, p.train["models"]["student"], "config.json")
    with open(path) as f:
        hf = json.load(f)
    hf.update(p.student_context)
    if "rope_parameters" in hf and "rope_theta" in p.student_context:
        hf["rope_parameters"] = {**hf["rope_parameters"], "rope_theta": p.student_context["rope_theta"]}
    with open(path, "w") as f:
        json.dump(hf, f, indent=2)
    return f"{path}: set {json.dumps(p.student_context, sort_keys=True)}"
