"""Prompt data: local jsonl/json/parquet files or reasoning-gym tasks -> rendered, length-filtered
prompts -> a grain pipeline (seeded shuffle, repeat, per-process shard, batch) with exact resume."""

from tgpo_jax.data.config import DEFAULT_PLAIN_TEMPLATE, DEFAULT_SYSTEM_PROMPT, DataConfig
from tgpo_jax.data.pipeline import (
    DataIterator,
    PromptBatch,
    PromptSet,
    build_prompt_set,
    make_data_iterator,
    prompt_dataset,
)
from tgpo_jax.data.prompts import THINK_PREFIX, PromptRenderer, bucket_by_length, bucket_for, left_pad
from tgpo_jax.data.sources import (
    EmptyDatasetError,
    LoadStats,
    check_columns,
    load_file_records,
    load_records,
    load_rg_records,
    read_table,
    rg_dataset,
)

__all__ = [
    "DataConfig",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_PLAIN_TEMPLATE",
    "DataIterator",
    "PromptBatch",
    "PromptSet",
    "build_prompt_set",
    "make_data_iterator",
    "prompt_dataset",
    "PromptRenderer",
    "THINK_PREFIX",
    "left_pad",
    "bucket_for",
    "bucket_by_length",
    "EmptyDatasetError",
    "LoadStats",
    "check_columns",
    "load_file_records",
    "load_records",
    "load_rg_records",
    "read_table",
    "rg_dataset",
]
