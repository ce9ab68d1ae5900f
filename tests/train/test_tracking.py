"""MLflow run status: no command leaves its run RUNNING (FINISHED / FAILED / KILLED)."""

from __future__ import annotations

import mlflow
import pytest

from raymim.train.tracking import run_status, setup_experiment


@pytest.mark.parametrize("raised,status", [(None, "FINISHED"), (ValueError("bad"), "FAILED"),
                                           (KeyboardInterrupt(), "KILLED")])
def test_run_status(tmp_path, raised, status):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(setup_experiment("t", uri)).info.run_id
    said = []
    try:
        with run_status(client, run_id, on_interrupt=lambda: said.append("resume hint")):
            if raised is not None:
                raise raised
    except (ValueError, KeyboardInterrupt) as exc:
        assert exc is raised  # re-raised unchanged
    assert client.get_run(run_id).info.status == status
    assert said == (["resume hint"] if status == "KILLED" else [])


def test_pretraining_metric_names_are_grouped_and_not_duplicated():
    from raymim.train.reporting import mlflow_metrics

    got = mlflow_metrics({"loss": 1.0, "loss_rec": 0.5, "loss_rec_l1": 0.4, "loss_rec_l2": 0.6, "loss_align": 0.3,
                          "loss_align_l2": 0.3, "samples_per_s": 9.0, "probe_loss": 0.2, "lr": 1e-3})
    assert got == {"train/loss": 1.0, "train/loss_rec": 0.5, "train/loss_rec/level1": 0.4,
                   "train/loss_rec/level2": 0.6, "train/loss_align": 0.3, "perf/samples_per_s": 9.0,
                   "probe/loss": 0.2, "train/lr": 1e-3}


def test_encoder_registered_and_loadable_from_the_registry(tmp_path, monkeypatch):
    import torch

    from raymim.config import config_from_dict
    from raymim.train.checkpoint import write_checkpoint
    from raymim.train.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, log_shards_input, register_encoder
    from raymim.weights import load_pretrained

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    exp = setup_experiment("reg", uri)
    assert client.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING  # the model-training view
    run_id = client.create_run(exp).info.run_id
    state = {"w": torch.arange(4.0)}
    ckpt = write_checkpoint(tmp_path / "ckpt", state={}, encoder_state=state,
                            cfg=config_from_dict({"method": {"name": "mim"}}), meta={})
    client.log_artifact(run_id, str(ckpt / "encoder.pt"), "encoder")
    client.log_artifact(run_id, str(ckpt / "config.yaml"), "encoder")
    assert register_encoder(client, run_id, "my-encoder") == "1"
    assert register_encoder(client, run_id, "my-encoder") == "2"  # a later run adds a version
    loaded, cfg = load_pretrained("models:/my-encoder/2")
    assert torch.equal(loaded["w"], state["w"]) and cfg.method.name == "mim"
    # Shards as the run's dataset input, digested from their manifest.
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text('{"counts": {"crops": 3}}')
    digest = log_shards_input(client, run_id, str(tmp_path / "shards"))
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == digest and inputs[0].dataset.name == "shards"
    assert log_shards_input(client, run_id, str(tmp_path)) is None  # raw scans: nothing to record


def test_shards_input_is_logged_without_a_user_warning(tmp_path):
    """MLflow's source registry warns that a local path 'can be interpreted in multiple ways'
    (its local-artifact source is registered twice); every pretraining run on shards printed it."""
    import warnings

    from raymim.train.tracking import log_shards_input

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"volumes": 1}')
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("inputs"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        digest = log_shards_input(client, run.info.run_id, str(shards))
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert digest and [i.dataset.digest for i in inputs] == [digest] and inputs[0].dataset.name == "shards"
