"""Which layout for preprocessed volumes: Parquet rows of whole volumes vs a chunked zarr store.

Both hold the same volumes (real CTs from ``../shared/data`` preprocessed by raymim's own MONAI
pipeline at the default 1.5 x 1.5 x 2.0 mm, float16), and both are read the way training reads
them: K random 96^3 crops per volume read. Reported per layout: bytes on disk per volume, the
time to read one volume and cut K crops, and the raw read of the same bytes (``pq.read_table``
of the file / reading every chunk of the zarr array) as the baseline.

zarr is not a raymim dependency; this benchmark imports it from ``$ZARR_PATH`` when given
(``pip install --target /tmp/zb zarr``) and skips the zarr rows otherwise.

Run: ``ZARR_PATH=/tmp/zb .venv/bin/python bench/bench_volume_store.py --repeat 5``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAYMIM_TEST_DATA", ROOT.parent / "shared" / "data"))
CASES = ["crlm/CRLM-CT-1004_ct.nii.gz", "crlm/CRLM-CT-1006_ct.nii.gz", "pyradiomics/lung1_image.nrrd",
         "totalsegmentator/example_ct.nii.gz", "totalsegmentator/aorta_ct_cropped.nii.gz"]


def volumes() -> list[np.ndarray]:
    from raymim.config import PrepareConfig
    from raymim.data.transforms import build_preprocess

    pre = build_preprocess(PrepareConfig(), with_label=False)
    return [pre({"image": str(DATA / c)})["image"][0].numpy().astype(np.float16) for c in CASES if (DATA / c).exists()]


def crops(vol: np.ndarray, k: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(k):
        o = [int(rng.integers(0, max(1, s - size + 1))) for s in vol.shape]
        out.append(np.ascontiguousarray(vol[o[0]:o[0] + size, o[1]:o[1] + size, o[2]:o[2] + size]))
    return out


def bench_parquet(vols, work: Path, k: int, size: int, repeat: int) -> dict:
    path = work / "vols.parquet"
    table = pa.table({"image": pa.array([v.tobytes() for v in vols], pa.large_binary()),
                      "shape": pa.array([list(v.shape) for v in vols], pa.list_(pa.int32(), 3))})
    pq.write_table(table, path, row_group_size=1, compression="none", use_dictionary=False,
                   write_statistics=False)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(repeat):
        pq.read_table(path)
    raw = (time.perf_counter() - t0) / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        f = pq.ParquetFile(path)
        for i in range(f.num_row_groups):
            t = f.read_row_group(i)
            buf = t.column("image").chunk(0).buffers()[2]
            vol = np.frombuffer(buf, np.float16, count=int(np.prod(t.column("shape")[0].as_py()))).reshape(
                t.column("shape")[0].as_py())
            crops(vol, k, size, rng)
    crop = (time.perf_counter() - t0) / repeat
    return {"bytes_per_volume": path.stat().st_size / len(vols), "raw_read_s": raw, "read_crop_s": crop}


def bench_zarr(vols, work: Path, k: int, size: int, repeat: int, chunk: int) -> dict | None:
    if os.environ.get("ZARR_PATH"):
        sys.path.insert(0, os.environ["ZARR_PATH"])
    try:
        import zarr
        from zarr.codecs import BloscCodec
    except ImportError:
        return None
    arrays = []
    for i, v in enumerate(vols):
        a = zarr.create_array(str(work / f"v{i}.zarr"), shape=v.shape, chunks=(chunk,) * 3, dtype="float16",
                              compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"))
        a[:] = v
        arrays.append(str(work / f"v{i}.zarr"))
    size_on_disk = sum(sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file()) for p in arrays)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(repeat):
        for p in arrays:
            zarr.open_array(p, mode="r")[:]
    raw = (time.perf_counter() - t0) / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        for p in arrays:
            a = zarr.open_array(p, mode="r")
            for _ in range(k):
                o = [int(rng.integers(0, max(1, s - size + 1))) for s in a.shape]
                a[o[0]:o[0] + size, o[1]:o[1] + size, o[2]:o[2] + size]
    crop = (time.perf_counter() - t0) / repeat
    return {"bytes_per_volume": size_on_disk / len(vols), "raw_read_s": raw, "read_crop_s": crop, "chunk": chunk}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--chunk", type=int, default=64)
    args = p.parse_args()
    vols = volumes()
    n = len(vols)
    with tempfile.TemporaryDirectory() as tmp:
        res = {"volumes": n, "shapes": [list(v.shape) for v in vols],
               "mb_per_volume_in_memory": sum(v.nbytes for v in vols) / n / 1e6,
               "parquet": bench_parquet(vols, Path(tmp), args.k, args.size, args.repeat),
               "zarr": bench_zarr(vols, Path(tmp), args.k, args.size, args.repeat, args.chunk)}
    for name in ("parquet", "zarr"):
        r = res[name]
        if r:
            r["read_crop_ms_per_volume"] = 1e3 * r["read_crop_s"] / n
            r["raw_read_ms_per_volume"] = 1e3 * r["raw_read_s"] / n
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
