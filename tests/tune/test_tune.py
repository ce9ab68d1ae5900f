"""raymim tune: search-space parsing, and a tiny real sweep (interrupted, then resumed) on phantoms."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raymim.config import ConfigError, load_config, to_dict
from raymim.tune.driver import param_space, trial_config
from raymim.tune.report import table_markdown, write_table_csv

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "tune-mae-tiny.yaml"


def test_space_spec_to_tune_domains():
    from ray.tune.search.sample import Categorical, Float

    space = param_space({"method.mask_ratio": {"grid": [0.5, 0.75]}, "train.lr": {"loguniform": [1e-5, 1e-2]},
                         "method.alpha": {"choice": [0.1, 0.2]}})
    assert space["method.mask_ratio"] == {"grid_search": [0.5, 0.75]}
    assert isinstance(space["train.lr"], Float) and isinstance(space["method.alpha"], Categorical)


def test_trial_config_applies_and_validates_params():
    base = to_dict(load_config(TINY))
    cfg = trial_config(base, {"method.mask_ratio": 0.5, "train.lr": 0.01})
    assert cfg.method.mask_ratio == 0.5 and cfg.train.lr == 0.01
    with pytest.raises(ConfigError, match="1.5"):
        trial_config(base, {"method.mask_ratio": 1.5})


def test_bad_space_spec_is_named():
    with pytest.raises(ConfigError, match="method.mask_ratio"):
        load_config(None, ["tune.space={method.mask_ratio: {normal: [0, 1]}}"])


def test_summary_table(tmp_path):
    rows = [{"trial": "t1", "method.mask_ratio": 0.5, "val_dice": 0.7, "test_dice": 0.6, "probe_loss": 0.02,
             "loss": 0.1, "step": 8, "status": "complete", "mlflow_run_id": "a", "params": {}}]
    md = table_markdown(rows, ["method.mask_ratio"])
    assert "| method.mask_ratio | val_dice | test_dice | probe_loss |" in md and "0.7" in md
    assert "t1" in write_table_csv(rows, tmp_path / "t.csv").read_text()


def test_grid_points_differing_only_in_ignored_parameters_run_once():
    """tune-mps-ams.yaml: mask_ratio_end means nothing under a constant schedule, and mps_clusters
    nothing without MPS (mps_mode=none): 36 grid points are 20 distinct experiments."""
    from raymim.tune.driver import collapse_grid, experiment_key

    cfg = load_config(REPO / "jobs" / "configs" / "tune-mps-ams.yaml")
    base = to_dict(cfg)
    kept, dropped = collapse_grid(base, cfg.tune.space)
    assert len(kept) + len(dropped) == 36 and len(kept) == 20
    keys = [experiment_key(trial_config(base, pt)) for pt in kept]
    assert len(set(keys)) == len(keys)
    for point, same in dropped:
        assert experiment_key(trial_config(base, point)) == experiment_key(trial_config(base, same))
        assert point["method.mask_schedule"] == "constant" or point["method.mps_mode"] == "none"
    # A sweep that changes something the method reads keeps every point.
    mae = load_config(REPO / "jobs" / "configs" / "tune-mae-tiny.yaml")
    assert len(collapse_grid(to_dict(mae), mae.tune.space)[0]) == 3


def test_sweep_space_holds_the_collapsed_grid_and_the_sampled_dimensions():
    from raymim.tune.driver import GRID_KEY, sweep_space, trial_params

    cfg = load_config(TINY, ["tune.space={method.mask_ratio: {grid: [0.6, 0.75]}, train.lr: {loguniform: "
                             "[0.0001, 0.01]}}"])
    space, dropped = sweep_space(cfg)
    assert dropped == [] and space[GRID_KEY] == {"grid_search": [{"method.mask_ratio": 0.6},
                                                                 {"method.mask_ratio": 0.75}]}
    assert trial_params({GRID_KEY: {"method.mask_ratio": 0.6}, "train.lr": 0.001, "_ctx": {}}) == {
        "method.mask_ratio": 0.6, "train.lr": 0.001}


def test_sweep_without_validation_cases_is_refused(tmp_path):
    from raymim.data.synth import generate_phantoms
    from raymim.tune.driver import check_labelled

    manifest = generate_phantoms(tmp_path / "ph", cases=5, size=24, seed=0)
    check_labelled(load_config(TINY), str(manifest))  # 5 cases, val_fraction 0.2: one validation case
    with pytest.raises(ValueError, match="no validation case"):
        check_labelled(load_config(TINY, ["finetune.val_fraction=0.0"]), str(manifest))
    cmd = [sys.executable, "-m", "raymim.cli", "tune", "--config", str(TINY), "--data", str(tmp_path),
           "--labelled", str(manifest), "--set", "finetune.val_fraction=0.0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no validation case" in proc.stderr


@pytest.mark.parametrize("name,swept", [("mae", {"mask_ratio": 0.9}), ("simmim", {"mask_ratio": 0.4}),
                                         ("mim", {"alpha": 0.5, "mask_ratio": 0.3}),
                                         ("mps_ams", {"mask_schedule": "linear", "mps_mode": "none"}),
                                         ("simclr", {"tau": 0.5})])
def test_probe_does_not_depend_on_the_swept_hyperparameters(name, swept):
    """Same weights, different method hyperparameters: the probe ASHA compares is the same."""
    import torch

    from raymim.config import config_from_dict
    from raymim.methods import build_method

    model = dict(img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4,
                 decoder_hidden_size=48, decoder_layers=1, decoder_heads=4)
    extra = {"levels": 2, "level_sizes": [32, 16], "gamma": 2} if name in ("mim", "mps_ams") else {}
    torch.manual_seed(0)
    a = build_method(name, config_from_dict({"model": model, "method": {"name": name, **extra}}))
    b = build_method(name, config_from_dict({"model": model, "method": {"name": name, **extra, **swept}}))
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.rand(2, 1, 32, 32, 32)
    pa, pb = a.probe_loss(x, 0.75, seed=3), b.probe_loss(x, 0.75, seed=3)
    assert pa is not None and torch.equal(pa, pb)
    assert not torch.equal(pa, a.probe_loss(x, 0.5, seed=3)), "the reference ratio should matter"


def test_probe_holds_whole_cases_out():
    from raymim.train.trainer import probe_cases

    counts = {f"c{i}": 3 for i in range(10)}
    held = probe_cases(counts, crops=4, seed=0)
    assert len(held) == 2 and held == probe_cases(counts, crops=4, seed=0)  # 2 cases give >= 4 crops
    assert probe_cases(counts, crops=100, seed=0) == probe_cases(counts, crops=15, seed=0)  # at most half
    assert len(probe_cases(counts, crops=100, seed=0)) == 5 and probe_cases({"only": 9}, 4, 0) == []


# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_data(ray_session, tmp_path_factory):
    from raymim.data.pipeline import prepare
    from raymim.data.synth import generate_phantoms

    root = tmp_path_factory.mktemp("tune-data")
    manifest = generate_phantoms(root / "phantoms", cases=8, size=40, seed=3)
    cfg = load_config(None, ["prepare.crop_size=[32,32,32]", "prepare.crops_per_volume=3"])
    prepare(str(manifest), root / "shards", cfg.prepare, progress=False)
    return root / "shards", manifest


def _overrides(tmp: Path) -> list[str]:
    return [
        "train.steps=6", "train.checkpoint_every=2", "train.log_every=2", "train.batch_size=2",
        "model.hidden_size=48", "model.mlp_dim=96", "model.num_layers=1", "model.num_heads=2",
        "model.decoder_hidden_size=24", "model.decoder_heads=2",
        # 2 parameters, 4 trials, one at a time so ASHA's rung comparisons are deterministic:
        # a trial with a useless LR reaches the step-2 rung with a worse loss than one before it.
        "tune.space={method.mask_ratio: {grid: [0.6, 0.75]}, train.lr: {grid: [0.003, 0.0000001]}}",
        "tune.grace_period=2", "tune.max_concurrent=1", "tune.finetune_steps=4", "tune.time_budget_s=900",
        "finetune.val_fraction=0.25", "finetune.test_fraction=0.25", "finetune.fractions=[1.0]",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "mlflow.experiment=test-tune",
    ]


def _child_runs(uri: str, name: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("test-tune")
    if exp is None:
        return client, None, []
    parents = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    if not parents:
        return client, None, []
    parent = parents[0].info.run_id
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return client, parent, kids


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_sweep_interrupted_then_resumed(ray_session, sweep_data, tmp_path):
    from raymim.tune.driver import sweep

    shards, labelled = sweep_data
    name, storage = "tiny-sweep", tmp_path / "ray"
    overrides = _overrides(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "raymim.cli", "tune", "--config", str(TINY), "--data", str(shards),
           "--labelled", str(labelled), "--name", name, "--storage", str(storage)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def finished_trials():
        _, _, kids = _child_runs(uri, name)
        return [k for k in kids if "downstream/val/dice/mean" in k.data.metrics]

    try:
        end = time.time() + 480
        while time.time() < end and not finished_trials() and proc.poll() is None:
            time.sleep(2)
        done_before = finished_trials()
        assert done_before, "no trial finished before the interruption"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # interrupt the sweep's driver
        proc.wait()
    time.sleep(3)

    cfg = load_config(TINY, overrides)
    res = sweep(cfg, str(shards), labelled=str(labelled), name=name, storage=str(storage), resume=True)
    assert len(res.table) == 4
    client, parent, kids = _child_runs(uri, name)
    assert parent == res.parent_run_id and len(kids) == 4, "every trial is one child run of the sweep's parent run"
    # finished trials were not rerun: their pretraining steps were logged once each
    for run in done_before:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)), f"trial {run.info.run_name} was rerun after --resume"
    completed = [r for r in res.table if r["status"] == "complete"]
    assert completed and all(0.0 <= r["val_dice"] <= 1.0 for r in completed)
    assert all(r["probe_loss"] is not None for r in completed), "trials report the held-out probe"
    assert any(r["status"] == "stopped early" for r in res.table), "ASHA stopped no trial"
    for kid in kids:
        metrics = client.get_run(kid.info.run_id).data.metrics
        if kid.info.run_id in {r["mlflow_run_id"] for r in completed}:
            assert "downstream/val/dice/mean" in metrics and "probe/loss" in metrics
            assert not [k for k in metrics if k.startswith("downstream/test/")], "a trial was scored on test"
        # Only the selected trial is scored on the test cases, once, after the sweep.
        assert ("test/dice/mean" in metrics) == (kid.info.run_id == res.best["mlflow_run_id"])
    assert res.best["test_dice"] is not None
    assert "best_test/dice/mean" in client.get_run(parent).data.metrics
    arts = {a.path for a in client.list_artifacts(parent, "sweep")}
    assert {"sweep/sweep.csv", "sweep/sweep.md", "sweep/objective_vs_params.png"} <= arts
    assert {a.path for a in client.list_artifacts(parent, "best_encoder")} >= {"best_encoder/encoder.pt"}
