"""RTSTRUCT and DICOM-SEG labels on the shared DICOM CT series: the mask lands on the right voxels,
ROI / segment names become classes, and fine-tuning's loader takes them like any label map."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from raymim.config import PrepareConfig
from raymim.io.checks import CaseRejected
from raymim.io.dicom_labels import dicom_label_kind, read_dicom_label
from raymim.io.discover import discover
from raymim.io.readers import VolumeReader

SERIES = ("totalsegmentator", "example_ct_dicom")


@pytest.fixture(scope="module")
def series(shared_data):
    folder = shared_data.joinpath(*SERIES)
    reader = VolumeReader()
    volume, meta = reader.get_data(reader.read(str(folder)))
    headers = []
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        # This archive leaves the SOP UIDs only in the file meta header; copy them in memory.
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        headers.append(ds)
    return folder, volume, meta, headers


def _slice_index(volume: np.ndarray, ds) -> int:
    """Which slice of the loaded volume holds this file's pixels (found by content, not geometry)."""
    hu = ds.pixel_array.T.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    (k,) = [k for k in range(volume.shape[2]) if np.array_equal(volume[:, :, k], hu)]
    return k


def _lps(ds, col: float, row: float) -> np.ndarray:
    """Patient coordinates (mm) of a pixel position of one slice, from that slice's own header."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    ps = np.asarray(ds.PixelSpacing, float)
    return np.asarray(ds.ImagePositionPatient, float) + col * ps[1] * iop[:3] + row * ps[0] * iop[3:]


def _square(ds, c0, c1, r0, r1) -> list[float]:
    """A closed contour around pixels c0..c1 x r0..r1 (corners on pixel edges)."""
    pts = [_lps(ds, c, r) for c, r in ((c0 - .5, r0 - .5), (c1 + .5, r0 - .5), (c1 + .5, r1 + .5), (c0 - .5, r1 + .5))]
    return [float(v) for p in pts for v in p]


def _rtstruct(path, headers, rois: dict[str, list[tuple[int, list[float]]]]) -> None:
    """A minimal RT Structure Set: ``rois`` {name: [(slice file index, contour data), ...]}."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.481.3", generate_uid()
    ds.Modality, ds.SeriesInstanceUID = "RTSTRUCT", generate_uid()
    ds.StudyInstanceUID = headers[0].StudyInstanceUID
    ds.PatientName = "DOE^JANE"
    ref = Dataset()
    ref.FrameOfReferenceUID = headers[0].FrameOfReferenceUID
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref])
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, ref.FrameOfReferenceUID
        ds.StructureSetROISequence.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = DicomSequence()
        for f, data in contours:
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints, c.ContourData = "CLOSED_PLANAR", len(data) // 3, data
            img = Dataset()
            img.ReferencedSOPClassUID, img.ReferencedSOPInstanceUID = headers[f].SOPClassUID, headers[f].SOPInstanceUID
            c.ContourImageSequence = DicomSequence([img])
            rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def test_rtstruct_rasterised_on_the_series_grid(series, tmp_path):
    folder, volume, meta, headers = series
    liver = [(3, _square(headers[3], 200, 239, 100, 119)), (3, _square(headers[3], 210, 214, 105, 109))]  # + hole
    spleen = [(12, _square(headers[12], 50, 59, 300, 309))]
    path = tmp_path / f"RS.{generate_uid()}"  # named by UID like an archive export
    _rtstruct(path, headers, {"Liver": liver, "Spleen": spleen, "Body": []})
    assert dicom_label_kind(path) == "rtstruct"
    label, lmeta, names = read_dicom_label(path, folder)
    assert label.shape == volume.shape and np.allclose(lmeta["affine"], meta["affine"])
    assert names == {"Liver": 1, "Spleen": 2, "Body": 3}
    expect = np.zeros(volume.shape, np.uint8)
    k3, k12 = _slice_index(volume, headers[3]), _slice_index(volume, headers[12])
    expect[200:240, 100:120, k3] = 1
    expect[210:215, 105:110, k3] = 0  # the inner contour is a hole
    expect[50:60, 300:310, k12] = 2
    assert np.array_equal(label, expect)
    # A name mapping selects and renumbers; names match case-insensitively.
    label, _, names = read_dicom_label(path, folder, names={"spleen": 7})
    assert names == {"Spleen": 7} and set(np.unique(label)) == {0, 7} and (label == 7).sum() == 100
    with pytest.raises(CaseRejected, match="requested label names"):
        read_dicom_label(path, folder, names=["Kidney"])


def test_rtstruct_off_the_grid_is_refused(series, tmp_path):
    folder, volume, meta, headers = series
    data = _square(headers[3], 10, 20, 10, 20)
    data = [v + (1.0 if i % 3 == 2 else 0.0) for i, v in enumerate(data)]  # 1 mm between slices (2 mm apart)
    _rtstruct(tmp_path / "rs", headers, {"Liver": [(3, data)]})
    with pytest.raises(CaseRejected, match="does not lie on a slice"):
        read_dicom_label(tmp_path / "rs", folder)


def _seg(path, headers, mask: np.ndarray) -> None:
    hd = pytest.importorskip("highdicom")
    code = hd.sr.CodedConcept
    desc = [hd.seg.SegmentDescription(segment_number=i, segment_label=name,
                                      segmented_property_category=code("91723000", "SCT", "Anatomical Structure"),
                                      segmented_property_type=code(c, "SCT", name), algorithm_type="MANUAL")
            for i, (name, c) in enumerate((("Liver", "10200004"), ("Spleen", "78961009")), start=1)]
    seg = hd.seg.Segmentation(source_images=headers, pixel_array=mask, segmentation_type="BINARY",
                              segment_descriptions=desc, series_instance_uid=generate_uid(), series_number=99,
                              sop_instance_uid=generate_uid(), instance_number=1, manufacturer="raymim-test",
                              manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    seg.save_as(path)


def test_dicom_seg_on_the_series_grid_and_on_a_nifti_copy(series, tmp_path):
    import nibabel as nib

    folder, volume, meta, headers = series
    mask = np.zeros((len(headers), 512, 512), np.uint8)  # (source image, row, column)
    mask[3, 100:120, 200:240] = 1
    mask[12, 300:310, 50:60] = 2
    path = tmp_path / f"SEG.{generate_uid()}"
    _seg(path, headers, mask)
    assert dicom_label_kind(path) == "seg"
    expect = np.zeros(volume.shape, np.uint8)
    expect[200:240, 100:120, _slice_index(volume, headers[3])] = 1
    expect[50:60, 300:310, _slice_index(volume, headers[12])] = 2
    label, _, names = read_dicom_label(path, folder)
    assert names == {"Liver": 1, "Spleen": 2} and np.array_equal(label, expect)
    # The same image as NIfTI: placed through the affines (nearest neighbour), same voxels.
    nib.save(nib.Nifti1Image(volume, meta["affine"]), tmp_path / "ct.nii.gz")
    label, _, _ = read_dicom_label(path, tmp_path / "ct.nii.gz")
    assert np.array_equal(label, expect)
    # A study folder (the series, this SEG and an RTSTRUCT, both referring to it): one case whose
    # label is the first of them by name (the RTSTRUCT); the SEG is skipped, saying why.
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    shutil.copy(path, study / path.name)
    rs = study / f"RS.{generate_uid()}"
    _rtstruct(rs, headers, {"Liver": [(3, _square(headers[3], 1, 5, 1, 5))]})
    found = discover(study)
    assert [c["rel"] for c in found.cases] == ["."] and "series_files" not in found.cases[0]
    assert found.cases[0]["label"] == str(rs)
    assert [s["rel"][:3] for s in found.skipped] == ["SEG"]
    assert "DICOM-SEG" in found.skipped[0]["reason"] and "another label object" in found.skipped[0]["reason"]
    reader = VolumeReader()
    assert reader.get_data(reader.read(str(study)))[0].shape == volume.shape


def test_finetune_loader_takes_rtstruct_and_seg_labels(series, tmp_path):
    from raymim.data.transforms import build_preprocess
    from raymim.downstream.data import load_labelled_cases

    folder, volume, meta, headers = series
    _rtstruct(tmp_path / "rs", headers, {"Liver": [(3, _square(headers[3], 200, 239, 100, 119))]})
    mask = np.zeros((len(headers), 512, 512), np.uint8)
    mask[3, 100:120, 200:240] = 1
    _seg(tmp_path / "seg", headers, mask)
    cfg = PrepareConfig(spacing=None, crop_foreground=False, modality="ct", crop_size=[16, 16, 16])
    cases, _ = load_labelled_cases([{"image": str(folder), "label": str(tmp_path / "rs"), "id": "a"},
                                    {"image": str(folder), "label": str(tmp_path / "seg"), "id": "b"}],
                                   cfg, roi_size=(16, 16, 16), label_names=["Liver"])
    image = build_preprocess(cfg, with_label=False)({"image": str(folder)})["image"][0].numpy()
    hu = volume[200:240, 100:120, _slice_index(volume, headers[3])]
    lo, hi = cfg.ct_window
    windowed = np.sort(np.clip((hu.ravel() - lo) / (hi - lo), 0, 1))
    for case in cases:
        lab = case["label"][0].numpy()
        assert case["class_names"] == {"Liver": 1} and int((lab == 1).sum()) == 800
        # After the loader's reorientation the label still covers the same voxels of the image.
        assert np.allclose(np.sort(image[lab == 1]), windowed, atol=1e-5)
