"""Parquet shards of preprocessed volumes: schema, atomic writing, commit records, the volume index.

Shard row schema (``SCHEMA_VERSION`` 2), one row **per volume** (and one Parquet row group per
row, so a reader fetches exactly one volume's bytes), files ``<out>/shards/part-*.parquet``:

============  ==========================  ==========================================================
column        type                        meaning
============  ==========================  ==========================================================
image         large_binary                the whole preprocessed volume [X, Y, Z], C order, raw bytes
                                          of ``prepare.dtype`` (schema metadata ``raymim.dtype``):
                                          reoriented, resampled, windowed to [0, 1], cropped to the
                                          body. float16 (default): 11-bit mantissa, <= 5e-4 absolute
                                          error on [0, 1], i.e. ~1 HU on a 2000 HU window; uint8: 1/255
shape         fixed_size_list<int32>[3]   the volume's shape (X, Y, Z)
case_id       string                      keyed hash (HMAC) of the case content; never a path or a
                                          patient identifier
domain        string                      site / dataset tag from the manifest
modality      string                      "ct" or "mr" (the intensity scaling applied)
spacing       fixed_size_list<float32>[3] voxel spacing (mm) of the stored grid
orientation   string                      axis codes of the stored grid ("RAS")
foreground    float32                     fraction of voxels above the foreground threshold
report        string (nullable)           report text, null when none
has_label     bool                        whether ``label`` holds a real label volume
label         large_binary                uint8 label volume [X, Y, Z] (zstd); empty when
                                          ``has_label`` is false
source        string (only ``--keep-paths``)  input path relative to the input root
lesion_prob   large_binary (only with     float32 MPS prior grid [X/p, Y/p, Z/p] (``prior_shape``),
              ``prepare.lesion_prior``)   ``p = prepare.prior_patch``: patch (i, j, k) covers voxels
                                          [p i, p i + p) x ...; volumes are zero-padded to multiples
                                          of ``p`` so the grid tiles them exactly
prior_shape   fixed_size_list<int32>[3]   shape of ``lesion_prob`` (only with the prior)
============  ==========================  ==========================================================

Why whole volumes in Parquet rather than a chunked array store (zarr + blosc/zstd chunks indexed
by a Parquet manifest): ``bench/bench_volume_store.py`` on the real CTs of ``../shared/data``
(float16, the default spacing; 2026-12-01) reads a volume and cuts four 96^3 crops in 6.1 ms
from an uncompressed Parquet row group (one ``read_row_group`` + ``np.frombuffer``, no decode)
against 59.9 ms for zarr decoding the 64^3 blosc-zstd chunks those crops touch: ~10x less CPU
per volume read; zarr stores 1.75x fewer bytes (6.3 vs 11.1 MB per volume). Training is
CPU-bound on the crop path (bench/results/data_plane_2026-12-01.md), the format needs no new
dependency, and pyarrow reads it from S3/GCS the same way. The ``image``
column is therefore stored uncompressed without dictionary or statistics; the zero-heavy
``label`` and the small columns are zstd-compressed.

Each shard's Parquet key-value metadata holds its *commit record* (``raymim.commit``: config
hash and the status of every case it completes); a shard appears under its final name only
after it is fully written (temp name + atomic rename), so the rename is the commit point.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymim.atomic import TMP_PREFIX, atomic_write, write_text_atomic

SCHEMA_VERSION = 2
COMMIT_KEY = b"raymim.commit"
DTYPE_KEY = b"raymim.dtype"
SHARDS_DIR = "shards"
STATUS_DIR = "_status"  # commit records of batches that produced no volume at all
PRIOR_MODEL_FILE = "prior_model.json"  # MPS prior's population model (raymim.data.patch_stats)
# Columns of the volume index: everything but the voxel payloads.
INDEX_COLUMNS = ("case_id", "shape", "spacing", "domain", "modality", "foreground", "has_label")

__all__ = ["SCHEMA_VERSION", "case_ids", "load_commits", "read_volume", "rows_to_table",
           "schema", "shard_files", "volume_index", "write_commit", "write_shard"]


def schema(dtype: str, keep_paths: bool = False, prior: bool = False) -> pa.Schema:
    """The Arrow schema of a volume shard (``dtype``: the stored image dtype)."""
    fields = [
        pa.field("image", pa.large_binary(), nullable=False),
        pa.field("shape", pa.list_(pa.int32(), 3)),
        pa.field("case_id", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("spacing", pa.list_(pa.float32(), 3)),
        pa.field("orientation", pa.string()),
        pa.field("foreground", pa.float32()),
        pa.field("report", pa.string(), nullable=True),
        pa.field("has_label", pa.bool_()),
        pa.field("label", pa.large_binary()),
    ]
    if keep_paths:
        fields.append(pa.field("source", pa.string()))
    if prior:
        fields += [pa.field("lesion_prob", pa.large_binary()), pa.field("prior_shape", pa.list_(pa.int32(), 3))]
    return pa.schema(fields, metadata={DTYPE_KEY: dtype.encode()})


def rows_to_table(rows: list[dict[str, Any]], sch: pa.Schema) -> pa.Table:
    """Volume rows (numpy arrays ``image`` / ``label`` / ``lesion_prob`` + scalars) -> an Arrow table."""
    cols = []
    for f in sch:
        if f.name in ("image", "label", "lesion_prob"):
            cols.append(pa.array([b"" if r.get(f.name) is None else np.ascontiguousarray(r[f.name]).tobytes()
                                  for r in rows], f.type))
        else:
            cols.append(pa.array([r.get(f.name) for r in rows], type=f.type))
    return pa.Table.from_arrays(cols, schema=sch)


def write_shard(table: pa.Table, path: Path, commit: dict[str, Any]) -> int:
    """Write ``table`` to ``path`` atomically (one row group per volume) with ``commit``; returns bytes."""
    meta = dict(table.schema.metadata or {})
    meta[COMMIT_KEY] = json.dumps(commit).encode()
    table = table.replace_schema_metadata(meta)
    compression = {f.name: "zstd" for f in table.schema}
    compression["image"] = "none"  # float16 noise barely compresses; decoding would cost the read path
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, row_group_size=1, compression=compression, use_dictionary=strings,
                       write_statistics=[c for c in table.column_names if c not in ("image", "label", "lesion_prob")])
    return path.stat().st_size


def write_commit(path: Path, commit: dict[str, Any]) -> None:
    """A volume-less commit record (every case of a batch rejected), written atomically."""
    write_text_atomic(path, json.dumps(commit))


def load_commits(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every committed record under ``out_dir`` (shard footers + status files); removes temp files."""
    out = Path(out_dir)
    records = []
    for sub in (SHARDS_DIR, STATUS_DIR):
        folder = out / sub
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.name.startswith(TMP_PREFIX):
                p.unlink(missing_ok=True)  # left by a killed run: never committed
            elif p.suffix == ".parquet":
                rec = json.loads(pq.read_schema(p).metadata[COMMIT_KEY])
                records.append(dict(rec, shard=p.name, bytes=p.stat().st_size))
            elif p.suffix == ".json":
                records.append(dict(json.loads(p.read_text()), shard=None, bytes=0))
    return records


def shard_files(path: str | os.PathLike) -> list[str]:
    """Parquet files of a prepared folder (``<out>``, ``<out>/shards``) or a single shard file."""
    p = Path(path)
    if p.is_file():
        return [str(p.resolve())]
    folder = p / SHARDS_DIR if (p / SHARDS_DIR).is_dir() else p
    files = sorted(str(f.resolve()) for f in folder.glob("*.parquet") if not f.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no shards found in {str(path)!r}.")
    return files


def volume_index(path: str | os.PathLike) -> list[dict[str, Any]]:
    """One small record per stored volume: ``file``, ``row_group`` and the :data:`INDEX_COLUMNS`
    (reads only those columns; the voxel payloads stay on disk). Sorted by case id, so the
    order does not depend on how the volumes fell into shards."""
    out = []
    for f in shard_files(path):
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        t = pf.read(columns=[c for c in INDEX_COLUMNS if c in names])
        for i, rec in enumerate(t.to_pylist()):
            out.append(dict(rec, file=f, row_group=i, dtype=pf.schema_arrow.metadata[DTYPE_KEY].decode(),
                            prior="lesion_prob" in names))
    return sorted(out, key=lambda r: r["case_id"])


def case_ids(path: str | os.PathLike) -> list[str]:
    """The case ids of a prepared folder's volumes (reads one small column)."""
    return sorted(cid for f in shard_files(path) for cid in pq.read_table(f, columns=["case_id"])
                  .column("case_id").to_pylist())


def _array(value: Any, dtype: Any, shape: list[int]) -> np.ndarray | None:
    buf = value.as_buffer() if value.is_valid else None
    if buf is None or buf.size == 0:
        return None
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def read_volume(file: str, row_group: int, columns: list[str] | None = None) -> dict[str, Any]:
    """One stored volume as numpy (zero-copy views of the Arrow buffers: read-only): ``image``
    [X, Y, Z] in the stored dtype, ``label`` uint8 or None, ``lesion_prob`` float32 or None, and
    the scalar columns. ``columns`` limits what is read (``image`` and ``shape`` always are)."""
    pf = pq.ParquetFile(file)
    names = pf.schema_arrow.names
    want = names if columns is None else [c for c in names if c in set(columns) | {"image", "shape"}
                                          or (c == "prior_shape" and "lesion_prob" in columns)]
    t = pf.read_row_group(row_group, columns=want)
    dtype = np.dtype(pf.schema_arrow.metadata[DTYPE_KEY].decode())
    out: dict[str, Any] = {}
    for name in t.column_names:
        value = t.column(name)[0]
        if name == "image":
            continue
        if name not in ("label", "lesion_prob"):
            out[name] = value.as_py()
    shape = out["shape"]
    out["image"] = _array(t.column("image")[0], dtype, shape)
    if "label" in t.column_names:
        out["label"] = _array(t.column("label")[0], np.uint8, shape) if out.get("has_label", True) else None
    if "lesion_prob" in t.column_names:
        out["lesion_prob"] = _array(t.column("lesion_prob")[0], np.float32, out["prior_shape"])
    return out
