"""Readers (NIfTI / NRRD / DICOM series), case discovery and de-identification helpers."""

from raymim.io.discover import discover_cases
from raymim.io.readers import CaseRejected, VolumeReader

__all__ = ["CaseRejected", "VolumeReader", "discover_cases"]
