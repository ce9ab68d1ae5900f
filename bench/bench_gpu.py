"""GPU path, mixed precision and throughput of every method at the paper shape (ViT-B, 96^3, patch 16).

Needs a CUDA GPU; imports only ``raymim.config``, ``raymim.methods``, ``raymim.data.synth`` and
``raymim.train.schedule`` (no Ray, no MLflow), so it runs where only torch, MONAI and nibabel
are installed. One training step = forward + backward + AdamW step on a batch of ``--batch``
phantom crops, with the same precision helpers the Ray Train loop uses
(:func:`~raymim.train.schedule.resolve_precision`, :func:`~raymim.train.schedule.autocast`,
:func:`~raymim.train.schedule.build_scaler`).

Per method, for fp32 and bf16 (``precision="auto"`` resolves to bf16 on Hopper):

* the median step time over ``--reps`` steps (CUDA events, after ``--warmup`` steps), samples/s;
* training FLOPs per step (``torch.utils.flop_counter``, fp32 pass) and the achieved TFLOP/s,
  as a share of the bf16 matrix-product ceiling measured at the start of the same run;
* peak GPU memory;
* an AMP check: ``--fit-steps`` steps of bf16 training on one fixed batch, first and last loss
  (must be finite and lower) and the relative gap between the bf16 and fp32 losses of the same
  masked forward at the start.

Variants (``--attention fused,einsum`` and ``--compile off,on`` run each combination): the
blocks' attention through torch's fused ``scaled_dot_product_attention`` (``model.fused_attention``,
the default) or MONAI's einsum path, and the method's forward through ``torch.compile`` (the
compiled module is the one the step calls; AOTAutograd compiles its backward; the training loop's
``train.compile``). The compile time (the first step) is reported apart from the timed steps.

Baselines, same run: bf16 vs fp32 (speed-up ratio), each method vs MAE at the same precision and
variant, and each variant vs the einsum + eager variant of the same case and batch.

Run (on the lent GPU machine; results go to a dated file in bench/results/ and bench/RESULTS.md by hand)::

    python3 bench/bench_gpu.py --batch 8 --reps 20 --json gpu.json
    python3 bench/bench_gpu.py --batch 8,32 --cases mae,mim,medim-kdm --no-fit
    python3 bench/bench_gpu.py --batch 8,32 --cases mae,simmim,mim,mps_ams-online,hssl --no-fit \
        --attention einsum,fused --compile off,on --json gpu_fused_compiled.json
    python3 bench/bench_gpu.py --profile mae --batch 8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from raymim.config import ModelConfig, RaymimConfig, config_from_dict
from raymim.data.synth import phantom_batch
from raymim.methods import build_method
from raymim.train.schedule import autocast, build_scaler, resolve_precision

VIT_B = dict(hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12)  # decoder: the package default

# (label, method name, backbone, fields of the method's config)
CASES = [
    ("mae", "mae", "vit", {"mask_ratio": 0.75}),
    ("simmim", "simmim", "vit", {"mask_ratio": 0.6}),
    ("simmim-swin", "simmim", "swin", {"mask_ratio": 0.6}),
    ("mim", "mim", "vit", {"mask_ratio": 0.6, "levels": 3, "level_sizes": [384, 96, 16], "gamma": 4}),
    ("mps_ams-online", "mps_ams", "vit", {"mask_ratio": 0.75, "mps_mode": "online", "levels": 1}),
    ("medim-kdm", "medim", "vit", {"mask_ratio": 0.75, "medim_mode": "kdm"}),
    ("hssl", "hssl", "vit", {"mask_ratio": 0.75}),
    ("simclr", "simclr", "vit", {}),
]


def config(name: str, backbone: str, overrides: dict, img: int, fused: bool = True) -> RaymimConfig:
    """ViT-B/16 (or Swin) at ``img``^3; ``fused``: ``model.fused_attention`` (a tree without that
    field has MONAI's einsum attention only)."""
    model = dict(backbone=backbone, img_size=img, patch_size=16, **VIT_B)
    if "fused_attention" in ModelConfig.__dataclass_fields__:
        model["fused_attention"] = fused
    elif fused:
        raise SystemExit("this tree has no model.fused_attention; run with --attention einsum")
    return config_from_dict({"model": model, "method": {"name": name, **overrides}})


def make_batch(n: int, img: int, device: torch.device, seed: int = 0) -> dict:
    """``n`` generator phantoms (sites cycle 0, 1, 2) with their reports and sites, on ``device``."""
    image, _, reports = phantom_batch(n, img, seed=seed)
    grid = img // 16
    # MedIM scores its words on the MPS lesion prior (a random one here: timing only)
    prior = torch.rand(n, grid, grid, grid, generator=torch.Generator().manual_seed(seed))
    return {"image": image.to(device), "report": reports, "domain": [f"site{i % 3}" for i in range(n)],
            "lesion_prob": prior.to(device)}


def matmul_ceiling(device: torch.device) -> float:
    """bf16 TFLOP/s of an 8192^3 matrix product (median of 10 after 3 warm-ups), random data."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def step_fn(method, opt, scaler, batch, precision, device):
    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(precision, device):
            out = method(batch)
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        return out.loss.detach()

    return step


def time_steps(step, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return times


def run_case(label, name, backbone, overrides, bs, args, device, peak, fused: bool = True,
             compiled: bool = False) -> dict:
    res: dict = {"case": label, "batch": bs, "img": args.img, "attention": "fused" if fused else "einsum",
                 "compiled": compiled}
    batch = make_batch(bs, args.img, device)
    for precision in ("fp32", resolve_precision("auto", device)):
        torch.manual_seed(0)
        method = build_method(name, config(name, backbone, overrides, args.img, fused)).to(device)
        opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
        scaler = build_scaler(precision, device)
        if precision == "fp32":  # FLOPs of the eager step (the compiled one does the same matrix products)
            counter = FlopCounterMode(display=False)
            with counter:
                step_fn(method, opt, scaler, batch, precision, device)()
            res["gflop_per_step"] = counter.get_total_flops() / 1e9
        fwd = torch.compile(method, dynamic=False) if compiled else method  # as the loop's train.compile
        step = step_fn(fwd, opt, scaler, batch, precision, device)
        if compiled:  # the first call compiles the forward, its backward and the step's graphs
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            res[f"compile_s_{precision}"] = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        times = time_steps(step, args.warmup, args.reps)
        med = statistics.median(times)
        res[precision] = {"step_ms": 1e3 * med, "min_ms": 1e3 * min(times),
                          "samples_per_s": bs / med,
                          "tflops": res["gflop_per_step"] / med / 1e3,
                          "mfu_vs_bf16_matmul": res["gflop_per_step"] / med / 1e3 / peak,
                          "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        del method, opt
        torch.cuda.empty_cache()
    res["speedup_bf16_vs_fp32"] = res["fp32"]["step_ms"] / res["bf16"]["step_ms"]
    if args.no_fit:
        return res
    # AMP check: the same masked forward in fp32 and bf16, then bf16 training on one batch.
    torch.manual_seed(1)
    method = build_method(name, config(name, backbone, overrides, args.img, fused)).to(device)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(2)
        with torch.no_grad(), autocast(precision, device):
            losses[precision] = float(method(batch).loss)
    res["bf16_vs_fp32_loss_rel"] = abs(losses["bf16"] - losses["fp32"]) / max(abs(losses["fp32"]), 1e-12)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    step = step_fn(method, opt, build_scaler("bf16", device), batch, "bf16", device)
    fit = [float(step()) for _ in range(args.fit_steps)]
    res["bf16_fit"] = {"first": fit[0], "last": fit[-1], "finite": all(math.isfinite(v) for v in fit)}
    return res


def profile_case(label: str, args, device: torch.device) -> None:
    """Where a bf16 step's time goes: the profiler's top operators by CPU and by CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    _, name, backbone, overrides = next(c for c in CASES if c[0] == label)
    fused = args.attention.split(",")[0] == "fused"
    method = build_method(name, config(name, backbone, overrides, args.img, fused)).to(device)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    batch = make_batch(int(args.batch.split(",")[0]), args.img, device)
    step = step_fn(method, opt, build_scaler("bf16", device), batch, "bf16", device)
    time_steps(step, 3, 1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    for key in ("self_cpu_time_total", "self_cuda_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="8", help="batch size per step; a comma list runs each")
    ap.add_argument("--img", type=int, default=96)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fit-steps", type=int, default=30)
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES), help="comma-separated case labels")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--no-fit", action="store_true", help="skip the AMP check (timings only)")
    ap.add_argument("--profile", help="instead: torch.profiler table of 5 bf16 steps of this case")
    ap.add_argument("--attention", default="fused", help="fused (torch SDPA, model.fused_attention) and/or "
                    "einsum (MONAI's path); a comma list runs each")
    ap.add_argument("--compile", default="off", help="off and/or on (torch.compile of the method); "
                    "a comma list runs each")
    args = ap.parse_args()
    attention = args.attention.split(",")
    compiles = args.compile.split(",")
    if set(attention) - {"fused", "einsum"} or set(compiles) - {"off", "on"}:
        ap.error(f"--attention takes fused,einsum and --compile off,on; got {args.attention!r} and {args.compile!r}")
    unknown = sorted(set(args.cases.split(",")) - {c[0] for c in CASES})
    if unknown:
        ap.error(f"--cases should be among {','.join(c[0] for c in CASES)}, got {','.join(unknown)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False).")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; bf16 is the fast path
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
           "batch": args.batch, "img": args.img, "reps": args.reps}
    if args.profile:
        profile_case(args.profile, args, device)
        return
    peak = matmul_ceiling(device)
    env["bf16_matmul_tflops"] = peak
    print(json.dumps(env), flush=True)
    wanted = args.cases.split(",")
    results = []
    for bs in [int(b) for b in args.batch.split(",")]:
        for label, name, backbone, overrides in CASES:
            if label not in wanted:
                continue
            for att in attention:
                for comp in compiles:
                    t0 = time.perf_counter()
                    variant = {"attention": att, "compiled": comp == "on"}
                    try:
                        res = run_case(label, name, backbone, overrides, bs, args, device, peak,
                                       fused=att == "fused", compiled=comp == "on")
                    except Exception as exc:  # report and go on: one failing method must not hide the others
                        res = {"case": label, "batch": bs, **variant, "error": f"{type(exc).__name__}: {exc}"}
                    res["wall_s"] = time.perf_counter() - t0
                    results.append(res)
                    print(json.dumps(res), flush=True)

    def same(r: dict, **want) -> dict | None:
        keys = {"case": r["case"], "batch": r["batch"], "attention": r["attention"], "compiled": r["compiled"], **want}
        return next((b for b in results if all(b.get(k) == v for k, v in keys.items()) and "error" not in b), None)

    print("\n| case | batch | attention | compiled | GFLOP/step | fp32 ms | bf16 ms | bf16 speed-up | bf16 samples/s "
          "| bf16 TFLOP/s (MFU) | vs MAE (bf16) | vs einsum eager (bf16) | peak GiB bf16 | bf16 fit first -> last "
          "| bf16/fp32 loss gap |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | {r['batch']} | {r['attention']} | {r['compiled']} | error: {r['error'][:80]} |")
            continue
        base = same(r, case="mae")
        vs = r["bf16"]["step_ms"] / base["bf16"]["step_ms"] if base else float("nan")
        plain = same(r, attention="einsum", compiled=False)
        vs_plain = plain["bf16"]["step_ms"] / r["bf16"]["step_ms"] if plain else float("nan")  # > 1: faster
        fit = (f"{r['bf16_fit']['first']:.4f} -> {r['bf16_fit']['last']:.4f} | {r['bf16_vs_fp32_loss_rel']:.1e}"
               if "bf16_fit" in r else "- | -")
        print(f"| {r['case']} | {r['batch']} | {r['attention']} | {r['compiled']} | {r['gflop_per_step']:.0f} "
              f"| {r['fp32']['step_ms']:.1f} | {r['bf16']['step_ms']:.1f} | {r['speedup_bf16_vs_fp32']:.2f}x "
              f"| {r['bf16']['samples_per_s']:.1f} | {r['bf16']['tflops']:.0f} "
              f"({100 * r['bf16']['mfu_vs_bf16_matmul']:.1f} %) | {vs:.2f}x | {vs_plain:.2f}x speed-up "
              f"| {r['bf16']['peak_mem_gib']:.1f} | {fit} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
