"""``raymim prepare`` vs a plain MONAI ``Dataset`` + ``DataLoader(num_workers=2)`` script, on real CT.

Usage::

    .venv/bin/python bench/bench_prepare.py --data ../shared/data --volumes 48 --reps 3 \\
        --workdir /tmp/rb/prep [--before /tmp/before]

One JSON line with the figures of issue #18, every variant measured in the same run:

- **whole process**: wall time of ``raymim prepare --input IN --out OUT`` as a fresh process (Ray
  start, header pass, tasks, shards, manifest, operator report) against this file run as
  ``--monai-run IN OUT``: a self-contained MONAI script (no raymim import) doing the work prepare
  stores: ``LoadImaged`` -> ``EnsureChannelFirstd`` -> ``Orientationd`` (RAS) -> ``Spacingd``
  (1.5 x 1.5 x 2 mm, bilinear) -> ``ScaleIntensityRanged`` (-1000..1000 HU -> [0, 1], clipped) ->
  ``CropForegroundd`` (> 0.05) -> ``SpatialPadd`` (96^3) -> float16, in a ``monai.data.Dataset``
  read by ``DataLoader(num_workers=2)``, the main process writing each volume as one
  uncompressed Parquet row group (pyarrow, a new file every 128 MB). No crop is cut by either:
  training draws crops from the stored volumes. ``--before DIR`` adds a third variant, a
  ``raymim`` package tree (``git archive HEAD raymim | tar -x -C DIR``) run with ``PYTHONPATH=DIR``;
  repetitions are interleaved (A/B/C, A/B/C, ...) because the box is shared;
- **in-process, per volume** (one process, one torch thread, volumes interleaved): the bare MONAI
  transforms + float16 cast against raymim's whole per-volume worker work (content hash, input
  checks, the same preprocessing through :class:`raymim.io.readers.VolumeReader`, row conversion,
  the streaming Parquet write), with the worker's phases timed separately.

Data: the real CTs of ``--data`` (``crlm/*.nii.gz``, ``totalsegmentator/example_ct.nii.gz`` and
``aorta_ct_cropped.nii.gz``), copied round-robin into ``<workdir>/in`` until ``--volumes``; copy
``i`` of a scan has its voxel array flipped along the axes of the bits of ``i % 8`` and its last
``i // 8`` slices dropped (header and affine kept), so every copy has distinct bytes and content
ids (prepare's duplicate detection keeps them all) while the work per copy stays that of the scan.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SPACING = (1.5, 1.5, 2.0)
WINDOW = (-1000.0, 1000.0)
FOREGROUND = 0.05  # raymim.data.crops.FOREGROUND
PAD = (96, 96, 96)
SHARD_BYTES = 128 << 20
BASE_CTS = ("crlm/CRLM-CT-1004_ct.nii.gz", "crlm/CRLM-CT-1006_ct.nii.gz", "totalsegmentator/example_ct.nii.gz",
            "totalsegmentator/aorta_ct_cropped.nii.gz")


def build_ct_set(data: Path, dest: Path, n: int) -> list[Path]:
    """``n`` distinct copies of the real CTs under ``dest`` (see the module docstring); reused when present."""
    import nibabel as nib

    dest.mkdir(parents=True, exist_ok=True)
    bases = [data / b for b in BASE_CTS if (data / b).is_file()]
    if not bases:
        raise SystemExit(f"no real CT under {data} (expected {', '.join(BASE_CTS)})")
    out = []
    for i in range(n):
        src, copy = bases[i % len(bases)], i // len(bases)
        path = dest / f"{src.name.removesuffix('.nii.gz')}_c{copy:02d}.nii.gz"
        out.append(path)
        if path.exists():
            continue
        img = nib.load(str(src))
        arr = np.asanyarray(img.dataobj)
        arr = np.flip(arr, axis=tuple(a for a in range(3) if copy >> a & 1)) if copy % 8 else arr
        arr = arr[:, :, : arr.shape[2] - copy // 8]
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), img.affine, img.header), str(path))
    return out


# -- the MONAI baseline (self-contained: no raymim import) -----------------------------------------


def monai_transforms():
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )

    return Compose([
        LoadImaged("image", image_only=True),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=SPACING, mode="bilinear"),
        ScaleIntensityRanged("image", a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd("image", source_key="image", select_fn=_foreground, allow_smaller=True),
        SpatialPadd("image", spatial_size=PAD, mode="constant"),
    ])


def _foreground(x):
    return x > FOREGROUND


def _to_stored(d: dict) -> dict:
    img = d["image"]
    spacing = [float(v) for v in np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)]
    return {"image": img[0].as_tensor().to(dtype=__import__("torch").float16), "spacing": spacing}


def monai_run(inp: Path, out: Path) -> None:
    """The baseline as a whole process: MONAI Dataset + DataLoader(num_workers=2) -> float16 Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, Lambda

    files = sorted(str(p) for p in inp.glob("*.nii.gz"))
    ds = Dataset([{"image": f} for f in files], Compose([monai_transforms(), Lambda(_to_stored)]))
    loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda x: x)
    sch = pa.schema([pa.field("image", pa.large_binary()), pa.field("shape", pa.list_(pa.int32(), 3)),
                     pa.field("spacing", pa.list_(pa.float32(), 3))])
    out.mkdir(parents=True, exist_ok=True)
    writer, written, part = None, 0, 0
    for item in loader:
        arr = item["image"].numpy()
        if writer is None:
            writer = pq.ParquetWriter(out / f"part-{part:04d}.parquet", sch, compression={"image": "none",
                                      "shape": "zstd", "spacing": "zstd"})
        table = pa.table({"image": pa.array([arr.tobytes()], pa.large_binary()), "shape": [list(arr.shape)],
                          "spacing": [item["spacing"]]}, schema=sch)
        writer.write_table(table, row_group_size=1)
        written += arr.nbytes
        if written >= SHARD_BYTES:
            writer.close()
            writer, written, part = None, 0, part + 1
    if writer is not None:
        writer.close()


# -- whole process ---------------------------------------------------------------------------------


def _timed(cmd: list[str], env: dict[str, str], cwd: Path, label: str) -> float:
    """Wall seconds of one run; a run that fails (a Ray node that times out starting on an
    overloaded box) is run once more, and its time is that of the run that finished."""
    for attempt in (1, 2):
        start = time.perf_counter()
        res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
        took = time.perf_counter() - start
        if res.returncode in (0, 3):
            print(f"{label}: {took:.2f} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            return took
        print(f"{label}: attempt {attempt} failed ({res.returncode}): {res.stderr[-800:]}", file=sys.stderr, flush=True)
    raise SystemExit(f"{label} failed twice")


def whole_process(inp: Path, work: Path, reps: int, before: Path | None, py: str, after: Path | None = None) -> dict:
    here = Path(__file__).resolve()
    repo = after or here.parent.parent
    # a loaded box starts a raylet slowly: Ray's default 10 s wait fails there
    base_env = dict(os.environ, RAYMIM_DEID_KEY="bench-" + "0" * 58, PYTHONHASHSEED="0",
                    RAY_raylet_start_wait_time_s="120")
    base_env.pop("RAY_ADDRESS", None)
    variants = {"monai_dataloader": ([py, str(here), "--monai-run", str(inp)], dict(base_env)),
                "prepare": ([py, "-c", "from raymim.cli import main; main()", "prepare", "--input", str(inp),
                             "--no-progress", "--json", "--overwrite"], dict(base_env, PYTHONPATH=str(repo)))}
    if before is not None:
        variants["prepare_before"] = (variants["prepare"][0], dict(base_env, PYTHONPATH=str(before)))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(reps):
        for name, (cmd, env) in variants.items():
            out = work / f"out-{name}-{r}"
            full = [*cmd, str(out)] if name == "monai_dataloader" else [*cmd, "--out", str(out)]
            times[name].append(_timed(full, env, work, f"rep {r} {name}"))  # cwd: the workdir (PYTHONPATH's tree)
    res = {k: {"median_s": round(statistics.median(v), 2), "all_s": [round(x, 2) for x in v]}
           for k, v in times.items()}
    base = times["monai_dataloader"]
    for k in variants:
        if k != "monai_dataloader":
            ratios = [b / t for b, t in zip(base, times[k])]  # per repetition: same load on both
            res[k]["speedup_vs_monai"] = {"median": round(statistics.median(ratios), 3),
                                          "all": [round(x, 3) for x in ratios]}
    return res


# -- in-process, per volume ------------------------------------------------------------------------


def in_process(files: list[Path], work: Path, reps: int, phase_volumes: int) -> dict:
    """Per-volume seconds, one process: bare MONAI (+ float16) vs raymim's ``process_case`` + shard write,
    interleaved volume by volume; then raymim's phases on the first ``phase_volumes`` volumes."""
    import dataclasses

    import torch

    torch.set_num_threads(1)  # as each prepare task / DataLoader worker runs
    from raymim.config import PrepareConfig
    from raymim.data import shards as shard_io
    from raymim.data import worker
    from raymim.io.deid import content_digest, keyed_id
    from raymim.io.discover import digest_input, discover_cases

    manifest = work / "inproc.csv"
    manifest.write_text("image\n" + "\n".join(str(f) for f in files) + "\n")
    cases = discover_cases(manifest)
    cfg = PrepareConfig()
    ctx = {"cfg": dataclasses.asdict(cfg), "key": "00" * 32, "config_hash": "bench", "keep_paths": False,
           "done": []}
    monai = monai_transforms()
    sch = shard_io.schema(cfg.dtype)
    t_monai, t_raymim = [], []
    writer = shard_io.ShardWriter(work / "inproc-shards", sch)
    phases = {"hash": 0.0, "transform": 0.0, "row": 0.0, "write": 0.0}
    try:
        worker.process_case(cases[0], ctx)  # warm-up: imports and the cached Compose
        _to_stored(monai({"image": str(files[0])}))
        for _ in range(reps):
            for case, f in zip(cases, files):
                t0 = time.perf_counter()
                _to_stored(monai({"image": str(f)}))
                t1 = time.perf_counter()
                _, row = worker.process_case(case, ctx)
                writer.write(row)
                t2 = time.perf_counter()
                t_monai.append(t1 - t0)
                t_raymim.append(t2 - t1)
                del row
        for case in cases[:phase_volumes]:  # the same work as process_case, piece by piece
            t0 = time.perf_counter()
            cid = keyed_id(b"\0" * 32, content_digest(digest_input(case), digest_input(case, "label")))
            t1 = time.perf_counter()
            pre = worker.preprocess_case(case, cfg, "bench")
            t2 = time.perf_counter()
            row = worker._volume_row(case, cid, pre, cfg, ctx)
            t3 = time.perf_counter()
            writer.write(row)
            t4 = time.perf_counter()
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k] += v
    finally:
        writer.abort()
    n, m = len(t_monai), max(1, min(phase_volumes, len(cases)))
    ratios = [b / a for a, b in zip(t_monai, t_raymim)]
    return {"volumes": n, "monai_ms_per_volume_median": round(1e3 * statistics.median(t_monai), 1),
            "raymim_ms_per_volume_median": round(1e3 * statistics.median(t_raymim), 1),
            "monai_total_s": round(sum(t_monai), 2), "raymim_total_s": round(sum(t_raymim), 2),
            "raymim_over_monai_total": round(sum(t_raymim) / sum(t_monai), 3),
            "raymim_over_monai_per_volume_median": round(statistics.median(ratios), 3),
            "raymim_phases_ms_per_volume": {k: round(1e3 * v / m, 1) for k, v in phases.items()},
            "raymim_from": str(Path(worker.__file__).parent.parent)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--volumes", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--inproc-reps", type=int, default=1)
    ap.add_argument("--inproc-volumes", type=int, default=None, help="in-process: the first N volumes (default all)")
    ap.add_argument("--phase-volumes", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/raymim-bench-prepare")
    ap.add_argument("--before", default=None, help="a raymim package tree to time as well (PYTHONPATH)")
    ap.add_argument("--after", default=None, help="the raymim tree timed as `prepare` (default this checkout)")
    ap.add_argument("--skip", choices=["whole", "inproc"], default=None)
    ap.add_argument("--monai-run", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.monai_run:
        monai_run(Path(a.monai_run[0]), Path(a.monai_run[1]))
        return
    work = Path(a.workdir).resolve()
    files = build_ct_set(Path(a.data), work / "in", a.volumes)
    res: dict = {"volumes": len(files), "input_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
                 "cpus": os.cpu_count(), "loadavg_before": [round(x, 1) for x in os.getloadavg()]}
    if a.skip != "whole":
        res["whole_process"] = whole_process(work / "in", work, a.reps, Path(a.before).resolve() if a.before
                                             else None, sys.executable, Path(a.after).resolve() if a.after else None)
    if a.skip != "inproc":
        res["in_process"] = in_process(files[: a.inproc_volumes], work, a.inproc_reps, a.phase_volumes)
    res["loadavg_after"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
