"""MLflow helpers shared by pretraining, fine-tuning and Tune.

Tracking URI: ``MlflowConfig.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else a local
SQLite store ``<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts`` (MLflow 3.17 refuses
plain ``file:`` stores unless ``MLFLOW_ALLOW_FILE_STORE=true``; DESIGN.md).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEFAULT_ROOT = Path(os.environ.get("RAYMIM_HOME", "runs"))


def resolve_tracking_uri(uri: str | None = None, root: str | Path | None = None) -> str:
    """The tracking URI to use; creates the local SQLite default's folder when needed."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(root or DEFAULT_ROOT).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """Artifact location for new experiments on a local SQLite store (beside the .db file)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def setup_experiment(name: str, uri: str | None = None, root: str | Path | None = None) -> str:
    """Point MLflow at ``uri`` and make sure experiment ``name`` exists; returns its id."""
    import mlflow

    uri = resolve_tracking_uri(uri, root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name, artifact_location=_artifact_root(uri),
                                          tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    else:
        exp_id = exp.experiment_id
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp_id


# The MLflow UI opens an experiment in its model-training view (runs, metrics) rather than its
# GenAI view (traces, latency) when the experiment carries this tag.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def git_commit() -> str | None:
    """The commit of the raymim checkout in use (None for an installed wheel or without git)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def source_tags() -> dict[str, str]:
    """MLflow's own source tags for the code version (``mlflow.source.git.commit``)."""
    commit = git_commit()
    return {"mlflow.source.git.commit": commit} if commit else {}


def log_shards_input(client: Any, run_id: str, data: str) -> str | None:
    """Record prepared shards as the run's MLflow dataset input (context ``train``), with a digest
    of their ``manifest.json`` (config hash, counts, commit records), so two runs on the same
    shards show the same dataset. Returns the digest; raw-scan (streaming) inputs are not logged."""
    import hashlib

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag

    manifest = Path(data) / "manifest.json"
    if not manifest.is_file():
        return None
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    with warnings.catch_warnings():
        # MLflow registers its local-artifact source twice (local paths and file://) and warns that
        # the path "can be interpreted in multiple ways"; both are the same local source
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(Path(data).resolve()))
    dataset = Dataset(name=Path(data).resolve().name, digest=digest, source_type=source._get_source_type(),
                      source=source.to_json())
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])])
    return digest


def register_encoder(client: Any, run_id: str, name: str) -> str | None:
    """Register the run's ``encoder/`` artifact folder (``encoder.pt`` + ``config.yaml``) as a
    version of the registered model ``name``, so ``raymim finetune --pretrained
    models:/<name>/<version>`` works. Returns the version."""
    import mlflow

    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, tags={"raymim.kind": "encoder"},
                                       description="raymim pretrained encoder (encoder.pt state dict + config.yaml)")
    run = client.get_run(run_id)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/encoder", run_id=run_id,
                                          tags={"raymim.method": run.data.tags.get("raymim.method", "")})
    return str(version.version)


@contextlib.contextmanager
def system_metrics(run_id: str, uri: str) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network; GPU with ``nvidia-ml-py``) for
    ``run_id`` while the block runs, sampled on this (driver) node."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=uri)
        monitor.start()
    except Exception:  # noqa: BLE001 - psutil missing or the monitor cannot start: train anyway
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def find_run(experiment_id: str, run_name: str, uri: str, parent_run_id: str | None = None) -> str | None:
    """Id of the newest run called ``run_name`` in the experiment (to continue it on resume)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    filt = f"attributes.run_name = '{run_name}'"
    if parent_run_id:
        filt += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
    runs = client.search_runs([experiment_id], filter_string=filt, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0].info.run_id if runs else None


def log_params_flat(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Log a flat param dict in batches (MLflow caps a batch at 100 params, values at 6000 chars)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    existing = client.get_run(run_id).data.params
    items = [p for p in items if p.key not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


@contextlib.contextmanager
def run_status(client: Any, run_id: str, on_interrupt: Callable[[], None] | None = None) -> Iterator[None]:
    """End ``run_id`` as MLflow users expect: ``FINISHED`` when the block completes, ``KILLED``
    on Ctrl-C (``KeyboardInterrupt``; ``on_interrupt`` runs first, e.g. to say how to resume),
    ``FAILED`` on any other error. The exception is re-raised; no run is left ``RUNNING``."""
    try:
        yield
    except KeyboardInterrupt:
        client.set_terminated(run_id, status="KILLED")
        if on_interrupt is not None:
            on_interrupt()
        raise
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
