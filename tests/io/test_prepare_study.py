"""A study folder as an archive exports it, through `raymim prepare`: two CT series named by UID,
an RTSTRUCT, an SR and a README in one folder -> one volume per image series; the other objects
are skipped with their reason (not quarantined) and counted in the summary."""

from __future__ import annotations

import pytest
from dicom_fixtures import BASIC_SR, RTSTRUCT, write_object, write_series

from raymim.config import PrepareConfig
from raymim.data.shards import volume_index

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_study_folder_gives_one_volume_per_image_series(ray_session, tmp_path, capsys):
    from raymim.data.pipeline import prepare

    study = tmp_path / "study"
    write_series(study, n=8, size=16, seed=1)
    write_series(study, n=6, size=16, seed=2, step=2.0)
    write_object(study, RTSTRUCT, "RTSTRUCT")
    write_object(study, BASIC_SR, "SR")
    (study / "README.txt").write_text("exported by the PACS\n")
    summary = prepare(str(study), tmp_path / "out", PrepareConfig(crop_size=[8, 8, 8], spacing=None),
                      progress=False)
    assert summary["exit_code"] == 0 and summary["rejected"] == 0, summary
    assert summary["ok"] == 2 and summary["not_images"] == 3 and summary["duplicates"] == 0, summary
    index = volume_index(tmp_path / "out")
    assert len({v["case_id"] for v in index}) == 2
    err = capsys.readouterr().err
    assert err.count("not an image: ") == 3, err
    assert not (tmp_path / "out" / "quarantine.csv").read_text().strip().splitlines()[1:]
