"""Every program one training iteration runs, lowered from shapes and shardings alone.

`abstract_run(cfg, student_hf, teacher_hf, devices)` builds the run as `train` would (mesh, both
models with their runtime options, train state, sampler) but with jax.ShapeDtypeStruct leaves:
nothing is allocated, so the devices may be a TPU slice this CPU process only compiles for.
`iteration_programs(run)` gives the programs at the run's real shapes:

- `rollout`: the sampler's prefill + decode loop (its KV cache allocated inside) for a rollout batch;
- `score`: the student and teacher forwards over the rollout batch (train.score_micro_batch rows at a time);
- `train_step`: one optimizer step on a mini-batch (the train state donated);
- `eval_rollout`: the sampler at the evaluator's batch and lengths (when the run has an eval set).

Each program also names the buffers that stay alive while it runs without being among its
arguments (the optimizer state during the rollout, the teacher during the train step, ...): the
memory a device needs is the compiler's figure for the program plus those.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.hf_import import model_from_flat
from tgpo_jax.models.vocab_map import TeacherIdMap
from tgpo_jax.objectives.batch import Batch
from tgpo_jax.rollout.sampler import Sampler, bucket_length
from tgpo_jax.rollout.sampling import SamplingParams
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh
from tgpo_jax.sharding.placement import abstract_sharded_params
from tgpo_jax.sharding.rules import ActivationSharding
from tgpo_jax.train.config import TrainConfig
from tgpo_jax.train.step import TrainState, make_optimizer, make_train_step, opt_state_shardings


@dataclasses.dataclass
class AbstractRun:
    cfg: TrainConfig
    mesh: Any
    s_graphdef: Any
    t_graphdef: Any
    t_state: Any  # ShapeDtypeStructs, or None without a teacher
    train_state: TrainState  # ShapeDtypeStructs
    optimizer: Any
    sampler: Sampler


@dataclasses.dataclass
class Program:
    name: str
    lower: Callable[[], jax.stages.Lowered]
    # () -> {name: pytree of ShapeDtypeStructs}: what stays alive beside the program's own buffers
    resident: Callable[[], dict[str, Any]]


def _model(hf: dict, param_dtype: str, dtype: str, overrides: dict, mesh, rules: ShardingRules, vocab: int | None):
    cfg = ModelConfig.from_hf_dict(hf, param_dtype=param_dtype, dtype=dtype).replace(**overrides)
    if vocab is not None and cfg.vocab_size < vocab:  # as train/setup.py pads the teacher to the student's ids
        cfg = cfg.replace(vocab_size=vocab, valid_vocab_size=cfg.valid_vocab_size or cfg.vocab_size)
    flat = abstract_sharded_params(cfg, mesh, rules)
    return model_from_flat(cfg, flat, ActivationSharding(mesh, rules))


def _abstract_train_state(params, optimizer, mesh) -> TrainState:
    """The train state `init_train_state` makes, as ShapeDtypeStructs in the same shardings."""
    shapes = jax.eval_shape(optimizer.init, params)
    shardings = opt_state_shardings(optimizer, params)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(params, opt_state, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))


def abstract_run(cfg: TrainConfig, student_hf: dict, teacher_hf: dict | None, devices: Sequence) -> AbstractRun:
    """The run's models and state on a mesh over `devices`, every leaf a ShapeDtypeStruct."""
    mesh = build_mesh(MeshConfig.from_dict(cfg.sharding.mesh), devices)
    m = cfg.models
    s_rules = ShardingRules.from_dict(cfg.sharding.student_rules)
    student = _model(student_hf, m.param_dtype, m.dtype, m.model_overrides(), mesh, s_rules, None)
    t_graphdef = t_state = None
    if cfg.objective.objective.needs_teacher:
        if teacher_hf is None:
            raise ValueError(f"objective {cfg.objective.name!r} needs a teacher config")
        t_rules = ShardingRules.from_dict(cfg.sharding.teacher_rules)
        t_dtypes = (m.teacher_param_dtype or m.param_dtype, m.teacher_dtype or m.dtype)
        teacher = _model(teacher_hf, *t_dtypes, m.model_overrides(), mesh, t_rules, student.cfg.vocab_size)
        t_graphdef, t_state = nnx.split(teacher)
    optimizer = make_optimizer(cfg.optimizer)
    s_graphdef, params = nnx.split(student)
    train_state = _abstract_train_state(params, optimizer, mesh)
    # stop ids only change the values a program compares against, not its shapes: the model's EOS
    sampler = Sampler(
        student,
        stop_ids=_model_stop_ids(student.cfg),
        prompt_buckets=cfg.rollout.prompt_buckets,
        slots=cfg.rollout.slots,
        kv_pages=cfg.rollout.kv_pages,
        page_size=cfg.rollout.page_size,
    )
    return AbstractRun(cfg, mesh, s_graphdef, t_graphdef, t_state, train_state, optimizer, sampler)


def _model_stop_ids(cfg: ModelConfig) -> tuple[int, ...]:
    eos = cfg.eos_token_id
    return tuple(eos) if isinstance(eos, tuple) else (eos,) if eos is not None else (0,)


def _batch_sds(run: AbstractRun, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    rules = ShardingRules.from_dict(run.cfg.sharding.student_rules)
    spec = rules.spec(("batch",) + (None,) * (len(shape) - 1))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(run.mesh, spec))


def _bucket(cfg: TrainConfig, prompt_len: int) -> int:
    return bucket_length(prompt_len, cfg.rollout.prompt_buckets)


def rollout_batch(run: AbstractRun) -> Batch:
    """The rollout fields of one iteration's Batch: rows = prompts x n (the sampler's filler prompts
    dropped, as the iteration receives them), the prompt bucket the longest kept prompt needs."""
    c = run.cfg
    B = c.rollout_batch
    P, T = _bucket(c, c.max_prompt_len), c.rollout.max_new_tokens
    i32 = jnp.int32
    return Batch(_batch_sds(run, (B, P), i32), _batch_sds(run, (B, P), i32), *(_batch_sds(run, (B, T), i32),) * 2)


def _key_sds(run: AbstractRun) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(run.mesh, PartitionSpec()))


def _score_fn(run: AbstractRun):
    """(jitted score, its static kwargs): the function train/iteration.py calls."""
    from tgpo_jax.train.score import _score

    c = run.cfg
    return _score, dict(
        obj_cfg=c.objective,
        chunk=c.train.logprob_chunk,
        micro_batch=c.score_micro_batch_rows,
        temperature=c.rollout.temperature,
    )


def _score_args(run: AbstractRun, batch: Batch) -> tuple:
    return (run.s_graphdef, run.train_state.params, run.t_graphdef, run.t_state, batch, _key_sds(run), _id_map_sds(run))


def _id_map_sds(run: AbstractRun) -> TeacherIdMap | None:
    """The teacher-id map train/setup.py passes to the score step: two arrays over the teacher's
    embedding rows, replicated (None without a teacher)."""
    if run.t_graphdef is None:
        return None
    rows = nnx.merge(run.t_graphdef, run.t_state).cfg.vocab_size
    replicated = NamedSharding(run.mesh, PartitionSpec())
    return TeacherIdMap(
        jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=replicated),
        jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=replicated),
    )


def scored_batch(run: AbstractRun) -> Batch:
    """The iteration's whole Batch after scoring (rollout fields, scored fields, advantages,
    off-policy flags where the objective has them), as ShapeDtypeStructs sharded over the batch."""
    rollout = rollout_batch(run)
    fn, kw = _score_fn(run)
    fields, _ = jax.eval_shape(lambda *a: fn(*a, **kw), *_score_args(run, rollout))
    B = rollout.tokens_BT.shape[0]
    fields = {k: _batch_sds(run, v.shape, v.dtype) for k, v in fields.items()}
    off = _batch_sds(run, (B,), jnp.bool_) if run.cfg.objective.objective.offpolicy_rows else None
    # per-row denominators of the authors' dynamic micro-batches (train.micro_batch_tokens)
    denom = _batch_sds(run, (B,), jnp.float32) if run.cfg.train.micro_batch_tokens > 0 else None
    return rollout.replace(**fields, adv_B=_batch_sds(run, (B,), jnp.float32), offpolicy_B=off, agg_denom_B=denom)


def mini_batch(run: AbstractRun, full: Batch) -> Batch:
    rows = run.cfg.mini_batch
    return jax.tree.map(lambda x: _batch_sds(run, (rows,) + x.shape[1:], x.dtype), full)


def _sampler_program(run: AbstractRun, name: str, prompts: int, prompt_len: int, params: SamplingParams) -> Program:
    P = run.sampler.padded_prompts(prompts)
    return Program(name, lambda: run.sampler.lower(P, prompt_len, params), dict)


def iteration_programs(run: AbstractRun) -> list[Program]:
    """The programs of one iteration (and of an evaluation), each with what stays alive beside it
    (the KV cache lives inside the rollout programs). Nothing is traced until a program's `lower`
    (or `resident`) is called."""
    c = run.cfg
    opt = {"opt_state": (run.train_state.opt_state, run.train_state.step)}
    teacher = {"teacher_params": run.t_state} if run.t_state is not None else {}
    rollout = _sampler_program(
        run, "rollout", c.rollout.prompts_per_iteration, _bucket(c, c.max_prompt_len), c.rollout_sampling
    )
    rollout.resident = lambda: opt | teacher
    fn, kw = _score_fn(run)
    score = Program("score", lambda: fn.lower(*_score_args(run, rollout_batch(run)), **kw), lambda: opt)
    train = Program(
        "train_step", lambda: _lower_train_step(run), lambda: teacher | {"iteration_batch": scored_batch(run)}
    )
    progs = [rollout, score, train]
    if c.eval.data and c.eval.every > 0:
        eval_len = _bucket(c, c.eval_max_prompt_len)
        ev = _sampler_program(run, "eval_rollout", c.eval_batch_prompts, eval_len, c.eval_sampling)
        ev.resident = lambda: opt | teacher
        progs.append(ev)
    return progs


def _lower_train_step(run: AbstractRun) -> jax.stages.Lowered:
    c = run.cfg
    step = make_train_step(
        run.s_graphdef,
        run.optimizer,
        obj_cfg=c.objective,
        micro_batch=c.train.micro_batch,
        chunk=c.train.logprob_chunk,
        state=run.train_state,
        temperature=c.rollout.temperature,
    )
    iteration = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(run.mesh, PartitionSpec()))
    return step.lower(run.train_state, mini_batch(run, scored_batch(run)), iteration)


def device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard where
    devices differ, which an uneven split never makes here)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * _itemsize(x.dtype)
    return total


def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # a threefry key: two uint32
    return np.dtype(dtype).itemsize
