"""Shared tiny end-to-end training setup (tiny student/teacher, reasoning-gym data, 8-device mesh)."""

from __future__ import annotations

import json
import os

from tgpo_jax.models.tiny import make_tiny_checkpoint

SYSTEM = "Think in <think></think>, answer in \\boxed{}."


def eight_cpu_device_env(**extra: str) -> dict[str, str]:
    """A subprocess environment with 8 fake CPU devices: this process's XLA_FLAGS (conftest's
    collective timeouts) plus the device count, then `extra`."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(), **extra)


def tiny_models(root: str) -> tuple[str, str]:
    s, t = os.path.join(root, "student"), os.path.join(root, "teacher")
    if not os.path.exists(os.path.join(s, "config.json")):
        make_tiny_checkpoint(s, arch="qwen2", seed=0)
        make_tiny_checkpoint(t, arch="llama", seed=1, num_layers=3)
    return s, t


def write_luffy_data(path: str) -> str:
    rows = [
        {
            "problem": f"What is {a} + {b}?",
            "answer": str(a + b),
            "solution": f"<think>{a} + {b} = {a + b}</think> \\boxed{{{a + b}}}",
        }
        for a in range(1, 5)
        for b in range(1, 5)
    ]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def tiny_config(root: str, run: str, objective: str = "tgpo_reg", iterations: int = 3, **extra) -> dict:
    s, t = tiny_models(root)
    cfg = {
        "run_dir": os.path.join(root, run),
        "models": {"student": s, "teacher": t},
        "sharding": {"mesh": {"data": 2, "fsdp": 2, "tensor": 2}},
        "rollout": {"prompts_per_iteration": 4, "n": 4, "max_new_tokens": 8, "prompt_buckets": [128]},
        "objective": {"name": objective},
        "optimizer": {"lr": 1e-3},
        "train": {"iterations": iterations, "micro_batch": 4, "logprob_chunk": 8},
        "data": {"rg_tasks": ["chain_sum"], "rg_size": 64, "max_prompt_len": 128, "system_prompt": SYSTEM},
        "rewards": {"workers": 1, "timeout_s": 5},
        "eval": {"every": 0},
        "checkpoint": {"every": 1, "async_save": True},
        "logging": {"progress": False, "tensorboard": True, "plot": True},
    }
    if objective == "luffy":
        cfg["data"] = {
            "files": [write_luffy_data(os.path.join(root, "luffy.jsonl"))],
            "solution_column": "solution",
            "max_prompt_len": 128,
            "system_prompt": SYSTEM,
        }
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return cfg


def last_per_iteration(path: str) -> dict[int, dict]:
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out[r["iteration"]] = r
    return out


def comparable(record: dict) -> dict:
    """Everything but wall-clock measurements."""
    return {k: v for k, v in record.items() if not k.startswith("perf/")}
