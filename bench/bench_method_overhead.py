"""Method overhead benchmark: per-step cost of MPS online clustering and MedIM's text branch vs MAE.

One training step = forward + backward + AdamW step, batch 2, the same image tensor (a phantom
volume, or uniform noise with ``--image rand``) for every variant. Each variant is timed
interleaved with a plain MAE baseline at the same shapes and the same mask ratio (0.6), after one
warm-up step per model; the ratio variant / MAE is reported for the minimum and the median of the
repetitions (the box is shared and noisy: only same-run ratios mean anything).

Variants (``levels=1`` for MPS-AMS, i.e. MAE with MPS-AMS masks):

* ``mps-embed``: per-volume covariance clustering of the patch embeddings, every step;
* ``mps-tokens``: the same on descriptors from a no-grad pass of the whole encoder on all tokens;
* ``ams-only``: ``mps_mode="none"`` (random masking at the scheduled ratio): ~1.0x, a harness check;
* ``medim-kdm`` / ``medim-sdm``: reports in the batch (keyword / sentence attention + alignment);
* ``medim-noreport``: no ``report`` key (the random-masking fallback): ~1.0x expected;

MedIM is only used through ``build_method("medim", cfg)`` and ``{"image", "report"}`` batches, so
the benchmark survives changes to its internals. ``--breakdown`` adds, per shape, a forward-time
split by top-level submodule (forward hooks) of each variant, and the cost of each part of the
online MPS scoring (embedding / encoder pass, standardisation, k-means seeding and Lloyd
iterations, nearest-centre assignment, scores, masking).

Run (CPU; results go to a dated file in bench/results/ and bench/RESULTS.md by hand; each command
takes 5-7 minutes on 2 cores)::

    .venv/bin/python bench/bench_method_overhead.py --threads 1 --shapes tiny,tiny-p8 --reps-tiny 20 --breakdown
    .venv/bin/python bench/bench_method_overhead.py --threads 1 --shapes vit-b --reps-base 3 --breakdown

``--threads 1`` on a shared 2-core box: with the other core busy, 2 intra-op threads wait on the
preempted one and a step gets 5-10x slower and erratic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import torch

from raymim.config import ModelConfig, RaymimConfig, method_config, method_configs, method_fields
from raymim.masking.selection import kmeans, lesion_scores, mps_masking, standardize
from raymim.methods import build_method

MASK_RATIO = 0.6
BATCH = 2
REPORTS = [
    "CT chest and abdomen. A 12 mm hypodense lesion in the right kidney. A 7 mm nodule in the left lung.",
    "CT chest and abdomen. A 21 mm hyperdense lesion in the right liver.",
]

SHAPES = {
    # ViT-tiny-like (DESIGN.md's CPU test shape): 64^3, 4 layers; patch 16 -> 64 tokens, 8 -> 512.
    "tiny": dict(img_size=64, patch_size=16, hidden_size=192, mlp_dim=768, num_layers=4, num_heads=3,
                 decoder_hidden_size=192, decoder_layers=2, decoder_heads=3),
    "tiny-p8": dict(img_size=64, patch_size=8, hidden_size=192, mlp_dim=768, num_layers=4, num_heads=3,
                    decoder_hidden_size=192, decoder_layers=2, decoder_heads=3),
    # ViT-B at the paper's 96^3 input, patch 16 (216 tokens), MAE decoder 384 x 4.
    "vit-b": dict(img_size=96, patch_size=16, hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12,
                  decoder_hidden_size=384, decoder_layers=4, decoder_heads=12),
}

# name -> (method registry key, fields of the method's config, batch has reports, steps per timed call)
VARIANTS: dict[str, tuple[str, dict, bool, int]] = {
    "mps-embed": ("mps_ams", dict(mps_mode="online", mps_features="embed"), False, 1),
    "mps-tokens": ("mps_ams", dict(mps_mode="online", mps_features="tokens"), False, 1),
    "ams-only": ("mps_ams", dict(mps_mode="none"), False, 1),
    "medim-kdm": ("medim", dict(medim_mode="kdm"), True, 1),
    "medim-sdm": ("medim", dict(medim_mode="sdm"), True, 1),
    "medim-noreport": ("medim", dict(medim_mode="kdm"), False, 1),
}


def _batch(img: torch.Tensor, with_report: bool) -> dict:
    """A timing batch; with reports also a ``lesion_prob`` prior on the token grid (MedIM needs it)."""
    if not with_report:
        return {"image": img}
    return {"image": img, "report": list(REPORTS), "lesion_prob": torch.rand(img.shape[0], 4, 4, 4)}


def available(variant: str) -> bool:
    """False when the variant sets a field that this version of the method's config lacks."""
    name, fields = VARIANTS[variant][:2]
    return name in method_configs() and set(fields) <= method_fields(method_configs()[name])


def make_config(shape: str, name: str, **method_kw) -> RaymimConfig:
    kw: dict = dict(mask_ratio=MASK_RATIO)
    if name == "mps_ams":
        kw.update(levels=1, mask_schedule="constant")
    kw.update(method_kw)
    return RaymimConfig(model=ModelConfig(backbone="vit", **SHAPES[shape]), method=method_config(name, **kw))


def make_image(size: int, kind: str) -> torch.Tensor:
    """[BATCH, 1, size^3] in [0, 1]: phantom CT volumes (HU window -1000..1000) or uniform noise."""
    if kind == "rand":
        return torch.rand(BATCH, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    from raymim.data.synth import phantom_batch  # in-memory phantoms (same generator as `raymim synth`)

    return phantom_batch(BATCH, size, seed=0)[0]


class Trainer:
    """A method, its AdamW, a step counter (``set_progress``, for the mask-ratio schedule)."""

    def __init__(self, shape: str, name: str, method_kw: dict, batch: dict) -> None:
        torch.manual_seed(0)  # same initial encoder / decoder weights for every variant
        self.method = build_method(name, make_config(shape, name, **method_kw))
        self.method.train()
        self.opt = torch.optim.AdamW(self.method.parameters(), lr=1e-4, weight_decay=0.05)
        self.batch = batch
        self.step_no = 0
        self.last_metrics: dict = {}
        self.steps(1)  # warm-up: allocator, AdamW state, first k-means

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.method.set_progress(self.step_no, 10**6)
            self.opt.zero_grad(set_to_none=True)
            out = self.method(self.batch)
            out.loss.backward()
            self.opt.step()
            self.step_no += 1
            self.last_metrics = out.metrics


def time_pair(fn_a: Callable[[], None], fn_b: Callable[[], None], reps: int) -> tuple[list[float], list[float]]:
    """Interleaved timings (a, b, a, b, ...): all ``reps`` of each (the callers warm up)."""
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return ta, tb


def _min_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_variant(shape: str, variant: str, base: Trainer, img: torch.Tensor, reps: int, block: int) -> dict:
    name, kw, with_report, per_call = VARIANTS[variant]
    n = per_call or block
    batch = _batch(img, with_report)
    tr = Trainer(shape, name, kw, batch)
    t_var, t_mae = time_pair(lambda: tr.steps(n), lambda: base.steps(n), reps)
    v = [t / n for t in t_var]
    m = [t / n for t in t_mae]
    row = {
        "shape": shape,
        "variant": variant,
        "steps_per_call": n,
        "reps": reps,
        "variant_s_min": min(v),
        "variant_s_median": statistics.median(v),
        "mae_s_min": min(m),
        "mae_s_median": statistics.median(m),
        "ratio_min": min(v) / min(m),
        "ratio_median": statistics.median(v) / statistics.median(m),
        "variant_s_all": [round(t, 4) for t in v],
        "mae_s_all": [round(t, 4) for t in m],
        "metrics": {k: round(float(x), 4) for k, x in tr.last_metrics.items()
                    if k in ("mask_ratio", "mps_cluster_share", "mps_masked_lesion_share", "no_report_frac",
                             "loss_align")},
    }
    return row


# ---- breakdown (--breakdown) ----------------------------------------------------------------------------


def forward_split(tr: Trainer, reps: int) -> dict[str, float]:
    """Forward seconds per step inside each submodule (forward hooks), min over reps.

    Modules up to two levels deep (``encoder.blocks.3`` counts as ``encoder.blocks.*``; containers
    are not called, their members are). Nested rows overlap (``encoder.*`` vs the MAE encoder's
    ``forward_visible``, which calls its members directly); backward and the optimiser are only in
    the whole step.
    """
    acc: dict[str, float] = {}
    starts: dict[str, list[float]] = {}
    handles = []
    for qname, mod in tr.method.named_modules():
        parts = qname.split(".")
        if not qname or len(parts) > 3 or (len(parts) == 3 and not parts[2].isdigit()):
            continue
        key = ".".join("*" if x.isdigit() else x for x in parts)

        def pre(_m, _a, key=key):
            starts.setdefault(key, []).append(time.perf_counter())

        def post(_m, _a, _o, key=key):
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - starts[key].pop()

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    best: dict[str, float] = {}
    try:
        for _ in range(reps):
            acc.clear()
            t0 = time.perf_counter()
            tr.steps(1)
            acc["(whole step)"] = time.perf_counter() - t0
            for k, t in acc.items():
                best[k] = min(best.get(k, float("inf")), t)
    finally:
        for h in handles:
            h.remove()
    return {k: round(t, 5) for k, t in sorted(best.items(), key=lambda kv: -kv[1]) if t >= 1e-4}


def mps_parts(base: Trainer, img: torch.Tensor, reps: int, k: int = 4, iters: int = 10) -> dict[str, float]:
    """Seconds of each part of the online MPS scoring (no grad), with the encoder of ``base``."""
    enc = base.method.encoder
    with torch.no_grad():
        emb = enc.embed_patches(img, None)
        z = standardize(emb.float())
        flat = z.reshape(-1, z.shape[-1])
        assign, centres = kmeans(flat, k, iters)
        gen = torch.Generator().manual_seed(0)
        # Lloyd iterations actually run (kmeans stops once the assignment is stable), from one seeding.
        _, c0 = kmeans(flat, k, 0, generator=torch.Generator().manual_seed(1))
        ran = iters
        for i in range(1, iters + 1):
            ai, _ = kmeans(flat, k, i, init=c0)
            aj, _ = kmeans(flat, k, i + 1, init=c0)
            if torch.equal(ai, aj):
                ran = i
                break
        scores = lesion_scores(z, assign.view(z.shape[0], -1), k)
        parts = {
            "embed_patches": _min_time(lambda: enc.embed_patches(img, None), reps),
            "forward_tokens (no grad)": _min_time(lambda: enc.forward_tokens(img), reps),
            "standardize": _min_time(lambda: standardize(emb.float()), reps),
            "kmeans k-means++ seeding only (iters=0)": _min_time(lambda: kmeans(flat, k, 0, generator=gen), reps),
            f"kmeans full (iters={iters})": _min_time(lambda: kmeans(flat, k, iters, generator=gen), reps),
            "nearest cached centre (cdist+argmin)": _min_time(lambda: torch.cdist(flat, centres).argmin(1), reps),
            "lesion_scores": _min_time(lambda: lesion_scores(z, assign.view(z.shape[0], -1), k), reps),
            "mps_masking": _min_time(lambda: mps_masking(scores, MASK_RATIO), reps),
        }
    out = {key: round(t, 6) for key, t in parts.items()}
    out["points x features"] = f"{flat.shape[0]} x {flat.shape[1]}"
    out["lloyd_iterations_until_stable"] = ran
    return out


# ---- main ------------------------------------------------------------------------------------------------


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | variant | steps/call | variant s/step (min) | MAE s/step (min) | ratio (min) "
        "| variant s/step (median) | MAE s/step (median) | ratio (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | `{r['variant']}` | {r['steps_per_call']} | {r['variant_s_min']:.4f} "
            f"| {r['mae_s_min']:.4f} | **{r['ratio_min']:.2f}x** | {r['variant_s_median']:.4f} "
            f"| {r['mae_s_median']:.4f} | {r['ratio_median']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="tiny,tiny-p8,vit-b", help=f"comma-separated, of {list(SHAPES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    p.add_argument("--reps-tiny", type=int, default=15, help="repetitions per variant at the tiny shapes")
    p.add_argument("--reps-base", type=int, default=2, help="repetitions per variant at vit-b")
    p.add_argument("--block", type=int, default=10, help="steps per timed call of a variant whose per-call steps is 0")
    p.add_argument("--image", choices=("phantom", "rand"), default="phantom")
    p.add_argument("--breakdown", action="store_true", help="forward split per submodule + MPS parts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    load_before = os.getloadavg()
    print(json.dumps({"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
                      "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "image": args.image, "loadavg_before": load_before}), flush=True)
    rows: list[dict] = []
    variants = [v for v in args.variants.split(",") if v]
    skipped = [v for v in variants if not available(v)]
    if skipped:
        print(json.dumps({"skipped (the method config lacks a field)": skipped}), flush=True)
    variants = [v for v in variants if v not in skipped]
    for shape in [s for s in args.shapes.split(",") if s]:
        reps = args.reps_base if shape == "vit-b" else args.reps_tiny
        img = make_image(SHAPES[shape]["img_size"], args.image)
        base = Trainer(shape, "mae", {}, {"image": img})
        for variant in variants:
            row = time_variant(shape, variant, base, img, reps, args.block)
            row["loadavg_1m"] = os.getloadavg()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.breakdown:
            bd_reps = 2 if shape == "vit-b" else 5
            split = {"mae": forward_split(base, bd_reps)}
            for variant in variants:
                name, kw, with_report, _ = VARIANTS[variant]
                batch = _batch(img, with_report)
                split[variant] = forward_split(Trainer(shape, name, kw, batch), bd_reps)
            print(json.dumps({"shape": shape, "forward_split_s": split}), flush=True)
            print(json.dumps({"shape": shape, "mps_parts_s": mps_parts(base, img, bd_reps * 2)}), flush=True)
        del base
    load_after = os.getloadavg()
    print()
    print(markdown(rows))
    print()
    print(json.dumps({"summary": {f"{r['shape']}/{r['variant']}": round(r["ratio_min"], 3) for r in rows},
                      "loadavg_before": load_before, "loadavg_after": load_after,
                      "wall_s": round(time.time() - t_start, 1)}), flush=True)


if __name__ == "__main__":
    main()
