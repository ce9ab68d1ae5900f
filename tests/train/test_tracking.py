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
