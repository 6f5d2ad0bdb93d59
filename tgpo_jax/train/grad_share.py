"""The teacher term's share of the gradient, measured on demand (`logging.grad_share_every`).

Definition: g = grad of the objective's loss on a mini-batch, g_rest = the same gradient with every
teacher coefficient set to 0 (lambda_k = 0 for TGPO-Reg / -Adv / -MC / forward top-K, kdrl_beta = 0
for KDRL), g_teacher = g - g_rest: exactly the part of the update the teacher term adds (for
TGPO-Adv, whose teacher term sits inside the clipped surrogate, it is the change the teacher bonus
makes to the advantage's gradient). Logged:

  teacher/grad_norm       ||g_teacher||
  teacher/rest_grad_norm  ||g_rest||  (outcome policy gradient + entropy bonus)
  teacher/grad_share      ||g_teacher|| / (||g_teacher|| + ||g_rest||), in [0, 1]
  teacher/grad_cos        cos(g_teacher, g_rest)

All before clipping, at the parameters the iteration starts from, on the first mini-batch of the
iteration. Objectives whose whole signal is the teacher (the RKL family: no outcome advantage) and
teacher-free ones log nothing. Cost: two extra forward/backward passes over one mini-batch, only
on the iterations asked for; the train step itself is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from tgpo_jax.objectives.advantages import teacher_coef
from tgpo_jax.objectives.batch import split_micro_batches
from tgpo_jax.objectives.registry import ObjectiveConfig
from tgpo_jax.train.step import _denominators, _micro_loss


def measurable(obj_cfg: ObjectiveConfig) -> bool:
    """A teacher term that can be switched off leaving an outcome-reward objective."""
    obj = obj_cfg.objective
    return obj.needs_teacher and obj.group_advantages


def _grads(graphdef, params, mb_M, denoms, lam, obj_cfg, chunk, temperature):
    def body(g_acc, xs):
        mb, denom = xs
        g = jax.grad(lambda p: _micro_loss(p, graphdef, mb, denom, lam, obj_cfg, chunk, temperature)[0])(params)
        return jax.tree.map(jnp.add, g_acc, g), None

    g, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), (mb_M, denoms))
    return g


def teacher_grad_share(
    graphdef, params, minibatch, iteration, *, obj_cfg: ObjectiveConfig, micro_batch, chunk, temperature=1.0
):
    mb_M = split_micro_batches(minibatch, micro_batch)
    # the train step's own denominators: per row when the mini-batch carries the authors' split
    denoms = _denominators(mb_M.mask_BT, obj_cfg, mb_M.agg_denom_B)
    lam = teacher_coef(iteration, *obj_cfg.schedule())
    g = _grads(graphdef, params, mb_M, denoms, lam, obj_cfg, chunk, temperature)
    no_teacher = dataclasses.replace(obj_cfg, kdrl_beta=0.0)
    g_rest = _grads(graphdef, params, mb_M, denoms, 0.0 * lam, no_teacher, chunk, temperature)
    g_t = jax.tree.map(jnp.subtract, g, g_rest)
    n_t, n_r = optax.tree.norm(g_t), optax.tree.norm(g_rest)
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_t), jax.tree.leaves(g_rest)))
    tiny = jnp.finfo(jnp.float32).tiny
    return {
        "teacher/grad_norm": n_t,
        "teacher/rest_grad_norm": n_r,
        "teacher/grad_share": n_t / jnp.maximum(n_t + n_r, tiny),
        "teacher/grad_cos": dot / jnp.maximum(n_t * n_r, tiny),
    }


@dataclasses.dataclass
class GradShare:
    """Callable (params, minibatch, iteration) -> metrics on iterations 1, every + 1, 2 * every + 1, ..."""

    fn: object
    every: int

    def due(self, iteration: int) -> bool:
        return self.every > 0 and (iteration - 1) % self.every == 0

    def __call__(self, params, minibatch, iteration):
        return self.fn(params, minibatch, iteration)


def make_grad_share(
    graphdef, *, obj_cfg: ObjectiveConfig, micro_batch: int, chunk: int, every: int, temperature: float = 1.0
):
    """A GradShare, or None when `every` is 0 or the objective has no separable teacher term."""
    if not every or not measurable(obj_cfg):
        return None
    fn = functools.partial(
        teacher_grad_share, graphdef, obj_cfg=obj_cfg, micro_batch=micro_batch, chunk=chunk, temperature=temperature
    )
    return GradShare(jax.jit(fn), every)
