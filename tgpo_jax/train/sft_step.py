"""The jitted supervised fine-tuning step: token-mean cross-entropy on (prompt, solution) pairs,
with the same chunked log-probs, micro-batch scan and optimizer as the TGPO train step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tgpo_jax.objectives.logprobs import student_stats
from tgpo_jax.train.score import response_hidden
from tgpo_jax.train.step import TrainState, split_micro_batches


def _sft_micro_loss(params, graphdef, mb, denom, chunk: int):
    """sum_t -log pi(y_t | x, y_<t) over solution tokens / denom (the mini-batch's token count)."""
    model = nnx.merge(graphdef, params)
    h = response_hidden(model, mb["prompt"], mb["prompt_mask"], mb["tokens"], mb["mask"], remat=True)
    cfg = model.cfg
    y = mb["tokens"]
    stats = student_stats(
        h,
        model.lm_head_EV(),
        y,
        jnp.zeros(y.shape + (0,), jnp.int32),
        chunk=chunk,
        valid_vocab=cfg.valid_vocab_size or cfg.vocab_size,
    )
    mask = mb["mask"].astype(jnp.float32)
    return -jnp.sum(stats.logp_BT * mask) / denom


def sft_step(graphdef, optimizer, state: TrainState, minibatch, *, micro_batch: int, chunk: int):
    mb_M = split_micro_batches(minibatch, micro_batch)  # strided: see its docstring
    denom = jnp.maximum(minibatch["mask"].sum().astype(jnp.float32), 1.0)
    grad_fn = jax.value_and_grad(_sft_micro_loss)

    def body(acc, mb):
        loss, g = grad_fn(state.params, graphdef, mb, denom, chunk)
        return (jax.tree.map(jnp.add, acc[0], g), acc[1] + loss), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), mb_M)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1), {"sft/loss": loss, "sft/grad_norm": optax.tree.norm(grads)}


def make_sft_step(graphdef, optimizer, *, micro_batch: int, chunk: int = 256):
    fn = functools.partial(sft_step, graphdef, optimizer, micro_batch=micro_batch, chunk=chunk)
    return jax.jit(fn, donate_argnums=(0,))
