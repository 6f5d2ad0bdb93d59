"""The jit-compiled TGPO train step: micro-batch gradient accumulation with `lax.scan`, the
selected objective, global-norm clipping and optax AdamW. The old state is donated.

A mini-batch is an objectives.batch.Batch (rollout, advantages and the score step's outputs;
fields the objective does not read are None).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from tgpo_jax.objectives.advantages import teacher_coef
from tgpo_jax.objectives.batch import Batch, split_micro_batches
from tgpo_jax.objectives.logprobs import student_stats
from tgpo_jax.objectives.losses import aggregate
from tgpo_jax.objectives.registry import ObjectiveConfig
from tgpo_jax.sharding.distributed import put_global
from tgpo_jax.train.score import response_hidden


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self):
        # Checked here so that train and sft configs (both `optimizer:` sections) reject the same
        # values; configtree.from_dict puts the section name in front ("optimizer.lr=...").
        problems = [
            f"{name}={getattr(self, name)!r}: must be {accepted}"
            for name, ok, accepted in (
                ("lr", self.lr >= 0, ">= 0 (a negative rate would ascend the loss)"),
                ("b1", 0 <= self.b1 < 1, "in [0, 1)"),
                ("b2", 0 <= self.b2 < 1, "in [0, 1)"),
                ("eps", self.eps > 0, "> 0"),
                ("weight_decay", self.weight_decay >= 0, ">= 0"),
                ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
                ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            )
            if not ok
        ]
        if problems:
            raise ValueError("; ".join(problems))


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW with a constant (optionally warmed-up) learning rate. The
    schedule starts at step 1 with the full rate (the authors' lr=0 first step is not copied)."""
    lr = cfg.lr if cfg.warmup_steps == 0 else optax.linear_schedule(cfg.lr / cfg.warmup_steps, cfg.lr, cfg.warmup_steps)
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


@struct.dataclass
class TrainState:
    params: Any  # nnx.State of the student's parameters
    opt_state: Any
    step: jax.Array  # optimizer steps taken


def opt_state_shardings(optimizer: optax.GradientTransformation, params):
    """The shardings of optimizer.init(params) on the params' mesh: every parameter-shaped leaf
    (AdamW's two moments) sharded as its parameter, the rest (counters) replicated.

    Why given explicitly: left to the compiler, `jit(optimizer.init)` returns its zeros REPLICATED
    (nothing ties a fresh zeros array to its parameter's sharding), so every device would hold all
    of AdamW's state: 11.5 GiB instead of 2.9 per device for a 1.5B student on a v5p-8."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shapes = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(
        optimizer,
        lambda _, p: p.sharding,
        shapes,
        params,
        transform_non_params=lambda _: replicated,
    )


def init_train_state(model, optimizer: optax.GradientTransformation) -> tuple[Any, TrainState]:
    graphdef, params = nnx.split(model)
    sharding = jax.tree.leaves(params)[0].sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return graphdef, TrainState(params, jax.jit(optimizer.init)(params), jnp.zeros((), jnp.int32))
    # Counters (step, Adam's count) sit on the params' mesh, replicated: a checkpoint restores them
    # committed where they were, and jit rejects mixed device sets.
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    opt_state = jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params))(params)
    return graphdef, TrainState(params, opt_state, put_global(np.zeros((), np.int32), replicated))


def _micro_loss(params, graphdef, mb: Batch, denom, lam, obj_cfg: ObjectiveConfig, chunk: int, temperature: float):
    """Loss of one micro-batch (already divided by the aggregation denominator) and its metric sums.
    The current student's log-probs and entropy are of softmax(logits / temperature), the rollout
    temperature, as the old log-probs of the score step are.

    loss = sum over the objective's terms of agg(term_BT, mask_BT) / denom; the PPO ratio
    r_t = exp(log pi(y_t) - log pi_old(y_t)) is reported (mean, clip fraction, extremes)."""
    obj = obj_cfg.objective
    model = nnx.merge(graphdef, params)
    h = response_hidden(model, mb.prompt_BP, mb.prompt_mask_BP, mb.tokens_BT, mb.mask_BT, remat=True)
    cfg = model.cfg
    cur = student_stats(
        h,
        model.lm_head_EV(),
        mb.tokens_BT,
        obj.extra_ids(mb, obj_cfg),
        chunk=chunk,
        valid_vocab=cfg.valid_vocab_size or cfg.vocab_size,
        temperature=temperature,
    )
    mask = mb.mask_BT.astype(jnp.float32)
    terms = obj.terms(cur, mb, obj_cfg, lam)
    parts = {f"loss/{k}": aggregate(v, mask, denom) for k, v in terms.items()}
    loss = sum(parts.values())
    ratio = jnp.exp(cur.logp_BT - mb.old_logp_BT)
    lo, hi = 1.0 - obj_cfg.clip_eps_low, 1.0 + obj_cfg.clip_eps_high
    big = jnp.finfo(jnp.float32).max
    stats = dict(
        parts,
        **{
            "actor/entropy": aggregate(cur.entropy_BT, mask, denom),
            "actor/ratio_mean": aggregate(ratio, mask, denom),
            "actor/clip_frac": aggregate(((ratio < lo) | (ratio > hi)).astype(jnp.float32), mask, denom),
            "actor/ratio_max": jnp.max(jnp.where(mask > 0, ratio, -big)),
            "actor/ratio_min": jnp.min(jnp.where(mask > 0, ratio, big)),
        },
    )
    return loss, stats


def _denominators(mask_MbT, obj_cfg: ObjectiveConfig, agg_denom_Mb=None):
    """Aggregation denominators from the micro-batched response mask [M, b, T]: per micro-batch
    [M], or per row [M, b] when the mini-batch carries agg_denom_B (train.micro_batch_tokens: the
    authors' dynamic micro-batches, computed on the host; the loss is then the same whatever this
    step's fixed micro-batch split)."""
    if agg_denom_Mb is not None:
        return agg_denom_Mb.astype(jnp.float32)
    mask = mask_MbT.astype(jnp.float32)
    M, b, T = mask.shape
    if obj_cfg.objective.offpolicy_rows:  # sum / T_max per sequence, mean over the mini-batch
        return jnp.full((M,), float(T * M * b))
    if obj_cfg.loss_agg == "microbatch_sum":
        return mask.sum((1, 2))
    return jnp.full((M,), mask.sum())


def train_step(
    graphdef,
    optimizer,
    state: TrainState,
    minibatch: Batch,
    iteration,
    *,
    obj_cfg: ObjectiveConfig,
    micro_batch: int,
    chunk: int,
    temperature: float = 1.0,
):
    """One optimizer step on a mini-batch; returns (new state, metrics). The objectives are
    deterministic given the batch (the teacher's sample, if any, is drawn by the score step), so
    the step takes no random key."""
    mb_M = split_micro_batches(minibatch, micro_batch)
    M = mb_M.mask_BT.shape[0]
    denoms = _denominators(mb_M.mask_BT, obj_cfg, mb_M.agg_denom_B)
    lam = teacher_coef(iteration, *obj_cfg.schedule())
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

    def body(acc, xs):
        mb, denom = xs
        (loss, stats), g = grad_fn(state.params, graphdef, mb, denom, lam, obj_cfg, chunk, temperature)
        g_acc, s_acc = acc
        return (jax.tree.map(jnp.add, g_acc, g), _accumulate(s_acc, stats)), None

    zeros_g = jax.tree.map(jnp.zeros_like, state.params)
    first = jax.tree.map(lambda x: x[0], (mb_M, denoms))
    names = jax.eval_shape(lambda: _micro_loss(state.params, graphdef, *first, lam, obj_cfg, chunk, temperature)[1])
    (grads, sums), _ = jax.lax.scan(body, (zeros_g, _initial(names)), (mb_M, denoms))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(sums)
    if obj_cfg.loss_agg == "microbatch_sum" and not obj_cfg.objective.offpolicy_rows:
        # the loss is a sum of micro-batch means; report the diagnostics as means
        n = M if minibatch.agg_denom_B is None else _authors_micro_batches(minibatch)
        metrics.update({k: v / n for k, v in sums.items() if k in _MEAN_DIAGNOSTICS})
    metrics.update(
        {
            "loss/total": sum(v for k, v in metrics.items() if k.startswith("loss/")),
            "actor/grad_norm": optax.tree.norm(grads),
        }
    )
    if minibatch.teacher_valid_BT is not None:  # objectives that read a teacher target id
        metrics["teacher/masked_ids"] = jnp.sum((1.0 - minibatch.teacher_valid_BT) * minibatch.mask_BT)
    if obj_cfg.objective.has_lambda:
        metrics["teacher/lambda"] = lam
    return TrainState(params, opt_state, state.step + 1), metrics


_MEAN_DIAGNOSTICS = ("actor/entropy", "actor/ratio_mean", "actor/clip_frac")


def _authors_micro_batches(minibatch: Batch):
    """How many micro-batches the per-row denominators stand for: each micro-batch's rows weigh
    sum(tokens) / (ranks x tokens) = 1 / ranks, so the sum over rows is their count per rank."""
    tokens_B = minibatch.mask_BT.astype(jnp.float32).sum(-1)
    return jnp.maximum(jnp.sum(tokens_B / jnp.maximum(minibatch.agg_denom_B, 1.0)), 1.0)


def _initial(names):
    """Running extremes for *_min / *_max metrics, sums for the rest."""
    return {
        k: jnp.full((), jnp.inf)
        if k.endswith("_min")
        else jnp.full((), -jnp.inf)
        if k.endswith("_max")
        else jnp.zeros((), jnp.float32)
        for k in names
    }


def _accumulate(acc, stats):
    return {
        k: jnp.minimum(acc[k], v)
        if k.endswith("_min")
        else jnp.maximum(acc[k], v)
        if k.endswith("_max")
        else acc[k] + v
        for k, v in stats.items()
    }


def pinned_out_shardings(state: TrainState):
    """The new state keeps exactly the shardings of the state it replaces (so a run resumed from a
    checkpoint, which restores into these shardings, runs the very same program), metrics
    replicated. None when the state is not on a mesh."""
    sh = jax.tree.map(lambda x: x.sharding, state)
    leaf = jax.tree.leaves(sh)[0]
    if not isinstance(leaf, jax.sharding.NamedSharding):
        return None
    return sh, jax.sharding.NamedSharding(leaf.mesh, jax.sharding.PartitionSpec())


def make_train_step(
    graphdef,
    optimizer,
    *,
    obj_cfg: ObjectiveConfig,
    micro_batch: int,
    chunk: int = 256,
    state: TrainState | None = None,
    temperature: float = 1.0,
):
    """The jitted step: (state, minibatch: Batch, iteration) -> (state, metrics); state donated.
    Pass the initial `state` to pin the output shardings to its own. temperature: the rollout
    temperature (rollout.temperature) the student's log-probs are computed at."""
    fn = functools.partial(
        train_step,
        graphdef,
        optimizer,
        obj_cfg=obj_cfg,
        micro_batch=micro_batch,
        chunk=chunk,
        temperature=temperature,
    )
    out = pinned_out_shardings(state) if state is not None else None
    if out is None:
        return jax.jit(fn, donate_argnums=(0,))
    return jax.jit(fn, donate_argnums=(0,), out_shardings=out)
