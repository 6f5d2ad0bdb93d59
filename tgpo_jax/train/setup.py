"""Builds the parts of a run from its config: mesh, student and teacher on it (vocabularies
aligned, tokenizers checked), sampler, jitted train step, data, rewards and the evaluator."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tgpo_jax.configtree import ConfigError
from tgpo_jax.data import DataConfig, build_prompt_set, make_data_iterator
from tgpo_jax.eval.evaluator import EVAL_REWARD, EvalItem, evaluate
from tgpo_jax.eval.model_policy import policy_from_sampler
from tgpo_jax.models.config import ModelConfig, read_model_config
from tgpo_jax.models.hf_export import flat_params
from tgpo_jax.models.hf_import import TOKENIZER_FILES, load_tokenizer, model_from_flat
from tgpo_jax.models.tokenizer_check import check_tokenizers_agree
from tgpo_jax.models.vocab import align_vocab
from tgpo_jax.models.vocab_map import build_teacher_id_map, describe_teacher_id_map, usable_vocab_override
from tgpo_jax.rewards import RewardFn
from tgpo_jax.rollout.sampler import Sampler
from tgpo_jax.rollout.text import context_problem, stop_ids_for
from tgpo_jax.sharding import MeshConfig, ShardingRules, build_mesh, load_sharded
from tgpo_jax.sharding.distributed import put_batch, put_global
from tgpo_jax.sharding.rules import ActivationSharding, param_shardings
from tgpo_jax.train.config import TrainConfig
from tgpo_jax.train.grad_share import make_grad_share
from tgpo_jax.train.iteration import Example, Models
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


def _load(path, mesh, rules_dict, param_dtype, dtype, overrides):
    return load_sharded(
        path, mesh, ShardingRules.from_dict(rules_dict), param_dtype=param_dtype, dtype=dtype, cfg_overrides=overrides
    )


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


def build_models(cfg: TrainConfig, tokenizer=None):
    """(mesh, student, teacher or None, tokenizer). `tokenizer`: the run's, if already loaded
    (build_run loads it once for the data); else it is loaded here. jax.distributed must already
    be initialised for a multi-process run (`train` does it first)."""
    return _build_models(cfg, tokenizer)[:4]


def _student_overrides(cfg: TrainConfig, tokenizer) -> dict:
    """The student's runtime options, with its usable vocabulary: ids its tokenizer cannot produce
    are masked out of its logits (never sampled, never a log-prob target), except under
    models.teacher_oov: shared (the authors' behaviour: every embedding row)."""
    m = cfg.models
    rows = read_model_config(m.student, "models.student").vocab_size
    return m.model_overrides() | usable_vocab_override(len(tokenizer), rows, m.teacher_oov)


def _build_models(cfg: TrainConfig, tokenizer=None):
    """build_models' (mesh, student, teacher, tokenizer) and the teacher-id map on the mesh (None
    without a teacher)."""
    mesh = build_mesh(MeshConfig.from_dict(cfg.sharding.mesh))
    m = cfg.models
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(m.tokenizer or m.student)
    overrides = _student_overrides(cfg, tokenizer)
    student = _load(m.student, mesh, cfg.sharding.student_rules, m.param_dtype, m.dtype, overrides)
    teacher = id_map = None
    if cfg.objective.objective.needs_teacher:
        teacher_tok = load_tokenizer(m.teacher)
        report = check_tokenizers_agree(tokenizer, teacher_tok, allow_mismatch=m.allow_tokenizer_mismatch)
        teacher = _load(
            m.teacher,
            mesh,
            cfg.sharding.teacher_rules,
            m.teacher_param_dtype or m.param_dtype,
            m.teacher_dtype or m.dtype,
            m.model_overrides(),
        )
        teacher = _teacher_on_student_vocab(
            teacher, student.cfg, len(tokenizer), mesh, ShardingRules.from_dict(cfg.sharding.teacher_rules)
        )
        id_map = _teacher_id_map(cfg, tokenizer, teacher_tok, student, teacher, report, mesh)
    return mesh, student, teacher, tokenizer, id_map


def _teacher_id_map(cfg: TrainConfig, tokenizer, teacher_tok, student, teacher, report, mesh):
    """models/vocab_map's table over the teacher's rows, replicated on the mesh. When the tokenizers
    disagree (allowed by models.allow_tokenizer_mismatch), prints before training which tokens
    differ and how each teacher id the student's tokenizer lacks is handled."""
    mode = cfg.models.teacher_oov
    id_map = build_teacher_id_map(
        tokenizer, teacher_tok, teacher_rows=teacher.cfg.vocab_size, student_rows=student.cfg.vocab_size, mode=mode
    )
    if not report.ok and jax.process_index() == 0:
        lines = str(report).splitlines()
        lines += describe_teacher_id_map(id_map, tokenizer, teacher_tok, mode, student_rows=student.cfg.vocab_size)
        print("\n".join(f"[vocab] {line}" for line in lines))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: put_global(x, replicated), id_map)


def batch_putter(mesh, rules: ShardingRules):
    """A pytree of host arrays with a leading batch axis (a Batch, a dict, one array) -> the same
    pytree of global device arrays sharded over the batch axes; None fields (a Batch's absent
    optional fields) stay None.

    Multi-process: every process holds the same whole batch (same seeded data pipeline, same
    rollouts gathered back) and places only its own devices' rows."""

    return lambda arrays: jax.tree.map(lambda v: put_batch(v, mesh, rules), arrays)


def build_model_parts(cfg: TrainConfig, tokenizer=None):
    """(Models, initial train state, tokenizer); `tokenizer` as in build_models."""
    mesh, student, teacher, tokenizer, id_map = _build_models(cfg, tokenizer)
    optimizer = make_optimizer(cfg.optimizer)
    s_graphdef, train_state = init_train_state(student, optimizer)
    t_graphdef, t_state = nnx.split(teacher) if teacher is not None else (None, None)
    # The stop ids `tgpo-jax eval` and `sample` use too (+ rollout.stop_ids): rollouts and the in-run
    # evaluator stop where an evaluation of the exported model would.
    stop_ids = stop_ids_for(tokenizer, student.cfg, cfg.rollout.stop_ids)
    sampler = Sampler(
        student,
        stop_ids=stop_ids,
        pad_id=tokenizer.pad_token_id or 0,
        prompt_buckets=cfg.rollout.prompt_buckets,
        slots=cfg.rollout.slots,
        kv_pages=cfg.rollout.kv_pages,
        page_size=cfg.rollout.page_size,
    )
    step = make_train_step(
        s_graphdef,
        optimizer,
        obj_cfg=cfg.objective,
        micro_batch=cfg.train.micro_batch,
        chunk=cfg.train.logprob_chunk,
        state=train_state,
        temperature=cfg.rollout.temperature,  # the rollouts' sampling distribution (score: iteration.py)
    )
    models = Models(
        s_graphdef,
        t_graphdef,
        t_state,
        sampler,
        step,
        batch_putter(mesh, ShardingRules.from_dict(cfg.sharding.student_rules)),
        lambda ids: tokenizer.decode(list(map(int, ids)), skip_special_tokens=False),
        id_map,
        make_grad_share(
            s_graphdef,
            obj_cfg=cfg.objective,
            micro_batch=cfg.train.micro_batch,
            chunk=cfg.train.logprob_chunk,
            every=cfg.logging.grad_share_every,
            temperature=cfg.rollout.temperature,
        ),
    )
    return models, train_state, tokenizer


class PromptStream:
    """The data iterator as the iteration needs it: `next_batch()` -> list[Example]."""

    def __init__(self, iterator, tokenizer):
        self.it, self.tokenizer = iterator, tokenizer

    def next_batch(self) -> list[Example]:
        b = next(self.it)
        enc = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"] if s else None  # noqa: E731
        return [
            Example(p, a, s, enc(sol)) for p, a, s, sol in zip(b.prompt_ids, b.answers, b.data_sources, b.solutions)
        ]

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state) -> None:
        self.it.set_state(state)


def build_data(cfg: TrainConfig, tokenizer) -> PromptStream:
    """Fails before any model is loaded when the dataset is empty after filtering."""
    data_cfg = DataConfig.from_dict({**cfg.data, "batch_size": cfg.rollout.prompts_per_iteration})
    prompt_set = build_prompt_set(data_cfg, tokenizer)
    print(f"[data] {prompt_set.stats.summary()}")
    # Every process draws the whole global batch, in the single-process order: the rollouts are
    # gathered to every host anyway, and a multi-host run then reproduces a single-host one.
    it = make_data_iterator(data_cfg, tokenizer, prompt_set=prompt_set, process_index=0, process_count=1)
    return PromptStream(it, tokenizer)


class InRunEvaluator:
    """evaluate(params, iteration) -> {'eval/score', 'eval/<source>/accuracy', ...} on the eval set
    with the train sampler (rollout stop ids). Sampling goes through `policy_from_sampler` with seed
    train.seed in calls of `batch_size` = min(cfg.eval_batch_prompts, eval items) prompts (k rows
    each; a short last call padded to batch_size, as `tgpo-jax eval` pads), the schedule of
    `tgpo-jax eval --seed <train.seed> --batch-size <batch_size>`: every evaluation draws the same
    random numbers, so iterations differ only by the model, and the exported model scores the same
    in `tgpo-jax eval`. `last_report` keeps the latest EvalReport."""

    def __init__(self, cfg: TrainConfig, models: Models, tokenizer):
        data_cfg = DataConfig.from_dict({**cfg.data, **cfg.eval.data, "shuffle": False}, path="eval.data")
        records = build_prompt_set(data_cfg, tokenizer).records
        self.items = [
            EvalItem(r["problem"], r["answer"], r["data_source"], r["index"], r["prompt_ids"]) for r in records
        ]
        self.params = cfg.eval_sampling
        self.k, self.seed = cfg.eval.k, cfg.train.seed
        # capped at the set: a small eval set is one call of its own size, not padded up to a batch
        self.batch_size = min(cfg.eval_batch_prompts, len(self.items))
        self.progress = cfg.logging.progress and jax.process_index() == 0
        self.sampler, self.tokenizer = models.sampler, tokenizer
        self.reward = RewardFn(cfg.rewards.reward_config(EVAL_REWARD))
        self.last_report = None

    def __call__(self, train_params, iteration: int) -> dict:
        del iteration  # the same keys at every evaluation (see the class docstring)
        policy = policy_from_sampler(
            self.sampler, self.tokenizer, self.params, seed=self.seed, pad_to=self.batch_size, state=train_params
        )
        rep = evaluate(
            policy, self.items, self.k, reward_fn=self.reward, batch_size=self.batch_size, progress=self.progress
        )
        self.last_report = rep
        out = {"eval/score": rep.mean_accuracy}
        for src, s in rep.sources.items():
            out[f"eval/{src}/accuracy"] = s.accuracy
            out[f"eval/{src}/length_mean"] = s.mean_length
        return out

    def close(self) -> None:
        self.reward.close()


def build_evaluator(cfg: TrainConfig, models: Models, tokenizer):
    """An InRunEvaluator, or a no-op returning {} when there is no eval set."""
    if not cfg.eval.data:
        return lambda params, iteration: {}
    return InRunEvaluator(cfg, models, tokenizer)


def preflight(cfg: TrainConfig) -> ModelConfig:
    """Reads the models' config.json files and checks the tokenizer directory and the context length
    before any weights or tokenizer are loaded, so a wrong path or a corrupt config.json is one
    line naming its key (models.student / models.teacher / models.tokenizer). Returns the student's."""
    m = cfg.models
    student = read_model_config(m.student, "models.student")
    if cfg.objective.objective.needs_teacher:
        read_model_config(m.teacher, "models.teacher")
    tok_key, tok_dir = ("models.tokenizer", m.tokenizer) if m.tokenizer else ("models.student", m.student)
    if not os.path.isdir(tok_dir):
        raise FileNotFoundError(f"{tok_key}: tokenizer directory not found: {tok_dir}")
    if not any(os.path.exists(os.path.join(tok_dir, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{tok_key}: no tokenizer in {tok_dir}: expected one of {', '.join(TOKENIZER_FILES)}")
    prompt_len, eval_prompt_len = cfg.max_prompt_len, cfg.eval_max_prompt_len
    ctx = student.max_position_embeddings
    problems = [
        context_problem(
            prompt_len,
            cfg.rollout.max_new_tokens,
            ctx,
            prompt_desc=f"data.max_prompt_len={prompt_len}",
            new_label="rollout.max_new_tokens",
            model_label="models.student",
        )
    ]
    if cfg.eval.data:
        problems.append(
            context_problem(
                eval_prompt_len,
                cfg.eval.max_new_tokens,
                ctx,
                prompt_desc=f"the eval set's max_prompt_len={eval_prompt_len}",
                new_label="eval.max_new_tokens",
                model_label="models.student",
            )
        )
    if problems := [p for p in problems if p]:
        raise ConfigError("; ".join(problems))
    return student


def build_run(cfg: TrainConfig) -> RunParts:
    preflight(cfg)
    tokenizer = load_tokenizer(cfg.models.tokenizer or cfg.models.student)
    data = build_data(cfg, tokenizer)
    models, train_state, tokenizer = build_model_parts(cfg, tokenizer)
    reward_fn = RewardFn(cfg.rewards.reward_config())
    evaluate_fn = build_evaluator(cfg, models, tokenizer)

    def close():
        reward_fn.close()
        getattr(evaluate_fn, "close", lambda: None)()

    return RunParts(models, train_state, tokenizer, data, reward_fn, evaluate_fn, close)
