"""Reading shards into training batches: ``iter_torch_batches`` MB/s vs ``pyarrow.parquet.read_table``,
for several shard layouts (row-group size, image compression, dictionary encoding).

Usage:
    python bench/bench_shards.py --shards /tmp/raymim-bench/out [--batch 8] [--reps 3]
    python bench/bench_shards.py --make 150 --size 96 --workdir /tmp/raymim-bench-shards   # prepare a set first

Every layout is a rewrite of the same shard rows (``--shards``) with ``pyarrow.parquet.write_table``;
"current" is what ``raymim.data.shards.write_shard`` writes. MB/s counts the decoded bytes of the
``image`` column. Each (layout, reader) pair gets one warm-up pass (page cache, Ray worker start-up,
imports); then ``--reps`` interleaved passes, the minimum time of each is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# name -> (row-group bytes, image compression, dictionary encoding of the tensor columns, label compression)
LAYOUTS = {
    "current": (None, "none", False, "zstd"),
    "label_uncompressed": (None, "none", False, "none"),  # what write_shard wrote before the leaf-path fix
    "rg8mb": (8 << 20, "none", False, "zstd"),
    "rg128mb": (128 << 20, "none", False, "zstd"),
    "img_lz4": (None, "lz4", False, "zstd"),
    "img_zstd": (None, "zstd", False, "zstd"),
    "dict_on": (None, "none", True, "zstd"),
}


def rewrite(files: list[str], dest: Path, rg_bytes: int | None, img_comp: str, tensor_dict: bool,
            label_comp: str) -> None:
    from raymim.data import shards

    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        table = pq.read_table(f)
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        tensor_cols = [x.name for x in table.schema if isinstance(x.type, pa.FixedShapeTensorType)]
        strings = [x.name for x in table.schema if pa.types.is_string(x.type)]
        comp = {shards._leaf_path(x): "zstd" for x in table.schema}
        comp[shards._leaf_path(table.schema.field("image"))] = img_comp
        comp[shards._leaf_path(table.schema.field("label"))] = label_comp
        pq.write_table(table, dest / Path(f).name,
                       row_group_size=max(1, (rg_bytes or shards.ROW_GROUP_BYTES) // row_bytes),
                       compression=comp, use_dictionary=strings + (tensor_cols if tensor_dict else []),
                       write_statistics=[c for c in table.column_names if c not in tensor_cols])


def read_arrow(files: list[str]) -> int:
    nbytes = 0
    for f in files:
        t = pq.read_table(f, columns=["image"])
        nbytes += t["image"].combine_chunks().to_numpy_ndarray().nbytes
    return nbytes


def read_ray(files: list[str], batch: int) -> int:
    from raymim.data.shards import read_shards

    seen = 0
    for b in read_shards(str(Path(files[0]).parent), columns=["image"]).iter_torch_batches(batch_size=batch):
        seen += b["image"].numel() * b["image"].element_size()
    return seen


def make_shards(n: int, size: int, work: Path) -> Path:
    from raymim.config import PrepareConfig
    from raymim.data.pipeline import prepare
    from raymim.data.synth import generate_phantoms

    shutil.rmtree(work, ignore_errors=True)
    manifest = generate_phantoms(work / "in", n, size=size, seed=1)
    prepare(manifest, work / "out", PrepareConfig(crop_size=[64, 64, 64], crops_per_volume=4), progress=False)
    return work / "out"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards")
    ap.add_argument("--make", type=int, default=0, help="prepare this many phantoms first (into --workdir)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--workdir", default="/tmp/raymim-bench-shards")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    a = ap.parse_args()
    from raymim.data.pipeline import ensure_ray
    from raymim.data.shards import shard_files

    load_before = os.getloadavg()
    ensure_ray()
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    src = make_shards(a.make, a.size, Path(a.workdir)) if a.make else Path(a.shards)
    files = shard_files(src)
    names = a.layouts.split(",")
    dirs = {}
    for name in names:
        dirs[name] = Path(a.workdir) / "layouts" / name
        shutil.rmtree(dirs[name], ignore_errors=True)
        rewrite(files, dirs[name], *LAYOUTS[name])
    lfiles = {n: shard_files(d) for n, d in dirs.items()}
    readers = {"read_table": lambda fs: read_arrow(fs), "iter_torch_batches": lambda fs: read_ray(fs, a.batch)}
    times: dict[tuple[str, str], list[float]] = {}
    nbytes = 0
    for rep in range(a.reps + 1):  # rep 0 is the warm-up
        for name in names:
            for rname, fn in readers.items():
                start = time.perf_counter()
                nbytes = fn(lfiles[name])
                if rep:
                    times.setdefault((name, rname), []).append(time.perf_counter() - start)
    res = {"mb": round(nbytes / 1e6, 1), "files": len(files), "batch": a.batch, "reps": a.reps,
           "loadavg": {"before": [round(x, 1) for x in load_before], "after": [round(x, 1) for x in os.getloadavg()]},
           "layouts": {}}
    for name in names:
        disk = sum(os.path.getsize(f) for f in lfiles[name]) / 1e6
        rg = pq.ParquetFile(lfiles[name][0]).metadata.num_row_groups
        t_arrow, t_ray = min(times[(name, "read_table")]), min(times[(name, "iter_torch_batches")])
        res["layouts"][name] = {"disk_mb": round(disk, 1), "row_groups_first_file": rg,
                                "read_table_mb_s": round(nbytes / 1e6 / t_arrow, 1),
                                "iter_torch_batches_mb_s": round(nbytes / 1e6 / t_ray, 1),
                                "ratio": round(t_arrow / t_ray, 3),
                                "all_s": {r: [round(x, 2) for x in times[(name, r)]] for r in readers}}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
