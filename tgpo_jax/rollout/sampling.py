"""Per-step token selection: temperature, top-k, top-p, min-p, greedy; pure functions on [B, V]."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. temperature 0 means greedy. top_k 0 and top_p 1 and min_p 0 are off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    n: int = 1  # samples per prompt (the GRPO group)
    stop_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS

    def __post_init__(self):
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p={self.min_p} must be in [0, 1)")
        if self.max_new_tokens < 1 or self.n < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} and n={self.n} must be >= 1")
        if problems:
            raise ValueError("bad sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def processed_logits(logits_BV: jax.Array, p: SamplingParams) -> jax.Array:
    """The logits of the distribution actually sampled from: logits / temperature, with tokens
    outside the top-k, outside the top-p nucleus or below min_p * max prob set to -inf."""
    x = logits_BV.astype(jnp.float32) / (p.temperature if not p.greedy else 1.0)
    if p.top_k > 0 and p.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, p.top_k)[0][..., -1:]
        x = jnp.where(x < kth, NEG_INF, x)
    if p.top_p < 1.0:
        x = _nucleus(x, p.top_p)
    if p.min_p > 0.0:
        logp = jax.nn.log_softmax(x, -1)
        x = jnp.where(logp < jnp.log(p.min_p) + jnp.max(logp, -1, keepdims=True), NEG_INF, x)
    return x


def _nucleus(x_BV: jax.Array, top_p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p (always >= 1)."""
    sorted_desc = -jnp.sort(-x_BV, axis=-1)
    probs = jax.nn.softmax(sorted_desc, -1)
    mass_before = jnp.cumsum(probs, -1) - probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), -1, keepdims=True)
    return jnp.where(x_BV < threshold, NEG_INF, x_BV)


def _last_positive(x_BN: jax.Array) -> jax.Array:
    """Index of the last entry > 0 in each row."""
    n = x_BN.shape[-1]
    return n - 1 - jnp.argmax((x_BN > 0)[:, ::-1], axis=-1)


def inverse_cdf_sample(logp_BV: jax.Array, u_B: jax.Array, block: int = 1024) -> jax.Array:
    """Draws one token per row from exp(logp) with one uniform u per row, by inverting the CDF in
    two levels (blocks of the vocabulary, then tokens within the chosen block) so that fp32
    cumulative sums stay short. One uniform per row instead of a Gumbel per vocabulary entry."""
    B, V = logp_BV.shape
    nb = -(-V // block)
    probs = jnp.exp(jnp.pad(logp_BV, ((0, 0), (0, nb * block - V)), constant_values=-jnp.inf))
    probs_BNK = probs.reshape(B, nb, block)
    mass_BN = probs_BNK.sum(-1)
    cdf_BN = jnp.cumsum(mass_BN, -1)
    target_B = u_B * cdf_BN[:, -1]
    bi = jnp.minimum(jnp.sum(cdf_BN < target_B[:, None], -1), _last_positive(mass_BN))
    within_BK = jnp.take_along_axis(probs_BNK, bi[:, None, None], 1)[:, 0]
    rem_B = target_B - (jnp.take_along_axis(cdf_BN, bi[:, None], 1)[:, 0] - jnp.take_along_axis(mass_BN, bi[:, None], 1)[:, 0])
    wi = jnp.minimum(jnp.sum(jnp.cumsum(within_BK, -1) < rem_B[:, None], -1), _last_positive(within_BK))
    return (bi * block + wi).astype(jnp.int32)


def select(logits_BV: jax.Array, key: jax.Array, p: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """(token [B], its log-prob under the processed distribution [B])."""
    x = processed_logits(logits_BV, p)
    logp_BV = jax.nn.log_softmax(x, -1)
    if p.greedy:
        tok = jnp.argmax(x, -1).astype(jnp.int32)
    else:
        tok = inverse_cdf_sample(logp_BV, jax.random.uniform(key, (x.shape[0],)))
    return tok, jnp.take_along_axis(logp_BV, tok[:, None], -1)[:, 0]
