"""One TGPO iteration, the data path of the paper:
prompts -> student rollouts -> teacher scoring -> rewards -> advantages -> mini-batch updates.

Pure orchestration over jitted pieces (sampler, score, train_step); no file I/O here."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

from tgpo_jax.objectives.advantages import grpo_advantages
from tgpo_jax.objectives.batch import Batch
from tgpo_jax.objectives.token_budget import authors_mini_batches
from tgpo_jax.rollout.sampler import Sampler
from tgpo_jax.rollout.sampling import SamplingParams
from tgpo_jax.train.score import score


@dataclasses.dataclass
class Example:
    prompt_ids: list[int]
    answer: str
    data_source: str = ""
    solution_ids: list[int] | None = None  # LUFFY off-policy trace (response tokens)


class RewardFn(Protocol):
    def submit(self, texts: Sequence[str], answers: Sequence[str]) -> Any: ...  # a future of [B] floats


@dataclasses.dataclass
class Models:
    """Everything the iteration needs from the models, already on the mesh."""

    s_graphdef: Any
    t_graphdef: Any
    t_state: Any
    sampler: Sampler
    train_step: Any  # jitted (state, minibatch: Batch, iteration) -> (state, metrics)
    put_batch: Any  # a pytree of host arrays [B, ...] (a Batch, an array) -> device arrays sharded over the batch axes
    decode: Any  # token ids -> text
    # models/vocab_map.TeacherIdMap on the mesh: what each teacher target id becomes (None: ids
    # below the student's usable vocabulary are kept, the rest masked)
    teacher_id_map: Any = None
    grad_share: Any = None  # train/grad_share.GradShare: the teacher term's share of the gradient, or None


def _replace_offpolicy(tokens_BT: np.ndarray, mask_BT: np.ndarray, examples: Sequence[Example], n: int) -> np.ndarray:
    """LUFFY: the first sample of each group becomes the teacher-written solution (truncated to
    T), in place; returns offpolicy_B, True on the replaced rows."""
    off = np.zeros(len(examples) * n, bool)
    for i, ex in enumerate(examples):
        if ex.solution_ids is None:
            continue
        row, ids = i * n, ex.solution_ids[: tokens_BT.shape[1]]
        tokens_BT[row], mask_BT[row] = 0, 0
        tokens_BT[row, : len(ids)] = ids
        mask_BT[row, : len(ids)] = 1
        off[row] = True
    return off


def _rollout_batch(r, examples: Sequence[Example], n: int, offpolicy_rows: bool) -> tuple[Batch, np.ndarray | None]:
    """The host-side rollout Batch and, for an objective with off-policy rows, offpolicy_B."""
    tokens, mask = r.tokens_BT.copy(), r.mask_BT.copy()
    off = _replace_offpolicy(tokens, mask, examples, n) if offpolicy_rows else None
    return Batch(r.prompt_tokens_BP, r.prompt_mask_BP, tokens, mask), off


def _grad_share(grad_share, params, minibatch: Batch, iteration: int) -> dict:
    """The teacher term's share of the gradient on this mini-batch (train/grad_share.py), timed."""
    t0 = time.perf_counter()
    out = {k: float(v) for k, v in jax.device_get(grad_share(params, minibatch, iteration)).items()}
    out["perf/grad_share_s"] = time.perf_counter() - t0
    return out


def _mini_batches(full: Batch, host: Batch, put, mini_batches: int, micro_batch_tokens: int, ranks: int):
    """The iteration's mini-batches (device Batches). Default: `mini_batches` contiguous row slices.
    With micro_batch_tokens > 0: the authors' mini-batches (with ranks > 1 not contiguous), each row
    carrying its aggregation denominator agg_denom_B, computed here on the host from the masks
    (objectives/token_budget.py)."""
    B = full.size
    if micro_batch_tokens <= 0:
        return [
            jax.tree.map(lambda x, j=j: x[j * B // mini_batches : (j + 1) * B // mini_batches], full)
            for j in range(mini_batches)
        ]
    resp_B = host.mask_BT.sum(-1)
    seq_B = host.prompt_mask_BP.sum(-1) + resp_B  # the budget counts prompt + response tokens (veRL)
    plan = authors_mini_batches(seq_B, resp_B, mini_batches=mini_batches, budget=micro_batch_tokens, ranks=ranks)
    denom_B = np.zeros(B, np.float32)
    for rows, denom in plan:
        denom_B[rows] = denom
    full = full.replace(agg_denom_B=put(denom_B))
    out = []
    for rows, _ in plan:
        lo = int(rows[0])
        contiguous = np.array_equal(rows, np.arange(lo, lo + len(rows)))  # always with ranks = 1
        sel = slice(lo, lo + len(rows)) if contiguous else rows  # a slice where it can: as without a budget
        out.append(jax.tree.map(lambda x, sel=sel: x[sel], full))
    return out


def run_iteration(
    models: Models,
    train_state,
    examples: Sequence[Example],
    iteration: int,
    key,
    *,
    sampling: SamplingParams,
    obj_cfg,
    reward_fn: RewardFn,
    mini_batches: int,
    chunk: int,
    score_micro_batch: int,
    micro_batch_tokens: int = 0,
    micro_batch_ranks: int = 1,
):
    """Returns (new train state, metrics dict). score_micro_batch: rows per micro-batch of the
    score step (TrainConfig.score_micro_batch_rows; divides the rollout batch). micro_batch_tokens,
    micro_batch_ranks: train.* (the authors' dynamic micro-batches; 0: off)."""
    t0 = time.perf_counter()
    # the third key was the train step's, which draws nothing: still split in 3 so that rollouts
    # and teacher samples draw the numbers they always have (runs stay comparable across versions)
    k_sample, k_score, _ = jax.random.split(jax.random.fold_in(key, iteration), 3)
    compiles0, compile_s0 = models.sampler.stats.compiles, models.sampler.stats.compile_s
    r = models.sampler.sample([ex.prompt_ids for ex in examples], sampling, k_sample, state=train_state.params)
    t_rollout = time.perf_counter() - t0 - (models.sampler.stats.compile_s - compile_s0)
    host, off = _rollout_batch(r, examples, sampling.n, obj_cfg.objective.offpolicy_rows)
    answers = [ex.answer for ex in examples for _ in range(sampling.n)]
    texts = [models.decode(t[: m.sum()]) for t, m in zip(host.tokens_BT, host.mask_BT)]
    pending = reward_fn.submit(texts, answers)  # host workers grade while the device scores
    batch = models.put_batch(host)
    scored, gap = score(
        models.s_graphdef,
        train_state.params,
        models.t_graphdef,
        models.t_state,
        batch,
        k_score,
        obj_cfg=obj_cfg,
        chunk=chunk,
        micro_batch=score_micro_batch,
        temperature=sampling.temperature,  # old log-probs of the distribution the rollouts were drawn from
        id_map=models.teacher_id_map,
    )
    rewards = np.asarray(pending.result(), np.float32)
    adv = grpo_advantages(rewards, sampling.n) if sampling.n > 1 else np.zeros_like(rewards)
    full = scored.replace(adv_B=models.put_batch(adv), offpolicy_B=None if off is None else models.put_batch(off))
    t1 = time.perf_counter()
    step_metrics = []
    share = {}
    for j, mb in enumerate(
        _mini_batches(full, host, models.put_batch, mini_batches, micro_batch_tokens, micro_batch_ranks)
    ):
        if j == 0 and models.grad_share is not None and models.grad_share.due(iteration):
            share = _grad_share(models.grad_share, train_state.params, mb, iteration)  # before the step donates it
        train_state, m = models.train_step(train_state, mb, iteration)
        step_metrics.append(m)
    step_metrics = jax.device_get(step_metrics)
    t_train = time.perf_counter() - t1
    metrics = _iteration_metrics(step_metrics, jax.device_get(gap), rewards, r, host, t_rollout, t_train)
    metrics.update(group_reward_metrics(rewards, sampling.n))
    metrics.update(share)
    metrics["perf/iteration_s"] = time.perf_counter() - t0
    metrics["perf/compile_s"] = models.sampler.stats.compile_s - compile_s0
    metrics["perf/compiles"] = models.sampler.stats.compiles - compiles0
    return train_state, metrics


def group_reward_metrics(rewards_B: np.ndarray, n: int) -> dict[str, float]:
    """The share of prompt groups (n samples of one prompt) whose rewards are all equal: their GRPO
    advantage is 0, so only a teacher term can move the student on them. all_zero: none solved."""
    if n < 2:
        return {}
    g = np.asarray(rewards_B, np.float32).reshape(-1, n)
    equal = np.all(g == g[:, :1], axis=1)
    return {
        "reward/all_equal_group_frac": float(equal.mean()),
        "reward/all_zero_group_frac": float((equal & (g[:, 0] == 0)).mean()),
    }


def _iteration_metrics(step_metrics, gap, rewards, r, host: Batch, t_rollout, t_train) -> dict[str, float]:
    out = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
    for k in ("actor/ratio_max",):
        out[k] = float(np.max([m[k] for m in step_metrics]))
    out["actor/ratio_min"] = float(np.min([m["actor/ratio_min"] for m in step_metrics]))
    out.update({k: float(v) for k, v in gap.items()})
    lengths = host.mask_BT.sum(-1)
    n_resp = int(r.mask_BT.sum())
    n_train = int(host.mask_BT.sum() + host.prompt_mask_BP.sum())
    out.update(
        {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()),
            "response/length_mean": float(lengths.mean()),
            "response/length_max": float(lengths.max()),
            "response/truncated_frac": float((r.finish_B == 1).mean()),
            "perf/rollout_s": t_rollout,
            "perf/rollout_tokens_per_s": n_resp / max(t_rollout, 1e-9),
            "perf/train_s": t_train,
            "perf/train_tokens_per_s": n_train / max(t_train, 1e-9),
        }
    )
    return out
