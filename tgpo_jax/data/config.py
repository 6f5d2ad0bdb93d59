"""The typed data configuration (the `data:` section of a run config)."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

from tgpo_jax.configtree import Overlay, from_dict

# A system prompt in the spirit of the paper's: reasoning inside <think> ... </think>, final answer
# in \boxed{}. Override it with `system_prompt` to match a particular checkpoint's training prompt.
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. The user asks a math question and you solve it. First think through "
    "the reasoning process step by step inside <think> </think> tags, then give a concise solution with "
    "the final answer in \\boxed{}."
)
TEMPLATES = ("chat", "plain")
DEFAULT_PLAIN_TEMPLATE = "{system}User: {problem}\nAssistant: "


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where prompts come from and how they are rendered, shuffled, sharded and batched.

    Sources (exactly one): `files` (jsonl / json / parquet) or `rg_tasks` (reasoning-gym task names).
    Columns: `problem_column`, `answer_column` (required; a dotted path such as "reward_model.ground_truth"
    reads nested fields), `data_source_column` (optional: absent -> the file's stem), `solution_column`
    (optional off-policy solution for LUFFY; when set, the column is required).
    Rendering: `template` "chat" (the tokenizer's chat template) or "plain" (`plain_template` with
    {system} and {problem}, for base models without one); `think_suffix` appends "<think>\\n".
    `max_prompt_len`: longer prompts are dropped and counted, never truncated.
    Batching: `batch_size` prompts per step, GLOBAL (each process gets batch_size / process_count).
    `num_epochs` None repeats forever.
    """

    files: tuple[str, ...] = ()
    problem_column: str = "problem"
    answer_column: str = "answer"
    data_source_column: str = "data_source"
    solution_column: str | None = None
    rg_tasks: tuple[str, ...] = ()
    rg_size: int = 1000
    rg_seed: int = 0
    rg_difficulty: int | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    template: str = "chat"
    plain_template: str = DEFAULT_PLAIN_TEMPLATE
    think_suffix: bool = True
    max_prompt_len: int = 1024
    batch_size: int = 128
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    drop_remainder: bool = True

    def __post_init__(self):
        for name in ("files", "rg_tasks"):  # accept a single string or a list
            v = getattr(self, name)
            object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v))
        self._validate()

    def _validate(self) -> None:
        problems = []
        if bool(self.files) == bool(self.rg_tasks):
            problems.append("give exactly one source: `files` (jsonl/parquet) or `rg_tasks` (reasoning-gym)")
        problems += value_problems(self)
        if problems:
            raise ValueError("bad data config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str = "data") -> DataConfig:
        """configtree.from_dict: an unknown key raises, listing the valid ones, keys named `data.<key>`."""
        return from_dict(cls, dict(d), path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def value_problems(c) -> list[str]:
    """Values outside what their key accepts, as `key=value: must be ...` (`c`: a DataConfig or a
    namespace of its fields). The source check is not here: a section may name its files later."""
    checks = (
        ("template", c.template in TEMPLATES, f"one of {', '.join(TEMPLATES)}"),
        ("max_prompt_len", c.max_prompt_len >= 1, ">= 1"),
        ("batch_size", c.batch_size >= 1, ">= 1"),
        ("rg_size", c.rg_size >= 1, ">= 1"),
        ("num_epochs", c.num_epochs is None or c.num_epochs >= 1, ">= 1 or None (repeat forever)"),
        ("seed", 0 <= c.seed < 2**32, "in [0, 2**32)"),
    )
    return [f"{name}={getattr(c, name)!r}: must be {accepted}" for name, ok, accepted in checks if not ok]


class DataSection(Overlay):
    """The `data:` (and `eval.data:`) section of a train / sft config: the keys given, typed and
    checked against DataConfig at load. The DataConfig itself is built when the run starts, after
    the merges (`eval.data` over `data`; `batch_size` from the rollout section), which is also when a
    missing source is reported: a config may name its files later (the demo fills them in)."""

    schema = DataConfig

    def problems(self, path: str = "data") -> list[str]:
        """value_problems of these keys over the defaults, named `<path>.<key>=...`."""
        fields = {f.name: f.default for f in dataclasses.fields(DataConfig)}
        return [f"{path}.{p}" for p in value_problems(types.SimpleNamespace(**{**fields, **self}))]


__all__ = ["DataConfig", "DataSection", "DEFAULT_SYSTEM_PROMPT", "DEFAULT_PLAIN_TEMPLATE", "TEMPLATES"]
