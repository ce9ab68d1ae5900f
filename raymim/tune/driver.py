"""Ray Tune sweeps over pretraining configs, scored by a quick downstream fine-tune.

The Ray 2.60 pattern (DESIGN.md): each trial is a function trainable that runs a full Ray Train
pretraining (:func:`raymim.train.trainer.pretrain`, whose ``TorchTrainer`` gets a
``TuneReportCallback`` so every checkpoint report reaches Tune with its ``step`` for ASHA), then
fine-tunes a segmentation network on a fixed validation split with the trial's encoder and
reports ``dice`` — the sweep's objective. The pretraining loss drives early stopping only.

MLflow: the sweep is a parent run; each trial's pretraining run is its child (named after the
Tune trial, so a restored trial continues its run) and receives the trial's downstream scores.
At the end the parent gets a table sorted by the objective, a plot of the objective against each
swept parameter, and the best trial's encoder under ``best_encoder/``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymim.config import RaymimConfig, config_from_dict, flatten, to_dict, unflatten
from raymim.train.tracking import find_run, log_params_flat, resolve_tracking_uri, setup_experiment

OBJECTIVE = "dice"


@dataclass
class SweepResult:
    name: str
    path: str
    parent_run_id: str
    tracking_uri: str
    table: list[dict[str, Any]]  # one row per trial, best first
    best: dict[str, Any] | None


def param_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """Our YAML spec -> Tune's domains, keyed by the dotted config path."""
    from ray import tune

    make = {
        "grid": lambda v: tune.grid_search(v),
        "choice": lambda v: tune.choice(v),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {key: make[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> RaymimConfig:
    """The base config with a trial's dotted-key params applied (validated like any config)."""
    from raymim.config import _deep_merge

    return config_from_dict(_deep_merge(base, unflatten(params)))


def run_trial(params: dict[str, Any]) -> None:
    """The function trainable. ``params``: dotted config keys plus ``_ctx`` (fixed sweep settings)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymim.train.checkpoint import load_pretrained
    from raymim.train.trainer import pretrain

    ctx = params["_ctx"]
    swept = {k: v for k, v in params.items() if k != "_ctx"}
    cfg = trial_config(ctx["base"], swept)
    trial = ray.tune.get_context().get_trial_name()
    res = pretrain(cfg, ctx["data"], name=trial, storage=ctx["storage"],
                   extra_callbacks=[TuneReportCallback()], parent_run_id=ctx["parent_run_id"])
    encoder_state, _ = load_pretrained(res.checkpoint_path)
    scores = _objective(encoder_state, cfg, ctx)
    _log_trial(res.tracking_uri, res.mlflow_run_id, swept, scores)
    ray.tune.report({OBJECTIVE: scores["dice/mean"], "step": cfg.train.steps, "loss": res.final_loss,
                     "mlflow_run_id": res.mlflow_run_id, "checkpoint_path": res.checkpoint_path})


def _objective(encoder_state, cfg: RaymimConfig, ctx: dict[str, Any]) -> dict[str, float]:
    from raymim.downstream.evaluate import quick_finetune

    return quick_finetune(encoder_state, cfg, ctx["labelled"], steps=ctx["finetune_steps"], seed=ctx["seed"])


def _log_trial(uri: str, run_id: str, swept: dict[str, Any], scores: dict[str, float]) -> None:
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(uri)
    client.set_tag(run_id, "raymim.kind", "tune-trial")
    ts = int(time.time() * 1000)
    items = [Metric(f"downstream/{k}", float(v), ts, 0) for k, v in scores.items() if _is_number(v)]
    client.log_batch(run_id, metrics=items)
    client.set_tag(run_id, "raymim.swept", json.dumps(swept, default=str))


def _is_number(v: Any) -> bool:
    try:
        return v == v and float(v) is not None  # NaN is not logged
    except (TypeError, ValueError):
        return False


def _search_alg(cfg: RaymimConfig):
    tc = cfg.tune
    if tc.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError("tune.algorithm=optuna needs `pip install optuna`") from exc
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(OptunaSearch(metric=OBJECTIVE, mode="max", seed=tc.seed),
                                  max_concurrent=tc.max_concurrent)
    return None  # Tune's BasicVariantGenerator: grid entries enumerated, the rest sampled


def _scheduler(cfg: RaymimConfig):
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t one past the last training step: ASHA stops a trial that reaches max_t, and the trial
    # still has its downstream fine-tune to run and report after the final pretraining report.
    return ASHAScheduler(time_attr="step", metric="loss", mode="min", max_t=cfg.train.steps + 1,
                         grace_period=min(cfg.tune.grace_period, cfg.train.steps),
                         reduction_factor=cfg.tune.reduction_factor)


def _parent_run(cfg: RaymimConfig, name: str) -> tuple[str, str]:
    import mlflow

    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    exp_id = setup_experiment(cfg.mlflow.experiment, uri)
    client = mlflow.MlflowClient(uri)
    run_id = find_run(exp_id, name, uri)
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=name, tags={"raymim.kind": "tune-sweep"}).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    log_params_flat(client, run_id, {k: v for k, v in flatten(cfg).items() if k not in cfg.tune.space})
    client.set_tag(run_id, "raymim.space", json.dumps(cfg.tune.space))
    return uri, run_id


def sweep(cfg: RaymimConfig, data: str, labelled: str | None = None, name: str | None = None,
          storage: str | None = None, resume: bool = False) -> SweepResult:
    """Run (or with ``resume``, continue) a sweep; returns the trials' table, best first."""
    import ray
    from ray import tune

    from raymim.train.trainer import default_storage

    labelled = labelled or cfg.tune.labelled
    if not labelled:
        raise ValueError("a sweep needs labelled data for its objective: pass --labelled or set tune.labelled")
    if not cfg.tune.space:
        raise ValueError("tune.space is empty: nothing to sweep")
    name = name or f"{cfg.name}-sweep"
    storage = storage or default_storage()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    uri, parent = _parent_run(cfg, name)
    base = to_dict(cfg)
    ctx = {"base": base, "data": str(Path(data).resolve()), "labelled": str(Path(labelled).resolve()),
           "storage": str(Path(storage) / f"{name}-trials") if "://" not in storage else f"{storage}/{name}-trials",
           "parent_run_id": parent, "finetune_steps": cfg.tune.finetune_steps, "seed": cfg.tune.seed}
    space = {**param_space(cfg.tune.space), "_ctx": ctx}
    trainable = tune.with_resources(run_trial, {"CPU": cfg.tune.trial_cpus})
    exp_path = f"{storage.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(exp_path):
        print(f"[raymim] resuming sweep {name!r} from {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, param_space=space,
                                   resume_unfinished=True, resume_errored=True)
    else:
        if tune.Tuner.can_restore(exp_path) and not resume:
            raise FileExistsError(f"sweep {name!r} already exists at {exp_path}: pass --resume or a new --name")
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(num_samples=cfg.tune.num_samples, search_alg=_search_alg(cfg),
                                        scheduler=_scheduler(cfg), max_concurrent_trials=cfg.tune.max_concurrent,
                                        time_budget_s=cfg.tune.time_budget_s),
            run_config=tune.RunConfig(name=name, storage_path=storage),
        )
    grid = tuner.fit()
    table = _table(grid, list(cfg.tune.space))
    best = table[0] if table and table[0].get(OBJECTIVE) is not None else None
    _finish_parent(uri, parent, table, list(cfg.tune.space), best)
    return SweepResult(name, exp_path, parent, uri, table, best)


def _table(grid, keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        row = {"trial": result.path.rstrip("/").split("/")[-1] if result.path else "?",
               **{k: result.config.get(k) for k in keys},
               OBJECTIVE: m.get(OBJECTIVE), "loss": m.get("loss"), "step": m.get("step"),
               "status": "error" if result.error else ("complete" if OBJECTIVE in m else "stopped early"),
               "mlflow_run_id": m.get("mlflow_run_id"), "checkpoint_path": m.get("checkpoint_path")}
        rows.append(row)
    return sorted(rows, key=lambda r: (r[OBJECTIVE] is None, -(r[OBJECTIVE] or 0.0)))


def _finish_parent(uri: str, parent: str, table: list[dict[str, Any]], keys: list[str], best) -> None:
    import mlflow

    from raymim.tune.report import plot_objective, table_markdown, write_table_csv

    client = mlflow.MlflowClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        write_table_csv(table, Path(tmp) / "sweep.csv")
        (Path(tmp) / "sweep.md").write_text(table_markdown(table, keys))
        plot_objective(table, keys, Path(tmp) / "objective_vs_params.png")
        client.log_artifacts(parent, tmp, artifact_path="sweep")
    if best is not None:
        client.log_metric(parent, f"best_{OBJECTIVE}", float(best[OBJECTIVE]))
        client.set_tag(parent, "raymim.best_trial", best["trial"])
        if best.get("mlflow_run_id"):
            client.set_tag(parent, "raymim.best_run_id", best["mlflow_run_id"])
        if best.get("checkpoint_path"):
            with tempfile.TemporaryDirectory() as tmp:
                for f in ("encoder.pt", "config.yaml"):
                    src = Path(best["checkpoint_path"]) / f
                    if src.is_file():
                        (Path(tmp) / f).write_bytes(src.read_bytes())
                client.log_artifacts(parent, tmp, artifact_path="best_encoder")
    client.set_terminated(parent, status="FINISHED")
