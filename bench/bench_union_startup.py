"""Start-up cost of ``build_dataset``'s multi-epoch pass: first-batch latency of a union of N copies.

``raymim.train.trainer.build_dataset`` repeats the shard dataset ``epochs_per_pass`` times (a lazy
``Dataset.union``) so the shard iterator restarts once per pass, not once per epoch. This measures
what that costs up front: seconds to the first batch and to the end of one pass for N copies of a
small prepared dataset, against N = 1 (the baseline, measured first and again last) in the same run.

Run (CPU)::

    .venv/bin/python bench/bench_union_startup.py --cases 6 --repeats 1,4,8,16,1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--repeats", default="1,4,8,16,1")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAYMIM_DEID_KEY", "bench")
    import ray

    from raymim.config import PrepareConfig
    from raymim.data.pipeline import prepare
    from raymim.data.shards import read_shards
    from raymim.data.synth import generate_phantoms
    from raymim.train.loop import BatchCollate

    ray.init(num_cpus=args.cpus, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_phantoms(Path(tmp) / "ph", args.cases, 32)
        summary = prepare(manifest, Path(tmp) / "shards", PrepareConfig(crop_size=[16, 16, 16], crops_per_volume=2),
                          progress=False)
        print(f"load average {os.getloadavg()}; {summary['crops']} rows")
        print("| copies | first batch s | whole pass s | batches |\n|---|---|---|---|")
        for rep in (int(r) for r in args.repeats.split(",")):
            t0 = time.perf_counter()
            ds = read_shards(str(Path(tmp) / "shards")).select_columns(["image"])
            ds = ds.union(*([ds] * (rep - 1))) if rep > 1 else ds
            first, n = None, 0
            for _ in ds.iter_torch_batches(batch_size=2, collate_fn=BatchCollate()):
                first = first if first is not None else time.perf_counter() - t0
                n += 1
            print(f"| {rep} | {first:.1f} | {time.perf_counter() - t0:.1f} | {n} |", flush=True)


if __name__ == "__main__":
    main()
