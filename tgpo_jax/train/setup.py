"""Builds the parts of a run from its config: mesh, student and teacher on it (vocabularies
aligned, tokenizers checked), sampler, jitted train step, data, rewards and the evaluator."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from tgpo_jax.models.config import ModelConfig
from tgpo_jax.models.hf_export import flat_params
from tgpo_jax.models.hf_import import load_tokenizer, model_from_flat
from tgpo_jax.models.vocab import align_vocab, check_tokenizers_agree
from tgpo_jax.rollout.sampler import Sampler
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, load_sharded
from tgpo_jax.sharding.distributed import initialize
from tgpo_jax.sharding.rules import ActivationSharding, param_shardings
from tgpo_jax.train.config import TrainConfig
from tgpo_jax.train.iteration import Models
from tgpo_jax.train.step import init_train_state, make_optimizer, make_train_step


@dataclasses.dataclass
class RunParts:
    models: Models
    train_state: Any
    tokenizer: Any
    data: Any  # .next_batch() -> list[Example]; .get_state() / .set_state()
    reward_fn: Any
    evaluate: Callable[[Any, int], dict]
    close: Callable[[], None]


def _load(path, mesh, rules_dict, param_dtype, dtype):
    return load_sharded(path, mesh, ShardingRules.from_dict(rules_dict), param_dtype=param_dtype, dtype=dtype)


def _teacher_on_student_vocab(teacher, student_cfg: ModelConfig, tokenizer_len: int, mesh, rules: ShardingRules):
    """The teacher scores the STUDENT's token ids: it needs a row for every id the student can
    emit. Pads (never truncates real rows of) the teacher's embedding to cover them."""
    need = student_cfg.vocab_size
    if teacher.cfg.vocab_size >= need:
        return teacher
    flat, cfg = align_vocab(flat_params(teacher), teacher.cfg, need, real_vocab_size=tokenizer_len)
    shardings = param_shardings(cfg, rules, mesh)
    flat = {k: jax.device_put(v, shardings[k]) for k, v in flat.items()}
    return model_from_flat(cfg, flat, ActivationSharding(mesh, rules))


def build_models(cfg: TrainConfig):
    """(mesh, student, teacher or None, tokenizer)."""
    initialize()
    mesh = build_mesh(MeshConfig.from_dict(cfg.sharding.mesh))
    m = cfg.models
    student = _load(m.student, mesh, cfg.sharding.student_rules, m.param_dtype, m.dtype)
    tokenizer = load_tokenizer(m.tokenizer or m.student)
    teacher = None
    if cfg.objective.objective.needs_teacher:
        check_tokenizers_agree(tokenizer, load_tokenizer(m.teacher), allow_mismatch=m.allow_tokenizer_mismatch)
        teacher = _load(m.teacher, mesh, cfg.sharding.teacher_rules, m.teacher_param_dtype or m.param_dtype,
                        m.teacher_dtype or m.dtype)
        teacher = _teacher_on_student_vocab(teacher, student.cfg, len(tokenizer), mesh,
                                            ShardingRules.from_dict(cfg.sharding.teacher_rules))
    return mesh, student, teacher, tokenizer


def batch_putter(mesh, rules: ShardingRules):
    """Host arrays with a leading batch axis -> global device arrays sharded over the batch axes."""

    def put(arrays: dict) -> dict:
        out = {}
        for k, v in arrays.items():
            v = np.asarray(v)
            spec = rules.spec(("batch",) + (None,) * (v.ndim - 1))
            out[k] = jax.device_put(v, NamedSharding(mesh, spec))
        return out

    return put


def build_model_parts(cfg: TrainConfig):
    mesh, student, teacher, tokenizer = build_models(cfg)
    optimizer = make_optimizer(cfg.optimizer)
    s_graphdef, train_state = init_train_state(student, optimizer)
    t_graphdef, t_state = nnx.split(teacher) if teacher is not None else (None, None)
    stop_ids = set(cfg.rollout.stop_ids)
    if tokenizer.eos_token_id is not None:
        stop_ids.add(int(tokenizer.eos_token_id))
    sampler = Sampler(student, stop_ids=sorted(stop_ids), pad_id=tokenizer.pad_token_id or 0,
                      prompt_buckets=cfg.rollout.prompt_buckets)
    step = make_train_step(s_graphdef, optimizer, obj_cfg=cfg.objective, micro_batch=cfg.train.micro_batch,
                           chunk=cfg.train.logprob_chunk)
    models = Models(s_graphdef, t_graphdef, t_state, sampler, step,
                    batch_putter(mesh, ShardingRules.from_dict(cfg.sharding.student_rules)),
                    lambda ids: tokenizer.decode(list(map(int, ids)), skip_special_tokens=False))
    return models, train_state, tokenizer
