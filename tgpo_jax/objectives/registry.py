"""Objectives registered by name: `objective: tgpo_reg | tgpo_adv | ...` in a config selects one.

An objective owns its traits (class `Objective`): which extra token ids the current student must
score (teacher argmax, teacher top-K, old-student top-K), which Batch fields the score step must
compute (batch.py documents them), how its per-token terms are built from the loss functions in
losses.py, and how the run treats it (teacher model, lambda schedule, group advantages, LUFFY
off-policy rows). Code elsewhere asks these traits; it never compares objective names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from tgpo_jax.objectives import losses as L
from tgpo_jax.objectives.batch import SCORED_FIELDS, Batch
from tgpo_jax.objectives.logprobs import StudentStats

LOSS_AGGS = ("token_mean", "microbatch_sum")
# The teacher's distribution in the score step: "one", its own (temperature 1, the spec: the target
# the student is pulled toward does not depend on how the student samples); "rollout", logits /
# rollout.temperature like the student (the authors' veRL, compute_teacher_ref_log_prob). The same
# at rollout.temperature 1.0, the paper's setting.
TEACHER_TEMPERATURES = ("one", "rollout")


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
    teacher_temperature: str = "one"

    def __post_init__(self):
        get_objective(self.name)  # raises for an unknown name
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg={self.loss_agg!r}; accepted: {', '.join(LOSS_AGGS)}")
        if self.teacher_temperature not in TEACHER_TEMPERATURES:
            raise ValueError(
                f"teacher_temperature={self.teacher_temperature!r}; accepted: {', '.join(TEACHER_TEMPERATURES)}"
            )

    def teacher_temperature_at(self, rollout_temperature: float) -> float:
        """The temperature the score step reads the teacher at (see TEACHER_TEMPERATURES)."""
        return rollout_temperature if self.teacher_temperature == "rollout" else 1.0

    @property
    def objective(self) -> Objective:
        return get_objective(self.name)

    def schedule(self) -> tuple[float, float, float]:
        """(lambda_0, decay, lambda_min): the config's values, else the objective's defaults (0 for
        an objective without a teacher coefficient)."""
        lam0, decay = self.objective.lambda_defaults or (0.0, 0.0)
        return (
            lam0 if self.lambda_0 is None else self.lambda_0,
            decay if self.lambda_decay is None else self.lambda_decay,
            self.lambda_min,
        )


@dataclasses.dataclass(frozen=True)
class Objective:
    """An objective and every trait the rest of the code asks about; nothing outside this module
    compares objective names.

      terms(cur, batch, cfg, lam) -> {term name: [B, T]}: the per-token loss terms, built from
          losses.py; `cur` are the current student's StudentStats, `lam` the teacher coefficient.
      extra_ids(batch, cfg) -> [B, T, K]: ids whose current log-probs `terms` reads (K may be 0).
      scored: the optional Batch fields (batch.SCORED_FIELDS) the score step must fill; the rest
          stay None. old_logp_BT is always filled.
      needs_teacher: a teacher model is loaded and run by the score step.
      teacher_sample: the CE target y* is a temperature-1 teacher sample, not the argmax.
      teacher_topk(cfg) / student_topk(cfg): K of the teacher's / old student's top-K the score
          step computes (0: none).
      lambda_defaults: (lambda_0, decay) of the teacher coefficient schedule, None when the
          objective has no teacher coefficient (see `has_lambda`).
      group_advantages: the terms read the GRPO group advantage adv_B, so rollout.n must be >= 2.
          False for the RKL family, whose per-token advantage is a teacher/student log-ratio.
      offpolicy_rows: LUFFY: the first row of each group is replaced by the dataset's solution
          (data.solution_column) and the loss is sum / T_max per sequence, mean over the batch.
    """

    terms: Callable
    extra_ids: Callable
    scored: frozenset[str] = frozenset()
    needs_teacher: bool = True
    teacher_sample: bool = False
    teacher_topk: Callable = lambda cfg: 0
    student_topk: Callable = lambda cfg: 0
    lambda_defaults: tuple[float, float] | None = None
    group_advantages: bool = True
    offpolicy_rows: bool = False

    def __post_init__(self):
        unknown = self.scored - set(SCORED_FIELDS)
        if unknown:
            raise ValueError(f"not scored Batch fields: {sorted(unknown)}")
        if self.scored and not self.needs_teacher:
            raise ValueError("only an objective with a teacher has scored teacher fields")

    @property
    def has_lambda(self) -> bool:
        """Whether the terms are weighted by the scheduled teacher coefficient lambda_k."""
        return self.lambda_defaults is not None


def get_objective(name: str) -> Objective:
    """The registered objective `name`; ValueError naming the accepted ones otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; accepted: {' | '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def _none(batch: Batch, cfg):
    return jnp.zeros(batch.mask_BT.shape + (0,), jnp.int32)


def _teacher_ids(batch: Batch, cfg):
    return batch.teacher_ids_BT[..., None]


def _pg(cur: StudentStats, batch: Batch, cfg, adv_BT):
    pg, ratio, clipped = L.pg_clip(adv_BT, cur.logp_BT, batch.old_logp_BT, cfg.clip_eps_low, cfg.clip_eps_high)
    return {"pg": pg, "entropy": L.entropy_bonus(cur.entropy_BT, cfg.entropy_coef)}


def _outcome_adv(batch: Batch):
    """A_t = adv_B[b] on every real response token: [B, T]."""
    return batch.adv_B[:, None] * batch.mask_BT


def _tgpo_reg(cur, batch, cfg, lam):
    t = _pg(cur, batch, cfg, _outcome_adv(batch))
    t["ce_teacher"] = lam * L.teacher_ce(cur.extra_logp_BTK[..., 0], batch.teacher_valid_BT)
    return t


def _tgpo_adv(cur, batch, cfg, lam):
    adv = L.tgpo_adv_advantage(_outcome_adv(batch), batch.old_p_teacher_BT, batch.teacher_valid_BT, lam)
    return _pg(cur, batch, cfg, adv)


def _tgpo_fwd_topk(cur, batch, cfg, lam):
    t = _pg(cur, batch, cfg, _outcome_adv(batch))
    t["fkl_teacher"] = lam * L.forward_topk_kl(
        cur.extra_logp_BTK, batch.teacher_topk_logp_BTK, cfg.fwd_topk_student_renorm
    )
    return t


def _grpo(cur, batch, cfg, lam):
    return _pg(cur, batch, cfg, _outcome_adv(batch))


def _rkl(cur, batch, cfg, lam):
    return _pg(cur, batch, cfg, L.rkl_advantage(batch.teacher_logp_BT, batch.old_logp_BT) * batch.mask_BT)


def _rkl_centered(cur, batch, cfg, lam):
    adv = L.rkl_centered_advantage(
        batch.teacher_logp_BT, batch.old_logp_BT, batch.old_topk_logp_BTK, batch.teacher_at_student_topk_BTK
    )
    return _pg(cur, batch, cfg, adv * batch.mask_BT)


def _rkl_reg(kind):
    def terms(cur, batch, cfg, lam):
        return {
            "rkl": L.rkl_loss(cur.logp_BT, batch.teacher_logp_BT, kind),
            "entropy": L.entropy_bonus(cur.entropy_BT, cfg.entropy_coef),
        }

    return terms


def _rkl_reg_dist(cur, batch, cfg, lam):
    return {
        "rkl": L.rkl_dist(cur.extra_logp_BTK, batch.teacher_at_student_topk_BTK),
        "entropy": L.entropy_bonus(cur.entropy_BT, cfg.entropy_coef),
    }


def _kdrl(term):
    """KDRL: PG_clip(A_GRPO) - c_ent * H + beta * term(log pi(y_t), log pi_T(y_t)), beta =
    objective.kdrl_beta (constant). `kdrl`: the k2 form 0.5 * (logp_T - logp)^2 (the spec);
    `kdrl_k1`: the authors' latest code, -(logp - logp_T) (losses.kdrl_k1_term)."""

    def terms(cur, batch, cfg, lam):
        t = _pg(cur, batch, cfg, _outcome_adv(batch))
        t["kdrl"] = cfg.kdrl_beta * term(cur.logp_BT, batch.teacher_logp_BT)
        return t

    return terms


def _luffy(cur, batch, cfg, lam):
    pg = L.luffy_pg(_outcome_adv(batch), cur.logp_BT, batch.old_logp_BT, batch.offpolicy_B, cfg.luffy_gamma)
    return {"pg": pg, "entropy": L.entropy_bonus(cur.entropy_BT, cfg.entropy_coef)}


_REG = frozenset({"teacher_ids_BT", "teacher_valid_BT"})
_TEACHER_LOGP = frozenset({"teacher_logp_BT"})
_AT_STUDENT_TOPK = frozenset({"old_topk_logp_BTK", "teacher_at_student_topk_BTK"})


def _rkl_family(terms, extra_ids=_none, scored=_TEACHER_LOGP, **traits) -> Objective:
    """Reverse-KL objectives: per-token teacher/student log-ratio advantages, no group advantage."""
    return Objective(terms, extra_ids, scored, group_advantages=False, **traits)


OBJECTIVES: dict[str, Objective] = {
    "tgpo_reg": Objective(_tgpo_reg, _teacher_ids, _REG, lambda_defaults=(0.002, 1e-5)),
    "tgpo_adv": Objective(
        _tgpo_adv, _none, frozenset({"old_p_teacher_BT", "teacher_valid_BT"}), lambda_defaults=(0.02, 1e-4)
    ),
    "tgpo_mc": Objective(_tgpo_reg, _teacher_ids, _REG, teacher_sample=True, lambda_defaults=(0.002, 1e-5)),
    "tgpo_fwd_topk": Objective(
        _tgpo_fwd_topk,
        lambda b, c: b.teacher_topk_ids_BTK,
        frozenset({"teacher_topk_ids_BTK", "teacher_topk_logp_BTK"}),
        teacher_topk=lambda c: c.fwd_topk,
        lambda_defaults=(0.002, 1e-5),
    ),
    "grpo": Objective(_grpo, _none, needs_teacher=False),
    "rkl": _rkl_family(_rkl),
    "rkl_centered": _rkl_family(
        _rkl_centered, scored=_TEACHER_LOGP | _AT_STUDENT_TOPK, student_topk=lambda c: c.rkl_centered_topk
    ),
    "rkl_reg_k1": _rkl_family(_rkl_reg("k1")),
    "rkl_reg_k2": _rkl_family(_rkl_reg("k2")),
    "rkl_reg_k3": _rkl_family(_rkl_reg("k3")),
    "rkl_reg_dist": _rkl_family(
        _rkl_reg_dist,
        lambda b, c: b.student_topk_ids_BTK,
        frozenset({"student_topk_ids_BTK", "teacher_at_student_topk_BTK"}),
        student_topk=lambda c: c.rkl_dist_topk,
    ),
    "kdrl": Objective(_kdrl(L.kdrl_term), _none, _TEACHER_LOGP),
    "kdrl_k1": Objective(_kdrl(L.kdrl_k1_term), _none, _TEACHER_LOGP),
    "luffy": Objective(_luffy, _none, needs_teacher=False, offpolicy_rows=True),
}
