"""Pretraining without Ray (:class:`raymim.train.loop.LocalRuntime`): the Ray-less path of
``raymim pretrain`` / ``raymim evidence`` (a GPU box where Ray is not installed).

In this process Ray is installed, so the tests choose the Ray-less path by making
:func:`raymim.ray_session.ray_available` say False (prepare and pretrain branch on it);
``tests/test_evidence.py`` runs the whole command in an interpreter where ``import ray`` fails.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from raymim.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "mae-tiny.yaml"


def _no_ray(mp: pytest.MonkeyPatch) -> None:
    import raymim.data.pipeline
    import raymim.ray_session

    mp.setattr(raymim.ray_session, "ray_available", lambda: False)
    mp.setattr(raymim.data.pipeline, "ray_available", lambda: False)


def _overrides(tmp: Path, steps: int, every: int) -> list[str]:
    return [f"train.steps={steps}", f"train.checkpoint_every={every}", "train.log_every=1",
            "train.visual_every=100", "train.batch_size=2", "train.num_workers=1",
            "model.hidden_size=48", "model.mlp_dim=96", "model.num_layers=1", "model.num_heads=2",
            "model.decoder_hidden_size=24", "model.decoder_heads=2",
            f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "mlflow.experiment=test-local"]


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> Path:
    """Phantom shards prepared by the Ray-less prepare (a pool of spawned processes)."""
    from raymim.data.pipeline import prepare
    from raymim.data.synth import generate_phantoms

    root = tmp_path_factory.mktemp("local-data")
    manifest = generate_phantoms(root / "phantoms", cases=4, size=48, seed=1)
    cfg = load_config(None, ["prepare.crop_size=[32,32,32]", "prepare.crops_per_volume=4"])
    with pytest.MonkeyPatch.context() as mp:
        _no_ray(mp)
        summary = prepare(str(manifest), root / "shards", cfg.prepare, progress=False)
    assert summary["exit_code"] == 0 and summary["volumes"] == 4, summary
    return root / "shards"


def _encoder(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(path) / "encoder.pt", weights_only=True)


@pytest.mark.slow
def test_ray_less_pretraining_checkpoints_and_resumes_exactly(local_shards, tmp_path, monkeypatch):
    import mlflow

    from raymim.train.trainer import pretrain

    _no_ray(monkeypatch)
    cfg = load_config(TINY, _overrides(tmp_path, 6, 3))
    storage = tmp_path / "runs"
    res = pretrain(cfg, str(local_shards), name="here", storage=str(storage))
    run_dir = storage / "here"
    assert Path(res.checkpoint_path) == run_dir / "checkpoint_step00000006"
    kept = sorted(p.name for p in run_dir.glob("checkpoint_step*"))
    assert kept == ["checkpoint_step00000003", "checkpoint_step00000006"]  # keep_checkpoints=2
    assert not list(run_dir.glob(".tmp-*")) and (run_dir / "best" / "encoder.pt").is_file()
    assert res.first_loss is not None and res.final_loss is not None
    straight = _encoder(res.checkpoint_path)

    # the last checkpoint lost: the rerun resumes from step 3 and ends on the same weights
    shutil.rmtree(res.checkpoint_path)
    again = pretrain(cfg, str(local_shards), name="here", storage=str(storage))
    resumed = _encoder(again.checkpoint_path)
    assert straight.keys() == resumed.keys()
    for k, v in straight.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6, msg=k)
    client = mlflow.MlflowClient(again.tracking_uri)
    run = client.get_run(again.mlflow_run_id)
    assert again.mlflow_run_id == res.mlflow_run_id and run.data.tags.get("raymim.resumed") == "true"
    assert run.info.status == "FINISHED"


def test_ray_less_pretraining_refuses_raw_scans_and_remote_storage(tmp_path, monkeypatch):
    from raymim.train.trainer import pretrain

    _no_ray(monkeypatch)
    cfg = load_config(TINY, _overrides(tmp_path, 2, 2))
    with pytest.raises(ConfigError, match="prepared shards"):
        pretrain(cfg, str(tmp_path), name="raw", storage=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="local folder"):
        pretrain(cfg, str(tmp_path), name="remote", storage="s3://bucket/runs")


@pytest.mark.ray
def test_local_batches_hold_the_crops_of_the_ray_stream(ray_session, local_shards):
    """One iterator pass: the Ray-less batches carry exactly the crops (same volumes, origins and
    pixels) that the Ray Data stream gives rank 0 of 1, in another shuffled order."""
    import numpy as np

    from raymim.data.stream import crop_stream, local_batches, stream_spec

    cfg = load_config(TINY, ["prepare.crop_size=[32,32,32]", "prepare.crops_per_volume=4"])
    spec = stream_spec(str(local_shards), cfg)

    def crops(batches) -> Counter:  # (case, origin, pass, pixels) of every row, as a multiset
        out: Counter = Counter()
        for b in batches:
            for i in range(len(b["image"])):
                pixels = hashlib.sha1(np.ascontiguousarray(b["image"][i], np.float32).tobytes()).hexdigest()
                out[(str(b["case_id"][i]), tuple(np.asarray(b["origin"][i]).tolist()), int(b["pass"][i]), pixels)] += 1
        return out

    ray_rows = crops(crop_stream(spec, 0, passes_per_epoch=2).iter_batches(batch_size=3, batch_format="numpy"))
    here = crops(local_batches(spec, 0, batch_size=3, passes_per_epoch=2, shuffle_buffer=8, workers=1))
    assert ray_rows.total() == 2 * 4 * 4  # 2 passes x 4 volumes x 4 crops
    # drop_last: the Ray-less side keeps whole batches only (32 = 10 x 3 + 2)
    assert here.total() == 30 and not here - ray_rows
    # deterministic: the same seed gives the same batches
    a = [b["case_id"].tolist() for b in local_batches(spec, 0, 3, 2, shuffle_seed=5)]
    b = [b["case_id"].tolist() for b in local_batches(spec, 0, 3, 2, shuffle_seed=5)]
    assert a == b
