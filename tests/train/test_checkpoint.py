"""Checkpoint files are weights_only-safe, and a checkpoint from another config is refused."""

from __future__ import annotations

import pytest
import torch

from raymim.config import load_config
from raymim.train.checkpoint import (
    CheckpointMismatchError,
    model_config_hash,
    read_state,
    write_checkpoint,
)
from raymim.train.trainer import check_existing_checkpoints
from raymim.weights import load_pretrained


def _write(path, cfg, step=3):
    state = {"model": {"w": torch.ones(2)}, "step": step, "config_hash": model_config_hash(cfg)}
    meta = {"step": step, "config_hash": model_config_hash(cfg)}
    return write_checkpoint(path, state=state, encoder_state={"blocks.0.w": torch.zeros(3)}, cfg=cfg, meta=meta)


def test_roundtrip_weights_only(tmp_path):
    cfg = load_config(None, ["method.name=mim"])
    d = _write(tmp_path / "ck", cfg)
    for f in ("state.pt", "encoder.pt"):
        torch.load(d / f, weights_only=True)
    assert read_state(d, cfg)["step"] == 3
    enc, cfg2 = load_pretrained(d)
    assert list(enc) == ["blocks.0.w"] and cfg2 == cfg
    enc, _ = load_pretrained(d / "encoder.pt")
    assert torch.equal(enc["blocks.0.w"], torch.zeros(3))


def test_mismatched_config_refused(tmp_path):
    cfg = load_config(None, ["method.mask_ratio=0.6"])
    _write(tmp_path / "run1" / "checkpoint_step00000003", cfg)
    assert check_existing_checkpoints(str(tmp_path), "run1", cfg) == 3
    # Worker count and logging cadence may change on resume; the model and optimisation may not.
    assert check_existing_checkpoints(str(tmp_path), "run1", load_config(None, [
        "method.mask_ratio=0.6", "train.num_workers=4", "train.log_every=1"])) == 3
    other = load_config(None, ["method.mask_ratio=0.75"])
    with pytest.raises(CheckpointMismatchError, match="different config"):
        check_existing_checkpoints(str(tmp_path), "run1", other)
    with pytest.raises(CheckpointMismatchError):
        read_state(tmp_path / "run1" / "checkpoint_step00000003", other)


def test_missing_pretrained_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(tmp_path / "nope")


def test_prune_keeps_unlisted_checkpoints_newer_than_the_snapshot(tmp_path):
    """A killed driver's workers may write checkpoints Ray Train never records; older ones are
    orphans (deleted), newer ones hold the most progress (kept: the next run resumes from them)."""
    import json

    from raymim.train.trainer import prune_orphan_checkpoints

    run = tmp_path / "run"
    for step in (2, 4, 8, 12):
        (run / f"checkpoint_step{step:08d}").mkdir(parents=True)
    listed = [{"checkpoint_dir_name": f"checkpoint_step{s:08d}"} for s in (4, 8)]
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": listed}))
    assert prune_orphan_checkpoints(str(tmp_path), "run") == ["checkpoint_step00000002"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "checkpoint_step00000004", "checkpoint_step00000008", "checkpoint_step00000012"]
