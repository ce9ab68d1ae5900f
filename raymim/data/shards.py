"""Parquet shard format: schema, atomic writing, commit records, and the reader for training.

Shard row schema (``SCHEMA_VERSION`` 1), one row per crop, files ``<out>/shards/part-*.parquet``:

============  ==========================================  ===============================================
column        type                                        meaning
============  ==========================================  ===============================================
image         fixed_shape_tensor<dtype>[D, H, W]          crop intensities in [0, 1]; dtype per
                                                          ``prepare.dtype`` (float16 default: 11-bit
                                                          mantissa, <= 5e-4 absolute error on [0, 1],
                                                          i.e. ~1 HU on a 2000 HU window; uint8: 1/255)
case_id       string                                      keyed hash (HMAC) of the case content; never a
                                                          path or a patient identifier
domain        string                                      site / dataset tag from the manifest
modality      string                                      "ct" or "mr" (the intensity scaling applied)
origin        fixed_size_list<int32>[3]                   crop origin in the preprocessed voxel grid
spacing       fixed_size_list<float32>[3]                 voxel spacing (mm) of the preprocessed grid
orientation   string                                      axis codes of the preprocessed grid ("RAS")
mean, std,    float32                                     intensity statistics of the crop (scaled)
p1, p99
foreground    float32                                     fraction of crop voxels above the foreground
                                                          threshold
report        string (nullable)                           report text, null when none
has_label     bool                                        whether ``label`` holds a real label crop
label         fixed_shape_tensor<uint8>[D, H, W]          label crop; all zeros when ``has_label`` is
                                                          false (a null is what the contract means, but
                                                          Parquet in pyarrow 25 cannot round-trip null
                                                          fixed-size lists, so the flag carries it)
source        string (only with ``--keep-paths``)         input path relative to the input root
lesion_prob   fixed_shape_tensor<float32>[D/p, H/p, W/p]  only with ``prepare.lesion_prior``: MPS prior
                                                          lesion score per ``prepare.prior_patch`` patch
                                                          (:mod:`raymim.data.patch_stats`)
============  ==========================================  ===============================================

Layout (chosen by ``bench/bench_shards.py``): tensor columns uncompressed and without dictionary
encoding (float16 noise does not compress, and decoding would cost more than the I/O it saves),
zero-heavy ``label`` zstd-compressed, ~32 MB row groups. Each shard's Parquet key-value metadata
holds its *commit record* (``raymim.commit``: config hash and the status of every case it
completes); a shard appears under its final name only after it is fully written (temp name +
atomic rename), so the rename is the commit point of those cases.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymim.io.discover import discover_cases

SCHEMA_VERSION = 1
COMMIT_KEY = b"raymim.commit"
SHARDS_DIR = "shards"
STATUS_DIR = "_status"  # commit records of batches that produced no crop at all
PRIOR_MODEL_FILE = "prior_model.json"  # MPS prior's population model (raymim.data.patch_stats)
ROW_GROUP_BYTES = 32 << 20
_ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32(), "uint8": pa.uint8()}

__all__ = ["SCHEMA_VERSION", "case_crop_counts", "discover_cases", "load_commits", "read_case_images",
           "read_shards", "rows_to_table", "schema", "write_commit", "write_shard"]


def schema(crop_size: list[int], dtype: str, keep_paths: bool = False, prior_patch: int | None = None) -> pa.Schema:
    """The Arrow schema of a shard for this crop size / stored dtype (+ ``lesion_prob`` grid)."""
    shape = [int(s) for s in crop_size]
    fields = [
        pa.field("image", pa.fixed_shape_tensor(_ARROW_DTYPES[dtype], shape), nullable=False),
        pa.field("case_id", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("origin", pa.list_(pa.int32(), 3)),
        pa.field("spacing", pa.list_(pa.float32(), 3)),
        pa.field("orientation", pa.string()),
        pa.field("mean", pa.float32()),
        pa.field("std", pa.float32()),
        pa.field("p1", pa.float32()),
        pa.field("p99", pa.float32()),
        pa.field("foreground", pa.float32()),
        pa.field("report", pa.string(), nullable=True),
        pa.field("has_label", pa.bool_()),
        pa.field("label", pa.fixed_shape_tensor(pa.uint8(), shape), nullable=False),
    ]
    if keep_paths:
        fields.append(pa.field("source", pa.string()))
    if prior_patch:
        grid = [s // int(prior_patch) for s in shape]
        fields.append(pa.field("lesion_prob", pa.fixed_shape_tensor(pa.float32(), grid), nullable=False))
    return pa.schema(fields)


def rows_to_table(rows: list[dict[str, Any]], sch: pa.Schema) -> pa.Table:
    """Crop rows (dicts of numpy arrays and scalars) -> an Arrow table with ``sch``."""
    cols: dict[str, pa.Array] = {}
    for f in sch:
        if isinstance(f.type, pa.FixedShapeTensorType):
            stacked = np.stack([r[f.name] for r in rows]).astype(f.type.value_type.to_pandas_dtype(), copy=False)
            cols[f.name] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(stacked))
        else:
            cols[f.name] = pa.array([r.get(f.name) for r in rows], type=f.type)
    return pa.Table.from_arrays(list(cols.values()), schema=sch)


def _tmp(path: Path) -> Path:
    return path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")


def _leaf_path(field: pa.Field) -> str:
    """The Parquet column path of a (flat or fixed-size-list) Arrow field."""
    storage = field.type.storage_type if isinstance(field.type, pa.BaseExtensionType) else field.type
    return f"{field.name}.list.element" if pa.types.is_fixed_size_list(storage) else field.name


def write_shard(table: pa.Table, path: Path, commit: dict[str, Any]) -> int:
    """Write ``table`` to ``path`` atomically with ``commit`` in its metadata; returns bytes."""
    meta = dict(table.schema.metadata or {})
    meta[COMMIT_KEY] = json.dumps(commit).encode()
    table = table.replace_schema_metadata(meta)
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tensor_cols = [f.name for f in table.schema if isinstance(f.type, pa.FixedShapeTensorType)]
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    # keyed by Parquet leaf path: a tensor / fixed-size-list column's leaf is "<name>.list.element",
    # and a key that names no leaf is silently ignored (it left ``label`` uncompressed before)
    compression = {_leaf_path(f): "zstd" for f in table.schema}
    compression[_leaf_path(table.schema.field("image"))] = "none"
    pq.write_table(
        table,
        tmp,
        row_group_size=max(1, ROW_GROUP_BYTES // row_bytes),
        compression=compression,
        use_dictionary=strings,
        write_statistics=[c for c in table.column_names if c not in tensor_cols],
    )
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def write_commit(path: Path, commit: dict[str, Any]) -> None:
    """A crop-less commit record (every case of a batch rejected or empty), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(commit))
    os.replace(tmp, path)


def load_commits(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every committed record under ``out_dir`` (shard footers + status files); removes temp files."""
    out = Path(out_dir)
    records = []
    for sub in (SHARDS_DIR, STATUS_DIR):
        folder = out / sub
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".tmp-"):
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
        return [str(p)]
    folder = p / SHARDS_DIR if (p / SHARDS_DIR).is_dir() else p
    files = sorted(str(f.resolve()) for f in folder.glob("*.parquet") if not f.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no shards found in {str(path)!r}.")
    return files


def case_crop_counts(path: str | os.PathLike) -> dict[str, int]:
    """``{case_id: number of crops}`` over the shards of a prepared folder (reads one column)."""
    counts: dict[str, int] = {}
    for f in shard_files(path):
        for cid in pq.read_table(f, columns=["case_id"]).column("case_id").to_pylist():
            counts[cid] = counts.get(cid, 0) + 1
    return counts


def read_case_images(path: str | os.PathLike, case_ids: list[str] | set[str], limit: int | None = None) -> np.ndarray:
    """The ``image`` crops of ``case_ids`` as float32 ``[N, D, H, W]`` (shard order, at most ``limit``)."""
    import pyarrow.compute as pc

    want = pa.array(sorted(case_ids), type=pa.string())
    out: list[np.ndarray] = []
    for f in shard_files(path):
        table = pq.read_table(f, columns=["image", "case_id"], filters=pc.field("case_id").isin(want))
        if table.num_rows:
            out.append(table.column("image").combine_chunks().to_numpy_ndarray().astype(np.float32))
        if limit is not None and sum(len(a) for a in out) >= limit:
            break
    if not out:
        return np.zeros((0,), dtype=np.float32)
    images = np.concatenate(out)
    return images[:limit] if limit is not None else images


def read_shards(path: str | os.PathLike, columns: list[str] | None = None, shuffle: bool = False,
                seed: int | None = None) -> Any:
    """A Ray Dataset over prepared shards, ready for ``iter_torch_batches``.

    ``shuffle`` shuffles the file order, differently at each epoch (execution) even with a
    ``seed``; add ``local_shuffle_buffer_size`` to ``iter_torch_batches`` for row-level mixing.
    The ``image`` column comes out as a ``[B, D, H, W]`` tensor of the stored dtype (float16
    default; pass ``dtypes=torch.float32`` to ``iter_torch_batches`` to upcast on the fly).

    Example::

        ds = read_shards("prepared/", columns=["image"], shuffle=True, seed=0)  # numeric columns only
        for batch in ds.iter_torch_batches(batch_size=2):
            batch["image"].shape  # [2, 96, 96, 96]
    """
    import ray
    from ray.data.datasource import FileShuffleConfig

    shuffle_arg = None
    if shuffle:
        shuffle_arg = FileShuffleConfig(seed=seed, reseed_after_execution=True) if seed is not None else "files"
    ds = ray.data.read_parquet(shard_files(path), shuffle=shuffle_arg)
    return ds.select_columns(columns) if columns else ds
