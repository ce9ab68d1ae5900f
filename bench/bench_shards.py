"""Reading shards into training batches: ``iter_torch_batches`` MB/s vs ``pyarrow.parquet.read_table``.

Usage: python bench/bench_shards.py --shards /tmp/raymim-bench/out [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import time

import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    from raymim.data.pipeline import ensure_ray
    from raymim.data.shards import read_shards, shard_files

    files = shard_files(a.shards)
    start = time.perf_counter()
    nbytes = 0
    for f in files:
        t = pq.read_table(f, columns=["image"])
        nbytes += t["image"].combine_chunks().to_numpy_ndarray().nbytes
    t_arrow = time.perf_counter() - start
    ensure_ray()
    ds = read_shards(a.shards, columns=["image"])
    start = time.perf_counter()
    seen = 0
    for batch in ds.iter_torch_batches(batch_size=a.batch):
        seen += batch["image"].numel() * batch["image"].element_size()
    t_ray = time.perf_counter() - start
    print(json.dumps({"mb": round(nbytes / 1e6, 1), "read_table_mb_s": round(nbytes / 1e6 / t_arrow, 1),
                      "iter_torch_batches_mb_s": round(seen / 1e6 / t_ray, 1),
                      "ratio": round(t_arrow / t_ray, 2)}))


if __name__ == "__main__":
    main()
