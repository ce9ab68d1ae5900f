"""Throughput of ``prepare`` vs a MONAI Dataset + DataLoader(num_workers=2) baseline vs decode-only.

Usage: python bench/bench_prepare.py --cases 40 --size 96 [--reps 2] [--workdir /tmp/raymim-bench]
Prints one JSON line with every variant (volumes/s, MB/s of input) and the ratios the issue targets.

A warm-up pass of all three variants on a few cases runs first (Ray worker start-up, torch / MONAI
imports, page cache), then ``--reps`` interleaved repetitions; each variant's time is the minimum.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def _baseline(manifest: Path, out: Path, cfg, key: bytes) -> float:
    """Same transforms and the same shard writer, driven by torch's DataLoader (2 workers)."""
    import dataclasses

    from torch.utils.data import DataLoader, Dataset

    from raymim.data.worker import process_case
    from raymim.io.discover import discover_cases

    cases = discover_cases(manifest)
    ctx = {"cfg": dataclasses.asdict(cfg), "key": key.hex(), "config_hash": "bench", "keep_paths": False}

    class Cases(Dataset):
        def __len__(self) -> int:
            return len(cases)

        def __getitem__(self, i: int):
            return process_case(cases[i], ctx)[1]

    from raymim.data import shards

    start = time.perf_counter()
    rows: list = []
    sch = shards.schema(cfg.dtype)
    loader = DataLoader(Cases(), batch_size=None, num_workers=2, collate_fn=lambda x: x)
    for i, volume in enumerate(loader):
        rows += [volume] if volume is not None else []
        if rows and (sum(r["image"].nbytes for r in rows) >= cfg.shard_mb << 20 or i == len(cases) - 1):
            shards.write_shard(shards.rows_to_table(rows, sch), out / f"part-{i}.parquet", {"cases": []})
            rows = []
    return time.perf_counter() - start


def _decode(path_json: str) -> dict:
    from monai.transforms import LoadImage

    from raymim.io.readers import VolumeReader

    case = json.loads(path_json)
    x = LoadImage(image_only=True)(case["image"], reader=VolumeReader())
    return {"n": np.asarray([x.numel()])}


def _timed_decode(cases: list[dict]) -> float:
    import ray

    start = time.perf_counter()
    items = [{"case": json.dumps(c)} for c in cases]  # one case per block, as `prepare` plans its tasks
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(lambda r: {"n": _decode(r["case"])["n"][0]}, num_cpus=1)
    ds.materialize()
    return time.perf_counter() - start


def _write_manifest(work: Path, names: list[str], file: str) -> Path:
    manifest = work / "in" / file
    manifest.write_text("image\n" + "\n".join(f"images/{n}" for n in names))
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup-cases", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/raymim-bench")
    a = ap.parse_args()
    import os

    import ray

    from raymim.config import PrepareConfig
    from raymim.data.pipeline import ensure_ray, prepare
    from raymim.data.synth import generate_phantoms

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    generate_phantoms(work / "in", a.cases, size=a.size, seed=0)
    names = sorted(p.name for p in (work / "in" / "images").iterdir())
    in_mb = sum((work / "in" / "images" / n).stat().st_size for n in names) / 1e6
    cfg = PrepareConfig(crop_size=[64, 64, 64], crops_per_volume=4)
    # image only: the same input bytes for all three variants
    img_manifest = _write_manifest(work, names, "images.csv")
    warm_manifest = _write_manifest(work, names[: a.warmup_cases], "warmup.csv")
    all_cases = [{"image": str(work / "in" / "images" / n)} for n in names]
    load = {"before": os.getloadavg()}
    ensure_ray()

    def run_prepare(manifest: Path, out: Path) -> float:
        return prepare(manifest, out, cfg, progress=False)["seconds"]

    def run_base(manifest: Path, out: Path) -> float:
        out.mkdir(parents=True)
        return _baseline(manifest, out, cfg, b"bench")

    # warm-up: every variant once on a few cases (worker start-up and imports are not measured)
    _timed_decode(all_cases[: a.warmup_cases])
    run_prepare(warm_manifest, work / "warm-prep")
    run_base(warm_manifest, work / "warm-base")
    times: dict[str, list[float]] = {"prepare": [], "monai_dataloader": [], "decode_only": []}
    for r in range(a.reps):  # interleaved; the minimum of each variant is reported
        times["decode_only"].append(_timed_decode(all_cases))
        times["prepare"].append(run_prepare(img_manifest, work / f"out-{r}"))
        times["monai_dataloader"].append(run_base(img_manifest, work / f"base-{r}"))
    load["after"] = os.getloadavg()
    res = {"cases": a.cases, "size": a.size, "input_mb": round(in_mb, 1), "cpus": ray.cluster_resources()["CPU"],
           "reps": a.reps, "loadavg": {k: [round(x, 1) for x in v] for k, v in load.items()}}
    best = {k: min(v) for k, v in times.items()}
    for name, t in best.items():
        res[name] = {"s": round(t, 2), "vol_per_s": round(a.cases / t, 2), "mb_per_s": round(in_mb / t, 2),
                     "all_s": [round(x, 2) for x in times[name]]}
    res["prepare_vs_dataloader"] = round(best["monai_dataloader"] / best["prepare"], 2)
    res["prepare_vs_decode"] = round(best["decode_only"] / best["prepare"], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
