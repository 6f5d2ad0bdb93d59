"""Reading rows: local jsonl / json / parquet files with configurable columns, and reasoning-gym tasks
generated offline. Output: plain records

    {"index": int, "problem": str, "answer": str | dict, "data_source": str, "solution": str | None}

`answer` is a string for math data and a reasoning-gym payload dict for reasoning-gym tasks
(scored by tgpo_jax.rewards). Rows without a problem or an answer are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

from tgpo_jax.data.config import DataConfig

RG_KEY = "reasoning_gym"  # same key as tgpo_jax.rewards.scorers.RG_KEY


@dataclasses.dataclass
class LoadStats:
    """What happened to the rows on the way to the prompt set."""

    rows_read: int = 0
    skipped_no_problem: int = 0
    skipped_no_answer: int = 0
    dropped_too_long: int = 0  # rendered prompt longer than max_prompt_len
    kept: int = 0
    per_source: dict = dataclasses.field(default_factory=dict)  # data_source -> kept rows

    def summary(self) -> str:
        return (
            f"{self.rows_read} rows read, {self.skipped_no_problem} without a problem and "
            f"{self.skipped_no_answer} without an answer skipped, {self.dropped_too_long} prompts over "
            f"max_prompt_len dropped, {self.kept} kept"
        )


class EmptyDatasetError(ValueError):
    """No usable prompt is left after filtering: raised before any training or evaluation starts."""


# ---------------------------------------------------------------------------------------- files
def read_table(path: str) -> tuple[list[dict], list[str]]:
    """All rows of a .jsonl / .json / .parquet file and the column names found (in file order)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    ext = path.lower().rsplit(".", 1)[-1]
    if ext == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.to_pylist(), list(table.schema.names)
    if ext == "jsonl":
        rows = _read_jsonl(path)
    elif ext == "json":
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json data file must hold a list of objects")
    else:
        raise ValueError(f"{path}: unsupported data file type .{ext}; accepted: .jsonl, .json, .parquet")
    return rows, _columns(rows)


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    return rows


def _columns(rows: Iterable[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def get_field(row: dict, path: str) -> Any:
    """row["a"]["b"] for path "a.b" (None when any level is missing)."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def check_columns(path: str, columns: list[str], required: dict[str, str]) -> None:
    """Raises naming each missing required column (role -> key) and listing the columns found."""
    missing = [f"{key!r} ({role})" for role, key in required.items() if key.split(".")[0] not in columns]
    if missing:
        raise ValueError(
            f"{path}: column {', '.join(missing)} not found; columns found: {', '.join(columns) or 'none (empty file)'}"
        )


def _as_problem(value: Any) -> str:
    """A problem cell as text; a list of chat messages (veRL's `prompt` column) gives the last user turn."""
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content", "") for m in value if m.get("role") == "user"]
        return str(users[-1] if users else value[-1].get("content", "")).strip()
    return "" if value is None else str(value).strip()


def _as_answer(value: Any) -> str:
    """An answer cell as text; a list of accepted answers gives its first element."""
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) else None
    return "" if value is None else str(value).strip()


def load_file_records(cfg: DataConfig) -> tuple[list[dict], LoadStats]:
    """Records from cfg.files, in file order then row order."""
    required = {"problem": cfg.problem_column, "answer": cfg.answer_column}
    if cfg.solution_column:
        required["off-policy solution"] = cfg.solution_column
    records, stats = [], LoadStats()
    for path in cfg.files:
        rows, columns = read_table(path)
        check_columns(path, columns, required)
        stem = os.path.splitext(os.path.basename(path))[0]
        for row in rows:
            stats.rows_read += 1
            rec = _file_record(row, cfg, stem)
            if not rec["problem"]:
                stats.skipped_no_problem += 1
            elif not rec["answer"]:
                stats.skipped_no_answer += 1
            else:
                rec["index"] = len(records)
                records.append(rec)
    return records, stats


def _file_record(row: dict, cfg: DataConfig, default_source: str) -> dict:
    source = get_field(row, cfg.data_source_column) if cfg.data_source_column else None
    solution = get_field(row, cfg.solution_column) if cfg.solution_column else None
    return {
        "problem": _as_problem(get_field(row, cfg.problem_column)),
        "answer": _as_answer(get_field(row, cfg.answer_column)),
        "data_source": str(source) if source not in (None, "") else default_source,
        "solution": None if solution is None else str(solution),
    }


# ---------------------------------------------------------------------------------------- reasoning-gym
def rg_dataset(task: str, size: int, seed: int, difficulty: int | None = None):
    """(dataset, config) of a reasoning-gym task; `difficulty` sets the task curriculum's global level
    (0 = easiest; clipped to each attribute's highest level)."""
    import reasoning_gym  # noqa: F401  (registers the tasks)
    from reasoning_gym.factory import DATASETS, create_curriculum, has_curriculum

    if task not in DATASETS:
        raise ValueError(f"unknown reasoning-gym task {task!r}; available: {', '.join(sorted(DATASETS))}")
    dataset_cls, config_cls = DATASETS[task]
    if difficulty is None:
        config = config_cls(size=size, seed=seed)
    else:
        if not has_curriculum(task):
            raise ValueError(f"reasoning-gym task {task!r} has no curriculum: leave rg_difficulty unset")
        curriculum = create_curriculum(task)
        curriculum.set_global_level(int(difficulty))
        config = curriculum.generate_configuration({"size": size, "seed": seed})
    return dataset_cls(config=config), config


def load_rg_records(cfg: DataConfig) -> tuple[list[dict], LoadStats]:
    """cfg.rg_size items of each task in cfg.rg_tasks; the answer is the payload the scorer needs."""
    records, stats = [], LoadStats()
    for task in cfg.rg_tasks:
        ds, config = rg_dataset(task, cfg.rg_size, cfg.rg_seed, cfg.rg_difficulty)
        config_dict = dataclasses.asdict(config)
        for i in range(len(ds)):
            entry = ds[i]
            stats.rows_read += 1
            payload = {RG_KEY: task, "config": config_dict, "entry": entry}
            records.append(
                {
                    "index": len(records),
                    "problem": str(entry["question"]).strip(),
                    "answer": payload,
                    "data_source": task,
                    "solution": None,
                }
            )
    return records, stats


def load_records(cfg: DataConfig) -> tuple[list[dict], LoadStats]:
    """Records of the configured source (files or reasoning-gym)."""
    return load_file_records(cfg) if cfg.files else load_rg_records(cfg)


__all__ = [
    "LoadStats",
    "EmptyDatasetError",
    "read_table",
    "get_field",
    "check_columns",
    "load_file_records",
    "load_rg_records",
    "load_records",
    "rg_dataset",
    "RG_KEY",
]
