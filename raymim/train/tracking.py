"""MLflow helpers shared by pretraining, fine-tuning and Tune.

Tracking URI: ``MlflowConfig.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else a local
SQLite store ``<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts`` (MLflow 3.17 refuses
plain ``file:`` stores unless ``MLFLOW_ALLOW_FILE_STORE=true``; DESIGN.md).
"""

from __future__ import annotations

import contextlib
import os
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
        exp_id = client.create_experiment(name, artifact_location=_artifact_root(uri))
    else:
        exp_id = exp.experiment_id
    return exp_id


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
