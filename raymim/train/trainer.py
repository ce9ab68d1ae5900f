"""Driver side of pretraining: build the dataset, the MLflow run and the ``TorchTrainer``, fit.

Resume is by name: Ray Train V2 keeps a checkpoint-manager snapshot under
``<storage>/<name>/``; fitting again with the same ``RunConfig(name, storage_path)`` hands the
latest checkpoint to the workers through ``ray.train.get_checkpoint()``. Before that happens the
driver reads the checkpoints' ``meta.json`` and refuses ones written by another config, and the
MLflow run with the same name is continued rather than duplicated.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raymim.config import ConfigError, RaymimConfig, flatten, to_dict
from raymim.train.checkpoint import META_FILE, CheckpointMismatchError, model_config_hash
from raymim.train.progress import StepBar, wants_bar
from raymim.train.tracking import (
    DEFAULT_ROOT,
    find_run,
    log_params_flat,
    log_shards_input,
    register_encoder,
    resolve_tracking_uri,
    run_status,
    setup_experiment,
    source_tags,
    system_metrics,
)


@dataclass
class PretrainResult:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint_path: str | None
    first_loss: float | None
    final_loss: float | None
    steps: int


def default_storage() -> str:
    """``$RAYMIM_STORAGE``, else ``<RAYMIM_HOME or ./runs>/ray`` (absolute: Ray Train needs it)."""
    env = os.environ.get("RAYMIM_STORAGE")
    if env:
        return env
    return str((DEFAULT_ROOT / "ray").resolve())


def check_existing_checkpoints(storage: str, name: str, cfg: RaymimConfig) -> int:
    """Refuse to resume from checkpoints written by another config; returns the latest step found.

    (The workers restore from the newest readable checkpoint on storage, including one Ray Train
    had not recorded in its run snapshot when the previous driver or a worker died.)
    """
    if "://" in storage:
        return 0  # remote stores: the workers' read_state() makes the same check
    run_dir = Path(storage) / name
    want = model_config_hash(cfg)
    latest = 0
    for meta_file in sorted(run_dir.glob(f"checkpoint_*/{META_FILE}")):
        meta = json.loads(meta_file.read_text())
        if meta.get("config_hash") != want:
            raise CheckpointMismatchError(
                f"run {name!r} at {run_dir} has checkpoints from a different config "
                f"(hash {meta.get('config_hash')}, this config {want}); pass another --name to start a new run, "
                "or the original config to resume it."
            )
        latest = max(latest, int(meta.get("step", 0)))
    return latest


def _ckpt_step(d: Path) -> int:
    try:
        return int(d.name.removeprefix("checkpoint_step"))
    except ValueError:
        return -1


def prune_orphan_checkpoints(storage: str, name: str) -> list[str]:
    """Delete checkpoint folders Ray Train's run snapshot does not list (left by a driver killed
    between writing a checkpoint and recording it), so ``keep_checkpoints`` holds on disk too.

    An unlisted checkpoint *newer* than every listed one is kept: it holds the most progress (a
    killed driver's workers may outlive it for a while and write further checkpoints, which the
    next run resumes from), and deleting it would lose work."""
    if "://" in storage:
        return []
    import shutil

    run_dir = Path(storage) / name
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return []
    known = {r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text()).get("checkpoint_results", [])}
    newest_known = max((_ckpt_step(Path(k)) for k in known), default=-1)
    removed = []
    for d in sorted(run_dir.glob("checkpoint_*")):
        if d.is_dir() and d.name not in known and _ckpt_step(d) < newest_known:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


# A worker's iterator pass spans several data passes (each drawing fresh crops, see
# raymim.data.stream) so the iterator is not restarted every epoch: each restart stalls the workers
# for seconds (bench/RESULTS.md, "data wait"), which dominates runs whose epochs are short. A pass is
# capped at this many micro-batches per worker, which bounds the batches a resumed run skips (and
# re-reads) to find its place, and at MAX_REPEAT data passes.
PASS_BATCHES = 2000
MAX_REPEAT = 8


def epochs_per_pass(rows: int | None, cfg: RaymimConfig) -> int:
    """How many data passes (epochs) one iterator pass covers: enough for the whole run when it is
    short, at most :data:`PASS_BATCHES` micro-batches per worker and :data:`MAX_REPEAT` passes; 1
    when the crop count per pass is unknown."""
    tc = cfg.train
    if not rows:
        return 1
    per_epoch = max(1, rows // (tc.num_workers * tc.batch_size))
    needed = -(-tc.steps * tc.accumulation // per_epoch) + 1
    return max(1, min(needed, PASS_BATCHES // per_epoch, MAX_REPEAT))


def probe_cases(counts: dict[str, int], crops: int, seed: int) -> list[str]:
    """Whole cases held out of pretraining for the probe: in an order fixed by a hash of
    (seed, case id), enough cases for ``crops`` crops (``counts``: the crops each case gives),
    never more than half of the cases."""
    order = sorted(counts, key=lambda c: hashlib.sha256(f"probe/{seed}/{c}".encode()).hexdigest())
    held, n = [], 0
    for cid in order:
        if n >= crops or len(held) + 1 > len(order) // 2:
            break
        held.append(cid)
        n += counts[cid]
    return held


def build_probe(data: str, cfg: RaymimConfig) -> tuple[np.ndarray | None, dict[str, int]]:
    """``(probe crops [N, D, H, W] float32, {held-out case id: its crop count})`` for
    ``train.probe_crops`` > 0; ``(None, {})`` when the probe is off. Needs prepared shards with at
    least 2 volumes. The held-out volumes give ``prepare.crops_per_volume`` crops each, drawn once
    by the training sampler with the reserved probe pass (:data:`raymim.data.crops.PROBE_PASS`),
    so the probe is the same set of crops at every checkpoint and in a resumed run."""
    tc = cfg.train
    if not tc.probe_crops:
        return None, {}
    if not (Path(data) / "manifest.json").is_file():
        raise ValueError("train.probe_crops needs prepared shards (raymim prepare), not raw scans: "
                         f"{data!r} has no manifest.json; set train.probe_crops=0 (and tune.scheduler=none)")
    from raymim.data.crops import PROBE_PASS, CropSpec, sample_crops
    from raymim.data.shards import read_volume, volume_index

    index = {v["case_id"]: v for v in volume_index(data)}
    spec = CropSpec.from_config(cfg.prepare, tc.seed)
    counts = {cid: spec.k for cid in index}
    held = probe_cases(counts, tc.probe_crops, tc.seed)
    if not held:
        raise ValueError(f"train.probe_crops={tc.probe_crops} holds whole cases out of pretraining, but "
                         f"{data!r} has {len(counts)} case(s); prepare at least 2 or set train.probe_crops=0")
    crops = []
    for cid in held:
        vol = read_volume(index[cid]["file"], index[cid]["row_group"], ["case_id"])
        crops += [r["image"].astype(np.float32) for r in sample_crops(vol, spec, PROBE_PASS)]
    return np.stack(crops[: tc.probe_crops]), {cid: counts[cid] for cid in held}


def build_dataset(data: str, cfg: RaymimConfig, exclude: dict[str, int] | None = None) -> tuple[dict, int]:
    """``(stream spec, data passes per iterator pass)`` for the workers' crop streams
    (:func:`raymim.data.stream.stream_spec`): prepared shards (a folder with ``manifest.json``) or,
    in streaming mode, raw scans (a folder, glob or manifest) run through the same preprocessing
    and crop sampler without writing shards; the cases in ``exclude`` (the probe's) are left out."""
    from raymim.data.stream import stream_spec

    spec = stream_spec(data, cfg, set(exclude or ()))
    return spec, epochs_per_pass(spec["rows"], cfg)


def _local_path(data: str) -> str:
    """``data`` as an absolute path (kept as given when it is a URI or a glob)."""
    return data if "://" in data or any(ch in data for ch in "*?[") else str(Path(data).resolve())


def _mlflow_run(cfg: RaymimConfig, name: str, data: str, parent_run_id: str | None = None) -> tuple[str, str]:
    import mlflow

    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    exp_id = setup_experiment(cfg.mlflow.experiment, uri)
    client = mlflow.MlflowClient(uri)
    run_id = find_run(exp_id, name, uri, parent_run_id)
    if run_id is None:
        tags = {"raymim.kind": "pretrain", "raymim.method": cfg.method.name, "raymim.backbone": cfg.model.backbone,
                **source_tags()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=name, tags=tags)
        run_id = run.info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "raymim.resumed", "true")
    log_params_flat(client, run_id, {**flatten(cfg), "data": Path(data).name})
    client.set_tag(run_id, "raymim.data_path", _local_path(data))  # the overlap check of raymim finetune
    digest = log_shards_input(client, run_id, data)
    if digest:
        client.set_tag(run_id, "raymim.data_digest", digest)
    return uri, run_id


def _metric_endpoints(uri: str, run_id: str) -> tuple[float | None, float | None]:
    import mlflow

    hist = mlflow.MlflowClient(uri).get_metric_history(run_id, "train/loss")
    if not hist:
        return None, None
    hist = sorted(hist, key=lambda m: (m.step, m.timestamp))
    return hist[0].value, hist[-1].value


def _fit(trainer: Any) -> Any:
    """``trainer.fit()``, with Ctrl-C reported as ``KeyboardInterrupt``: Ray Train V2 installs its
    own SIGINT handler during ``fit`` that aborts the run and may ``sys.exit(0)``."""
    try:
        return trainer.fit()
    except SystemExit as exc:
        raise KeyboardInterrupt from exc
    except Exception as exc:
        if "abort" in str(exc).lower() and "SIGINT" in str(exc):
            raise KeyboardInterrupt from exc
        raise


def pretrain(cfg: RaymimConfig, data: str, name: str | None = None, storage: str | None = None,
             extra_callbacks: list[Any] | None = None, parent_run_id: str | None = None) -> PretrainResult:
    """Run (or resume) a pretraining run on a Ray cluster (a local one is started on demand), or,
    when Ray is not installed, in this process (:class:`raymim.train.loop.LocalRuntime`: one
    worker, prepared shards only, the same loop, checkpoints and resume).

    ``extra_callbacks``: Ray Train callbacks (Tune passes ``TuneReportCallback``);
    ``parent_run_id``: nest the MLflow run under this one (a sweep's parent run).
    """
    from raymim.ray_session import ensure_ray, pretrain_log_settings, ray_available

    with_ray = ray_available()
    name = name or cfg.name
    storage = storage or default_storage()
    if not with_ray:
        if "://" in storage or extra_callbacks:
            raise ConfigError("without Ray, pretraining writes to a local folder and takes no Ray Train callbacks "
                              f"(storage {storage!r}); install Ray (pip install -e .) for remote storage and Tune")
        if not (Path(data) / "manifest.json").is_file():
            raise ConfigError(f"without Ray, pretraining reads prepared shards (raymim prepare), not raw scans: "
                              f"{data!r} has no manifest.json")
    if "://" not in storage:
        storage = str(Path(storage).resolve())  # Ray Train wants an absolute local path
    latest = check_existing_checkpoints(storage, name, cfg)
    if latest:
        print(f"[raymim] resuming run {name!r} from step {latest}", flush=True)
    if with_ray:
        ensure_ray(**pretrain_log_settings())  # `raymim pretrain --quiet` / `--log-level`
    uri, run_id = _mlflow_run(cfg, name, data, parent_run_id)
    import mlflow

    client = mlflow.MlflowClient(uri)

    def interrupted() -> None:
        step = check_existing_checkpoints(storage, name, cfg)
        print(f"[raymim] interrupted at step {step} (the last checkpoint); rerun the same command to resume",
              flush=True)

    # On a terminal one progress bar (rate, ETA) replaces the workers' step lines; otherwise lines.
    console = "bar" if wants_bar() else "lines"
    with run_status(client, run_id, on_interrupt=interrupted):
        tc = cfg.train
        probe, held = build_probe(data, cfg)
        if held:
            print(f"[raymim] probe: {len(probe)} crops of {len(held)} case(s) held out of pretraining", flush=True)
        spec, repeat = build_dataset(data, cfg, exclude=held)
        loop_config = {"cfg": to_dict(cfg), "mlflow_uri": uri, "mlflow_run_id": run_id, "console": console,
                       "best_dir": f"{storage.rstrip('/')}/{name}/best",
                       "run_dir": None if "://" in storage else f"{storage}/{name}",
                       "epochs_per_pass": repeat, "data": _local_path(data)}
        with system_metrics(run_id, uri), StepBar(client, run_id, tc.steps, latest, enabled=console == "bar"):
            if with_ray:
                ckpt_path = _fit_with_ray(loop_config, spec, probe, cfg, name, storage, extra_callbacks)
            else:
                ckpt_path = _fit_here(loop_config, spec, probe, cfg, name, storage)
        if cfg.mlflow.register and parent_run_id is None:
            model = cfg.mlflow.registered_model or name
            version = register_encoder(client, run_id, model)
            print(f"[raymim] encoder registered as models:/{model}/{version}", flush=True)
    prune_orphan_checkpoints(storage, name)
    first, final = _metric_endpoints(uri, run_id)
    return PretrainResult(name, run_id, uri, ckpt_path, first, final, tc.steps)


def _fit_with_ray(loop_config: dict[str, Any], spec: dict[str, Any], probe: np.ndarray | None, cfg: RaymimConfig,
                  name: str, storage: str, extra_callbacks: list[Any] | None) -> str | None:
    """Fit the ``TorchTrainer``; returns the path of the run's latest checkpoint."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from raymim.train.loop import train_loop_per_worker

    tc = cfg.train
    # Ray Data's own progress bars are off inside training: they redraw per block (tens of
    # thousands of lines when stderr is a file) and say nothing the step lines do not.
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "stream": ray.put(spec),
                           "driver": ray.put(True),  # the crop streams stop when this driver dies
                           "probe": None if probe is None else ray.put(probe)},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            callbacks=extra_callbacks,
        ),
    )
    result = _fit(trainer)
    if "://" not in storage and check_existing_checkpoints(storage, name, cfg) < tc.steps:
        raise KeyboardInterrupt  # Ray Train returned early: its SIGINT handler aborted the run
    return result.checkpoint.path if result.checkpoint is not None else None


def loader_workers() -> int:
    """DataLoader processes of a Ray-less run: one core is the training process's."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _fit_here(loop_config: dict[str, Any], spec: dict[str, Any], probe: np.ndarray | None, cfg: RaymimConfig,
              name: str, storage: str) -> str | None:
    """Run the loop in this process (no Ray); returns the path of the latest checkpoint."""
    from raymim.train.loop import LocalRuntime, run_loop

    tc = cfg.train
    if tc.num_workers > 1:
        print(f"[raymim] without Ray one process trains (train.num_workers={tc.num_workers} is not used)", flush=True)
    rt = LocalRuntime(f"{storage}/{name}", tc.keep_checkpoints, tc.use_gpu, loader_workers())
    run_loop({**loop_config, "stream": spec, "probe": probe, "driver": None}, rt)
    return str(rt.latest) if rt.latest is not None else None
