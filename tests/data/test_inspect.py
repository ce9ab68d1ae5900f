"""``raymim inspect`` on the demo's data (phantoms prepared by ``raymim prepare``)."""

from __future__ import annotations

import json

import pytest

from raymim.cli import main


@pytest.fixture(scope="module")
def demo_shards(ray_session, tmp_path_factory):
    from raymim.config import PrepareConfig
    from raymim.data.pipeline import prepare
    from raymim.data.synth import generate_phantoms

    root = tmp_path_factory.mktemp("inspect")
    manifest = generate_phantoms(root / "phantoms", cases=4, size=32, seed=2)
    prepare(manifest, root / "shards", PrepareConfig(crop_size=[16, 16, 16]), progress=False)
    return root / "shards"


@pytest.mark.ray
def test_inspect_reports_volumes_and_sampled_crops(demo_shards, tmp_path, capsys):
    png = tmp_path / "crops.png"
    args = ["inspect", "--data", str(demo_shards), "--samples", "6", "--seed", "3", "--json", "--png", str(png),
            "--set", "prepare.crop_size=[16,16,16]", "--set", "prepare.min_foreground=0.2"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["volumes"] == 4 and report["labelled"] == 4 and report["dtype"] == ["float16"]
    assert report["spacing_mm"]["min"] == pytest.approx([1.5, 1.5, 2.0])
    assert report["voxels"] >= 4 * 16**3 and report["bytes"] > 2 * report["voxels"]  # float16 + labels
    crops = report["crops"]
    assert len(crops) == 6 and all(c["size"] == [16, 16, 16] for c in crops)
    assert all(c["foreground"] >= 0.2 for c in crops)
    assert len({c["case_id"] for c in crops}) >= 2  # 4 crops per volume read, then the next volume
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["crops"] == crops  # seeded
    assert main(args[:-4] + ["--seed", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["crops"] != crops
    assert main(["inspect", "--data", str(demo_shards), "--samples", "2"]) == 0  # text form
    out = capsys.readouterr().out
    assert out.startswith("volumes: 4") and out.count("origin") == 2


def test_inspect_refuses_bad_paths_in_one_line(tmp_path, capsys):
    assert main(["inspect", "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such file or folder" in err and len(err.splitlines()) == 1
    (tmp_path / "scans").mkdir()
    assert main(["inspect", "--data", str(tmp_path / "scans")]) == 2
    assert "not a folder of prepared shards" in capsys.readouterr().err
