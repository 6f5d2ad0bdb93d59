"""The typed (mini-)batch every TGPO step reads: rollout arrays, then what the score step adds.

One pytree class from the rollout to the train step. Optional fields are None when the selected
objective does not read them (see `Objective.scored` in registry.py): None is an empty pytree
node, so jit, `jax.tree.map` (placement, slicing into mini-batches and micro-batches) and
`jax.eval_shape` skip it, and each objective compiles to one program with no placeholder arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Batch:
    """Rows are sequences: B = batch, P = prompt length, T = response length, K = top-K width.

    Always present (the rollout):
      prompt_BP       int32 [B, P]  left-padded prompt ids
      prompt_mask_BP  int32 [B, P]  1 on real prompt tokens
      tokens_BT       int32 [B, T]  the response y (student sample, or an off-policy trace)
      mask_BT         int32 [B, T]  1 on real response tokens
    Set by the iteration (None where unused):
      adv_B           f32 [B]   GRPO group advantage of each row's reward
      offpolicy_B     bool [B]  the row is a teacher-written solution (LUFFY), not a rollout
      agg_denom_B     f32 [B]   the row's loss aggregation denominator (train.micro_batch_tokens:
                                 ranks x the response tokens of its micro-batch in the authors'
                                 dynamic split, objectives/token_budget.py); None: per micro-batch
    Set by the score step (old student = the parameters that sampled; teacher no grad):
      old_logp_BT              f32 [B, T]     log pi_old(y_t) (always: PPO ratio and its metrics)
      teacher_ids_BT           int32 [B, T]   teacher argmax (or sample) y*_t as a student id
                                              (models.teacher_oov, models/vocab_map.py); 0 where invalid
      teacher_valid_BT         f32 [B, T]     1 where y*_t stays in the teacher terms (not masked)
      teacher_logp_BT          f32 [B, T]     log pi_T(y_t)
      old_p_teacher_BT         f32 [B, T]     pi_old(y*_t) * teacher_valid
      teacher_topk_ids_BTK     int32 [B, T, K]  teacher top-K ids as student ids (0 where masked)
      teacher_topk_logp_BTK    f32 [B, T, K]    their log pi_T (MASK_VALUE where masked; entries
                                                mapped onto one student id summed into the first)
      student_topk_ids_BTK     int32 [B, T, K]  old student's top-K ids
      old_topk_logp_BTK        f32 [B, T, K]    their log pi_old
      teacher_at_student_topk_BTK f32 [B, T, K] log pi_T at the old student's top-K ids
    """

    prompt_BP: jax.Array
    prompt_mask_BP: jax.Array
    tokens_BT: jax.Array
    mask_BT: jax.Array
    adv_B: jax.Array | None = None
    offpolicy_B: jax.Array | None = None
    agg_denom_B: jax.Array | None = None
    old_logp_BT: jax.Array | None = None
    teacher_ids_BT: jax.Array | None = None
    teacher_valid_BT: jax.Array | None = None
    teacher_logp_BT: jax.Array | None = None
    old_p_teacher_BT: jax.Array | None = None
    teacher_topk_ids_BTK: jax.Array | None = None
    teacher_topk_logp_BTK: jax.Array | None = None
    student_topk_ids_BTK: jax.Array | None = None
    old_topk_logp_BTK: jax.Array | None = None
    teacher_at_student_topk_BTK: jax.Array | None = None

    @property
    def size(self) -> int:
        """B, the number of rows."""
        return self.mask_BT.shape[0]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, jax.Array]) -> Batch:
        """From arrays named by field, with or without the shape suffix ("tokens" or "tokens_BT"):
        for array files written by name (the train-step bench's .npz). Unknown names raise."""
        fields = {f.name: f.name for f in dataclasses.fields(cls)}
        fields.update({name.rsplit("_", 1)[0]: name for name in list(fields)})
        unknown = sorted(set(arrays) - set(fields))
        if unknown:
            raise KeyError(f"not Batch fields: {', '.join(unknown)}")
        return cls(**{fields[k]: v for k, v in arrays.items()})


SCORED_FIELDS = (
    "teacher_ids_BT",
    "teacher_valid_BT",
    "teacher_logp_BT",
    "old_p_teacher_BT",
    "teacher_topk_ids_BTK",
    "teacher_topk_logp_BTK",
    "student_topk_ids_BTK",
    "old_topk_logp_BTK",
    "teacher_at_student_topk_BTK",
)
"""The optional fields the score step fills on an objective's request (old_logp_BT it always fills)."""


def split_micro_batches(minibatch, micro_batch: int):
    """[B, ...] -> [M, micro_batch, ...] with M = B / micro_batch; micro-batch m holds rows
    m, m + M, m + 2M, ... (strided, not contiguous).

    Why strided: a data-parallel mesh holds the batch in contiguous row blocks, one per device. A
    contiguous split would put whole micro-batches on single devices, and the scan over them would
    gather the batch to every device and repeat each micro-batch's compute there (measured: 4x the
    ideal per-device FLOPs on 8 devices). Strided, every micro-batch is spread evenly over the
    blocks and the step runs with no gather of the batch."""
    B = jax.tree.leaves(minibatch)[0].shape[0]  # any pytree of [B, ...] arrays: a Batch, SFT's dict
    if B % micro_batch:
        raise ValueError(f"micro_batch={micro_batch} does not divide the batch of {B} sequences")
    M = B // micro_batch
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(micro_batch, M, *x.shape[1:]), 0, 1), minibatch)


def merge_micro_batches(tree_M):
    """The inverse of `split_micro_batches`: [M, micro_batch, ...] -> [B, ...] in the original row
    order (row i * M + m comes from micro-batch m, position i)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree_M)
