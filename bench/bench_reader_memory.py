"""Memory of the training reader against the number of volumes it streams: 50 vs 500 volume reads.

Streams ``crop_stream`` over an item list of N volume reads (the prepared real CTs of
``bench_data_plane.py``, listed N / 5 times, so bytes per read stay the same), iterating
``[4, 1, 96, 96, 96]`` batches as training does, and samples every 0.1 s the resident memory
(USS) of this process plus every Ray worker process, and the object store's used bytes. Peak
values per N, side by side in one run; "flat" means the 500-read peak is within 10 % of the
50-read one.

Run (after ``bench_data_plane.py --out /tmp/bdp`` has prepared the shards):
``.venv/bin/python bench/bench_reader_memory.py --shards /tmp/bdp/shards --reads 50,500``
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import psutil


def _rss_mb() -> float:
    total = 0
    me = psutil.Process()
    procs = [me] + [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::")]
    for p in procs:
        try:
            total += p.memory_full_info().uss
        except (psutil.Error, OSError):
            pass
    return total / 1e6


def run(spec: dict, reads: int) -> dict:
    from raymim.data.stream import crop_stream
    from raymim.train.loop import BatchCollate

    base = spec["items"]
    spec = dict(spec, items=(base * (reads // len(base) + 1))[:reads])
    peak = {"mem": 0.0, "store": 0.0}
    stop = threading.Event()

    def sample() -> None:
        import ray

        while not stop.is_set():
            peak["mem"] = max(peak["mem"], _rss_mb())
            used = ray.available_resources().get("object_store_memory")
            total = ray.cluster_resources().get("object_store_memory")
            if used is not None and total:
                peak["store"] = max(peak["store"], (total - used) / 1e6)
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0, crops = time.perf_counter(), 0
    for b in crop_stream(spec, 0).iter_torch_batches(batch_size=4, collate_fn=BatchCollate()):
        crops += b["image"].shape[0]
    stop.set()
    t.join()
    return {"reads": reads, "crops": crops, "seconds": round(time.perf_counter() - t0, 1),
            "peak_uss_mb": round(peak["mem"]), "peak_object_store_mb": round(peak["store"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default="/tmp/bdp/shards")
    ap.add_argument("--reads", default="50,500")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    import ray

    from raymim.config import PrepareConfig, RaymimConfig, TrainConfig
    from raymim.data.stream import stream_spec

    ray.init(num_cpus=args.cpus, log_to_driver=False, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = stream_spec(args.shards, RaymimConfig(prepare=PrepareConfig(crops_per_volume=4), train=TrainConfig()))
    run(spec, 10)  # warm
    res = [run(spec, int(n)) for n in args.reads.split(",")]
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": res,
                      "uss_ratio": round(res[-1]["peak_uss_mb"] / res[0]["peak_uss_mb"], 3)}))


if __name__ == "__main__":
    main()
