"""MedIM grounding on phantoms: does training make the report's organ and side drive the mask?

Trains ``medim`` (KDM, tiny ViT) on ``--train`` phantoms of ``--size``^3 with their reports and,
every ``--steps / 4`` steps, measures on ``--test`` held-out phantoms:

* the held-out word-region (local) InfoNCE loss in batches of 16 (chance: log 16 = 2.77);
* the *named-organ factor*: P(masked | patch is >= 25 % the organ + side a finding names, its
  lesions included) / ratio, with KDM's most-attended masking (no low-attention share) at ratios
  0.1 and 0.25, and the *lesion factor* (patches holding a lesion voxel) at 0.1;
* the same factors when each image is masked with another **same-site** image's report (shuffled
  control): an untrained attention already prefers body tissue to air (factor > 1), so grounding
  shows as own > shuffled, not as > 1;
* the same factors with a same-site report that names **none** of the own organ + side pairs
  (the *disjoint* control): words that look where the report's organ and side are give
  own > disjoint, while a map that only learned where lesions are in general gives own = disjoint;
* a site-shortcut probe: the share of same-site images whose score for report i beats image i's
  own (chance 0.50; the held-out loss can fall on site cues alone, with this at chance).

Run (CPU, about 1 s per step at 64^3 on one core; ``--fresh`` draws new phantoms every step
instead of batches from ``--train`` fixed ones, about 1 s more per step)::

    .venv/bin/python bench/bench_medim_grounding.py --size 64 --patch 8 --steps 2000
    .venv/bin/python bench/bench_medim_grounding.py --size 64 --patch 8 --steps 1600 --fresh
    .venv/bin/python bench/bench_medim_grounding.py --fresh --negatives domain --keys stats --steps 800 --evals 8
    .venv/bin/python bench/bench_medim_grounding.py --train 960 --test 96 --local finding \
        --keys position --values prior --steps 1200 --prior-cache .cache-bench/prior_960_96.pt
    .venv/bin/python bench/bench_medim_grounding.py --train 192 --test 96 --local finding --tau 0.1 \
        --keys position --values prior_score --steps 600 --prior-cache .cache-bench/prior_192_96.pt
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymim.config import ModelConfig, PrepareConfig  # noqa: E402
from raymim.data.synth import LESION  # noqa: E402
from raymim.masking.report_guided import report_guided_masking  # noqa: E402
from raymim.masking.selection import lesion_token_mask  # noqa: E402
from raymim.methods import build_method  # noqa: E402
from raymim.methods.medim import finding_groups, finding_loss, reads_prior, word_region_scores  # noqa: E402
from tests.methods.conftest import tiny_config  # noqa: E402
from tests.methods.phantoms import (  # noqa: E402
    disjoint_reports,
    fit_phantom_prior,
    lesion_masking_factor,
    named_patches,
    phantom_batch,
    phantom_priors,
)


def train_pool(n: int, size: int, pool: ProcessPoolExecutor | None) -> tuple[torch.Tensor, list[str]]:
    """``n`` training phantoms (sites cycle 0, 1, 2 by index), drawn in chunks of 48 (on ``pool`` if any)."""
    chunks = [(min(48, n - s), size, 10_000 + s) for s in range(0, n, 48)]
    parts = list((pool.map if pool else map)(phantom_batch, *zip(*chunks, strict=True)))
    return torch.cat([p[0] for p in parts]), [r for p in parts for r in p[2]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--test", type=int, default=36)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tau", type=float, default=0.2, help="method.tau of the alignment losses")
    ap.add_argument("--seed", type=int, default=0, help="torch seed: initialisation and batch order")
    ap.add_argument("--keys", default="embed", choices=["embed", "tokens", "stats", "prior", "prior_position",
                                                                  "position"])
    ap.add_argument("--values", default="keys", choices=["keys", "separate", "prior", "prior_score"],
                    help="method.medim_values")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="new phantoms every step (no fixed training set)")
    ap.add_argument("--negatives", default="batch", choices=["batch", "domain"], help="method.medim_negatives")
    ap.add_argument("--local", default="report", choices=["report", "finding"], help="method.medim_local")
    ap.add_argument("--align-only", action="store_true",
                    help="train the word-region loss alone (no MAE, no report-image loss), as the CI test does")
    ap.add_argument("--evals", type=int, default=4, help="evaluations over the run (plus one before it)")
    ap.add_argument("--save", help="write the trained method's state_dict here")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the phantoms are drawn on the CPU)")
    ap.add_argument("--workers", type=int, default=1, help="processes drawing the phantoms and their priors")
    ap.add_argument("--hidden", type=int, default=48, help="ViT width (text width follows)")
    ap.add_argument("--layers", type=int, default=2, help="ViT depth")
    ap.add_argument("--prior-cache", help="--keys prior: load the priors from this file if it exists, else save them")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop training after this (final evaluation); --evals are then spread evenly in time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    pool = ProcessPoolExecutor(args.workers) if args.workers > 1 else None  # one for the whole run
    train_i, train_r = (None, None) if args.fresh else train_pool(args.train, args.size, pool)
    test_i, test_l, test_r = phantom_batch(args.test, args.size, seed=11)
    cfg = tiny_config("medim", mask_ratio=0.75, medim_keys=args.keys, medim_negatives=args.negatives,
                      medim_values=args.values, medim_local=args.local, tau=args.tau,
                      text_dim=args.hidden, text_max_len=48)
    cfg.model = ModelConfig(img_size=args.size, patch_size=args.patch, hidden_size=args.hidden,
                            mlp_dim=2 * args.hidden, num_layers=args.layers, num_heads=4,
                            decoder_hidden_size=48, decoder_layers=1, decoder_heads=4)
    train_p = test_p = prior_cfg = None
    if reads_prior(cfg.method):  # the MPS population prior (8^3 patches)
        t0 = time.perf_counter()
        prior_cfg = PrepareConfig(crop_size=[args.size] * 3, lesion_prior=True, prior_patch=8)
        cache = Path(args.prior_cache) if args.prior_cache else None
        if cache is not None and cache.exists():  # same phantoms (seeded), priors computed elsewhere
            test_p, train_p = torch.load(cache).values()
            if len(test_p) != len(test_i) or (train_i is not None and len(train_p) != len(train_i)):
                raise SystemExit(f"{cache} holds priors for other --test / --train sizes.")
        if cache is None or not cache.exists() or args.fresh:
            fit_i, _, _ = phantom_batch(48, args.size, seed=12)
            model = fit_phantom_prior(fit_i, prior_cfg)
        if cache is None or not cache.exists():
            test_p = phantom_priors(test_i, prior_cfg, model, pool)
            train_p = None if train_i is None else phantom_priors(train_i, prior_cfg, model, pool)
            if cache is not None:
                torch.save({"test": test_p, "train": train_p}, cache)
        print(f"MPS prior for {len(test_i) + (0 if train_i is None else len(train_i))} phantoms: "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    named = named_patches(test_l, test_r, args.patch)
    lesion = lesion_token_mask(test_l, args.patch, LESION)
    shuffled = [test_r[(i + 3) % len(test_r)] for i in range(len(test_r))]  # a same-site report
    disjoint = disjoint_reports(test_r)  # a same-site report naming none of the own organ + side pairs
    site = torch.arange(args.test) % 3  # phantom_batch cycles the sites
    same_site = (site[:, None] == site[None, :]) & ~torch.eye(args.test, dtype=torch.bool)
    torch.manual_seed(args.seed)
    method = build_method("medim", cfg).to(dev)
    test_i = test_i.to(dev)
    named, lesion, same_site = named.to(dev), lesion.to(dev), same_site.to(dev)
    if train_i is not None:
        train_i = train_i.to(dev)
    if test_p is not None:
        test_p = test_p.to(dev)
    opt = torch.optim.AdamW(method.parameters(), lr=args.lr)
    print(f"chance local loss log({args.batch}) = {math.log(args.batch):.2f}")
    print("| step | held-out local loss report / finding | named factor @0.1 own / shuffled / disjoint "
          "| @0.25 own / shuffled / disjoint | lesion factor @0.1 own / shuffled | same-site above own | s |\n"
          "|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    evals_done = 0
    for step in range(args.steps + 1):
        elapsed = time.perf_counter() - start
        if args.max_minutes is not None and elapsed > 60 * args.max_minutes:
            args.steps = step  # out of time: evaluate, save and stop here
        if args.max_minutes is None:
            due = step % max(1, args.steps // args.evals) == 0
        else:  # evenly in time: --evals evaluations over --max-minutes
            due = elapsed >= 60 * args.max_minutes * evals_done / args.evals
        if due or step == args.steps:
            evals_done += 1
            method.eval()
            with torch.no_grad():
                own = method.report_attention(test_i, test_r, test_p)
                other = method.report_attention(test_i, shuffled, test_p)
                apart = method.report_attention(test_i, disjoint, test_p)
                b = args.batch
                # Both local losses, in held-out batches of b (the method's own loss code, no negatives mask).
                slices = [torch.arange(len(test_i), device=dev) // b == k for k in range(len(test_i) // b)]
                local = [float(method.local_loss(own, rows, None, "report")) for rows in slices]
                found = [float(method.local_loss(own, rows, None, "finding")) for rows in slices]
                if evals_done == 1:  # equal scores: the finding loss's chance level
                    enc = own["enc"]
                    chance = [float(finding_loss(torch.zeros(b, b, own["q"].shape[1], device=dev),
                                                 *finding_groups(enc.keyword[rows], enc.sentence[rows],
                                                                 own["q_sentence"][rows], own["q_valid"][rows]),
                                                 cfg.method.tau))
                              for rows in slices]
                    print(f"chance held-out finding loss = {sum(chance) / len(chance):.3f}", flush=True)
                # Shortcut probe: how often a same-site image outscores report i's own image (chance 0.5).
                full = word_region_scores(own["q"], own["q_valid"], own["keys"], own["values"])
                above = float(((full > full.diag()[:, None]) & same_site).sum() / same_site.sum())
                has = torch.ones(len(test_i), dtype=torch.bool, device=dev)
                f = {}  # (ratio, control, region) -> factor
                for ratio in (0.1, 0.25):
                    for name, amap in (("own", own["map"]), ("shuffled", other["map"]), ("disjoint", apart["map"])):
                        mask = report_guided_masking(amap, ratio, 0.0, has).mask.bool()
                        for region, where in (("named", named), ("lesion", lesion)):
                            f[ratio, name, region] = lesion_masking_factor(mask, where, ratio)
            method.train()
            print(f"| {step} | {sum(local) / len(local):.3f} / {sum(found) / len(found):.3f} "
                  + "".join(f"| {f[r, 'own', 'named']:.2f} / {f[r, 'shuffled', 'named']:.2f} / "
                            f"{f[r, 'disjoint', 'named']:.2f} " for r in (0.1, 0.25))
                  + f"| {f[0.1, 'own', 'lesion']:.2f} / {f[0.1, 'shuffled', 'lesion']:.2f} "
                  f"| {above:.2f} | {time.perf_counter() - start:.0f} |", flush=True)
        if step == args.steps:
            if args.save:
                torch.save(method.state_dict(), args.save)
            break
        if args.fresh:
            bi, _, br = phantom_batch(args.batch, args.size, seed=1000 + step)
            extra = {} if prior_cfg is None else {"lesion_prob": phantom_priors(bi, prior_cfg, model, pool)}
            out = method({"image": bi.to(dev), "report": br, "domain": [f"site{i % 3}" for i in range(args.batch)],
                          **extra})
        elif args.align_only:
            idx = torch.randperm(args.train)[: args.batch]
            r = method.report_attention(train_i[idx], [train_r[i] for i in idx.tolist()],
                                        None if train_p is None else train_p[idx])
            loss = method.local_loss(r, r["q_valid"].any(1), None)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 250 == 0:
                print(f"  train step {step}: loss_local {float(loss.detach()):.3f}", flush=True)
            continue
        else:
            idx = torch.randperm(args.train)[: args.batch]
            extra = {} if train_p is None else {"lesion_prob": train_p[idx]}
            out = method({"image": train_i[idx], "report": [train_r[i] for i in idx.tolist()],
                          "domain": [f"site{i % 3}" for i in idx.tolist()], **extra})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 250 == 0:
            print(f"  train step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.metrics.items()
                                                       if k.startswith("loss")), flush=True)


    if pool is not None:
        pool.shutdown()


if __name__ == "__main__":
    main()
