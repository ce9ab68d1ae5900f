"""Throughput of ``prepare`` vs a MONAI Dataset + DataLoader(num_workers=2) baseline vs decode-only.

Usage: python bench/bench_prepare.py --cases 40 --size 96 [--workdir /tmp/raymim-bench]
Prints one JSON line per variant (volumes/s, MB/s of input) and the ratios the issue targets.
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
    sch = shards.schema(cfg.crop_size, cfg.dtype)
    loader = DataLoader(Cases(), batch_size=None, num_workers=2, collate_fn=lambda x: x)
    for i, case_rows in enumerate(loader):
        rows += case_rows
        if sum(r["image"].nbytes for r in rows) >= cfg.shard_mb << 20 or i == len(cases) - 1:
            shards.write_shard(shards.rows_to_table(rows, sch), out / f"part-{i}.parquet", {"cases": []})
            rows = []
    return time.perf_counter() - start


def _decode(path_json: str) -> dict:
    from monai.transforms import LoadImage

    from raymim.io.readers import VolumeReader

    case = json.loads(path_json)
    x = LoadImage(image_only=True)(case["image"], reader=VolumeReader())
    return {"n": np.asarray([x.numel()])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--workdir", default="/tmp/raymim-bench")
    a = ap.parse_args()
    import ray

    from raymim.config import PrepareConfig
    from raymim.data.pipeline import _cases_dataset, ensure_ray, prepare
    from raymim.data.synth import generate_phantoms
    from raymim.io.discover import discover_cases

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    manifest = generate_phantoms(work / "in", a.cases, size=a.size, seed=0)
    in_mb = sum(p.stat().st_size for p in (work / "in" / "images").iterdir()) / 1e6
    cfg = PrepareConfig(crop_size=[64, 64, 64], crops_per_volume=4)
    ensure_ray()
    # (b) decode-only on all cores with the same reader
    start = time.perf_counter()
    cases = [{"image": c["image"]} for c in discover_cases(manifest)]
    ds = _cases_dataset(cases, 1).map(lambda r: {"n": _decode(r["case"])["n"][0]}, num_cpus=1)
    ds.materialize()
    t_decode = time.perf_counter() - start
    # raymim prepare (image only: same input bytes as the other two)
    img_manifest = work / "in" / "images.csv"
    names = sorted(p.name for p in (work / "in" / "images").iterdir())
    img_manifest.write_text("image\n" + "\n".join(f"images/{n}" for n in names))
    summary = prepare(img_manifest, work / "out", cfg, progress=False)
    t_prepare = summary["seconds"]
    (work / "base").mkdir()
    t_base = _baseline(img_manifest, work / "base", cfg, b"bench")
    res = {"cases": a.cases, "size": a.size, "input_mb": round(in_mb, 1), "cpus": ray.cluster_resources()["CPU"]}
    for name, t in (("prepare", t_prepare), ("monai_dataloader", t_base), ("decode_only", t_decode)):
        res[name] = {"s": round(t, 2), "vol_per_s": round(a.cases / t, 2), "mb_per_s": round(in_mb / t, 2)}
    res["prepare_vs_dataloader"] = round(t_base / t_prepare, 2)
    res["prepare_vs_decode"] = round(t_decode / t_prepare, 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
