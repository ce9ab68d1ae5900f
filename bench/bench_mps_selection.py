"""MPS lesion masking on phantoms: how often lesion-holding patches are masked, against random masking.

For each phantom seed (``--cases`` phantoms of ``--size``^3, 1-3 lesions each, label 8), each
prior-mode clustering (``raymim.data.patch_stats``: intensity + Hessian blobness descriptors,
scikit-learn k-means / agglomerative / DBSCAN) and each scope (``population``: one model fitted
on the pooled patches of the seed's phantoms, as ``raymim prepare`` fits it on its sample;
``volume``: the paper's per-image clustering, the baseline), the factor is

    P(patch masked | patch holds a lesion voxel) / P(patch masked)   at mask ratio --ratio,

measured in the same run for random masking (the baseline, ~1.0x) and MPS. Also the seconds per
crop the prior column adds to ``raymim prepare`` (one thread).

Run (CPU)::

    .venv/bin/python bench/bench_mps_selection.py --cases 12 --size 64 --patch 8 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from raymim.config import PrepareConfig
from raymim.data.patch_stats import fit_prior, lesion_prob, patch_descriptors
from raymim.data.synth import phantom_batch
from raymim.masking.selection import lesion_token_mask, mps_masking
from raymim.masking.tokens import random_masking


def lesion_masking_factor(mask: torch.Tensor, lesion: torch.Tensor, ratio: float) -> float:
    """P(masked | token holds a lesion voxel) over the rate of random masking (= ratio); mask, lesion: [N, L]."""
    return float((mask.bool() & lesion).sum() / lesion.sum()) / ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--algorithms", default="kmeans,agglomerative,dbscan")
    ap.add_argument("--scopes", default="population,volume")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()}")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        img, lab, _ = phantom_batch(args.cases, size=args.size, seed=seed)
        lesion = lesion_token_mask(lab, args.patch)
        torch.manual_seed(seed)
        rand = random_masking(len(img), lesion.shape[1], args.ratio).mask
        base = lesion_masking_factor(rand, lesion, args.ratio)
        crops = [v[0].numpy() for v in img]
        t0 = time.perf_counter()
        descs = [patch_descriptors(c, args.patch) for c in crops]
        desc_s = (time.perf_counter() - t0) / len(img)
        for algo in args.algorithms.split(","):
            for scope in args.scopes.split(","):
                cfg = PrepareConfig(crop_size=[args.size] * 3, lesion_prior=True, prior_patch=args.patch,
                                    prior_algorithm=algo, prior_scope=scope)
                t0 = time.perf_counter()
                model = fit_prior(np.concatenate(descs), cfg) if scope == "population" else None
                fit_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                scores = torch.stack([torch.from_numpy(lesion_prob(c, cfg, model)).flatten() for c in crops])
                per_crop = (time.perf_counter() - t0) / len(img)
                torch.manual_seed(seed)
                factor = lesion_masking_factor(mps_masking(scores, args.ratio).mask, lesion, args.ratio)
                rows.append(dict(seed=seed, algorithm=algo, scope=scope, random=round(base, 2), mps=round(factor, 2),
                                 cluster_share=round(float((scores >= 0.5).float().mean()), 3),
                                 s_per_crop=round(per_crop, 3), descriptor_s_per_crop=round(desc_s, 3),
                                 fit_s=round(fit_s, 2)))
                print(json.dumps(rows[-1]), flush=True)
    print(f"load average after: {os.getloadavg()}")
    print("\n| seed | algorithm | scope | random | MPS prior | lesion-cluster share | s / crop | fit s |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['algorithm']} | {r['scope']} | {r['random']:.2f}x | {r['mps']:.2f}x "
              f"| {r['cluster_share']:.3f} | {r['s_per_crop']:.2f} | {r['fit_s']:.2f} |")
    for scope in args.scopes.split(","):
        for algo in args.algorithms.split(","):
            f = [r["mps"] for r in rows if r["scope"] == scope and r["algorithm"] == algo]
            print(f"{scope:10s} {algo:13s} mean {np.mean(f):.2f}x  min {min(f):.2f}x")


if __name__ == "__main__":
    main()
