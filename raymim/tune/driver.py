"""Ray Tune sweeps over pretraining configs, selected on validation Dice of a quick fine-tune.

The Ray 2.60 pattern (DESIGN.md): each trial is a function trainable that runs a full Ray Train
pretraining (:func:`raymim.train.trainer.pretrain`, whose ``TorchTrainer`` gets a
``TuneReportCallback`` so every checkpoint report reaches Tune with its ``step``), then
fine-tunes a segmentation network with the trial's encoder and reports ``val_dice`` (mean Dice
on the labelled set's **validation** cases) -- the sweep's objective. Only the selected trial is
scored on the test cases, once, after the sweep (``test/...`` on its run and ``best_test/...``
on the sweep's run). A labelled set without validation cases is refused before any trial starts.

Early stopping (ASHA) compares trials on ``probe_loss``, not on the training loss: the training
loss of two trials is not comparable when they differ in the mask ratio, alpha (an added
InfoNCE term), the level count (more terms), or MPS selection (masks the hardest patches on
purpose). The probe (``train.probe_crops``, turned on with 4 crops for an ASHA sweep) holds whole
cases out of pretraining and scores each checkpoint with a fixed random mask at one reference
ratio (``train.probe_ratio``): see :meth:`raymim.methods.base.PretrainMethod.probe_loss`.

Grid dimensions are expanded here, not by Tune, so that grid points that differ only in
parameters the trial ignores (``mask_ratio_end`` under a constant schedule, ``mps_clusters``
without MPS, ...: the method config's :meth:`~raymim.config.MethodConfig.inert_fields`) run once; the collapsed points
are printed and recorded on the sweep's run. Sampled dimensions (``choice``, ``uniform``, ...)
stay Tune domains.

MLflow: the sweep is a parent run; each trial's pretraining run is its child (named after the
Tune trial, so a restored trial continues its run) and receives the trial's downstream scores.
At the end the parent gets a table sorted by the objective, a plot of the objective against each
swept parameter, and the best trial's encoder under ``best_encoder/``.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymim.config import RaymimConfig, config_from_dict, flatten, set_values, to_dict
from raymim.train.tracking import find_run, log_params_flat, resolve_tracking_uri, run_status, setup_experiment
from raymim.tune.report import OBJECTIVE  # validation Dice of the quick fine-tune

PROBE = "probe_loss"
GRID_KEY = "_grid"  # one Tune grid dimension holding the collapsed grid points
PROBE_CROPS_FOR_ASHA = 4


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
    """The base config with a trial's dotted-key params applied (validated like any config; a
    swept ``method.name`` keeps the base's fields the method owns, like ``--set``)."""
    return config_from_dict(set_values(base, params))


def experiment_key(cfg: RaymimConfig) -> str:
    """What a trial actually trains: every section but ``name`` / ``tune``, with the method's
    inert fields dropped (:meth:`~raymim.config.MethodConfig.effective`). Two trials with one key
    are the same experiment."""
    tree = {k: v for k, v in to_dict(cfg).items() if k not in ("name", "tune")}
    tree["method"] = cfg.method.effective()
    return json.dumps(tree, sort_keys=True, default=str)


def collapse_grid(base: dict[str, Any], space: dict[str, dict[str, list[Any]]]
                  ) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """``(kept grid points, [(dropped point, the kept point it duplicates), ...])`` over the
    cartesian product of the ``grid`` dimensions of ``space`` (in Tune's enumeration order)."""
    keys = [k for k, spec in space.items() if "grid" in spec]
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(space[k]["grid"] for k in keys))]
    kept: dict[str, dict[str, Any]] = {}
    dropped = []
    for point in points:
        key = experiment_key(trial_config(base, point))
        if key in kept:
            dropped.append((point, kept[key]))
        else:
            kept[key] = point
    return list(kept.values()), dropped


def sweep_space(cfg: RaymimConfig) -> tuple[dict[str, Any], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Tune's ``param_space`` (without ``_ctx``) and the collapsed duplicate grid points."""
    from ray import tune

    space = cfg.tune.space
    sampled = {k: v for k, v in space.items() if "grid" not in v}
    out = param_space(sampled)
    if len(sampled) == len(space):
        return out, []
    kept, dropped = collapse_grid(to_dict(cfg), space)
    out[GRID_KEY] = tune.grid_search(kept)
    return out, dropped


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's swept dotted-key params (its grid point merged in), without the sweep context."""
    out = {k: v for k, v in config.items() if k not in ("_ctx", GRID_KEY)}
    out.update(config.get(GRID_KEY) or {})
    return out


def run_trial(params: dict[str, Any]) -> None:
    """The function trainable. ``params``: dotted config keys, the grid point, ``_ctx`` (fixed sweep settings)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymim.train.trainer import pretrain
    from raymim.weights import load_pretrained

    ctx = params["_ctx"]
    swept = trial_params(params)
    cfg = trial_config(ctx["base"], swept)
    trial = ray.tune.get_context().get_trial_name()
    res = pretrain(cfg, ctx["data"], name=trial, storage=ctx["storage"],
                   extra_callbacks=[TuneReportCallback()], parent_run_id=ctx["parent_run_id"])
    encoder_state, _ = load_pretrained(res.checkpoint_path)
    scores = _objective(encoder_state, cfg, ctx)
    _log_trial(res.tracking_uri, res.mlflow_run_id, swept, scores)
    final = {OBJECTIVE: scores["val/dice/mean"], "step": cfg.train.steps, "loss": res.final_loss,
             "mlflow_run_id": res.mlflow_run_id, "checkpoint_path": res.checkpoint_path}
    probe = _checkpoint_probe(res.checkpoint_path)
    if probe is not None:
        final[PROBE] = probe
    ray.tune.report(final)


def _checkpoint_probe(path: str | None) -> float | None:
    meta = Path(path or "") / "meta.json"
    return json.loads(meta.read_text()).get(PROBE) if path and meta.is_file() else None


def _objective(encoder_state, cfg: RaymimConfig, ctx: dict[str, Any], score_test: bool = False) -> dict[str, float]:
    from raymim.downstream.evaluate import quick_finetune

    return quick_finetune(encoder_state, cfg, ctx["labelled"], steps=ctx["finetune_steps"], seed=ctx["seed"],
                          score_test=score_test)


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


def check_labelled(cfg: RaymimConfig, labelled: str) -> None:
    """Refuse a sweep whose labelled set has no validation cases (its objective would be test
    Dice). Reads the manifest only: the same records, sides and patients the trials will split."""
    from raymim.downstream.data import case_id
    from raymim.downstream.splits import make_split
    from raymim.io.discover import discover_cases

    ft = cfg.finetune
    records = [r for r in discover_cases(labelled) if r.get("label") and not r.get("error")]
    if not records:
        raise ValueError(f"no labelled cases in {labelled!r} (a manifest needs a 'label' column)")
    ids = [case_id(r) for r in records]
    fixed = {case_id(r): r["split"] for r in records if r.get("split")}
    groups = {case_id(r): r["patient"] for r in records if r.get("patient")}
    split = make_split(ids, ft.split_seed, ft.val_fraction, ft.test_fraction, fixed, groups)
    if not split.val:
        raise ValueError(
            f"the sweep's objective is validation Dice, but {labelled!r} gives no validation case "
            f"({len(ids)} labelled cases, finetune.val_fraction={ft.val_fraction}); add cases, raise "
            "finetune.val_fraction, or mark cases split=val in the manifest"
        )


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
    return ASHAScheduler(time_attr="step", metric=PROBE, mode="min", max_t=cfg.train.steps + 1,
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
    from ray import tune

    from raymim.ray_session import ensure_ray
    from raymim.train.trainer import default_storage

    labelled = labelled or cfg.tune.labelled
    if not labelled:
        raise ValueError("a sweep needs labelled data for its objective: pass --labelled or set tune.labelled")
    if not cfg.tune.space:
        raise ValueError("tune.space is empty: nothing to sweep")
    check_labelled(cfg, labelled)
    if cfg.tune.scheduler == "asha" and not cfg.train.probe_crops:
        cfg = trial_config(to_dict(cfg), {"train.probe_crops": PROBE_CROPS_FOR_ASHA})
        print(f"[raymim] ASHA stops trials on {PROBE}: holding {PROBE_CROPS_FOR_ASHA} probe crops out of "
              "pretraining (train.probe_crops)", flush=True)
    name = name or f"{cfg.name}-sweep"
    storage = storage or default_storage()
    tune_space, dropped = sweep_space(cfg)
    for point, same in dropped:
        print(f"[raymim] skipping grid point {point}: the same experiment as {same} (differs only in "
              "parameters that setting ignores)", flush=True)
    ensure_ray()
    uri, parent = _parent_run(cfg, name)
    import mlflow

    with run_status(mlflow.MlflowClient(uri), parent):
        if dropped:
            import mlflow

            mlflow.MlflowClient(uri).set_tag(parent, "raymim.collapsed_grid_points", json.dumps(
                [{"point": pt, "same_as": same} for pt, same in dropped], default=str)[:5000])
        base = to_dict(cfg)
        ctx = {"base": base, "data": str(Path(data).resolve()), "labelled": str(Path(labelled).resolve()),
               "storage": str(Path(storage) / f"{name}-trials") if "://" not in storage else f"{storage}/{name}-trials",
               "parent_run_id": parent, "finetune_steps": cfg.tune.finetune_steps, "seed": cfg.tune.seed}
        space = {**tune_space, "_ctx": ctx}
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
        if best is not None:
            best.update(_score_selected(best, ctx, uri, parent))
        _finish_parent(uri, parent, table, list(cfg.tune.space), best)
    return SweepResult(name, exp_path, parent, uri, table, best)


def _score_selected(best: dict[str, Any], ctx: dict[str, Any], uri: str, parent: str) -> dict[str, Any]:
    """The selected trial's test scores (the only test evaluation of a sweep): the same quick
    fine-tune as its objective, now also scored on the test cases; logged as ``test/...`` on the
    trial's run and ``best_test/...`` on the sweep's run. Returns ``{"test_dice": ...}``."""
    import mlflow
    from mlflow.entities import Metric

    from raymim.weights import load_pretrained

    if not best.get("checkpoint_path"):
        return {}
    encoder_state, _ = load_pretrained(best["checkpoint_path"])
    cfg = trial_config(ctx["base"], best["params"])
    scores = _objective(encoder_state, cfg, ctx, score_test=True)
    ts = int(time.time() * 1000)
    test = {k: float(v) for k, v in scores.items() if k.startswith("test/") and _is_number(v)}
    client = mlflow.MlflowClient(uri)
    if best.get("mlflow_run_id"):
        client.log_batch(best["mlflow_run_id"], metrics=[Metric(k, v, ts, 0) for k, v in test.items()])
    client.log_batch(parent, metrics=[Metric(f"best_{k}", v, ts, 0) for k, v in test.items()])
    return {"test_dice": test.get("test/dice/mean")}


def _table(grid, keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        params = trial_params(result.config or {})
        row = {"trial": result.path.rstrip("/").split("/")[-1] if result.path else "?",
               **{k: params.get(k) for k in keys},
               OBJECTIVE: m.get(OBJECTIVE), PROBE: m.get(PROBE), "loss": m.get("loss"), "step": m.get("step"),
               "status": "error" if result.error else ("complete" if OBJECTIVE in m else "stopped early"),
               "mlflow_run_id": m.get("mlflow_run_id"), "checkpoint_path": m.get("checkpoint_path"),
               "params": params}
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
