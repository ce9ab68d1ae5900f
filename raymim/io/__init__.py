"""Readers (NIfTI / NRRD / DICOM series), case discovery and de-identification helpers."""

from raymim.io.checks import CaseRejected
from raymim.io.discover import Discovery, ManifestError, case_input, discover, discover_cases
from raymim.io.readers import VolumeReader

__all__ = ["CaseRejected", "Discovery", "ManifestError", "VolumeReader", "case_input", "discover", "discover_cases"]
