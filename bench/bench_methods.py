"""Methods benchmark: visible-only vs all-token encoder step time, and FLOPs per method.

1. Encoder step (forward + backward of the encoder alone) at mask ratio 0.75: MAE-style
   visible-only encoding (``forward_visible``, 25 % of the tokens) against the same encoder on
   all tokens (``forward_tokens``), for ViT-tiny and ViT-B shapes at 96^3, patch 16, batch 2.
   Target: visible-only <= 0.35x the all-token time.
2. FLOPs per sample (one training step: forward + backward, batch 1) for each method at the
   paper shapes (96^3 input, ViT-B, MiM with L=3, gamma=4, level sizes 384/96/16), counted with
   ``torch.utils.flop_counter.FlopCounterMode``, with the measured step time beside them.

Run (CPU; results go to a dated file in bench/results/ and bench/RESULTS.md by hand)::

    .venv/bin/python bench/bench_methods.py --threads 2 --reps-tiny 10 --reps-base 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from bench_method_overhead import time_pair as interleaved_times  # bench/ is on sys.path when run as a script
from torch.utils.flop_counter import FlopCounterMode

from raymim.config import ModelConfig, RaymimConfig, method_config
from raymim.masking import random_masking
from raymim.methods import build_method
from raymim.models import ViTEncoder

SHAPES = {
    "vit-tiny": dict(hidden_size=192, mlp_dim=768, num_layers=12, num_heads=3),
    "vit-base": dict(hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12),
}


def _time_pair(fn_a, fn_b, reps: int) -> tuple[float, float]:
    """Interleaved timings, minimum of ``reps`` each (robust to a shared, noisy CPU)."""
    fn_a(), fn_b()  # warm-up
    ta, tb = interleaved_times(fn_a, fn_b, reps)
    return min(ta), min(tb)


def encoder_step_times(shape: str, reps: int, img: int = 96, batch: int = 2) -> dict:
    torch.manual_seed(0)
    enc = ViTEncoder(1, img, 16, **SHAPES[shape])
    x = torch.rand(batch, 1, img, img, img)
    m = random_masking(batch, enc.num_tokens, 0.75)

    def visible() -> None:
        enc.zero_grad(set_to_none=True)
        enc.forward_visible(x, m.ids_keep).float().pow(2).mean().backward()

    def full() -> None:
        enc.zero_grad(set_to_none=True)
        enc.forward_tokens(x).float().pow(2).mean().backward()

    t_vis, t_all = _time_pair(visible, full, reps)
    return {"shape": shape, "tokens": enc.num_tokens, "visible_s": t_vis, "all_s": t_all, "ratio": t_vis / t_all}


def paper_config(name: str, backbone: str = "vit") -> RaymimConfig:
    model = ModelConfig(backbone=backbone, img_size=96, patch_size=16, **SHAPES["vit-base"])
    ratio = {"mae": 0.75, "simmim": 0.6, "mim": 0.6}[name]
    levels = {"levels": 3, "level_sizes": [384, 96, 16], "gamma": 4} if name in ("mim", "mps_ams") else {}
    method = method_config(name, mask_ratio=ratio, **levels)
    return RaymimConfig(model=model, method=method)


def method_flops(name: str, backbone: str) -> dict:
    torch.manual_seed(0)
    method = build_method(name, paper_config(name, backbone))
    batch = {"image": torch.rand(1, 1, 96, 96, 96)}
    counter = FlopCounterMode(display=False)
    t0 = time.perf_counter()
    with counter:
        out = method(batch)
        out.loss.backward()
    step = time.perf_counter() - t0
    params = sum(p.numel() for p in method.parameters()) / 1e6
    enc_params = sum(p.numel() for p in method.encoder.parameters()) / 1e6
    return {
        "method": name,
        "backbone": backbone,
        "gflops_per_sample": counter.get_total_flops() / 1e9,
        "step_s": step,
        "params_m": params,
        "encoder_params_m": enc_params,
        "volumes_per_sample": float(out.metrics.get("volumes_per_sample", 1.0)),  # metrics are 0-d tensors
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps-tiny", type=int, default=10)
    p.add_argument("--reps-base", type=int, default=3)
    p.add_argument("--skip-flops", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor()}))
    for shape, reps in (("vit-tiny", args.reps_tiny), ("vit-base", args.reps_base)):
        print(json.dumps(encoder_step_times(shape, reps)), flush=True)
    if not args.skip_flops:
        for name, backbone in (
            ("mae", "vit"),
            ("simmim", "vit"),
            ("simmim", "swin"),
            ("mim", "vit"),
            ("mim", "convvit"),
        ):
            print(json.dumps(method_flops(name, backbone)), flush=True)


if __name__ == "__main__":
    main()
