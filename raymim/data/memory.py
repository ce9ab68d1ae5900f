"""How much memory preparing one case takes, estimated from its header before anything is decoded.

``raymim prepare`` asks Ray for this much (``memory=`` on the task that prepares the case), so
Ray never packs more volumes onto a node than it can hold, and rejects up front, with a reason,
a case that fits on no node (instead of Ray's memory monitor killing and retrying it forever).

The model, calibrated on NIfTI int16 CTs (peak RSS of one worker; ``/proc`` ``ru_maxrss``,
2026-12-01, MONAI 1.6.1): 256 x 256 x 200 at 0.8 x 0.8 x 1.5 mm -> 312 MB over the worker's
520 MB; 512 x 512 x 100 at 0.7 x 0.7 x 2.5 mm -> 705 MB; 128 x 128 x 100 at 3 x 3 x 4 mm
(upsampled 8x) -> 718 MB; about 13 bytes per input voxel plus 65 per resampled output voxel.
The constants below round these up (the model overestimates those three by 10-30 %) and give
13.4 GB for the 1024 x 1024 x 600 int16 volume that used 13 GB in one worker:

- ``WORKER_BYTES``: a Ray worker with torch and MONAI imported;
- per input voxel: its stored bytes (the decoded file) + ``DECODE_BYTES`` (float32 copy,
  reorientation, channel axis);
- per output voxel: ``RESAMPLE_BYTES`` when ``prepare.spacing`` resamples (MONAI's sampling grid
  and interpolation buffers, windowing, cropping, the stored copy), ``COPY_BYTES`` when it does
  not (native grid already at the target spacing, or ``spacing: null``), + ``PRIOR_BYTES`` with
  the MPS prior's patch descriptors;
- a label volume costs the same again (its own decode and nearest-neighbour resampling).

Output voxels are the input's times the ratio of native to target spacing (at least
``prepare.crop_size``, which volumes are padded to). A header that cannot be read, or that the
readers' checks refuse (absurd dimensions, over ``prepare.max_voxels``), gets no estimate here:
the worker rejects it with the readers' reason, and the task asks for :data:`UNKNOWN_BYTES`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from raymim.config import PrepareConfig
from raymim.io.checks import check_geometry, open_regular, regular_file
from raymim.io.discover import case_input
from raymim.io.readers import check_file

WORKER_BYTES = 640 << 20
DECODE_BYTES = 16
RESAMPLE_BYTES = 72
COPY_BYTES = 8
PRIOR_BYTES = 32
GRANULE = 64 << 20  # requests are rounded up to this, so similar cases ask for the same amount

__all__ = ["estimate_bytes", "estimate_cases", "header_geometry", "largest_node_memory", "request_bytes"]


def _nifti(path: Path) -> tuple[list[int], int, list[float]]:
    import nibabel as nib

    img = nib.load(str(path))
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return [int(s) for s in img.shape], int(img.get_data_dtype().itemsize), zooms


_NRRD_BYTES = (("double", 8), ("64", 8), ("longlong", 8), ("float", 4), ("32", 4), ("int", 4),
               ("16", 2), ("short", 2), ("8", 1), ("char", 1), ("block", 1))


def _nrrd(path: Path) -> tuple[list[int], int, list[float]]:
    import nrrd

    with open_regular(path) as f:
        head = f.read(1 << 20)
    m = re.search(rb"\r?\n\r?\n", head)
    header = nrrd.read_header(head[: m.start() if m else len(head)].decode("latin-1").splitlines())
    kind = str(header.get("type", "")).lower()
    itemsize = next((n for word, n in _NRRD_BYTES if word in kind), 4)
    dirs = header.get("space directions")
    if dirs is not None:
        spacing = [float(np.linalg.norm(d)) for d in dirs if d is not None]
    else:
        spacing = [float(s) for s in header.get("spacings", [1.0, 1.0, 1.0])]
    return [int(s) for s in header.get("sizes", [])], itemsize, spacing


def _dicom(files: list[Path]) -> tuple[list[int], int, list[float]]:
    """Geometry of a DICOM series from the first slice header that has one (pixels never read)."""
    import pydicom

    tags = ["Rows", "Columns", "NumberOfFrames", "BitsAllocated", "PixelSpacing", "SliceThickness",
            "SpacingBetweenSlices"]
    for f in files[:8]:  # a folder may start with an RTSTRUCT or an SR: try a few
        try:
            with open_regular(f) as fh:
                ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=tags, force=True)
        except Exception:  # noqa: BLE001 - not this file; try the next
            continue
        if ds.get("Rows") and ds.get("Columns"):
            frames = int(ds.get("NumberOfFrames") or 1)
            slices = frames if frames > 1 else len(files)
            ps = [float(v) for v in (ds.get("PixelSpacing") or [1.0, 1.0])][:2]
            step = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
            return [int(ds.Columns), int(ds.Rows), slices], max(1, int(ds.get("BitsAllocated") or 16) // 8), \
                [ps[1], ps[0], step]
    raise ValueError("no image slice header")


def header_geometry(inp: str | os.PathLike | list[str] | None, max_voxels: int | None = None) \
        -> tuple[list[int], int, list[float]] | None:
    """``(shape [X, Y, Z], bytes per stored voxel, spacing mm)`` from an input's header, or None when
    it cannot be read or the readers' header checks refuse it (they give the reason later)."""
    if not inp:
        return None
    try:
        if isinstance(inp, list):  # the slices of a series that shares its folder
            fmt, files = "dicom", [Path(f) for f in inp]
        else:
            path = Path(inp)
            fmt = check_file(path)  # regular file, magic bytes: nothing else is opened
            files = sorted(f for f in path.iterdir() if not f.name.startswith(".") and f.is_file()) \
                if path.is_dir() else [path]
        if fmt == "nifti":
            shape, itemsize, spacing = _nifti(files[0])
        elif fmt == "nrrd":
            shape, itemsize, spacing = _nrrd(files[0])
        else:
            for f in files:
                regular_file(f)
            shape, itemsize, spacing = _dicom(files)
        check_geometry(shape, spacing if len(spacing) >= 3 else [1.0, 1.0, 1.0], max_voxels)
    except Exception:  # noqa: BLE001 - unreadable header: the worker says why
        return None
    return shape[:3], itemsize, [abs(s) for s in spacing[:3]]


def _output_voxels(shape: list[int], spacing: list[float], cfg: PrepareConfig) -> tuple[int, bool]:
    """(voxels after resampling and padding, whether ``prepare.spacing`` resamples at all)."""
    voxels = math.prod(shape)
    resample = cfg.spacing is not None and not np.allclose(spacing, cfg.spacing, rtol=1e-3)
    if resample:
        voxels = voxels * math.prod(s / t for s, t in zip(spacing, cfg.spacing))
    return max(int(voxels), math.prod(int(c) for c in cfg.crop_size)), resample


def estimate_bytes(case: dict[str, Any], cfg: PrepareConfig) -> int | None:
    """Peak memory (bytes) of the worker that prepares ``case``, from its header(s); None when the
    image header cannot be read or is refused (the worker then rejects the case with the reason)."""
    geo = header_geometry(case_input(case), cfg.max_voxels)
    if geo is None:
        return None
    shape, itemsize, spacing = geo
    out, resample = _output_voxels(shape, spacing, cfg)
    per_out = (RESAMPLE_BYTES if resample else COPY_BYTES) + (PRIOR_BYTES if cfg.lesion_prior else 0)
    total = WORKER_BYTES + math.prod(shape) * (itemsize + DECODE_BYTES) + out * per_out
    if case.get("label"):
        lgeo = header_geometry(case["label"], cfg.max_voxels)
        lshape, litem = (lgeo[0], lgeo[1]) if lgeo else (shape, 1)
        total += math.prod(lshape) * (litem + DECODE_BYTES) + out * (RESAMPLE_BYTES if resample else COPY_BYTES)
    return int(total)


# What a task asks for when a header gives no estimate: a 512 x 512 x 300 int16 CT resampled to
# about a fifth of its voxels (such a case is usually rejected by the reader within seconds).
UNKNOWN_BYTES = WORKER_BYTES + 512 * 512 * 300 * (2 + DECODE_BYTES) + 512 * 512 * 60 * RESAMPLE_BYTES


def request_bytes(estimate: int | None) -> int:
    """The ``memory=`` a task asks Ray for: the estimate (or :data:`UNKNOWN_BYTES`) rounded up."""
    need = UNKNOWN_BYTES if estimate is None else estimate
    return int(math.ceil(need / GRANULE) * GRANULE)


def estimate_cases(cases: list[dict[str, Any]], cfg: dict[str, Any]) -> list[int | None]:
    """Ray task body: :func:`estimate_bytes` of each case (``cfg``: ``PrepareConfig`` as a dict)."""
    prepare_cfg = PrepareConfig(**cfg)
    return [None if c.get("error") else estimate_bytes(c, prepare_cfg) for c in cases]


def largest_node_memory() -> int:
    """The largest ``memory`` resource (bytes) of the alive Ray nodes: what one task can get."""
    import ray

    return max((int(n.get("Resources", {}).get("memory", 0)) for n in ray.nodes() if n.get("Alive")), default=0)
