"""Volume readers: NIfTI, NRRD and DICOM series behind one MONAI ``ImageReader``.

:class:`VolumeReader` plugs into ``monai.transforms.LoadImage()(path, reader=VolumeReader())``. It checks
every input *before* decoding it (size, magic bytes, header dimensions and spacings) so that a
corrupt or absurd file is rejected cheaply with a clear :class:`~raymim.io.checks.CaseRejected`
reason instead of an out-of-memory or a cryptic traceback, then delegates decoding to MONAI's
``NibabelReader`` / ``NrrdReader``. DICOM series are read with pydicom (:mod:`raymim.io.dicom`)
because MONAI's ``PydicomReader`` sorts slices by ``InstanceNumber``; we sort by position along
the slice normal, apply rescale slope/intercept, decode JPEG / JPEG2000 through pylibjpeg, and
refuse mixed series.

Nothing is opened unless it is a regular file (a FIFO, a device or a symlink to ``/dev/zero``
named ``*.nii.gz`` is refused without blocking); a header's declared voxel bytes are checked
against the bytes its file holds and against ``max_voxels`` before anything is allocated; a
compressed NRRD payload is never decompressed past its declared size; a detached NRRD header
(``.nhdr``) may only name a data file inside its own folder. Complex and RGB voxels and degenerate
orientations (zero / NaN spacing, dependent axes) are refused with a plain reason.

Every volume comes out as a 3D float32 array in the file's voxel order with a RAS affine in
``meta["affine"]`` (MONAI convention), so ``Orientationd`` / ``Spacingd`` work unchanged.
Reasons never quote header values (no identifiers leak into quarantine reports).
"""

from __future__ import annotations

import bz2
import gzip
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader, NibabelReader, NrrdReader

from raymim.io.checks import (
    CaseRejected,
    check_affine,
    check_array,
    check_declared_size,
    check_dtype,
    check_geometry,
    inside,
    open_regular,
    regular_file,
)
from raymim.io.dicom import read_dicom_series, sniff_dicom

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom")
# Default voxel limit of one volume (``prepare.max_voxels``): 1 Gi voxels is 4 GiB as float32.
DEFAULT_MAX_VOXELS = 1 << 30
_HEADER_BYTES = 1 << 20  # a NRRD header longer than this is not a header


def volume_format(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str | None:
    """``"nifti"``, ``"nrrd"``, ``"dicom"`` (a folder, a list of slice files, or a file whose
    *content* is DICOM, whatever its name) or None for anything else."""
    if isinstance(path, list | tuple):
        return "dicom"
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(NRRD_SUFFIXES):
        return "nrrd"
    if sniff_dicom(p):
        return "dicom"
    return None


def _head(path: Path, n: int = 352) -> bytes:
    with open_regular(path) as f:
        raw = f.read(n if not path.name.lower().endswith(".gz") else 4096)
    if raw[:2] == b"\x1f\x8b":
        try:
            with open_regular(path) as f, gzip.open(f, "rb") as g:
                return g.read(n)
        except (OSError, EOFError) as exc:
            raise CaseRejected(f"corrupt gzip stream ({type(exc).__name__})") from None
    return raw[:n]


def check_file(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """Cheap pre-decode checks; returns the format or raises :class:`CaseRejected`."""
    if isinstance(path, list | tuple):
        return "dicom"
    p = Path(path)
    if not os.path.lexists(p):
        raise CaseRejected("file not found")
    if p.is_dir():
        return "dicom"
    size = regular_file(p).st_size  # before anything opens it: FIFOs block, devices never end
    fmt = volume_format(p)
    if fmt is None:
        raise CaseRejected("unsupported file type (not NIfTI, NRRD or DICOM)")
    if fmt == "dicom":
        return fmt
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


def _check_nifti_header(path: Path, max_voxels: int | None) -> None:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        dtype = img.get_data_dtype()
    except Exception as exc:  # nibabel raises several types for corrupt headers
        raise CaseRejected(f"unreadable NIfTI header ({type(exc).__name__})") from None
    # nibabel silently turns a zero pixdim into 1 while loading: check the header as written.
    cls = type(img.header)
    head = _head(path, cls.sizeof_hdr)
    raw = cls(binaryblock=head, check=False) if len(head) == cls.sizeof_hdr else img.header
    zooms = [float(z) for z in np.asarray(raw["pixdim"], dtype=np.float64)[1:4]]
    check_geometry(img.shape, zooms if len(img.shape) >= 3 else (1, 1, 1), max_voxels)
    check_dtype(dtype)
    check_affine(img.affine)
    declared = int(np.prod(img.shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        check_declared_size(declared, size, "gzip")
    else:  # the file must hold the whole array after its header
        check_declared_size(int(img.dataobj.offset) + declared, size, "raw")


_NRRD_DTYPES = {"float": 4, "double": 8, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
                "int64": 8, "uint64": 8, "signed char": 1, "uchar": 1, "unsigned char": 1, "short": 2,
                "ushort": 2, "unsigned short": 2, "int": 4, "uint": 4, "unsigned int": 4, "longlong": 8,
                "ulonglong": 8, "block": 1}
_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2",
              "ascii": "text", "text": "text", "txt": "text"}


def _nrrd_header(path: Path) -> tuple[dict, int]:
    """(pynrrd header, byte offset of attached data) from at most :data:`_HEADER_BYTES`."""
    import nrrd

    with open_regular(path) as f:
        head = f.read(_HEADER_BYTES + 1)
    m = re.search(rb"\r?\n\r?\n", head)
    if m is None and len(head) > _HEADER_BYTES:
        raise CaseRejected("NRRD header without an end (no blank line in the first MB)")
    end = m.end() if m else len(head)
    lines = head[: m.start() if m else len(head)].decode("latin-1").splitlines()
    try:
        header = nrrd.read_header(lines)
    except Exception as exc:
        raise CaseRejected(f"unreadable NRRD header ({type(exc).__name__})") from None
    return header, end


def _data_file(path: Path, header: dict) -> Path | None:
    """The detached data file of a ``.nhdr`` header, refused unless it is a regular file inside the
    header's own folder (an absolute or ``../`` name could read any file on the machine)."""
    name = header.get("data file", header.get("datafile"))
    if name is None:
        return None
    name = str(name).strip()
    if name.upper().startswith("LIST") or re.search(r"%\d*d", name):
        raise CaseRejected("detached NRRD with several data files is not supported")
    data = path.parent / name
    if os.path.isabs(name) or not inside(path.parent, data):
        raise CaseRejected("detached NRRD data file lies outside the header's folder: refused")
    regular_file(data)
    return data


def volume_files(path: str | os.PathLike) -> list[Path]:
    """The files that hold one volume: a detached NRRD header (``.nhdr``) and the data file it
    names, otherwise the file itself. Content ids hash all of them: two headers alike byte for
    byte (same geometry, the same relative data-file name) in two folders are two scans. A data
    file that is missing or refused leaves the header alone (the reader then rejects the case)."""
    p = Path(path)
    if not p.name.lower().endswith(".nhdr"):
        return [p]
    try:
        data = _data_file(p, _nrrd_header(p)[0])
    except (CaseRejected, OSError, ValueError):
        return [p]
    return [p] if data is None else [p, data]


def _bounded_decompress(f: Any, codec: str, limit: int) -> bytes:
    """Decode a gzip / bzip2 stream, never producing more than ``limit`` + 1 bytes (a stream that
    holds more than its header declares is refused without being expanded)."""
    dec = zlib.decompressobj(zlib.MAX_WBITS | 32) if codec == "gzip" else bz2.BZ2Decompressor()
    out = bytearray()
    pending = b""
    while len(out) <= limit:
        if codec == "gzip":
            data = pending or f.read(1 << 20)
            if not data:
                break
            out += dec.decompress(data, limit + 1 - len(out))
            pending = dec.unconsumed_tail
            if dec.eof:
                break
        else:
            data = f.read(1 << 20) if dec.needs_input else b""
            if dec.needs_input and not data:
                break
            out += dec.decompress(data, max_length=limit + 1 - len(out))
            if dec.eof:
                break
    return bytes(out)


def _read_nrrd(path: Path, max_voxels: int | None) -> Any:
    """Check a NRRD header against its payload, then decode it reading no more than it declares.

    Returns MONAI's ``NrrdImage`` (what ``NrrdReader.read`` gives) for the common layouts (raw,
    gzip or bzip2 data, attached or detached, no line skip), or None after the checks for rare ones
    (text encoding, line / byte skips in compressed data), which pynrrd then decodes.
    """
    import nrrd
    from monai.data.image_reader import NrrdImage

    header, offset = _nrrd_header(path)
    shape = [int(s) for s in header.get("sizes", [])]
    dirs = header.get("space directions")
    if dirs is None:  # MONAI's NrrdReader needs them (KeyError otherwise)
        check_geometry(shape, list(header.get("spacings", [1.0, 1.0, 1.0])), max_voxels)
        raise CaseRejected("NRRD without 'space directions': the image orientation is unknown")
    dirs = [d for d in dirs if d is not None]
    if header.get("dimension", len(shape)) > len(dirs):
        raise CaseRejected(f"4D or multi-channel image (shape {tuple(shape)})")
    spacing = [float(np.linalg.norm(d)) for d in dirs]
    check_geometry(shape, spacing[:3] if len(spacing) >= 3 else [1.0, 1.0, 1.0], max_voxels)
    if len(dirs) >= 3:
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(dirs[:3], dtype=np.float64).T
        check_affine(affine)
    if str(header.get("type", "")).strip().lower() not in _NRRD_DTYPES:
        raise CaseRejected("voxels of an unsupported NRRD type")
    encoding = _ENCODINGS.get(str(header.get("encoding", "raw")).strip().lower())
    if encoding is None:
        raise CaseRejected("unsupported NRRD encoding")
    try:
        dtype = nrrd.reader._determine_datatype(header)
    except Exception:  # noqa: BLE001 - pynrrd raises NRRDError for unknown endianness / types
        raise CaseRejected("voxels of an unsupported NRRD type") from None
    voxels = int(np.prod(shape, dtype=np.int64))
    need = voxels * dtype.itemsize
    data = _data_file(path, header)
    where, start = (data, 0) if data is not None else (path, offset)
    size = where.stat().st_size
    skip = int(header.get("byte skip", header.get("byteskip", 0)) or 0)
    lines = int(header.get("line skip", header.get("lineskip", 0)) or 0)
    if encoding == "text":  # at least one character and one separator per voxel, minus the last
        check_declared_size(2 * voxels - 1, size - start, "raw")
        return None
    if encoding == "raw":
        if lines:
            check_declared_size(need, size - start, "raw")
            return None
        pos = size - need if skip == -1 else start + max(skip, 0)
        check_declared_size(need, size - pos, "raw")
        with open_regular(where) as f:
            f.seek(pos)
            buf = f.read(need)
    else:
        check_declared_size(need, size - start, encoding)
        with open_regular(where) as f:
            f.seek(start)
            if lines or skip:  # rare: check the stream's length, then let pynrrd apply the skips
                if len(_bounded_decompress(f, encoding, need + max(skip, 0))) > need + max(skip, 0):
                    raise CaseRejected("compressed data is longer than the header declares")
                return None
            buf = _bounded_decompress(f, encoding, need)
        if len(buf) > need:
            raise CaseRejected("compressed data is longer than the header declares")
    if len(buf) < need:
        raise CaseRejected("truncated file (its payload is shorter than its header declares)")
    array = np.frombuffer(buf, dtype=dtype).reshape(shape[::-1]).T  # pynrrd's index_order="F"
    return NrrdImage(array, header)


class VolumeReader(ImageReader):
    """MONAI reader for NIfTI / NRRD files and DICOM series folders, with input validation.

    Example::

        LoadImage(image_only=True)("ct.nii.gz", reader=VolumeReader())
    """

    def __init__(self, validate: bool = True, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> None:
        super().__init__()
        self.validate = validate
        self.max_voxels = max_voxels
        self._nib = NibabelReader(squeeze_non_spatial_dims=True)
        self._nrrd = NrrdReader(dtype=None)

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        names = filename if isinstance(filename, list | tuple) else [filename]
        return all(volume_format(n) is not None for n in names)

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs: Any) -> Any:
        names = list(data) if isinstance(data, list | tuple) else [data]
        if len(names) > 1:  # several files: the slices of one DICOM series (MONAI's convention)
            for name in names:
                regular_file(name)
            return ("dicom", read_dicom_series([Path(n) for n in names], self.max_voxels))
        if not names:
            raise CaseRejected("no input file")
        path = Path(names[0])
        fmt = check_file(path)
        if fmt == "nifti":
            _check_nifti_header(path, self.max_voxels)
            return ("nifti", self._nib.read(str(path)))
        if fmt == "nrrd":
            image = _read_nrrd(path, self.max_voxels)
            return ("nrrd", image if image is not None else self._nrrd.read(str(path)))
        return ("dicom", read_dicom_series(path, self.max_voxels))

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
