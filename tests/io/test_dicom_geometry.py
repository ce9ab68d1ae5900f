"""DICOM series whose geometry is silently wrong are refused with a reason that says what is wrong."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_fixtures import write_series

from raymim.io.checks import CaseRejected
from raymim.io.dicom import read_dicom_series
from raymim.io.discover import discover_cases


def _reason(path) -> str:
    with pytest.raises(CaseRejected) as info:
        read_dicom_series(path)
    reason = str(info.value)
    assert str(path) not in reason and "DOE" not in reason and "PID" not in reason
    return reason


def test_good_series_reads_with_position_order_and_spacing(tmp_path):
    files = write_series(tmp_path / "s", n=6, step=3.0)
    vol, meta = read_dicom_series(tmp_path / "s")
    assert vol.shape == (16, 16, 6)
    assert np.allclose(np.linalg.norm(meta["affine"][:3, :3], axis=0), [0.8, 0.8, 3.0])
    first = pydicom.dcmread(files[0])
    assert np.array_equal(vol[:, :, 0], first.pixel_array.T.astype(np.float32) - 1024)


def test_missing_slice_is_a_gap(tmp_path):
    z = [3.0 * k for k in range(16) if k != 12]  # slice 12 of 16 lost in transfer
    write_series(tmp_path / "s", z=z)
    assert _reason(tmp_path / "s") == "slice gap of 6.0 mm at slice 12; expected 3.0"


def test_uneven_spacing_is_refused(tmp_path):
    write_series(tmp_path / "s", z=[0.0, 3.0, 6.0, 7.5, 10.5, 13.5, 16.5])
    assert _reason(tmp_path / "s").startswith("uneven slice spacing of 1.5 mm at slice 3")


def test_pixel_spacing_varying_across_slices(tmp_path):
    write_series(tmp_path / "s", n=5, pixel_spacings=[0.8, 0.8, 0.9, 0.8, 0.8])
    assert _reason(tmp_path / "s") == "pixel spacing differs across the slices of the series"


def test_rgb_series_refused_before_decoding(tmp_path):
    write_series(tmp_path / "s", n=4, rgb=True)
    assert "colour (RGB" in _reason(tmp_path / "s")


def test_complex_mr_component_refused(tmp_path):
    files = write_series(tmp_path / "s", n=4)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ComplexImageComponent = "PHASE"
        ds.save_as(f)
    assert "complex-valued" in _reason(tmp_path / "s")


def test_degenerate_orientation_refused(tmp_path):
    files = write_series(tmp_path / "s", n=4)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]  # rows and columns along the same axis
        ds.save_as(f)
    assert "not perpendicular" in _reason(tmp_path / "s")


def test_truncated_slice_rejects_its_series_but_a_readme_does_not(tmp_path):
    files = write_series(tmp_path / "s", n=5)
    (tmp_path / "s" / "README").write_text("series exported for research\n")
    assert read_dicom_series(tmp_path / "s")[0].shape == (16, 16, 5)
    files[2].write_bytes(files[2].read_bytes()[:100])
    (case,) = discover_cases(tmp_path / "s")
    assert "unreadable DICOM slice" in _reason(case["image"])
