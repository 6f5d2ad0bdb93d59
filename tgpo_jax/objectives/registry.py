"""Objectives registered by name: `objective: tgpo_reg | tgpo_adv | ...` in a config selects one.

An objective says which extra token ids the current student must score (teacher argmax, teacher
top-K, old-student top-K), what the score step must compute, and how its per-token terms are
built from the loss functions in losses.py. Batch keys (all [B, T] unless noted):
  mask, adv_B [B], old_logp, teacher_ids, teacher_valid, teacher_logp, old_p_teacher,
  teacher_topk_ids / teacher_topk_logp [B, T, K], student_topk_ids / old_topk_logp /
  teacher_at_student_topk [B, T, K], offpolicy_B [B].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

from tgpo_jax.objectives import losses as L
from tgpo_jax.objectives.logprobs import StudentStats

LOSS_AGGS = ("token_mean", "microbatch_sum")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "tgpo_reg"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    entropy_coef: float = 0.001
    lambda_0: float | None = None  # None: the objective's paper default
    lambda_decay: float | None = None
    lambda_min: float = 0.0
    kdrl_beta: float = 0.002
    fwd_topk: int = 20
    fwd_topk_student_renorm: bool = True
    rkl_centered_topk: int = 1024
    rkl_dist_topk: int = 100
    luffy_gamma: float = 0.1
    loss_agg: str = "token_mean"

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; accepted: {' | '.join(OBJECTIVES)}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg={self.loss_agg!r}; accepted: {', '.join(LOSS_AGGS)}")

    @property
    def objective(self) -> Objective:
        return OBJECTIVES[self.name]

    def schedule(self) -> tuple[float, float, float]:
        lam0, decay = self.objective.lambda_defaults
        return (
            lam0 if self.lambda_0 is None else self.lambda_0,
            decay if self.lambda_decay is None else self.lambda_decay,
            self.lambda_min,
        )


class Objective(NamedTuple):
    terms: Callable  # (cur: StudentStats, batch, cfg, lam) -> {term name: [B, T]}
    extra_ids: Callable  # (batch, cfg) -> [B, T, K] ids whose current log-probs `terms` reads
    needs_teacher: bool = True
    teacher_sample: bool = False
    teacher_topk: Callable = lambda cfg: 0
    student_topk: Callable = lambda cfg: 0
    lambda_defaults: tuple[float, float] = (0.0, 0.0)
    luffy_agg: bool = False


def _none(batch, cfg):
    return jnp.zeros(batch["mask"].shape + (0,), jnp.int32)


def _teacher_ids(batch, cfg):
    return batch["teacher_ids"][..., None]


def _pg(cur: StudentStats, batch, cfg, adv_BT):
    pg, ratio, clipped = L.pg_clip(adv_BT, cur.logp_BT, batch["old_logp"], cfg.clip_eps_low, cfg.clip_eps_high)
    return {"pg": pg, "entropy": L.entropy_bonus(cur.entropy_BT, cfg.entropy_coef)}


def _outcome_adv(batch):
    return batch["adv_B"][:, None] * batch["mask"]


def _tgpo_reg(cur, batch, cfg, lam):
    t = _pg(cur, batch, cfg, _outcome_adv(batch))
    t["ce_teacher"] = lam * L.teacher_ce(cur.extra_logp_BTK[..., 0], batch["teacher_valid"])
    return t


def _tgpo_adv(cur, batch, cfg, lam):
    adv = L.tgpo_adv_advantage(_outcome_adv(batch), batch["old_p_teacher"], batch["teacher_valid"], lam)
    return _pg(cur, batch, cfg, adv)


def _tgpo_fwd_topk(cur, batch, cfg, lam):
    t = _pg(cur, batch, cfg, _outcome_adv(batch))
    t["fkl_teacher"] = lam * L.forward_topk_kl(
        cur.extra_logp_BTK, batch["teacher_topk_logp"], cfg.fwd_topk_student_renorm
    )
    return t


def _grpo(cur, batch, cfg, lam):
    return _pg(cur, batch, cfg, _outcome_adv(batch))


def _rkl(cur, batch, cfg, lam):
    return _pg(cur, batch, cfg, L.rkl_advantage(batch["teacher_logp"], batch["old_logp"]) * batch["mask"])


def _rkl_centered(cur, batch, cfg, lam):
    adv = L.rkl_centered_advantage(
        batch["teacher_logp"], batch["old_logp"], batch["old_topk_logp"], batch["teacher_at_student_topk"]
    )
    return _pg(cur, batch, cfg, adv * batch["mask"])


def _rkl_reg(kind):
    def terms(cur, batch, cfg, lam):
        return {
            "rkl": L.rkl_loss(cur.logp_BT, batch["teacher_logp"], kind),
            "entropy": L.entropy_bonus(cur.entropy_BT, cfg.entropy_coef),
        }

    return terms


def _rkl_reg_dist(cur, batch, cfg, lam):
    return {
        "rkl": L.rkl_dist(cur.extra_logp_BTK, batch["teacher_at_student_topk"]),
        "entropy": L.entropy_bonus(cur.entropy_BT, cfg.entropy_coef),
    }


def _kdrl(cur, batch, cfg, lam):
    t = _pg(cur, batch, cfg, _outcome_adv(batch))
    t["kdrl"] = cfg.kdrl_beta * L.kdrl_term(cur.logp_BT, batch["teacher_logp"])
    return t


def _luffy(cur, batch, cfg, lam):
    pg = L.luffy_pg(_outcome_adv(batch), cur.logp_BT, batch["old_logp"], batch["offpolicy_B"], cfg.luffy_gamma)
    return {"pg": pg, "entropy": L.entropy_bonus(cur.entropy_BT, cfg.entropy_coef)}


OBJECTIVES: dict[str, Objective] = {
    "tgpo_reg": Objective(_tgpo_reg, _teacher_ids, lambda_defaults=(0.002, 1e-5)),
    "tgpo_adv": Objective(_tgpo_adv, _none, lambda_defaults=(0.02, 1e-4)),
    "tgpo_mc": Objective(_tgpo_reg, _teacher_ids, teacher_sample=True, lambda_defaults=(0.002, 1e-5)),
    "tgpo_fwd_topk": Objective(
        _tgpo_fwd_topk,
        lambda b, c: b["teacher_topk_ids"],
        teacher_topk=lambda c: c.fwd_topk,
        lambda_defaults=(0.002, 1e-5),
    ),
    "grpo": Objective(_grpo, _none, needs_teacher=False),
    "rkl": Objective(_rkl, _none),
    "rkl_centered": Objective(_rkl_centered, _none, student_topk=lambda c: c.rkl_centered_topk),
    "rkl_reg_k1": Objective(_rkl_reg("k1"), _none),
    "rkl_reg_k2": Objective(_rkl_reg("k2"), _none),
    "rkl_reg_k3": Objective(_rkl_reg("k3"), _none),
    "rkl_reg_dist": Objective(
        _rkl_reg_dist, lambda b, c: b["student_topk_ids"], student_topk=lambda c: c.rkl_dist_topk
    ),
    "kdrl": Objective(_kdrl, _none),
    "luffy": Objective(_luffy, _none, needs_teacher=False, luffy_agg=True),
}
