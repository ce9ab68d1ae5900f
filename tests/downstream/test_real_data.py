"""Fine-tuning on real labelled CT from ../shared/data (TotalSegmentator example, a few organs).

Two labelled volumes exist with the same class map: ``example_ct`` (112 slices) and
``example_ct_sm`` (a 30-slice cut of the SAME scan). They are given fixed sides through the
records' ``split`` key (full scan: train, cut: test). This checks that real NIfTI CT with
silver labels goes through preprocessing, the pretrained/scratch pair, sliding-window scoring
and MLflow; it is not a generalisation measurement (the test volume is part of the training
patient).
"""

from __future__ import annotations

import mlflow
import pytest
from downstream_fixtures import FT

from raymim.config import config_from_dict
from raymim.downstream.evaluate import run_finetune

# TotalSegmentator v2 ids: spleen, kidney_right, liver.
ORGANS = {"classes": [1, 2, 5], "class_names": ["spleen", "kidney_right", "liver"]}


@pytest.mark.slow
def test_totalsegmentator_organs(shared_data, vit_ckpt, mlflow_uri, tmp_path):
    ts = shared_data / "totalsegmentator"
    # Records rather than a CSV: the data plane refuses manifest paths outside the manifest's folder.
    records = [
        {"id": "example_ct", "image": str(ts / "example_ct.nii.gz"),
         "label": str(ts / "example_seg_fast_force_split.nii.gz"), "split": "train"},
        {"id": "example_ct_sm", "image": str(ts / "example_ct_sm.nii.gz"), "label": str(ts / "example_seg.nii.gz"),
         "split": "test"},
    ]
    cfg = config_from_dict({
        "prepare": {"spacing": [6.0, 6.0, 6.0], "modality": "ct", "ct_window": [-200.0, 300.0]},
        "finetune": {**FT, **ORGANS, "fractions": [1.0], "val_fraction": 0.0, "quick_steps": 2, "overlays": 1},
    })
    res = run_finetune(str(vit_ckpt), records, cfg, tmp_path / "ft", quick=True, engine="local")
    assert (res.split.train, res.split.test) == (["example_ct"], ["example_ct_sm"])
    assert len(res.rows) == 2
    for row in res.rows:
        assert 0.0 <= row["dice/mean"] <= 1.0
        assert "dice/liver" in row and "hd95/liver" in row
    run = mlflow.MlflowClient(mlflow_uri).get_run(res.parent_run_id)
    assert run.data.metrics["finetune/f1.00/pretrained/dice"] >= 0.0
    assert (tmp_path / "ft" / "overlays").is_dir()
