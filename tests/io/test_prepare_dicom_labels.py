"""``raymim prepare`` with RTSTRUCT / DICOM-SEG labels (a study folder, a manifest's ``label``
column), ``--classes`` and ``--domain`` / ``--domain-column``, on the real CT series of
``../shared/data`` with label objects written by the test."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydicom.uid import generate_uid
from test_dicom_labels import _rtstruct, _seg, _slice_index, _square, series  # noqa: F401 - a fixture

from raymim.cli import main
from raymim.config import PrepareConfig
from raymim.data.shards import read_volume, volume_index

# The series' own grid (no resampling, no crop): stored voxels map 1:1 to the file's after RAS reorientation.
CFG = PrepareConfig(spacing=None, crop_foreground=False, modality="ct", crop_size=[16, 16, 16], dtype="float32",
                    min_foreground=0.0)


SETS = [a for kv in ("prepare.spacing=null", "prepare.crop_foreground=false", "prepare.modality=ct",
                     "prepare.crop_size=[16,16,16]", "prepare.dtype=float32", "prepare.min_foreground=0.0")
        for a in ("--set", kv)]


def _stored_label_matches(vol: dict, volume: np.ndarray, expect: np.ndarray) -> None:
    """The stored label has the expected voxel count per value, on the image voxels whose HU are
    those of the expected mask (the stored grid is reoriented, so compare by content)."""
    lab = vol["label"]
    for value in np.unique(expect[expect > 0]):
        assert int((lab == value).sum()) == int((expect == value).sum())
        lo, hi = CFG.ct_window
        hu = np.sort(np.clip((volume[expect == value] - lo) / (hi - lo), 0, 1))
        assert np.allclose(np.sort(vol["image"][lab == value]), hu, atol=1e-5)
    assert set(np.unique(lab)) == {0, *np.unique(expect[expect > 0]).tolist()}


def test_study_folder_rtstruct_becomes_the_label(ray_session, series, tmp_path, monkeypatch):  # noqa: F811
    from raymim.data.pipeline import prepare

    monkeypatch.setenv("RAYMIM_DEID_KEY", "labels-key")
    folder, volume, _, headers = series
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    liver = [(3, _square(headers[3], 200, 239, 100, 119))]
    spleen = [(12, _square(headers[12], 50, 59, 300, 309))]
    _rtstruct(study / f"RS.{generate_uid()}", headers, {"Liver": liver, "Spleen": spleen})
    out = tmp_path / "out"
    summary = prepare(study, out, CFG, progress=False)
    assert summary["ok"] == 1 and summary["not_images"] == 0, summary
    (v,) = volume_index(out)
    vol = read_volume(v["file"], v["row_group"])
    expect = np.zeros(volume.shape, np.uint8)
    expect[200:240, 100:120, _slice_index(volume, headers[3])] = 1
    expect[50:60, 300:310, _slice_index(volume, headers[12])] = 2
    assert v["has_label"]
    _stored_label_matches(vol, volume, expect)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cases"][0]["classes"] == {"Liver": 1, "Spleen": 2}
    assert manifest["classes"] == {"Liver": 1, "Spleen": 2}


def test_manifest_seg_label_with_classes_and_domain(ray_session, series, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("RAYMIM_DEID_KEY", "labels-key")
    folder, volume, _, headers = series
    mask = np.zeros((len(headers), 512, 512), np.uint8)  # (source image, row, column)
    mask[3, 100:120, 200:240] = 1
    mask[12, 300:310, 50:60] = 2
    _seg(tmp_path / "seg.dcm", headers, mask)
    shutil.copytree(folder, tmp_path / "ct")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,label\nct,seg.dcm\n")
    out = tmp_path / "out"
    code = main(["prepare", "--input", str(manifest), "--out", str(out), "--no-progress", "--classes", "spleen=3",
                 "--domain", "site-x", *SETS])
    assert code == 0
    (v,) = volume_index(out)
    vol = read_volume(v["file"], v["row_group"])
    expect = np.zeros(volume.shape, np.uint8)
    expect[50:60, 300:310, _slice_index(volume, headers[12])] = 3  # only the spleen, as value 3
    _stored_label_matches(vol, volume, expect)
    m = json.loads((out / "manifest.json").read_text())
    assert m["cases"][0]["classes"] == {"Spleen": 3} and m["domain"] == "site-x"
    assert pq.read_table(v["file"], columns=["domain"])["domain"].to_pylist() == ["site-x"]
    # the same dataset with other classes is another dataset: refused without --overwrite (exit 2)
    assert main(["prepare", "--input", str(manifest), "--out", str(out), "--no-progress", "--classes", "liver=1",
                 "--domain", "site-x", *SETS]) == 2


def test_domain_column_gives_each_case_its_domain(ray_session, tmp_path, monkeypatch):
    from raymim.data.pipeline import prepare
    from raymim.data.synth import generate_phantoms

    monkeypatch.setenv("RAYMIM_DEID_KEY", "labels-key")
    generate_phantoms(tmp_path / "in", cases=2, size=24, seed=5)
    manifest = tmp_path / "in" / "m.csv"
    manifest.write_text("image,scanner\nimages/case_00000.nii.gz,ge\nimages/case_00001.nii.gz,siemens\n")
    out = tmp_path / "out"
    summary = prepare(manifest, out, PrepareConfig(crop_size=[16, 16, 16]), progress=False, domain_column="scanner")
    assert summary["ok"] == 2
    assert sorted(v["domain"] for v in volume_index(out)) == ["ge", "siemens"]


@pytest.mark.parametrize("args, message", [
    (["--classes", "liver=0"], "1..255"),
    (["--classes", "liver=1,tumour"], "every name or to none"),
    (["--classes", "liver=x"], "integer"),
    (["--classes", "a,,b"], "empty entry"),
    (["--domain", " "], "--domain should not be empty"),
    (["--domain-column", "nope"], "no column 'nope'"),
])
def test_bad_label_and_domain_options_exit_2(tmp_path, capsys, args, message):
    manifest = tmp_path / "m.csv"
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    manifest.write_text("image\na.nii.gz\n")
    assert main(["prepare", "--input", str(manifest), "--out", str(tmp_path / "out"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_classes_file_and_domain_column_on_a_folder(tmp_path, capsys):
    from raymim.data.commands import parse_classes

    (tmp_path / "c.yaml").write_text("liver: 1\ntumour: 2\n")
    (tmp_path / "c.json").write_text('["liver", "tumour"]')
    assert parse_classes(str(tmp_path / "c.yaml")) == parse_classes(str(tmp_path / "c.json")) == \
        parse_classes("liver=1, tumour=2") == parse_classes("liver,tumour") == {"liver": 1, "tumour": 2}
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.nii.gz").write_bytes(b"x")
    assert main(["prepare", "--input", str(tmp_path / "scans"), "--out", str(tmp_path / "out"),
                 "--domain-column", "site"]) == 2
    assert "needs a manifest" in capsys.readouterr().err
