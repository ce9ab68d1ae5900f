"""Volume readers: NIfTI, NRRD and DICOM series behind one MONAI ``ImageReader``.

:class:`VolumeReader` plugs into ``monai.transforms.LoadImage()(path, reader=VolumeReader())``. It checks
every input *before* decoding it (size, magic bytes, header dimensions and spacings) so that a
corrupt or absurd file is rejected cheaply with a clear :class:`CaseRejected` reason instead of
an out-of-memory or a cryptic traceback, then delegates decoding to MONAI's ``NibabelReader`` /
``NrrdReader``. DICOM series are read with pydicom here because MONAI's ``PydicomReader`` sorts
slices by ``InstanceNumber``; we sort by position along the slice normal, apply rescale
slope/intercept, decode JPEG / JPEG2000 through pylibjpeg, and refuse mixed series.

Every volume comes out as a 3D float32 array in the file's voxel order with a RAS affine in
``meta["affine"]`` (MONAI convention), so ``Orientationd`` / ``Spacingd`` work unchanged.
Reasons never quote header values (no identifiers leak into quarantine reports).
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader, NibabelReader, NrrdReader

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom")
# Sanity limits for header checks: beyond these a header is corrupt, not a real scan.
MAX_DIM = 4096
MAX_VOXELS = 2048**3 // 4  # 2 Gi voxels -> 8 GiB as float32
MIN_SPACING, MAX_SPACING = 1e-3, 100.0  # mm


class CaseRejected(Exception):
    """A case that cannot be prepared; ``str(exc)`` is the quarantine reason."""


def volume_format(path: str | os.PathLike) -> str | None:
    """``"nifti"``, ``"nrrd"``, ``"dicom"`` (a folder or a .dcm file) or None for unknown names."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(NRRD_SUFFIXES):
        return "nrrd"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    return None


def _head(path: Path, n: int = 352) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(n if not path.name.lower().endswith(".gz") else 4096)
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                return g.read(n)
        except (OSError, EOFError) as exc:
            raise CaseRejected(f"corrupt gzip stream ({type(exc).__name__})") from None
    return raw[:n]


def check_file(path: str | os.PathLike) -> str:
    """Cheap pre-decode checks; returns the format or raises :class:`CaseRejected`."""
    p = Path(path)
    if not p.exists():
        raise CaseRejected("file not found")
    fmt = volume_format(p)
    if fmt is None:
        raise CaseRejected(f"unsupported file type {p.suffix!r}")
    if fmt == "dicom":
        return fmt
    size = p.stat().st_size
    if size == 0:
        raise CaseRejected("zero-byte file")
    head = _head(p)
    if fmt == "nifti":
        if len(head) < 348:
            raise CaseRejected("truncated file (NIfTI header shorter than 348 bytes)")
        magic = head[344:348]
        if magic not in (b"n+1\x00", b"ni1\x00", b"n+2\x00") and head[4:8] != b"n+2\x00":
            raise CaseRejected("wrong magic: not a NIfTI-1/2 file")
    elif fmt == "nrrd" and not head.startswith(b"NRRD000"):
        raise CaseRejected("wrong magic: not a NRRD file")
    return fmt


def check_geometry(shape: Sequence[int], spacing: Sequence[float]) -> None:
    """Reject non-3D images, absurd dimensions and absurd spacings (from header values)."""
    shape = [int(s) for s in shape]
    spatial = [s for s in shape if s > 1]
    if len(shape) < 3 or len(spatial) < 3:
        raise CaseRejected(f"not a 3D volume (shape {tuple(shape)})")
    if len(shape) > 3 and any(s > 1 for s in shape[3:]):
        raise CaseRejected(f"4D or multi-channel image (shape {tuple(shape)})")
    if any(s > MAX_DIM for s in shape[:3]) or int(np.prod(shape[:3], dtype=np.int64)) > MAX_VOXELS:
        raise CaseRejected(f"absurd header dimensions {tuple(shape[:3])}")
    sp = [float(s) for s in spacing[:3]]
    if not all(np.isfinite(sp)) or any(not MIN_SPACING <= abs(s) <= MAX_SPACING for s in sp):
        raise CaseRejected(f"absurd voxel spacing {tuple(round(s, 6) for s in sp)}")


def check_array(data: np.ndarray) -> None:
    """Reject NaN/Inf and constant images (after decoding)."""
    if data.ndim != 3:
        raise CaseRejected(f"not a 3D volume after decoding (shape {data.shape})")
    if not np.isfinite(data).all():
        raise CaseRejected("image contains NaN or Inf values")
    if float(data.max()) == float(data.min()):
        raise CaseRejected("constant image (no contrast)")


def _check_nifti_header(path: Path) -> None:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for corrupt headers
        raise CaseRejected(f"unreadable NIfTI header ({type(exc).__name__})") from None
    check_geometry(img.shape, img.header.get_zooms()[:3] if len(img.shape) >= 3 else (1, 1, 1))
    # Truncated payloads: the file must hold the whole array (uncompressed) / a full gzip stream.
    if not path.name.lower().endswith(".gz"):
        need = int(img.dataobj.offset) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
        if path.stat().st_size < need:
            raise CaseRejected("truncated file (NIfTI payload shorter than its header says)")


def _check_nrrd_header(path: Path) -> None:
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as exc:
        raise CaseRejected(f"unreadable NRRD header ({type(exc).__name__})") from None
    shape = list(header.get("sizes", []))
    dirs = header.get("space directions")
    if dirs is not None:
        spacing = [float(np.linalg.norm(d)) for d in dirs if d is not None and np.all(np.isfinite(d))]
        spacing = spacing[:3] if len(spacing) >= 3 else [1.0, 1.0, 1.0]
        if header.get("dimension", len(shape)) > len([d for d in dirs if d is not None]):
            raise CaseRejected(f"4D or multi-channel image (shape {tuple(shape)})")
    else:
        spacing = list(header.get("spacings", [1.0, 1.0, 1.0]))
    check_geometry(shape, spacing)


class VolumeReader(ImageReader):
    """MONAI reader for NIfTI / NRRD files and DICOM series folders, with input validation.

    Example::

        LoadImage(image_only=True)("ct.nii.gz", reader=VolumeReader())
    """

    def __init__(self, validate: bool = True) -> None:
        super().__init__()
        self.validate = validate
        self._nib = NibabelReader(squeeze_non_spatial_dims=True)
        self._nrrd = NrrdReader(dtype=None)

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        names = filename if isinstance(filename, list | tuple) else [filename]
        return all(volume_format(n) is not None for n in names)

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs: Any) -> Any:
        names = list(data) if isinstance(data, list | tuple) else [data]
        if len(names) != 1:
            raise CaseRejected("VolumeReader reads one volume per key")
        path = Path(names[0])
        fmt = check_file(path)
        if fmt == "nifti":
            _check_nifti_header(path)
            return ("nifti", self._nib.read(str(path)))
        if fmt == "nrrd":
            _check_nrrd_header(path)
            return ("nrrd", self._nrrd.read(str(path)))
        from raymim.io.dicom import read_dicom_series

        return ("dicom", read_dicom_series(path))

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        fmt, obj = img
        try:
            if fmt == "nifti":
                data, meta = self._nib.get_data(obj)
            elif fmt == "nrrd":
                data, meta = self._nrrd.get_data(obj)
            else:
                data, meta = obj
        except (EOFError, OSError, ValueError, zlib.error) as exc:
            raise CaseRejected(f"truncated or corrupt image data ({type(exc).__name__})") from None
        data = np.asarray(data)
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        if self.validate:
            check_array(data)
        meta["original_channel_dim"] = float("nan")
        meta["spatial_shape"] = np.asarray(data.shape)
        return data.astype(np.float32, copy=False), _prune_meta(meta)


# Only geometry survives loading: header fields such as NIfTI ``descrip`` / ``db_name`` or DICOM
# tags can hold identifiers, and nothing downstream needs them.
_KEEP_META = ("affine", "original_affine", "spatial_shape", "original_channel_dim", "space")


def _prune_meta(meta: dict) -> dict:
    return {k: meta[k] for k in _KEEP_META if k in meta}
