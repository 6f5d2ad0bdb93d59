"""The training prompt pipeline: records -> rendered, length-filtered prompt set -> grain dataset
(seeded shuffle, a fresh permutation every epoch, repeat, per-process shard, batch) -> DataIterator.

Sharding takes the global shuffled stream and gives process p the elements p, p + N, p + 2N, ...
(N processes), batched by batch_size / N: the union over processes of their step-s batches is
exactly the single-process step-s batch, whatever N is.

The iterator is a grain DatasetIterator: `get_state()` is a JSON-able dict and
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)` save and restore it with
Orbax (one file per process).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from tgpo_jax.data.config import DataConfig
from tgpo_jax.data.prompts import PromptRenderer, left_pad
from tgpo_jax.data.sources import EmptyDatasetError, LoadStats, load_records


@dataclasses.dataclass
class PromptSet:
    """Filtered records, each with "prompt_ids" (list[int]), and the filtering stats."""

    records: list[dict]
    stats: LoadStats


@dataclasses.dataclass
class PromptBatch:
    """P prompts of one step on this process (unpadded ids; see `left_padded`)."""

    prompt_ids: list[list[int]]
    problems: list[str]
    answers: list[Any]  # str (math ground truth) or a reasoning-gym payload dict
    data_sources: list[str]
    solutions: list[str | None]  # off-policy solutions (LUFFY) when configured
    indices: np.ndarray  # int64 [P]: position in the prompt set (the same on every process)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> PromptBatch:
        return cls(
            [r["prompt_ids"] for r in records],
            [r["problem"] for r in records],
            [r["answer"] for r in records],
            [r["data_source"] for r in records],
            [r["solution"] for r in records],
            np.asarray([r["index"] for r in records], np.int64),
        )

    def left_padded(self, pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [P, T] int32, mask [P, T] int32)."""
        return left_pad(self.prompt_ids, pad_id, length)


def build_prompt_set(cfg: DataConfig, tokenizer=None, *, renderer: PromptRenderer | None = None) -> PromptSet:
    """Loads, renders and length-filters every prompt. Raises EmptyDatasetError when nothing is left."""
    records, stats = load_records(cfg)
    renderer = renderer or PromptRenderer.from_config(cfg, tokenizer)
    ids = renderer.encode([r["problem"] for r in records])
    kept = []
    for rec, prompt_ids in zip(records, ids):
        if len(prompt_ids) > cfg.max_prompt_len:
            stats.dropped_too_long += 1
            continue
        kept.append(dict(rec, index=len(kept), prompt_ids=prompt_ids))
        stats.per_source[rec["data_source"]] = stats.per_source.get(rec["data_source"], 0) + 1
    stats.kept = len(kept)
    if not kept:
        raise EmptyDatasetError(
            f"no prompt left after filtering ({stats.summary()}); check the columns, the answers and max_prompt_len"
        )
    return PromptSet(kept, stats)


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    return process_index, process_count


def prompt_dataset(prompt_set: PromptSet, cfg: DataConfig, process_index: int, process_count: int) -> grain.MapDataset:
    """The grain MapDataset of PromptBatch for one process."""
    if cfg.batch_size % process_count:
        raise ValueError(f"batch_size={cfg.batch_size} (global) is not divisible by process_count={process_count}")
    per_process = cfg.batch_size // process_count
    n = len(prompt_set.records)
    if cfg.drop_remainder and (cfg.num_epochs or 1) * n < cfg.batch_size:
        raise EmptyDatasetError(
            f"{n} prompts x {cfg.num_epochs or 1} epoch(s) do not fill one batch of {cfg.batch_size}"
        )
    ds = grain.MapDataset.source(prompt_set.records)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # a new permutation per epoch (grain seeds epoch e with seed + e)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds[process_index::process_count]
    return ds.batch(per_process, drop_remainder=cfg.drop_remainder, batch_fn=PromptBatch.from_records)


def _fingerprint(prompt_set: PromptSet, cfg: DataConfig, process_index: int, process_count: int) -> str:
    h = hashlib.sha256()
    h.update(
        repr(
            (
                len(prompt_set.records),
                cfg.seed,
                cfg.shuffle,
                cfg.batch_size,
                cfg.num_epochs,
                process_index,
                process_count,
            )
        ).encode()
    )
    for rec in prompt_set.records[:: max(1, len(prompt_set.records) // 64)]:
        h.update(repr(rec["prompt_ids"]).encode())
    return h.hexdigest()[:16]


class DataIterator(grain.DatasetIterator):
    """Iterator of PromptBatch with exact resume: `get_state()` -> JSON-able dict, `set_state(state)`.

    The state carries a fingerprint of the prompt set, seed, batch size and process layout; restoring
    a state made for a different one raises instead of silently serving other data.
    """

    def __init__(self, dataset: grain.MapDataset, stats: LoadStats, *, steps_per_epoch: int, fingerprint: str):
        parent = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()
        super().__init__(parent)
        self.stats, self.steps_per_epoch, self.fingerprint = stats, steps_per_epoch, fingerprint

    def __next__(self) -> PromptBatch:
        return next(self._parent)

    def get_state(self) -> dict:
        return {"grain": self._parent.get_state(), "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "the saved data-iterator state belongs to a different pipeline (data, seed, "
                "batch size or process layout changed): cannot resume it exactly"
            )
        self._parent.set_state(state["grain"])


def make_data_iterator(
    cfg: DataConfig,
    tokenizer=None,
    *,
    prompt_set: PromptSet | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """The training iterator of this process (defaults: jax.process_index() / jax.process_count())."""
    pi, pc = _process_info(process_index, process_count)
    prompt_set = prompt_set or build_prompt_set(cfg, tokenizer)
    ds = prompt_dataset(prompt_set, cfg, pi, pc)
    return DataIterator(
        ds,
        prompt_set.stats,
        steps_per_epoch=len(prompt_set.records) // cfg.batch_size,
        fingerprint=_fingerprint(prompt_set, cfg, pi, pc),
    )


__all__ = ["PromptSet", "PromptBatch", "DataIterator", "build_prompt_set", "prompt_dataset", "make_data_iterator"]
