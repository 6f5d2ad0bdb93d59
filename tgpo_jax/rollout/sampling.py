"""Per-step token selection: temperature, top-k, top-p, min-p, greedy; pure functions on [B, V]."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


# What each sampling setting accepts: the one rule behind SamplingParams, the train / eval config
# sections and the `sample` / `eval` flags, so every entry point rejects the same values in words.
_ACCEPTED = {
    "temperature": (lambda v: v >= 0, ">= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "min_p": (lambda v: 0 <= v < 1, "in [0, 1) (0 = off)"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "n": (lambda v: v >= 1, ">= 1"),
    "k": (lambda v: v >= 1, ">= 1"),
}


def sampling_problems(*, style: str = "key", prefix: str = "", **values) -> list[str]:
    """One message per out-of-range sampling setting among `values` (names as in _ACCEPTED).
    style "key": named `prefix + name` (config keys, e.g. prefix "rollout."); style "flag": named
    `--name-with-dashes` (command-line flags)."""
    out = []
    for name, value in values.items():
        ok, accepted = _ACCEPTED[name]
        if not ok(value):
            label = "--" + name.replace("_", "-") if style == "flag" else prefix + name
            out.append(f"{label}={value!r}: must be {accepted}")
    return out


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
        problems = sampling_problems(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            max_new_tokens=self.max_new_tokens,
            n=self.n,
        )
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


def _cumsum(x_BN: jax.Array) -> jax.Array:
    """Inclusive cumulative sum along the last axis as a product with a triangular 0/1 matrix: one
    GEMM instead of XLA's quadratic reduce-window lowering. fp32 products (HIGHEST: no TF32)."""
    n = x_BN.shape[-1]
    tri_NN = jnp.triu(jnp.ones((n, n), x_BN.dtype))
    return jnp.matmul(x_BN, tri_NN, precision=jax.lax.Precision.HIGHEST)


def inverse_cdf_sample(weights_BV: jax.Array, u_B: jax.Array) -> jax.Array:
    """Draws one token per row with probability weights[b, v] / sum_v weights[b, v] (weights >= 0,
    unnormalised, fp32), with one uniform u per row, by inverting the CDF in two levels: blocks of
    about sqrt(V) tokens, then tokens within the chosen block (short fp32 sums, O(V) work).
    A token of weight 0 is never drawn."""
    B, V = weights_BV.shape
    block = max(8, 1 << math.ceil(math.log2(math.sqrt(V))))
    nb = -(-V // block)
    w_BNK = jnp.pad(weights_BV, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
    mass_BN = w_BNK.sum(-1)
    cdf_BN = _cumsum(mass_BN)
    target_B = u_B * cdf_BN[:, -1]
    bi = jnp.minimum(jnp.sum(cdf_BN <= target_B[:, None], -1), _last_positive(mass_BN))
    pick = lambda a: jnp.take_along_axis(a, bi[:, None], 1)[:, 0]  # noqa: E731
    within_BK = jnp.take_along_axis(w_BNK, bi[:, None, None], 1)[:, 0]
    rem_B = target_B - (pick(cdf_BN) - pick(mass_BN))
    wi = jnp.minimum(jnp.sum(_cumsum(within_BK) <= rem_B[:, None], -1), _last_positive(within_BK))
    return (bi * block + wi).astype(jnp.int32)


def select(logits_BV: jax.Array, key: jax.Array, p: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """(token [B], its log-prob under the processed distribution [B]). One exp pass over [B, V]:
    the unnormalised exp(x - max) is both the sampling weight and the normaliser's summand."""
    x = processed_logits(logits_BV, p)
    m_B1 = jnp.max(x, -1, keepdims=True)
    e_BV = jnp.exp(x - m_B1)
    if p.greedy:
        tok = jnp.argmax(x, -1).astype(jnp.int32)
    else:
        tok = inverse_cdf_sample(e_BV, jax.random.uniform(key, (x.shape[0],)))
    x_tok = jnp.take_along_axis(x, tok[:, None], -1)[:, 0]
    return tok, x_tok - m_B1[:, 0] - jnp.log(e_BV.sum(-1))
