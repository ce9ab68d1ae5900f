"""Small DICOM objects written the way scanners and archives do (files named by UID, no extension)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
RTDOSE = "1.2.840.10008.5.1.4.1.1.481.2"
BASIC_SR = "1.2.840.10008.5.1.4.1.1.88.11"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


def _file(ds: Dataset, sop_class: str, folder: Path, prefix: str = "") -> Path:
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.get("SOPInstanceUID") or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.PatientName, ds.PatientID = "DOE^JANE", "PID-4711"
    path = folder / f"{prefix}{ds.SOPInstanceUID}"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, n: int = 8, size: int = 16, spacing: float = 0.8, step: float = 3.0,
                 z: list[float] | None = None, series_uid: str | None = None, seed: int = 0,
                 pixel_spacings: list[float] | None = None, rgb: bool = False, prefix: str = "CT.") -> list[Path]:
    """A CT series of ``n`` ``size`` x ``size`` int16 slices (positions ``z`` or ``k * step``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    series_uid = series_uid or generate_uid()
    study, frame = generate_uid(), generate_uid()
    z = z if z is not None else [k * step for k in range(n)]
    files = []
    for k, zk in enumerate(z):
        ds = Dataset()
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = "CT", series_uid, study, frame
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, -20.0, float(zk)]
        ps = pixel_spacings[k] if pixel_spacings else spacing
        ds.PixelSpacing = [ps, ps]
        ds.SliceThickness = step
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = (8, 8, 7) if rgb else (16, 16, 15)
        ds.PixelRepresentation = 0 if rgb else 1
        if rgb:
            ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
            ds.PixelData = rng.integers(0, 255, (size, size, 3), dtype=np.uint8).tobytes()
        else:
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.PixelData = rng.integers(0, 2000, (size, size), dtype=np.int16).tobytes()
        files.append(_file(ds, CT_IMAGE, folder, prefix))
    return files


def write_object(folder: Path, sop_class: str, modality: str, prefix: str = "") -> Path:
    """A non-image object (RTSTRUCT / RTDOSE / SR / presentation state) next to a series."""
    ds = Dataset()
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, generate_uid(), generate_uid()
    if modality == "RTDOSE":  # a dose grid has pixels, but is no image to pretrain on
        ds.Rows = ds.Columns = 4
        ds.NumberOfFrames = 2
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = np.zeros((2, 4, 4), np.uint16).tobytes()
    return _file(ds, sop_class, folder, prefix)
