"""End-to-end pretraining on Ray Train (2 CPU workers) on prepared phantom shards.

Three fits in all (each costs ~30-40 s of Ray Train overhead): a run whose driver is killed after
its first checkpoint and then re-run (resume: step count and MLflow run continue; MLflow contents);
a run where one training worker process is SIGKILLed (FailureConfig restarts from the latest
checkpoint); both on the shared Ray session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raymim.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "mae-tiny.yaml"


def _overrides(tmp: Path, steps: int, every: int) -> list[str]:
    return [f"train.steps={steps}", f"train.checkpoint_every={every}", "train.log_every=1",
            "train.visual_every=4", "train.batch_size=2", "train.num_workers=2",
            "model.hidden_size=48", "model.mlp_dim=96", "model.num_layers=1", "model.num_heads=2",
            "model.decoder_hidden_size=24", "model.decoder_heads=2",
            f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "mlflow.experiment=test-pretrain"]


@pytest.fixture(scope="module")
def shards(ray_session, tmp_path_factory) -> Path:
    from raymim.data.pipeline import prepare
    from raymim.data.synth import generate_phantoms

    root = tmp_path_factory.mktemp("pretrain-data")
    manifest = generate_phantoms(root / "phantoms", cases=6, size=48, seed=1)
    cfg = load_config(None, ["prepare.crop_size=[32,32,32]", "prepare.crops_per_volume=4"])
    prepare(str(manifest), root / "shards", cfg.prepare, progress=False)
    return root / "shards"


def _history(uri: str, run_id: str, key: str):
    import mlflow

    return sorted(mlflow.MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)


def _wait_for(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def _train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker actors (Ray titles their processes ``ray::RayTrainWorker...``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(int(proc.name))
    return sorted(pids)


def test_interrupted_run_resumes_same_steps_and_mlflow_run(ray_session, shards, tmp_path):
    import mlflow

    from raymim.train.trainer import pretrain

    storage, name, steps, every = tmp_path / "ray", "resume-me", 12, 4
    overrides = _overrides(tmp_path, steps, every)
    cmd = [sys.executable, "-m", "raymim.cli", "pretrain", "--config", str(TINY), "--data", str(shards),
           "--name", name, "--storage", str(storage)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    console = tmp_path / "console.txt"  # stdout and stderr to a file, as under nohup / CI / `ray job logs`
    with open(console, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(lambda: any((storage / name).glob("checkpoint_*/meta.json")), 300, "the first checkpoint")
            time.sleep(2)  # let the step lines of the checkpoint interval reach the driver
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run
            proc.wait()
    # Ray reaps the dead driver's controller and workers within seconds, longer on a loaded box;
    # until then they keep training and checkpointing into the run folder
    _wait_for(lambda: not _train_worker_pids(), 120, "the killed run's workers to exit")
    lines = console.read_text(errors="replace").splitlines()
    ours = [ln for ln in lines if "[raymim]" in ln]
    assert len(ours) == len(set(ours)), f"duplicated console lines: {ours}"
    assert sum("[raymim] pretraining mae" in ln for ln in lines) == 1, ours
    assert any("[raymim] step 4/" in ln for ln in lines), ours
    assert len(lines) < 150, f"{len(lines)} console lines for {every} steps (progress-bar redraws?)"

    cfg = load_config(TINY, overrides)
    res = pretrain(cfg, str(shards), name=name, storage=str(storage))
    assert res.steps == steps
    uri = res.tracking_uri
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("test-pretrain").experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, "the resumed run must continue the same MLflow run"
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("raymim.resumed") == "true"
    assert run.data.params["method.name"] == "mae" and run.data.params["train.steps"] == str(steps)
    loss_steps = [m.step for m in _history(uri, res.mlflow_run_id, "train/loss")]
    assert max(loss_steps) == steps and min(loss_steps) == 1
    # steps after the last checkpoint before the kill are logged twice at most; nothing past `steps`
    assert len(loss_steps) <= steps + every
    for key in ("train/mask_ratio", "train/lr", "perf/samples_per_s", "perf/data_wait_frac"):
        assert _history(uri, res.mlflow_run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"panels", "encoder"} <= artifacts
    assert any(a.path.endswith(".png") for a in client.list_artifacts(res.mlflow_run_id, "panels"))
    assert {"encoder/encoder.pt", "encoder/config.yaml"} <= {
        a.path for a in client.list_artifacts(res.mlflow_run_id, "encoder")}
    # the last k checkpoints are kept, plus the best one
    kept = sorted(p.name for p in (storage / name).glob("checkpoint_step*") if p.is_dir())
    assert kept[-1] == f"checkpoint_step{steps:08d}" and len(kept) <= cfg.train.keep_checkpoints
    # Ray Train records the final checkpoint, also when the killed run's workers wrote it unrecorded
    assert res.checkpoint_path and Path(res.checkpoint_path).name == kept[-1]
    snapshot = json.loads((storage / name / "checkpoint_manager_snapshot.json").read_text())
    assert sorted(r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]) == kept
    assert (storage / name / "best" / "encoder.pt").is_file()

    from raymim.train.checkpoint import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError):
        pretrain(load_config(TINY, overrides + ["method.mask_ratio=0.5"]), str(shards), name=name,
                 storage=str(storage))


def test_unrecorded_final_checkpoint_is_recorded_on_resume(ray_session, shards, tmp_path):
    """The workers of a killed driver can outlive it and write the last checkpoint after Ray Train
    recorded its last report (seen on a loaded CI box). The state is built exactly: a finished run
    whose run snapshot is put back to what Ray Train wrote after the first checkpoint. Resuming
    records the unrecorded final checkpoint: Ray Train's result points at it, its snapshot lists
    it, and no more than ``keep_checkpoints`` stay on disk."""
    from raymim.train.trainer import pretrain

    storage, name, steps, every = tmp_path / "ray", "unrecorded", 8, 4
    cfg = load_config(TINY, _overrides(tmp_path, steps, every) + ["train.num_workers=1"])
    pretrain(cfg, str(shards), name=name, storage=str(storage))
    snap_file = storage / name / "checkpoint_manager_snapshot.json"
    snap = json.loads(snap_file.read_text())
    first = snap["checkpoint_results"][0]
    assert first["checkpoint_dir_name"] == f"checkpoint_step{every:08d}"
    snap.update(checkpoint_results=[first], checkpoint_report_indices=[0], latest_checkpoint_result=first,
                current_report_index=1)
    snap_file.write_text(json.dumps(snap))

    res = pretrain(cfg, str(shards), name=name, storage=str(storage))
    final = f"checkpoint_step{steps:08d}"
    assert res.checkpoint_path and Path(res.checkpoint_path).name == final
    listed = [r["checkpoint_dir_name"] for r in json.loads(snap_file.read_text())["checkpoint_results"]]
    assert listed[-1] == final and len(listed) <= cfg.train.keep_checkpoints
    kept = sorted(p.name for p in (storage / name).glob("checkpoint_step*") if p.is_dir())
    assert kept == sorted(listed)
    loss_steps = [m.step for m in _history(res.tracking_uri, res.mlflow_run_id, "train/loss")]
    assert max(loss_steps) == steps and len(loss_steps) == steps, "nothing is trained twice"


def test_killed_worker_restarts_from_latest_checkpoint(ray_session, shards, tmp_path):
    from raymim.train.trainer import pretrain

    storage, name, steps, every = tmp_path / "ray", "kill-a-worker", 16, 4
    overrides = _overrides(tmp_path, steps, every) + ["train.max_failures=2"]
    cfg = load_config(TINY, overrides)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(res=pretrain(cfg, str(shards), name=name,
                                                                     storage=str(storage))))
    thread.start()
    _wait_for(lambda: any((storage / name).glob("checkpoint_*/meta.json")), 300, "the first checkpoint")
    pids = _train_worker_pids()
    assert pids, "no Ray Train worker process found"
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert "res" in box, "the run did not complete after a worker was killed"
    res = box["res"]
    loss_steps = [m.step for m in _history(res.tracking_uri, res.mlflow_run_id, "train/loss")]
    assert max(loss_steps) == steps
    repeated = len(loss_steps) - len(set(loss_steps))
    assert repeated <= every, f"{repeated} steps were repeated; at most one checkpoint interval ({every}) may be"


def test_streaming_from_raw_scans(ray_session, shards, tmp_path):
    """--data pointing at raw scans: the preparation pipeline feeds the same crop sampler, no shards
    written (with gradient accumulation over 2 micro-batches)."""
    from raymim.train.trainer import build_dataset, pretrain

    manifest = next((shards.parent / "phantoms").glob("manifest.*"))
    overrides = _overrides(tmp_path, steps=3, every=3) + ["prepare.crop_size=[32,32,32]",
                                                          "prepare.crops_per_volume=2", "train.accumulation=2"]
    cfg = load_config(TINY, overrides)
    spec, repeat = build_dataset(str(manifest), cfg)
    assert spec["mode"] == "raw" and len(spec["items"]) == 6 and spec["rows"] == 12
    assert repeat >= 1
    res = pretrain(cfg, str(manifest), name="streaming", storage=str(tmp_path / "ray"))
    assert res.final_loss is not None and res.checkpoint_path
    assert not list(tmp_path.rglob("*.parquet")), "streaming mode must not write shards"


def test_ctrl_c_ends_the_run_killed_with_a_resume_hint(ray_session, shards, tmp_path):
    """SIGINT to the `raymim pretrain` process group, as Ctrl-C in a terminal sends it: exit 130,
    one line naming the step to resume from, no traceback, and the MLflow run ends KILLED."""
    import mlflow

    storage, name = tmp_path / "ray", "ctrl-c"
    cmd = [sys.executable, "-m", "raymim.cli", "pretrain", "--config", str(TINY), "--data", str(shards),
           "--name", name, "--storage", str(storage)]
    for o in _overrides(tmp_path, steps=200, every=2):
        cmd += ["--set", o]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for(lambda: any((storage / name).glob("checkpoint_*/meta.json")), 300, "the first checkpoint")
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _wait_for(lambda: not _train_worker_pids(), 120, "the interrupted run's workers to exit")
    assert proc.returncode == 130, out[-3000:]
    hint = [ln for ln in out.splitlines() if "[raymim] interrupted at step" in ln]
    assert len(hint) == 1 and "rerun the same command to resume" in hint[0], out[-3000:]
    assert "Traceback" not in out and "Handlers" not in out, out[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test-pretrain")
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert [r.info.status for r in runs] == ["KILLED"]
