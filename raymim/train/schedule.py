"""Optimiser, learning-rate schedule and precision choices for pretraining.

- AdamW with no weight decay on biases, norms, position embeddings and mask tokens (MAE recipe).
- The linear scaling rule: ``lr = base_lr x effective_batch / 256`` (MAE, MiM), where the
  effective batch is ``batch_size x accumulation x world_size``.
- Linear warm-up then cosine decay to zero, in optimiser steps.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from raymim.config import TrainConfig


def effective_batch(cfg: TrainConfig, world_size: int) -> int:
    return cfg.batch_size * cfg.accumulation * world_size


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """Base LR scaled by effective batch / 256 when ``cfg.scale_lr`` (the MAE rule)."""
    return cfg.lr * effective_batch(cfg, world_size) / 256 if cfg.scale_lr else cfg.lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "position" in name or "pos_embed" in name or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, world_size: int) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=scaled_lr(cfg, world_size),
                             betas=(0.9, 0.95))


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LR multiplier at optimiser step ``s``: linear 0->1 over warm-up, cosine 1->min_ratio after."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps))


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it, fp16 (with a grad scaler) on older GPUs, fp32 on CPU."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
