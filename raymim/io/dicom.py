"""DICOM: files found by content, grouped into series, and series read with pydicom (+ pylibjpeg).

*Finding.* A file is DICOM when it carries the ``DICM`` marker after its 128-byte preamble (or,
for the old preamble-less layout, when it starts with a group-0008 element that pydicom parses);
its name never matters (archives name slices by UID: ``CT.1.3.12.2...``, no extension). Headers
are read without pixel data; files are grouped by ``SeriesInstanceUID``. Objects that are not
image slices (RT structure sets, RT dose / plan, SEG, structured reports, presentation states,
key objects, registrations, encapsulated documents, DICOMDIR) are *skipped* with a reason, by SOP
Class UID and Modality, and never reject the image series next to them.

*Reading.* A series is a set of single-frame slices. Slices are sorted by their position along
the slice normal (``ImagePositionPatient`` projected on ``row x col`` cosines), not by
``InstanceNumber`` which scanners do not always fill consistently; rescale slope / intercept are
applied per slice. Before any pixel is decoded the series is refused when its geometry is
silently wrong: missing slices ("slice gap of 6.0 mm at slice 12; expected 3.0"), uneven or
duplicate positions, pixel spacing or orientation varying across slices, degenerate
orientation vectors, colour or complex pixel data, or more voxels than the configured limit.
Output: a float32 array indexed ``[column, row, slice]`` (MONAI's ``swap_ij`` convention) with a
RAS affine. Rejection reasons never quote header values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raymim.io.checks import CaseRejected, NotRegularFile, check_geometry, inside, open_regular, regular_file

# SOP classes that are not image slices of a volume (PS3.4 B.5), by exact UID or UID prefix.
_NON_IMAGE_SOP = {
    "1.2.840.10008.1.3.10": "a DICOMDIR media index",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT structure set (contours, not an image)",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT dose grid (not an image)",
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM-SEG segmentation (a label, not an image)",
    "1.2.840.10008.5.1.4.1.1.66": "raw data (not an image)",
    "1.2.840.10008.5.1.4.1.1.66.1": "a spatial registration (not an image)",
    "1.2.840.10008.5.1.4.1.1.66.3": "a deformable registration (not an image)",
    "1.2.840.10008.5.1.4.1.1.66.5": "a surface segmentation (not an image)",
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF document",
    "1.2.840.10008.5.1.4.1.1.104.2": "an encapsulated CDA document",
}
_NON_IMAGE_PREFIX = {
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report (not an image)",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state (not an image)",
    "1.2.840.10008.5.1.4.1.1.481.": "an RT object (plan, record or portal image; not a volume)",
    "1.2.840.10008.5.1.4.1.1.9.": "a waveform (not an image)",
}
_NON_IMAGE_MODALITY = {
    "RTSTRUCT": "an RT structure set (contours, not an image)", "RTDOSE": "an RT dose grid (not an image)",
    "RTPLAN": "an RT plan (not an image)", "RTRECORD": "an RT treatment record (not an image)",
    "RTIMAGE": "an RT portal image (not a volume)", "SEG": "a DICOM-SEG segmentation (a label, not an image)",
    "SR": "a structured report (not an image)", "PR": "a presentation state (not an image)",
    "KO": "a key object selection (not an image)", "REG": "a registration (not an image)",
    "DOC": "a document (not an image)", "RWV": "real-world value mapping (not an image)",
    "FID": "fiducials (not an image)", "PLAN": "a plan (not an image)", "ECG": "a waveform (not an image)",
}
SOP_RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SOP_SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def sniff_dicom(path: str | os.PathLike) -> bool:
    """Whether a regular file is DICOM by its content (``DICM`` at byte 128, or a preamble-less
    dataset starting with a group 0008 / 0002 element). Never blocks; never looks at the name."""
    try:
        with open_regular(path) as f:
            head = f.read(132)
    except (CaseRejected, OSError):
        return False
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8 or head[:2] not in (b"\x08\x00", b"\x02\x00"):
        return False
    try:  # preamble-less (ACR-NEMA style) files: trust pydicom only if it finds a SOP class
        return bool(_header(path, force=True).get("SOPClassUID"))
    except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
        return False


def looks_truncated_dicom(path: str | os.PathLike) -> bool:
    """A file shorter than the 132-byte preamble + marker whose bytes are all zero: the start of a
    DICOM file cut short (a failed copy), not an unrelated file."""
    try:
        with open_regular(path) as f:
            head = f.read(132)
    except (CaseRejected, OSError):
        return False
    return 0 < len(head) < 132 and not any(head)


def _header(path: str | os.PathLike, force: bool = False) -> Any:
    import pydicom

    with open_regular(path) as f:
        return pydicom.dcmread(f, stop_before_pixels=True, force=force)


def sop_class(ds: Any) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else "") or "")


def sop_instance(ds: Any) -> str:
    """The SOP Instance UID (some archives leave it only in the file meta header)."""
    meta = getattr(ds, "file_meta", None)
    return str(ds.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta is not None else "") or "")


def non_image_reason(ds: Any) -> str | None:
    """Why a DICOM object is not an image slice of a volume (a fixed phrase), or None for images."""
    sop = sop_class(ds)
    if sop in _NON_IMAGE_SOP:
        return _NON_IMAGE_SOP[sop]
    for prefix, why in _NON_IMAGE_PREFIX.items():
        if sop.startswith(prefix):
            return why
    modality = str(ds.get("Modality") or "").upper()
    if modality in _NON_IMAGE_MODALITY:
        return _NON_IMAGE_MODALITY[modality]
    if "Rows" not in ds or "Columns" not in ds:
        return "a DICOM object without an image matrix"
    return None


@dataclass
class SeriesScan:
    """Files of one folder sorted into image series (by ``SeriesInstanceUID``), skipped files with
    their reasons, and files that are DICOM but unreadable (they reject their folder's series).

    ``labels``: the RTSTRUCT / DICOM-SEG files among the skipped, each with the image series it
    refers to (:func:`label_series`; None when it names none of this folder's series)."""

    series: dict[str, list[Path]] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    broken: list[tuple[Path, str]] = field(default_factory=list)
    labels: list[tuple[Path, str | None]] = field(default_factory=list)
    instances: dict[str, set[str]] = field(default_factory=dict)  # series -> its SOP Instance UIDs
    frames: dict[str, set[str]] = field(default_factory=dict)  # series -> its Frame of Reference UIDs


def _references(ds: Any) -> tuple[set[str], set[str], set[str]]:
    """(series, SOP instance, frame of reference) UIDs a label object refers to, from its nested
    sequences (RTSTRUCT: referenced frame / study / series / contour image sequences; SEG:
    referenced series and source image sequences); its own top-level UIDs are not references."""
    series, instances, frames = set(), set(), set()

    def walk(item: Any) -> None:
        for elem in item:
            if elem.VR == "SQ":
                for sub in elem.value:
                    for key, into in (("SeriesInstanceUID", series), ("ReferencedSOPInstanceUID", instances),
                                      ("FrameOfReferenceUID", frames)):
                        if key in sub:
                            into.add(str(sub.get(key)))
                    walk(sub)

    walk(ds)
    return series, instances, frames


def label_series(ds: Any, scan: SeriesScan) -> str | None:
    """The one image series of ``scan`` a label object refers to: by Series Instance UID, else by
    the SOP Instances it names, else by Frame of Reference when a single series has it."""
    series, instances, frames = _references(ds)
    for hits in ([u for u in scan.series if u in series],
                 [u for u in scan.series if scan.instances.get(u, set()) & instances],
                 [u for u in scan.series if scan.frames.get(u, set()) & frames]):
        if len(hits) == 1:
            return hits[0]
        if hits:
            return None  # refers to several series: no guess
    return None


def scan_files(files: Sequence[Path], folder: Path | None = None) -> SeriesScan:
    """Classify candidate files by content (see the module docstring); with ``folder``, files
    that resolve outside it (symlinks leaving the series folder) are skipped, unread."""
    from pydicom.errors import InvalidDicomError

    out = SeriesScan()
    label_headers: list[tuple[Path, Any]] = []
    for f in files:
        if folder is not None and not inside(folder, f):
            out.skipped.append((f, "symlink leaving the series folder: not read"))
            continue
        try:
            st = regular_file(f)
        except CaseRejected as exc:
            out.skipped.append((f, str(exc)))
            continue
        if st.st_size == 0:
            out.broken.append((f, "zero-byte file"))
            continue
        if not sniff_dicom(f):
            if looks_truncated_dicom(f):
                out.broken.append((f, "truncated DICOM file"))
            else:
                out.skipped.append((f, "not a DICOM file"))
            continue
        try:
            ds = _header(f, force=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            out.broken.append((f, f"unreadable DICOM header ({type(exc).__name__})"))
            continue
        why = non_image_reason(ds)
        if why:
            modality = str(ds.get("Modality") or "").upper()
            if sop_class(ds) in (SOP_RTSTRUCT, SOP_SEG) or modality in ("RTSTRUCT", "SEG"):
                label_headers.append((f, ds))
            out.skipped.append((f, f"DICOM file is {why}"))
            continue
        uid = str(ds.get("SeriesInstanceUID") or "")
        out.series.setdefault(uid, []).append(f)
        out.instances.setdefault(uid, set()).add(sop_instance(ds))
        if ds.get("FrameOfReferenceUID"):
            out.frames.setdefault(uid, set()).add(str(ds.FrameOfReferenceUID))
    out.labels = [(f, label_series(ds, out)) for f, ds in label_headers]
    return out


def _folder_files(path: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise CaseRejected(f"cannot list the DICOM folder ({type(exc).__name__})") from None
    return [path / n for n in names if not n.startswith(".")]


def series_files(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The slice files of the one image series at ``path``: a folder (non-image objects and
    non-DICOM files in it are ignored), one DICOM file, or an explicit list of slice files."""
    if isinstance(path, list | tuple):
        files = [Path(p) for p in path]
        if not files:
            raise CaseRejected("empty DICOM series")
        return files
    p = Path(path)
    if not p.is_dir():
        return [p]
    scan = scan_files(_folder_files(p), folder=p)
    if scan.broken:
        why = scan.broken[0][1]
        raise CaseRejected(f"unreadable DICOM slice ({why})")
    if not scan.series:
        raise CaseRejected("no DICOM image series in the folder")
    if len(scan.series) > 1:
        raise CaseRejected(f"mixed series: {len(scan.series)} image series (SeriesInstanceUIDs) in one folder")
    return sorted(next(iter(scan.series.values())))


def _read_datasets(files: list[Path]) -> list[Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    out = []
    for i, f in enumerate(files):
        try:
            if regular_file(f).st_size == 0:
                raise CaseRejected(f"unreadable DICOM slice #{i} (zero-byte file)")
            with open_regular(f) as fh:
                ds = pydicom.dcmread(fh, force=True)
            _ = ds.get("SeriesInstanceUID")  # force=True parses lazily: touch the header
        except NotRegularFile as exc:
            raise CaseRejected(f"DICOM slice #{i} is {str(exc).removeprefix('not a regular file ')}") from None
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            raise CaseRejected(f"unreadable DICOM slice #{i} ({type(exc).__name__})") from None
        out.append(ds)
    return out


def _floats(ds: Any, name: str, n: int) -> np.ndarray | None:
    try:
        v = np.asarray([float(x) for x in ds[name].value], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    return v if v.shape == (n,) else None


def _check_pixels(slices: list[Any]) -> None:
    """Colour / complex pixel data and varying pixel spacing or orientation, from headers only."""
    for ds in slices:
        samples = int(ds.get("SamplesPerPixel") or 1)
        photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
        if samples != 1 or not photometric.startswith("MONOCHROME"):
            raise CaseRejected("colour (RGB or palette) pixel data: not a greyscale scan")
        component = str(ds.get("ComplexImageComponent") or "MAGNITUDE").upper()
        if component not in ("MAGNITUDE", ""):
            raise CaseRejected("complex-valued MR data (phase, real or imaginary component) is not supported")
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise CaseRejected("multi-frame DICOM object: only single-frame slice series are supported")
    ps = [_floats(ds, "PixelSpacing", 2) for ds in slices]
    iop = [_floats(ds, "ImageOrientationPatient", 6) for ds in slices]
    if ps[0] is None or iop[0] is None:
        raise CaseRejected("DICOM series lacks ImageOrientationPatient / PixelSpacing")
    if any(p is None or not np.allclose(p, ps[0], rtol=1e-4, atol=1e-5) for p in ps[1:]):
        raise CaseRejected("pixel spacing differs across the slices of the series")
    if any(o is None or not np.allclose(o, iop[0], atol=1e-3) for o in iop[1:]):
        raise CaseRejected("mixed series: slices with different orientations")


def _geometry(ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row cosine, column cosine, pixel spacing [between rows, between columns])."""
    iop = _floats(ds, "ImageOrientationPatient", 6)
    ps = _floats(ds, "PixelSpacing", 2)
    if iop is None or ps is None:
        raise CaseRejected("DICOM series lacks ImageOrientationPatient / PixelSpacing")
    if not np.isfinite(iop).all() or not np.isfinite(ps).all():
        raise CaseRejected("the orientation or pixel spacing holds NaN or infinite values")
    row, col = iop[:3], iop[3:]
    if min(np.linalg.norm(row), np.linalg.norm(col)) < 0.5:
        raise CaseRejected("degenerate orientation: a direction cosine has (near) zero length")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    if abs(float(row @ col)) > 0.01:
        raise CaseRejected("degenerate orientation: row and column directions are not perpendicular")
    if (ps <= 0).any():
        raise CaseRejected("voxel spacing is zero or negative along an axis")
    return row, col, ps


def check_slice_spacing(dist: np.ndarray) -> float:
    """Sorted slice positions along the normal (mm) -> the slice spacing, or a reason.

    Every step must match the median step within 10 % (+ 0.01 mm): a longer step is a missing
    slice ("slice gap of 6.0 mm at slice 12; expected 3.0", ``slice 12`` being the 0-based
    index of the slice after the gap in position order), a shorter one an uneven series.
    """
    if len(dist) < 2:
        return float("nan")
    steps = np.diff(dist)
    if float(steps.min()) < 1e-4:
        raise CaseRejected("mixed series: duplicate slice positions")
    expected = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - expected) > 0.1 * expected + 0.01)
    if bad.size:
        k = int(bad[0])
        kind = "slice gap" if steps[k] > expected else "uneven slice spacing"
        raise CaseRejected(f"{kind} of {steps[k]:.1f} mm at slice {k + 1}; expected {expected:.1f}")
    return expected


def read_dicom_series(path: str | os.PathLike | Sequence[str | os.PathLike],
                      max_voxels: int | None = None) -> tuple[np.ndarray, dict]:
    """Read one DICOM image series -> (float32 array [X, Y, Z], meta with a RAS ``affine``).

    ``path`` is a series folder (other objects in it are ignored), one slice file, or a list of
    slice files (the ``series_files`` of a discovered case). ``meta["sop_instance_uids"]`` lists
    the slices in array order (labels referencing them are placed with it).
    """
    files = series_files(path)
    slices = _read_datasets(files)
    uids = {str(ds.get("SeriesInstanceUID") or "") for ds in slices}
    if len(uids) > 1:
        raise CaseRejected(f"mixed series: {len(uids)} SeriesInstanceUIDs in one folder")
    for ds in slices:
        why = non_image_reason(ds)
        if why:
            raise CaseRejected(f"not an image series: the DICOM object is {why}")
    if any("PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds
           for ds in slices):
        raise CaseRejected("DICOM slice without pixel data")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in slices}
    if len(shapes) > 1:
        raise CaseRejected("mixed series: slices of different sizes")
    _check_pixels(slices)
    row_cos, col_cos, ps = _geometry(slices[0])
    normal = np.cross(row_cos, col_cos)
    pos = [_floats(ds, "ImagePositionPatient", 3) for ds in slices]
    if any(p is None or not np.isfinite(p).all() for p in pos):
        raise CaseRejected("DICOM slice without ImagePositionPatient")
    pos = np.asarray(pos)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    check_slice_spacing(dist[order])
    rows, cols = shapes.pop()
    step = (pos[order[-1]] - pos[order[0]]) / (len(order) - 1) if len(order) > 1 else normal
    check_geometry((cols, rows, len(order)), (ps[1], ps[0], float(np.linalg.norm(step))), max_voxels)
    volume = np.empty((cols, rows, len(order)), dtype=np.float32)
    for k, idx in enumerate(order):
        ds = slices[idx]
        try:
            arr = ds.pixel_array
        except Exception as exc:  # decoder plugins raise many types
            raise CaseRejected(f"undecodable pixel data in DICOM slice #{int(idx)} ({type(exc).__name__})") from None
        if arr.ndim != 2 or arr.shape != (rows, cols):
            raise CaseRejected(f"multi-frame or colour DICOM slice (shape {arr.shape})")
        if np.iscomplexobj(arr):
            raise CaseRejected("complex-valued pixel data is not supported")
        slope = float(ds.get("RescaleSlope") or 1.0)
        intercept = float(ds.get("RescaleIntercept") or 0.0)
        volume[:, :, k] = arr.T.astype(np.float32) * slope + intercept
        slices[idx] = None  # release the slice's pixel bytes as we go
    lps = np.eye(4)
    lps[:3, 0] = row_cos * ps[1]  # +i (next column) moves along the row cosine
    lps[:3, 1] = col_cos * ps[0]  # +j (next row) moves along the column cosine
    lps[:3, 2] = step
    lps[:3, 3] = pos[order[0]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS (DICOM) -> RAS (MONAI / NIfTI)
    meta = {"affine": affine, "original_affine": affine.copy(), "space": "RAS"}
    return volume, meta


def series_geometry(path: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Grid of an image series from headers only: ``shape`` (cols, rows, slices), the LPS
    ``affine`` of voxel (i = column, j = row, k = slice), ``sop_instance_uids`` in slice order and
    the ``frame_of_reference`` UID. Labels (RTSTRUCT, SEG) are placed on this grid."""
    files = series_files(path)
    slices = [_header(f, force=True) for f in files]
    row_cos, col_cos, ps = _geometry(slices[0])
    normal = np.cross(row_cos, col_cos)
    pos = np.asarray([_floats(ds, "ImagePositionPatient", 3) for ds in slices])
    order = np.argsort(pos @ normal, kind="stable")
    check_slice_spacing((pos @ normal)[order])
    step = (pos[order[-1]] - pos[order[0]]) / (len(order) - 1) if len(order) > 1 else normal
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * ps[1], col_cos * ps[0], step, pos[order[0]]
    return {"shape": (int(slices[0].Columns), int(slices[0].Rows), len(order)), "affine_lps": lps,
            "sop_instance_uids": [sop_instance(slices[i]) for i in order],
            "frame_of_reference": str(slices[0].get("FrameOfReferenceUID") or ""), "files": [files[i] for i in order]}


# Header elements whose values identify a person, an encounter or a place (besides every PN, DA
# and DT element): what :func:`header_identifiers` collects for report scrubbing.
_ID_KEYWORDS = frozenset({
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber", "StudyID", "AdmissionID",
    "MedicalRecordLocator", "RequestedProcedureID", "PerformedProcedureStepID", "ScheduledProcedureStepID",
    "FillerOrderNumberImagingServiceRequest", "PlacerOrderNumberImagingServiceRequest", "PatientTelephoneNumbers",
    "StudyInstanceUID", "SeriesInstanceUID", "PatientInsurancePlanCodeSequence", "MilitaryRank", "BranchOfService",
})
_PLACE_KEYWORDS = frozenset({"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "PatientAddress",
                             "CountryOfResidence", "RegionOfResidence", "PatientReligiousPreference"})


def header_identifiers(path: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, set[str]]:
    """Identifier values in the headers of a DICOM series (a folder, one file or a list of slice
    files, as :func:`series_files` takes them), nested sequences included: ``"names"`` (every
    person-name element: patient, physicians, operators), ``"ids"`` (patient, accession, study
    and procedure IDs, study / series UIDs, phone numbers), ``"dates"`` (every date and date-time
    element, as ``YYYYMMDD``) and ``"other"`` (institution, department, addresses). Every slice is
    read (headers only); a slice whose header cannot be parsed is passed over."""
    out: dict[str, set[str]] = {"names": set(), "ids": set(), "dates": set(), "other": set()}
    for f in series_files(path):
        try:
            ds = _header(f, force=True)
            elements = list(ds.iterall())
        except Exception:  # noqa: BLE001 - the reader rejects what cannot be parsed
            continue
        for elem in elements:
            values = elem.value if elem.VM > 1 else [elem.value]
            texts = [str(v).strip() for v in values if v not in (None, "") and not isinstance(v, bytes)]
            if not texts or elem.VR == "SQ":
                continue
            if elem.VR == "PN":
                out["names"].update(texts)
            elif elem.VR in ("DA", "DT"):
                out["dates"].update(t[:8] for t in texts if len(t) >= 8)
            elif elem.keyword in _ID_KEYWORDS:
                out["ids"].update(texts)
            elif elem.keyword in _PLACE_KEYWORDS:
                out["other"].update(texts)
    return out
