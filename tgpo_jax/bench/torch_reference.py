"""The train-step benchmark's peer: the TGPO-Reg loss written plainly in PyTorch on transformers'
model, the way a straightforward implementation would (full logits, no chunking, no compile).

Per micro-batch: full logits [b, P+T, V] -> log_softmax over the response positions -> gather
log pi(y), log pi(teacher id), full-vocab entropy -> PPO clip + lambda * CE - entropy_coef * H,
token mean over the mini-batch's valid tokens, backward; gradients accumulated over micro-batches,
`clip_grad_norm_(1.0)`, `torch.optim.AdamW` (the defaults of our OptimizerConfig).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from tgpo_jax.bench.harness import rss_now


@dataclasses.dataclass(frozen=True)
class TorchStepSpec:
    prompt_len: int
    micro_batch: int
    lr: float
    lam: float  # the teacher coefficient lambda of the step
    clip_eps: float
    entropy_coef: float
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None: os.cpu_count()
    grad_ckpt: bool = False


def load_model(model_dir: str, spec: TorchStepSpec):
    """transformers' model of `model_dir` in fp32, in train mode (dropout is 0 in these configs;
    train mode is what gradient checkpointing needs)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(spec.threads or os.cpu_count() or 1)
    torch.manual_seed(spec.seed)
    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.train()
    if spec.grad_ckpt:
        hf.gradient_checkpointing_enable()
    hf.config.use_cache = False
    return hf


def prepare_torch_step(model_dir: str, minibatch: dict[str, np.ndarray], spec: TorchStepSpec):
    """(one optimizer step on `minibatch` -> its loss, info) for the model in `model_dir`."""
    import torch

    hf = load_model(model_dir, spec)
    opt = torch.optim.AdamW(hf.parameters(), lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    d = {k: torch.from_numpy(v) for k, v in minibatch.items()}
    input_ids = torch.cat([d["prompt"], d["tokens"]], 1).long()
    attn = torch.cat([d["prompt_mask"], d["mask"]], 1).long()
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    mask = d["mask"].float()
    denom = mask.sum().clamp(min=1.0)  # token mean over the whole mini-batch (our default aggregation)
    batch, b = input_ids.shape[0], spec.micro_batch

    def micro_loss(sl: slice):
        logits = hf(
            input_ids=input_ids[sl], attention_mask=attn[sl], position_ids=position_ids[sl], use_cache=False
        ).logits  # [b, P+T, V]: the full logits
        return tgpo_reg_loss(logits, {k: v[sl] for k, v in d.items()}, mask[sl], denom, spec)

    def one_step() -> float:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, batch, b):
            loss = micro_loss(slice(i, i + b))
            loss.backward()
            total += float(loss.detach())
            del loss
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        return total

    return one_step, dict(
        rss_before_bytes=rss_now(),
        threads=torch.get_num_threads(),
        attn_implementation=getattr(hf.config, "_attn_implementation", None),
    )


def tgpo_reg_loss(logits, d: dict, mask, denom, spec: TorchStepSpec):
    """The micro-batch's share of the mini-batch's token-mean TGPO-Reg loss, from full logits."""
    import torch

    P, T = spec.prompt_len, d["tokens"].shape[1]
    logp_all = torch.log_softmax(logits[:, P - 1 : P + T - 1].float(), -1)
    logp = logp_all.gather(-1, d["tokens"].long()[..., None])[..., 0]
    logp_teacher = logp_all.gather(-1, d["teacher_ids"].long()[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp(logp - d["old_logp"])
    adv = d["adv_B"][:, None]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - spec.clip_eps, 1 + spec.clip_eps))
    ce = -logp_teacher * d["teacher_valid"]
    per_token = pg + spec.lam * ce - spec.entropy_coef * entropy
    return (per_token * mask).sum() / denom


__all__ = ["TorchStepSpec", "prepare_torch_step", "tgpo_reg_loss"]
