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
hash, the time it was written and the status of every case it completes); a shard appears under
its final name only after it is fully written (temp name + atomic rename), so the rename is the
commit point. :class:`ShardWriter` streams: each volume becomes its row group as soon as it is
preprocessed (``pyarrow.parquet.ParquetWriter``), the commit record goes into the footer when the
shard is closed, so a task holds one volume at a time however large ``prepare.shard_mb`` is.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
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

__all__ = ["SCHEMA_VERSION", "ShardWriter", "case_ids", "drop_volumes", "load_commits", "read_progress",
           "read_volume", "rows_to_table", "schema", "shard_files", "volume_index", "write_commit",
           "write_progress", "write_shard"]


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
        if f.name in ("image", "label", "lesion_prob") and len(rows) == 1:  # zero-copy: a view of the array
            data = rows[0].get(f.name)
            data = pa.py_buffer(np.ascontiguousarray(data)) if data is not None else pa.py_buffer(b"")
            offsets = pa.py_buffer(np.array([0, data.size], np.int64))
            cols.append(pa.Array.from_buffers(f.type, 1, [None, offsets, data]))
        elif f.name in ("image", "label", "lesion_prob"):
            cols.append(pa.array([b"" if r.get(f.name) is None else np.ascontiguousarray(r[f.name]).tobytes()
                                  for r in rows], f.type))
        else:
            cols.append(pa.array([r.get(f.name) for r in rows], type=f.type))
    return pa.Table.from_arrays(cols, schema=sch)


def _writer_options(sch: pa.Schema) -> dict[str, Any]:
    compression = {f.name: "zstd" for f in sch}
    compression["image"] = "none"  # float16 noise barely compresses; decoding would cost the read path
    return {"compression": compression, "use_dictionary": [f.name for f in sch if pa.types.is_string(f.type)],
            "write_statistics": [f.name for f in sch if f.name not in ("image", "label", "lesion_prob")]}


def write_shard(table: pa.Table, path: Path, commit: dict[str, Any]) -> int:
    """Write ``table`` to ``path`` atomically (one row group per volume) with ``commit``; returns bytes."""
    meta = dict(table.schema.metadata or {})
    meta[COMMIT_KEY] = json.dumps(commit).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, row_group_size=1, **_writer_options(table.schema))
    return path.stat().st_size


def shard_name(case_ids: list[str]) -> str:
    """The file name of the shard (or status record, plus ``.json``) completing ``case_ids``: a
    hash of them, so a retried task that completes the same cases writes the same name."""
    return "part-" + hashlib.sha256("|".join(case_ids).encode()).hexdigest()[:16]


class ShardWriter:
    """One shard written as its volumes come: :meth:`write` appends a volume as its own row group
    (nothing but the Parquet writer's small buffers stays in memory), :meth:`commit` puts the commit
    record into the footer and renames the temp file to its final name (the commit point);
    :meth:`abort` removes it. The temp file (``.tmp-*``, skipped and removed by
    :func:`load_commits`) is created on the first volume.

    Example::

        w = ShardWriter(out / SHARDS_DIR, schema("float16"))
        w.write(row)                     # volume row: numpy image / label + scalars
        name = w.commit(commit, ["cid"])  # "part-....parquet"
    """

    def __init__(self, folder: Path, sch: pa.Schema) -> None:
        self.folder, self.schema = Path(folder), sch
        self.tmp: Path | None = None
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0
        self.bytes = 0  # voxel payload bytes written (what ``prepare.shard_mb`` counts)

    def write(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.tmp = self.folder / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-part.parquet"
            self._writer = pq.ParquetWriter(self.tmp, self.schema, **_writer_options(self.schema))
        self._writer.write_table(rows_to_table([row], self.schema), row_group_size=1)
        self.rows += 1
        self.bytes += sum(int(row[k].nbytes) for k in ("image", "label", "lesion_prob")
                          if isinstance(row.get(k), np.ndarray))

    def commit(self, commit: dict[str, Any], case_ids: list[str]) -> str:
        """Close the shard with ``commit`` in its footer under the name of ``case_ids``; returns the name."""
        assert self._writer is not None and self.tmp is not None, "commit() of a shard without volumes"
        self._writer.add_key_value_metadata({COMMIT_KEY: json.dumps(commit).encode()})
        self._writer.close()
        self._writer = None
        path = self.folder / f"{shard_name(case_ids)}.parquet"
        with atomic_write(path) as tmp:  # fsync, rename onto the final name, fsync the folder
            os.replace(self.tmp, tmp)
        self.tmp = None
        return path.name

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file is removed anyway
                pass
            self._writer = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


def write_commit(path: Path, commit: dict[str, Any]) -> None:
    """A volume-less commit record (every case of a batch rejected), written atomically."""
    write_text_atomic(path, json.dumps(commit))


def load_commits(out_dir: str | os.PathLike, clean: bool = False) -> list[dict[str, Any]]:
    """Every committed record under ``out_dir`` (shard footers + status files). ``clean``: also
    remove temp files (left by a killed run or a cancelled task: never committed); only while
    no task writes, since a running task's open shard is such a temp file."""
    out = Path(out_dir)
    records = []
    for sub in (SHARDS_DIR, STATUS_DIR):
        folder = out / sub
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.name.startswith(TMP_PREFIX):
                if clean:
                    p.unlink(missing_ok=True)
            elif p.suffix == ".parquet":
                # The footer's key-value metadata (a streamed shard adds its commit there at close).
                rec = json.loads(pq.read_metadata(p).metadata[COMMIT_KEY])
                records.append(dict(rec, shard=p.name, bytes=p.stat().st_size))
            elif p.suffix == ".json":
                records.append(dict(json.loads(p.read_text()), shard=None, bytes=0))
    return records


def drop_volumes(out_dir: str | os.PathLike, shard: str, case_ids: set[str]) -> int:
    """Remove the volumes of ``case_ids`` from shard ``shard`` of ``out_dir``, and their entries from
    its commit record; returns how many volumes went.

    The other volumes are copied row group by row group (one volume in memory at a time) into a
    temp file that replaces the shard under its own name (one atomic rename: a crash leaves the old
    shard or the new one, never both). A shard left without volumes is replaced by a status
    record of its remaining (rejected) entries, written before the shard is deleted (a crash in
    between leaves both, whose records agree)."""
    out = Path(out_dir)
    path = out / SHARDS_DIR / shard
    pf = pq.ParquetFile(path)
    commit = json.loads(pf.metadata.metadata[COMMIT_KEY])
    ids = pf.read(columns=["case_id"]).column("case_id").to_pylist()
    keep = [i for i, cid in enumerate(ids) if cid not in case_ids]
    if len(keep) == len(ids):
        return 0
    commit["cases"] = [c for c in commit["cases"] if c.get("case_id") not in case_ids]
    if not keep:
        if commit["cases"]:
            write_commit(out / STATUS_DIR / f"{Path(shard).stem}.json", commit)
        path.unlink()
        return len(ids)
    sch = pf.schema_arrow.with_metadata({DTYPE_KEY: pf.schema_arrow.metadata[DTYPE_KEY]})
    with atomic_write(path) as tmp:
        writer = pq.ParquetWriter(tmp, sch, **_writer_options(sch))
        try:
            for i in keep:
                writer.write_table(pf.read_row_group(i).replace_schema_metadata(sch.metadata), row_group_size=1)
            writer.add_key_value_metadata({COMMIT_KEY: json.dumps(commit).encode()})
        finally:
            writer.close()
    return len(ids) - len(keep)


def write_progress(path: Path, index: int) -> None:
    """Record that a task starts case ``index`` (a tiny file the driver polls; no fsync)."""
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    tmp.write_text(str(int(index)))
    os.replace(tmp, path)


def read_progress(path: Path) -> int | None:
    """The case index :func:`write_progress` last recorded at ``path``, or None (not started)."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


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
