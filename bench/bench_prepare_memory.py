"""Peak memory of ``raymim prepare`` on N phantoms against 10x N: it should stay flat (within 10 %).

Usage: python bench/bench_prepare_memory.py --small 50 --large 500 --size 48 [--reps 2] [--shard-mb 128]

Every measurement runs in a fresh child process (its own local Ray instance, so both sizes start
from the same state). The child warms up (one ``prepare`` of a few cases: worker start-up and
imports), then samples ``/proc`` every 0.2 s while the measured ``prepare`` runs, summing over
the driver and all its descendants (GCS, raylet, dashboard, Ray workers): PSS from
``/proc/<pid>/smaps_rollup`` (shared pages, e.g. the object store and shared libraries, split
between the processes that map them, so the sum is not double counted) and plain RSS for
reference. The peak is the largest sum seen; the baseline is the sum just before the measured
run starts. Sizes are interleaved (small, large, small, large, ...); the minimum peak per size
is reported.

``--writer N,SIDE`` instead measures one task's shard writing in-process (``tracemalloc`` peak,
numpy buffers included): N volumes of SIDE^3 float16 held as rows and written at the end (what
the worker did before 2026-12-01) against :class:`raymim.data.shards.ShardWriter` (each volume
its row group as it comes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _mem(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes, 0 for a process that is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) << 10
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) << 10
    except OSError:
        pass
    return pss, rss


def tree_memory(root: int) -> tuple[int, int, int]:
    """(PSS sum, RSS sum, process count) over ``root`` and its descendants."""
    pids = _tree(root)
    pss = rss = 0
    for pid in pids:
        p, r = _mem(pid)
        pss, rss = pss + p, rss + r
    return pss, rss, len(pids)


class Sampler(threading.Thread):
    def __init__(self, root: int, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.stop = threading.Event()
        self.peak_pss = self.peak_rss = self.max_procs = self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            pss, rss, n = tree_memory(self.root)
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.max_procs, self.samples = max(self.max_procs, n), self.samples + 1
            self.stop.wait(self.period)


def _child(manifest: str, warm: str, out: str, shard_mb: int, crop: int) -> None:
    from raymim.config import PrepareConfig
    from raymim.data.pipeline import ensure_ray, prepare

    cfg = PrepareConfig(crop_size=[crop] * 3, crops_per_volume=4, shard_mb=shard_mb)
    ensure_ray()
    prepare(warm, out + "-warm", cfg, progress=False)
    time.sleep(1.0)
    base_pss, base_rss, _ = tree_memory(os.getpid())
    sampler = Sampler(os.getpid())
    sampler.start()
    summary = prepare(manifest, out, cfg, progress=False)
    sampler.stop.set()
    sampler.join()
    mb = 1 / 2**20
    print("RESULT " + json.dumps({
        "cases": summary["cases"], "ok": summary["ok"], "volumes": summary["volumes"], "shards": summary["shards"],
        "seconds": summary["seconds"], "baseline_pss_mb": round(base_pss * mb),
        "peak_pss_mb": round(sampler.peak_pss * mb),
        "baseline_rss_mb": round(base_rss * mb), "peak_rss_mb": round(sampler.peak_rss * mb),
        "max_procs": sampler.max_procs, "samples": sampler.samples}), flush=True)


def writer_peak(n: int, side: int, folder: Path) -> dict:
    """Peak traced memory of writing ``n`` volumes of ``side``^3 into one shard, both ways."""
    import tracemalloc

    import numpy as np

    from raymim.data import shards

    sch = shards.schema("float16")

    def row(i: int) -> dict:
        image = np.random.default_rng(i).random((side,) * 3, dtype=np.float32).astype(np.float16)
        return {"image": image, "shape": [side] * 3, "spacing": [1.5, 1.5, 2.0], "case_id": f"c{i}",
                "label": None, "has_label": False}

    tracemalloc.start()
    rows = [row(i) for i in range(n)]
    shards.write_shard(shards.rows_to_table(rows, sch), folder / "held.parquet", {"cases": []})
    del rows
    held = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    w = shards.ShardWriter(folder / "streamed", sch)
    for i in range(n):
        w.write(row(i))
    w.commit({"cases": []}, ["x"])
    streamed = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mb = 1 / 2**20
    return {"volumes": n, "volume_mb": round(side**3 * 2 * mb, 1), "held_rows_peak_mb": round(held * mb, 1),
            "shard_writer_peak_mb": round(streamed * mb, 1), "held_vs_streamed": round(held / streamed, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=50)
    ap.add_argument("--large", type=int, default=500)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--shard-mb", type=int, default=128)
    ap.add_argument("--workdir", default="/tmp/raymim-bench-mem")
    ap.add_argument("--child", nargs=3, metavar=("MANIFEST", "WARM", "OUT"))
    ap.add_argument("--writer", default=None, metavar="N,SIDE", help="measure one shard's writer instead")
    a = ap.parse_args()
    if a.writer:
        n, side = (int(v) for v in a.writer.split(","))
        folder = Path(a.workdir) / "writer"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        print(json.dumps(writer_peak(n, side, folder)))
        return
    if a.child:
        _child(*a.child, a.shard_mb, a.crop)
        return
    from raymim.data.synth import generate_phantoms

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = generate_phantoms(work / "in", a.large, size=a.size, seed=0)
    gen_s = time.perf_counter() - t0
    lines = manifest.read_text().splitlines()
    subsets = {}
    for n in (a.small, a.large, 4):
        subsets[n] = work / "in" / f"first{n}.csv"
        subsets[n].write_text("\n".join(lines[: n + 1]) + "\n")
    results: dict[int, list[dict]] = {a.small: [], a.large: []}
    load_before = os.getloadavg()
    for r in range(a.reps):
        for n in (a.small, a.large):
            cmd = [sys.executable, __file__, "--shard-mb", str(a.shard_mb), "--crop", str(a.crop), "--child",
                   str(subsets[n]), str(subsets[4]), str(work / f"out-{n}-{r}")]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            results[n].append(json.loads(line[len("RESULT "):]))
            shutil.rmtree(work / f"out-{n}-{r}", ignore_errors=True)
    best = {n: min(v, key=lambda x: x["peak_pss_mb"]) for n, v in results.items()}
    res = {"size": a.size, "crop": a.crop, "shard_mb": a.shard_mb, "generate_s": round(gen_s, 1),
           "loadavg": {"before": [round(x, 1) for x in load_before], "after": [round(x, 1) for x in os.getloadavg()]},
           "runs": {str(n): v for n, v in results.items()},
           "peak_pss_mb": {str(n): b["peak_pss_mb"] for n, b in best.items()},
           "peak_rss_mb": {str(n): min(x["peak_rss_mb"] for x in results[n]) for n in results},
           "large_vs_small_pss": round(best[a.large]["peak_pss_mb"] / best[a.small]["peak_pss_mb"], 3)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
