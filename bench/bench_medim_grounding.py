"""MedIM grounding on phantoms, full method: does training make a report's organ and side drive the mask?

Trains ``medim`` as ``jobs/configs/medim-tiny.yaml`` sets it up (64^3 whole-volume phantoms, 8^3
patches, KDM or SDM, tau 0.1, the MPS population prior) with its whole loss (MAE reconstruction,
finding loss, report-image loss) on ``--train`` phantoms, and every ``--steps / --evals`` steps
measures on ``--test`` held-out phantoms the *named-organ factor*: P(masked | patch >= 25 % inside
an organ + side its report names, lesions included) / ratio, with the most-attended masking at
ratio 0.1, for each image's own report and for a same-site report naming none of those organ +
side pairs (the *disjoint* control). Grounding shows as own > 1 (chance), own > untrained and
own > disjoint. ``tests/methods/test_medim_grounding.py`` checks the finding loss alone in CI.

Run (CPU, one thread; the priors take about 0.3 s per phantom)::

    .venv/bin/python bench/bench_medim_grounding.py --steps 300 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymim.config import PrepareConfig, load_config  # noqa: E402
from raymim.data.patch_stats import fit_prior, lesion_prob, patch_descriptors  # noqa: E402
from raymim.data.synth import disjoint_reports, named_voxels, phantom_batch  # noqa: E402
from raymim.masking.report_guided import report_guided_masking  # noqa: E402
from raymim.masking.tokens import patchify  # noqa: E402
from raymim.methods import build_method  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "medim-tiny.yaml"
RATIO = 0.1


def priors(images: torch.Tensor, cfg: PrepareConfig, model) -> torch.Tensor:
    """The MPS lesion_prob grid of every phantom [N, 1, S, S, S] -> [N, S/p, S/p, S/p]."""
    return torch.stack([torch.from_numpy(lesion_prob(v[0].numpy(), cfg, model)) for v in images])


def named_factor(method, reports: list[str], named: torch.Tensor) -> float:
    """P(masked | named patch) / ratio with each held-out image masked by ``reports``' map."""
    with torch.no_grad():
        amap = method.report_attention(reports)["map"]
    mask = report_guided_masking(amap, RATIO, 0.0, torch.ones(len(reports), dtype=torch.bool)).mask.bool()
    return float((mask & named).sum() / named.sum()) / RATIO


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--evals", type=int, default=3, help="evaluations over the run (plus one before it)")
    ap.add_argument("--train", type=int, default=192)
    ap.add_argument("--test", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0, help="torch seed: initialisation and batch order")
    ap.add_argument("--mode", default="kdm", choices=["kdm", "sdm"], help="method.medim_mode")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG, [f"method.medim_mode={args.mode}"])
    size, patch, batch = cfg.model.img_size, cfg.model.patch_size, cfg.train.batch_size
    t0 = time.perf_counter()
    prep = PrepareConfig(crop_size=[size] * 3, lesion_prior=True, prior_patch=cfg.prepare.prior_patch)
    fit_imgs, _, _ = phantom_batch(24, size, seed=12)  # the population prior, fitted apart from both sets
    model = fit_prior(np.concatenate([patch_descriptors(v[0].numpy(), prep.prior_patch) for v in fit_imgs]), prep)
    train_i, _, train_r = phantom_batch(args.train, size, seed=10)
    test_i, test_l, test_r = phantom_batch(args.test, size, seed=11)
    train_p = priors(train_i, prep, model)
    print(f"MPS prior of {args.train} phantoms: {time.perf_counter() - t0:.0f} s", flush=True)
    named = patchify(named_voxels(test_l, test_r).float(), patch).mean(-1) >= 0.25
    disjoint = disjoint_reports(test_r)
    torch.manual_seed(args.seed)
    method = build_method("medim", cfg)
    opt = torch.optim.AdamW(method.parameters(), lr=cfg.train.lr)
    print(f"medim {args.mode}, seed {args.seed}, {args.train} training / {args.test} held-out phantoms, batch {batch}")
    print("| step | named factor @0.1 own / disjoint | loss_rec | loss_local | loss_global | s |")
    print("|---|---|---|---|---|---|")
    start, last = time.perf_counter(), {}
    for step in range(args.steps + 1):
        if step % max(1, args.steps // args.evals) == 0 or step == args.steps:
            method.eval()
            own, other = named_factor(method, test_r, named), named_factor(method, disjoint, named)
            method.train()
            losses = " | ".join(f"{last.get(k, float('nan')):.3f}" for k in ("loss_rec", "loss_local", "loss_global"))
            print(f"| {step} | {own:.2f} / {other:.2f} | {losses} | {time.perf_counter() - start:.0f} |", flush=True)
        if step == args.steps:
            break
        idx = torch.randperm(args.train)[:batch]
        out = method({"image": train_i[idx], "report": [train_r[i] for i in idx.tolist()],
                      "lesion_prob": train_p[idx]})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        last = {k: float(v) for k, v in out.metrics.items()}


if __name__ == "__main__":
    main()
