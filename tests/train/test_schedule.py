"""Optimiser pieces: LR scaling rule, warm-up + cosine, precision choice, param groups."""

from __future__ import annotations

import math

import torch

from raymim.config import TrainConfig
from raymim.train.schedule import (
    build_optimizer,
    effective_batch,
    param_groups,
    resolve_precision,
    scaled_lr,
    warmup_cosine,
)


def test_linear_scaling_rule():
    cfg = TrainConfig(lr=1e-4, batch_size=4, accumulation=8, scale_lr=True)
    assert effective_batch(cfg, 8) == 256
    assert math.isclose(scaled_lr(cfg, 8), 1e-4)
    assert math.isclose(scaled_lr(cfg, 2), 1e-4 * 64 / 256)
    assert scaled_lr(TrainConfig(lr=1e-3, scale_lr=False), 8) == 1e-3


def test_warmup_then_cosine_to_zero():
    fn = warmup_cosine(warmup_steps=10, total_steps=110)
    assert math.isclose(fn(0), 0.1) and math.isclose(fn(9), 1.0)
    assert math.isclose(fn(10), 1.0)
    assert math.isclose(fn(60), 0.5, abs_tol=1e-9)
    assert fn(110) < 1e-9
    values = [fn(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_precision_on_cpu_is_fp32_unless_asked():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.05)
    assert len(decay["params"]) == 1 and decay["weight_decay"] == 0.05
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, TrainConfig(lr=1e-3, scale_lr=False), 1)
    assert opt.param_groups[0]["lr"] == 1e-3


def test_epochs_per_pass_covers_short_runs_and_caps_long_ones():
    from raymim.config import load_config
    from raymim.train.trainer import MAX_REPEAT, PASS_BATCHES, epochs_per_pass

    tiny = load_config(None, ["train.steps=60", "train.batch_size=4", "train.num_workers=2"])
    assert epochs_per_pass(96, tiny) == 6  # 12 batches per epoch: the whole run (5 epochs) in one pass
    assert epochs_per_pass(None, tiny) == 1  # streaming: row count unknown
    big = load_config(None, ["train.steps=45000", "train.batch_size=4", "train.accumulation=8",
                             "train.num_workers=8"])
    per_epoch = 40000 // 32
    assert epochs_per_pass(40000, big) == PASS_BATCHES // per_epoch
    assert epochs_per_pass(10**7, big) == 1
    assert epochs_per_pass(12, big) == MAX_REPEAT  # tiny data, long run: 2000 batches would be 1000 copies
