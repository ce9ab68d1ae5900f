"""Why a case is rejected, and the value checks every reader applies before and after decoding.

:class:`CaseRejected` carries the quarantine reason; :func:`regular_file` refuses anything but a
regular file before it is opened (a FIFO or a device would block or never end);
:func:`check_geometry` rejects absurd header dimensions and spacings, :func:`check_affine`
degenerate orientations, :func:`check_dtype` complex and colour voxels, and
:func:`check_declared_size` a header that declares more data than its file can hold, all before
a volume is decoded; :func:`check_array` rejects non-finite or constant data after. The NIfTI /
NRRD reader (:mod:`raymim.io.readers`), the DICOM series reader (:mod:`raymim.io.dicom`) and
discovery use them, so none imports the others for them. Reasons are short plain sentences that
never quote paths or free-text header values (names, IDs, descriptions); numbers describing the
geometry (shapes, spacings) are not identifying and are kept where they say what is wrong.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Sanity limits for header checks: beyond these a header is corrupt, not a real scan.
MAX_DIM = 4096
MAX_VOXELS = 2048**3 // 4  # 2 Gi voxels -> 8 GiB as float32; readers take a lower, configurable limit
MIN_SPACING, MAX_SPACING = 1e-3, 100.0  # mm
# The largest expansion a compressed payload can have: deflate tops out near 1032:1; bzip2 runs
# of identical bytes go further, so it gets a looser bound (the voxel limit still applies).
MAX_RATIO = {"gzip": 1100, "bzip2": 50_000}


class CaseRejected(Exception):
    """A case that cannot be prepared; ``str(exc)`` is the quarantine reason."""


class NotRegularFile(CaseRejected, OSError):
    """A FIFO, device, socket or folder where a file was expected (also an ``OSError``, so callers
    that catch I/O errors around hashing catch it too)."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def file_kind(mode: int) -> str:
    """Plain words for a non-regular ``st_mode``."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | os.PathLike) -> os.stat_result:
    """``os.stat`` of ``path`` (following symlinks) when it is a regular file, else :class:`NotRegularFile`.

    Called before every ``open`` of an input: opening a FIFO blocks until a writer appears and
    reading ``/dev/zero`` never ends, whatever the name says.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CaseRejected("file not found") from None
    except OSError as exc:  # ELOOP (symlink loop), EACCES, ENAMETOOLONG ...
        raise NotRegularFile(f"cannot open the file ({type(exc).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"not a regular file ({file_kind(st.st_mode)})")
    return st


def open_regular(path: str | os.PathLike):
    """Open a regular file for binary reading without ever blocking (``O_NONBLOCK`` guards the race
    between the check and the open: a FIFO swapped in opens at once and is refused)."""
    regular_file(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"not a regular file ({file_kind(os.fstat(fd).st_mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``root`` (resolved)."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def check_geometry(shape: Sequence[int], spacing: Sequence[float], max_voxels: int | None = None) -> None:
    """Reject non-3D images, absurd dimensions, too many voxels and absurd spacings (header values)."""
    shape = [int(s) for s in shape]
    spatial = [s for s in shape if s > 1]
    if len(shape) < 3 or len(spatial) < 3:
        raise CaseRejected(f"not a 3D volume (shape {tuple(shape)})")
    if len(shape) > 3 and any(s > 1 for s in shape[3:]):
        raise CaseRejected(f"4D or multi-channel image (shape {tuple(shape)})")
    if any(s <= 0 for s in shape[:3]):
        raise CaseRejected("the header declares an empty image (a zero dimension)")
    voxels = int(np.prod(shape[:3], dtype=np.int64))
    if any(s > MAX_DIM for s in shape[:3]) or voxels > MAX_VOXELS:
        raise CaseRejected(f"absurd header dimensions {tuple(shape[:3])}")
    if max_voxels is not None and voxels > int(max_voxels):
        raise CaseRejected(f"image of {voxels / 1e6:.0f} M voxels exceeds the limit of "
                           f"{int(max_voxels) / 1e6:.0f} M (prepare.max_voxels)")
    sp = [float(s) for s in spacing[:3]]
    if not all(np.isfinite(sp)):
        raise CaseRejected("voxel spacing is not a number (NaN or infinite in the header)")
    if any(s == 0 for s in sp):
        raise CaseRejected("voxel spacing is zero along an axis")
    if any(not MIN_SPACING <= abs(s) <= MAX_SPACING for s in sp):
        raise CaseRejected(f"absurd voxel spacing {tuple(round(s, 6) for s in sp)}")


def check_affine(affine: np.ndarray) -> None:
    """Reject voxel-to-world matrices that are not a usable 3D grid (NaN, zero or dependent axes)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape[0] < 3 or a.shape[1] < 4:
        raise CaseRejected("the orientation matrix is not 3D")
    m = a[:3, :3]
    if not np.isfinite(a[:3, :4]).all():
        raise CaseRejected("the orientation matrix holds NaN or infinite values")
    norms = np.linalg.norm(m, axis=0)
    if (norms == 0).any():
        raise CaseRejected("degenerate orientation: a voxel axis has zero length")
    # Unit axes: the volume of the parallelepiped they span is 1 when orthogonal, 0 when dependent.
    if abs(float(np.linalg.det(m / norms))) < 1e-3:
        raise CaseRejected("degenerate orientation: the voxel axes are not independent (singular direction matrix)")


def check_dtype(dtype: np.dtype | str) -> None:
    """Reject voxel types no scan pipeline can window: complex numbers and RGB / structured voxels."""
    dt = np.dtype(dtype)
    if dt.kind == "c":
        raise CaseRejected("complex-valued voxels (raw MR data?) are not supported")
    if dt.fields is not None or dt.kind == "V":
        raise CaseRejected("colour (RGB) voxels are not supported")
    if dt.kind not in "biuf":
        raise CaseRejected("voxels of a non-numeric type")


def check_declared_size(declared: int, available: int, encoding: str = "raw") -> None:
    """Reject a header that declares more voxel bytes than its payload could hold.

    ``available`` is the payload's size on disk; raw data must be at least ``declared`` bytes,
    compressed data can expand by at most :data:`MAX_RATIO`. Checked before anything is decoded,
    so a 1.7 KB file claiming 2048 x 2048 x 256 voxels is refused without allocating.
    """
    if encoding in ("raw", ""):
        if available < declared:
            raise CaseRejected("truncated file (its payload is shorter than its header declares)")
        return
    ratio = MAX_RATIO.get(encoding)
    if ratio is not None and available * ratio < declared:
        raise CaseRejected("the header declares far more data than the compressed file can hold")


def check_array(data: np.ndarray) -> None:
    """Reject complex / colour, NaN/Inf and constant images (after decoding)."""
    check_dtype(data.dtype)
    if data.ndim != 3:
        raise CaseRejected(f"not a 3D volume after decoding (shape {data.shape})")
    if not np.isfinite(data).all():
        raise CaseRejected("image contains NaN or Inf values")
    if float(data.max()) == float(data.min()):
        raise CaseRejected("constant image (no contrast)")
