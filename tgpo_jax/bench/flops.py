"""Analytic cost models of a train step (no jax import): parameter counts, model FLOPs (for MFU) and
the memory a full-logits loss must hold."""

from __future__ import annotations

import math


def param_count(cfg) -> int:
    """All parameters of a ModelConfig's decoder (a tied embedding counted once)."""
    from tgpo_jax.models.params import param_specs

    return sum(math.prod(spec.shape) for spec in param_specs(cfg).values())


def model_flops(cfg, s) -> dict:
    """Model FLOPs of one optimizer step on a mini-batch of shape `s` (the train-step bench's
    Settings: batch B, prompt_len P, response_len T, seq_len P + T), forward + backward = 3 x
    forward, rematerialisation NOT counted (per-layer remat and the chunked log-prob recompute add
    about one more forward):

        body      = 6 * N_layers * B * (P + T)      N_layers = all decoder-layer weights
        lm_head   = 6 * E * V * B * T               logits only at the T response positions
        attention = 12 * layers * H * D * (P + T)^2 * B   QK^T and PV over the whole score matrix

    The attention term counts the causal upper half too, although the query-block, cuDNN and fused
    CPU kernels skip most of it: the MFU compares attention kernels on one scale, it is not the
    share of the work actually done.
    """
    E, V = cfg.hidden_size, cfg.vocab_size
    n_embed = V * E * (1 if cfg.tie_word_embeddings else 2)
    n_layers = param_count(cfg) - n_embed - E  # minus the final norm
    L = s.seq_len
    body = 6 * n_layers * s.batch * L
    head = 6 * E * V * s.batch * s.response_len
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * L * L * s.batch
    return dict(
        flops_body=body,
        flops_lm_head=head,
        flops_attention=attn,
        flops_per_step=body + head + attn,
        params_layers=n_layers,
    )


def full_logits_bytes(cfg, s) -> dict:
    """What the full-logits path must hold, analytically (fp32): the logits tensor [b, P+T, V] of
    one forward; a lower bound on its peak is three such tensors (logits, log_softmax, and the
    gradient flowing back through them), before any activation, weight or optimizer memory."""
    one_batch = s.batch * s.seq_len * cfg.vocab_size * 4
    one_micro = s.micro_batch * s.seq_len * cfg.vocab_size * 4
    return dict(
        full_logits_tensor_bytes=one_batch,
        full_logits_lower_bound_bytes=3 * one_batch,
        full_logits_micro_batch_tensor_bytes=one_micro,
        full_logits_micro_batch_lower_bound_bytes=3 * one_micro,
    )
