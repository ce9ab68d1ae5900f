"""Pretraining overlap: held-out downstream cases whose scans are in the pretraining shards."""

from __future__ import annotations

import json

import pytest
from downstream_fixtures import FT

from raymim.cli import main
from raymim.config import config_from_dict, load_config
from raymim.downstream.data import load_labelled_cases
from raymim.downstream.evaluate import split_cases
from raymim.downstream.overlap import pretrain_data_of, pretraining_overlap


@pytest.fixture(scope="module")
def shards_of_phantoms(ray_session, phantoms, tmp_path_factory):
    """The downstream phantoms themselves prepared as pretraining shards (the leak to detect)."""
    from raymim.data.pipeline import prepare

    out = tmp_path_factory.mktemp("overlap") / "shards"
    cfg = load_config(None, ["prepare.crop_size=[32,32,32]", "prepare.crops_per_volume=1"])
    prepare(str(phantoms), out, cfg.prepare, progress=False)
    return out


@pytest.mark.ray
def test_overlap_found_for_shared_scans_and_not_for_others(shards_of_phantoms, phantoms, tmp_path, monkeypatch):
    from raymim.data.synth import generate_phantoms

    monkeypatch.delenv("RAYMIM_DEID_KEY", raising=False)
    cfg = config_from_dict({"finetune": {**FT, "fractions": [1.0], "val_fraction": 0.2}})
    cases, fixed = load_labelled_cases(str(phantoms), cfg.prepare, cfg.finetune.classes, (32, 32, 32))
    split = split_cases(cases, fixed, cfg)
    report = pretraining_overlap(cases, split, shards_of_phantoms)
    assert report.checked and report.overlapping == {"val": split.val, "test": split.test}
    assert f"{len(split.val) + len(split.test)} held-out case(s)" in report.message()
    # Other scans: nothing in common.
    other = generate_phantoms(tmp_path / "other", cases=3, size=32, seed=7)
    ocases, ofixed = load_labelled_cases(str(other), cfg.prepare, cfg.finetune.classes, (32, 32, 32))
    clean = pretraining_overlap(ocases, split_cases(ocases, ofixed, cfg), shards_of_phantoms)
    assert clean.checked and clean.count == 0
    # Raw scans or no data: the check says why it could not run.
    assert not pretraining_overlap(cases, split, None).checked
    assert "not a folder of prepared shards" in pretraining_overlap(cases, split, phantoms.parent).message()


@pytest.mark.ray
def test_strict_finetune_refuses_before_training(shards_of_phantoms, phantoms, vit_ckpt, tmp_path, capsys):
    argv = ["finetune", "--pretrained", str(vit_ckpt), "--data", str(phantoms), "--engine", "local", "--quick",
            "--out", str(tmp_path / "ft"), "--no-mlflow", "--pretrain-data", str(shards_of_phantoms), "--strict"]
    for k, v in FT.items():
        argv += ["--set", f"finetune.{k}={json.dumps(v)}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "in the pretraining shards" in err and "strict" in err
    assert not (tmp_path / "ft" / "cells").exists(), "nothing was trained"


def test_checkpoint_records_its_pretraining_data(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"step": 3, "data": "/data/shards"}))
    assert pretrain_data_of(str(tmp_path)) == "/data/shards"
    assert pretrain_data_of(str(tmp_path / "encoder.pt")) == "/data/shards"
    assert pretrain_data_of(None) is None
