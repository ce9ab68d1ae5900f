"""Ray Train overhead and data starvation: raymim pretraining vs plain PyTorch DDP (torchrun).

Usage:
    python bench/bench_train.py --data /tmp/raymim-bench-shards/out --config jobs/configs/mae-tiny.yaml \
        --steps 300 --log-every 10 --skip 3 --reps 2

(a) ``raymim.train.trainer.pretrain`` (TorchTrainer + ``train_loop_per_worker``) on the prepared
    shards, ``train.num_workers=2``; steady-state samples/s and ``data_wait_frac`` are read back
    from the run's MLflow metrics (the first ``--skip`` log windows and the step-1 window dropped).
(b) ``torchrun --nproc_per_node 2`` running this file's DDP loop: the same method
    (``raymim.methods.build_method``), optimiser, schedule, clipping, augmentation, batch and
    threads per process, on the same shards: the same per-rank volume lists and crop sampler
    (``raymim.data.stream``), read, cropped and augmented in the training process (no Ray). It logs windows the way the
    Ray loop does (samples/s over ``log_every`` steps, share of the window spent waiting for the
    next batch).

Both use ``torch.set_num_threads(--threads)`` per process; checkpoints happen only at the last
step and reconstruction panels are off (neither is part of the per-step cost being compared).
Runs are interleaved (a, b, a, b, ...); each variant's median steady window is reported, the best
rep is kept. ``data_wait_frac`` is split into windows inside an epoch and windows that contain an
epoch boundary (where the Ray loop restarts ``iter_torch_batches`` and the shard read).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cfg(config: str, overrides: list[str]):
    from raymim.config import load_config

    return load_config(config, overrides)


def _overrides(a) -> list[str]:
    return [f"train.steps={a.steps}", f"train.log_every={a.log_every}", "train.num_workers=2",
            f"train.checkpoint_every={a.steps}", "train.visual_every=0", "train.use_gpu=false",
            "train.precision=fp32", *a.set]


def _summarise(windows: list[dict], skip: int) -> dict:
    """windows: [{step, samples_per_s, data_wait_frac, epoch}] in step order (step 1 first)."""
    steady = [w for w in windows if w["step"] > 1][skip:]
    if not steady:
        return {"windows": 0}
    prev_epoch = {w["step"]: p["epoch"] for p, w in zip(windows, windows[1:])}
    inner = [w for w in steady if prev_epoch.get(w["step"], w["epoch"]) == w["epoch"]]
    edge = [w for w in steady if prev_epoch.get(w["step"], w["epoch"]) != w["epoch"]]

    def med(ws, key):
        return round(statistics.median(w[key] for w in ws), 4) if ws else None

    def mean_wait(ws):
        return round(statistics.fmean(w["data_wait_frac"] for w in ws), 4) if ws else None

    # time-weighted over all steady windows, epoch boundaries included: a window's time is
    # proportional to steps / rate, so the overall rate is the step-weighted harmonic mean
    n_steps = {w["step"]: w["step"] - p["step"] for p, w in zip(windows, windows[1:])}
    rel_t = [n_steps[w["step"]] / w["samples_per_s"] for w in steady]
    overall = sum(n_steps[w["step"]] for w in steady) / sum(rel_t)
    wait_overall = sum(t * w["data_wait_frac"] for t, w in zip(rel_t, steady)) / sum(rel_t)
    return {"windows": len(steady), "samples_per_s_median": med(steady, "samples_per_s"),
            "samples_per_s_overall": round(overall, 4), "data_wait_frac_overall": round(wait_overall, 4),
            "samples_per_s_inner_epoch": med(inner, "samples_per_s"),
            "data_wait_frac_median": med(steady, "data_wait_frac"),
            "data_wait_frac_mean": round(statistics.fmean(w["data_wait_frac"] for w in steady), 4),
            "data_wait_frac_inner_epoch_mean": mean_wait(inner),
            "data_wait_frac_epoch_boundary_mean": mean_wait(edge),
            "epoch_boundary_windows": len(edge), "epochs": windows[-1]["epoch"] + 1}


def run_ray(a, rep: int) -> dict:
    import mlflow
    import ray

    from raymim.train.reporting import metric_name
    from raymim.train.trainer import pretrain

    root = Path(a.workdir)
    cfg = _cfg(a.config, _overrides(a) + [f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}"])
    start = time.perf_counter()
    res = pretrain(cfg, a.data, name=f"bench-train-{os.getpid()}-{rep}", storage=str(root / "ray"))
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(res.tracking_uri)
    hist = {k: {m.step: m.value for m in client.get_metric_history(res.mlflow_run_id, metric_name(k))}
            for k in ("samples_per_s", "data_wait_frac", "epoch")}
    windows = [{"step": s, "samples_per_s": hist["samples_per_s"][s], "data_wait_frac": hist["data_wait_frac"][s],
                "epoch": int(hist["epoch"][s])} for s in sorted(hist["samples_per_s"])]
    ray.shutdown()
    return dict(_summarise(windows, a.skip), wall_s=round(wall, 1), raw=windows)


def run_ddp(a, rep: int) -> dict:
    out = Path(a.workdir) / f"ddp-{os.getpid()}-{rep}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29600 + rep),
           __file__, "--ddp-child", str(out), "--data", a.data, "--config", a.config, "--steps", str(a.steps),
           "--log-every", str(a.log_every), "--threads", str(a.threads)] + [x for s in a.set for x in ("--set", s)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    windows = json.loads(out.read_text())
    return dict(_summarise(windows, a.skip), wall_s=round(wall, 1), raw=windows)


def ddp_child(a) -> None:
    """One torchrun process: the DDP baseline loop (mirrors raymim.train.loop without Ray)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from raymim.data.stream import epoch_items, stream_spec, volume_crops
    from raymim.methods import build_method
    from raymim.train.schedule import build_optimizer, build_scheduler, effective_batch

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(a.threads)
    cfg = _cfg(a.config, _overrides(a))
    tc = cfg.train
    spec = stream_spec(a.data, cfg)  # the same volumes and crop sampler as the Ray reader, read in-process
    torch.manual_seed(tc.seed)
    method = build_method(cfg.method.name, cfg)
    model = torch.nn.parallel.DistributedDataParallel(method, find_unused_parameters=True)
    opt = build_optimizer(method, tc, world)
    sched = build_scheduler(opt, tc)
    np.random.seed(tc.seed + rank)
    torch.manual_seed(tc.seed + rank)
    samples_per_step = effective_batch(tc, world)
    windows: list[dict] = []
    step, epoch = 0, 0
    w_steps, w_wait, w_start = 0, 0.0, time.perf_counter()
    while step < tc.steps:
        crops = (c["image"] for it in epoch_items(spec, epoch, rank, world) for c in volume_crops(it, spec))
        t_ready = time.perf_counter()
        while True:
            chunk = [c for _, c in zip(range(tc.batch_size), crops)]
            if len(chunk) < tc.batch_size:
                break
            batch = {"image": torch.from_numpy(np.stack(chunk)).float().unsqueeze(1)}
            w_wait += time.perf_counter() - t_ready
            method.set_progress(step, tc.steps)
            out = model(batch)
            out.loss.backward()
            if tc.clip_grad:
                torch.nn.utils.clip_grad_norm_(method.parameters(), tc.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            w_steps += 1
            float(out.loss.detach())
            if step % tc.log_every == 0 or step == tc.steps or step == 1:
                elapsed = time.perf_counter() - w_start
                windows.append({"step": step, "samples_per_s": samples_per_step * w_steps / elapsed,
                                "data_wait_frac": w_wait / elapsed, "epoch": epoch})
                w_steps, w_wait, w_start = 0, 0.0, time.perf_counter()
            if step >= tc.steps:
                break
            t_ready = time.perf_counter()
        epoch += 1
    if rank == 0:
        Path(a.ddp_child).write_text(json.dumps(windows))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared folder (manifest.json + shards/)")
    ap.add_argument("--config", default="jobs/configs/mae-tiny.yaml")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides (a.b=c)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--skip", type=int, default=3, help="steady state: drop this many windows after step 1")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (both variants)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variants", default="ray,ddp")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--ddp-child", default=None)
    a = ap.parse_args()
    if a.ddp_child:
        ddp_child(a)
        return
    # the Ray loop's thread count comes from $RAYMIM_THREADS (workers inherit the driver's env)
    os.environ["RAYMIM_THREADS"] = str(a.threads)
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="raymim-bench-train-")
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {v: [] for v in a.variants.split(",")}
    for rep in range(a.reps):
        for v in runs:
            r = run_ray(a, rep) if v == "ray" else run_ddp(a, rep)
            print(f"[bench_train] {v} rep {rep}: " + json.dumps({k: x for k, x in r.items() if k != "raw"}), flush=True)
            runs[v].append(r)
    res = {"config": a.config, "set": a.set, "steps": a.steps, "log_every": a.log_every, "skip": a.skip,
           "threads": a.threads, "loadavg": {"before": [round(x, 1) for x in load_before],
                                             "after": [round(x, 1) for x in os.getloadavg()]}}
    for v, rs in runs.items():
        best = max(rs, key=lambda r: r.get("samples_per_s_median") or 0)
        res[v] = {k: x for k, x in best.items() if k != "raw"}
        res[v]["all_samples_per_s_median"] = [r.get("samples_per_s_median") for r in rs]
    if "ray" in res and "ddp" in res and res["ddp"].get("samples_per_s_median"):
        res["ray_vs_ddp"] = round(res["ray"]["samples_per_s_median"] / res["ddp"]["samples_per_s_median"], 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
