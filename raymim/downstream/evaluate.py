"""Downstream evaluation: label-fraction grid of pretrained/scratch pairs, tables, plots, MLflow.

:func:`run_finetune` is what ``raymim finetune`` runs; :func:`quick_finetune` is the one-cell
objective a Tune trial calls (in-process, no nested Ray Train job).

Example::

    res = run_finetune("runs/mim/checkpoint", "phantoms/manifest.csv", cfg, "runs/ft", engine="local")
    res.summary[0]["dice/mean"]                        # test Dice of the selected weights
    quick_finetune(encoder_state, cfg, cases)["val/dice/mean"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raymim.config import RaymimConfig, config_from_dict, flatten, to_dict
from raymim.downstream.data import load_labelled_cases, num_classes_of
from raymim.downstream.loop import cell_key, load_cell_results, run_cells, train_cell
from raymim.downstream.report import (
    cell_rows,
    markdown_summary,
    overlay_figure,
    plot_dice_vs_fraction,
    summary_rows,
    write_csv,
)
from raymim.downstream.splits import Split, fraction_subset, make_split

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    split: Split
    parent_run_id: str | None
    child_run_ids: dict[str, str]
    artifacts: list[Path]


def merge_pretrained_config(cfg: RaymimConfig, pretrained_cfg: RaymimConfig | None) -> RaymimConfig:
    """The run's config with the model (and method name) of the pretrained checkpoint: the encoder
    defines the architecture; everything downstream comes from ``cfg``."""
    if pretrained_cfg is None:
        return cfg
    tree = to_dict(cfg)
    tree["model"] = to_dict(pretrained_cfg.model)
    tree["method"] = to_dict(pretrained_cfg.method)
    return config_from_dict(tree)


def _roi(cfg: RaymimConfig) -> tuple[int, int, int]:
    return tuple(int(s) for s in (cfg.finetune.roi_size or [cfg.model.img_size] * 3))  # type: ignore[return-value]


def _cases_arg(data: Any, cfg: RaymimConfig) -> tuple[list[dict[str, Any]], dict[str, str]]:
    if isinstance(data, list | tuple) and data and isinstance(data[0], Mapping) and "label" in data[0] and \
            isinstance(data[0]["label"], torch.Tensor):
        return list(data), {c["id"]: c["split"] for c in data if c.get("split")}
    return load_labelled_cases(data, cfg.prepare, cfg.finetune.classes, _roi(cfg))


def split_cases(cases: list[dict[str, Any]], fixed: Mapping[str, str], cfg: RaymimConfig) -> Split:
    """The run's case-level split: ``finetune.split_seed`` / ``val_fraction`` / ``test_fraction``,
    manifest ``split`` sides, one patient's cases on one side."""
    ft = cfg.finetune
    groups = {c["id"]: c["patient"] for c in cases if c.get("patient")}
    return make_split([c["id"] for c in cases], ft.split_seed, ft.val_fraction, ft.test_fraction, fixed, groups)


def quick_finetune(
    encoder_state: Mapping[str, torch.Tensor] | None,
    cfg: RaymimConfig,
    data: Any,
    steps: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    with_scratch: bool = False,
    score_test: bool = False,
) -> dict[str, float]:
    """One fine-tuning cell in-process, scored on the **validation** cases: ``val/dice/mean``,
    ``val/nsd/mean``, ... per class ``val/dice/<name>``; with ``score_test`` also the test cases
    under ``test/...`` (only for a model that has been selected: a sweep's best trial, the demo);
    with ``with_scratch`` the same for the scratch twin under ``scratch/`` plus
    ``val_dice_gain_vs_scratch`` (and ``test_dice_gain_vs_scratch``). ``data``: a path
    :func:`load_labelled_cases` accepts, or the already loaded cases. Refuses a labelled set
    without validation cases. Safe inside a Ray task or Tune trial (no Ray or MLflow calls)."""
    ft = cfg.finetune
    cases, fixed = _cases_arg(data, cfg)
    split = split_cases(cases, fixed, cfg)
    if not split.val:
        raise ValueError(f"no validation cases in {len(cases)} labelled case(s) (finetune.val_fraction="
                         f"{ft.val_fraction}): a quick fine-tune is scored on validation cases only")
    by_id = {c["id"]: c for c in cases}
    num_classes = num_classes_of(cases, ft.classes)
    frac = ft.fractions[0] if fraction is None else fraction
    out: dict[str, float] = {}
    inits = ["pretrained"] + (["scratch"] if with_scratch else []) if encoder_state is not None else ["scratch"]
    for init in inits:
        cell = {"fraction": frac, "seed": seed, "init": init, "train_ids": fraction_subset(split.train, frac, seed)}
        res = train_cell(cell, by_id, encoder_state, cfg, num_classes, steps or ft.quick_steps, split.val,
                         split.test if score_test else ())
        pre = "" if init == inits[0] else "scratch/"
        out.update({f"{pre}val/{k}": v for k, v in res["val"].items()})
        out.update({f"{pre}test/{k}": v for k, v in res["test"].items()})
        out[f"{pre}train_seconds"] = res["train_seconds"]
        out[f"{pre}best_step"] = res["best_step"]
    if with_scratch and inits[0] == "pretrained":
        for side in ("val", "test"):
            if f"scratch/{side}/dice/mean" in out:
                out[f"{side}_dice_gain_vs_scratch"] = out[f"{side}/dice/mean"] - out[f"scratch/{side}/dice/mean"]
    return out


def run_finetune(
    pretrained: str | Path | tuple[Mapping[str, torch.Tensor], RaymimConfig],
    data: Any,
    cfg: RaymimConfig,
    out_dir: str | Path,
    quick: bool = False,
    engine: str | None = None,
    log_mlflow: bool = True,
    pretrain_data: str | None = None,
) -> FinetuneResult:
    """The full evaluation. ``pretrained``: checkpoint dir / encoder.pt / MLflow ref, or an
    ``(encoder_state, config)`` pair. Writes results under ``out_dir`` and logs to MLflow.

    ``pretrain_data``: the pretraining shards, for the overlap check (default: what the
    checkpoint records); ``finetune.strict_overlap`` turns an overlap (or an unchecked one) into
    an :class:`~raymim.downstream.overlap.OverlapError` before anything is trained."""
    from raymim.downstream.overlap import OverlapError, pretrain_data_of, pretraining_overlap
    from raymim.weights import load_pretrained

    t0 = time.time()
    ref = None if isinstance(pretrained, tuple) else str(pretrained)
    encoder_state, pre_cfg = pretrained if isinstance(pretrained, tuple) else load_pretrained(pretrained)
    cfg = merge_pretrained_config(cfg, pre_cfg)
    ft = cfg.finetune
    cases, fixed = _cases_arg(data, cfg)
    split = split_cases(cases, fixed, cfg)
    overlap = pretraining_overlap(cases, split, pretrain_data or pretrain_data_of(ref))
    if ft.strict_overlap and (overlap.count or not overlap.checked):
        raise OverlapError(overlap.message() + " (finetune.strict_overlap / --strict)")
    if overlap.count or not overlap.checked:
        print(f"[raymim] warning: {overlap.message()}", flush=True)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    num_classes = num_classes_of(cases, ft.classes)
    fractions = ft.fractions[:1] if quick else sorted(ft.fractions)
    seeds = 1 if quick else ft.seeds
    steps = ft.quick_steps if quick else None  # None: each cell's finetune_budget
    cells = [{"fraction": f, "seed": s, "init": init, "train_ids": fraction_subset(split.train, f, s)}
             for f in fractions for s in range(seeds) for init in ("pretrained", "scratch")]
    overlay_ids = split.test[: ft.overlays]
    encoder_digest = state_digest(encoder_state)
    for c in cells:
        c["fingerprint"] = cell_fingerprint(c, cfg, split, steps, encoder_digest, overlay_ids)
    todo = [c for c in cells if not finished_cell(out, c)]
    if len(todo) < len(cells):
        print(f"[raymim] fine-tune: {len(cells) - len(todo)} of {len(cells)} cell(s) already finished in {out}, "
              "reused", flush=True)
    job = {"cfg": to_dict(cfg), "cases": {c["id"]: _in_memory(c) for c in cases},
           "encoder_state": dict(encoder_state),
           "num_classes": num_classes, "steps": steps, "cells": todo, "val_ids": split.val, "test_ids": split.test,
           "overlay_ids": overlay_ids, "out_dir": str(out)}
    engine = engine or ft.engine
    if engine == "ray":
        from raymim.ray_session import ray_available

        if not ray_available():  # the same cells, one after another in this process
            print("[raymim] fine-tune: Ray is not installed; training the cells in this process", flush=True)
            engine = "local"
    if todo and engine == "ray":
        _fit_with_ray_train(job, cfg, out)
    elif todo:
        run_cells(job)
    results = load_cell_results(out, [cell_key(c) for c in cells])
    rows, summary = cell_rows(results), summary_rows(results)
    artifacts = _write_artifacts(out, rows, summary, results, {c["id"]: c for c in cases}, split, cfg, ref,
                                 overlap.message())
    parent, children = (None, {})
    if log_mlflow:
        parent, children = _log_mlflow(cfg, ref, results, summary, artifacts, split, quick, time.time() - t0)
    return FinetuneResult(out, rows, summary, split, parent, children, artifacts)


def state_digest(state: Mapping[str, torch.Tensor] | None) -> str | None:
    """SHA-256 over an encoder state's names, shapes and values (None for no state)."""
    if state is None:
        return None
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cell_fingerprint(cell: Mapping[str, Any], cfg: RaymimConfig, split: Split, steps: int | None,
                     encoder_digest: str | None, overlay_ids: Sequence[str] = ()) -> str:
    """What a cell's result depends on: the fine-tuning, model and preprocessing config, the cell
    (fraction, seed, init, training cases), the validation and test cases, the step budget, and
    for a pretrained cell the encoder's weights. A finished cell with the same fingerprint is
    reused (a resumed run; and the scratch twin of every encoder with the same architecture)."""
    body = {"finetune": to_dict(cfg.finetune), "model": to_dict(cfg.model), "prepare": to_dict(cfg.prepare),
            "cell": {k: cell[k] for k in ("fraction", "seed", "init", "train_ids")}, "val": list(split.val),
            "test": list(split.test), "overlays": list(overlay_ids), "steps": steps,
            "encoder": encoder_digest if cell["init"] == "pretrained" else None}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def finished_cell(out: Path, cell: Mapping[str, Any]) -> bool:
    """Whether ``out/cells`` holds this cell's result with the same fingerprint."""
    path = Path(out) / "cells" / f"{cell_key(cell)}.json"
    try:
        return json.loads(path.read_text()).get("fingerprint") == cell["fingerprint"]
    except (OSError, ValueError):
        return False


def _in_memory(case: Mapping[str, Any]) -> dict[str, Any]:
    """A case as the cells need it (no source paths travel to the workers)."""
    return {k: v for k, v in case.items() if k != "source"}


def _fit_with_ray_train(job: dict[str, Any], cfg: RaymimConfig, out: Path) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raymim.downstream.loop import finetune_train_loop
    from raymim.ray_session import ensure_ray

    ft = cfg.finetune
    ensure_ray()
    workers = max(1, min(ft.num_workers, len(job["cells"])))
    trainer = TorchTrainer(
        finetune_train_loop,
        train_loop_config={"job": ray.put(job)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=ft.use_gpu,
                                     resources_per_worker={"CPU": ft.cpus_per_worker}),
        run_config=RunConfig(name=f"finetune-{int(time.time())}", storage_path=str(out / "ray")),
    )
    trainer.fit()


def _write_artifacts(out: Path, rows, summary, results, cases, split: Split, cfg: RaymimConfig,
                     ref: str | None, overlap: str = "") -> list[Path]:
    """results.csv / summary.csv, results.md (Markdown tables only), the Dice-vs-fraction plots
    (mean over classes, and per class), split.json and the test-case overlays, classes named by
    ``finetune.class_names`` (else the label values ``finetune.classes``, else ``class_<i>``)."""
    from raymim.downstream.report import class_labels, plot_dice_per_class, result_classes

    arts = [write_csv(rows, out / "results.csv"), write_csv(summary, out / "summary.csv")]
    title = f"{cfg.method.name} {cfg.model.backbone} vs scratch ({len(split.test)} test cases)"
    classes = class_labels(result_classes(results), cfg.finetune.class_names, cfg.finetune.classes)
    md = markdown_summary(summary, title, classes)
    budget = ", ".join(sorted({f"{r['n_train']} cases: {r['steps']} steps" for r in results}))
    selected = "best validation Dice" if any(r.get("select") == "best_val" for r in results) else "last step"
    md += (f"\nPretrained: `{ref}`. Split: {len(split.train)} train / {len(split.val)} val / {len(split.test)} test "
           f"cases; budget {budget}; weights selected by {selected}; scored on the test cases. {overlap}. "
           "Per-cell rows: results.csv.\n")
    (out / "results.md").write_text(md)
    arts.append(out / "results.md")
    arts.append(plot_dice_vs_fraction(summary, out / "dice_vs_fraction.png"))
    if classes:
        arts.append(plot_dice_per_class(summary, out / "dice_per_class.png", classes))
    (out / "split.json").write_text(json.dumps(dataclasses.asdict(split), indent=1))
    arts.append(out / "split.json")
    (out / "overlays").mkdir(exist_ok=True)
    top = max(r["fraction"] for r in results)
    for case_id in split.test[: cfg.finetune.overlays]:
        preds = {f"{r['init']} (f={r['fraction']:g})": r["preds"][case_id.replace("/", "__")]
                 for r in results if r["seed"] == 0 and r["fraction"] in (min(r2["fraction"] for r2 in results), top)
                 and case_id.replace("/", "__") in r["preds"]}
        c = cases[case_id]
        name = case_id.replace("/", "_").split(".")[0]
        arts.append(overlay_figure(c["image"][0].numpy(), c["label"][0].numpy(), preds,
                                   out / "overlays" / f"{name}.png", title=case_id,
                                   class_names=list(classes.values()) or None))
    return arts


def metric_key(fraction: float, init: str, key: str) -> str:
    """MLflow name of a summary value, grouped by slashes: ``finetune/f0.10/pretrained/dice``
    (``dice/mean``), ``.../dice_std`` (``dice/mean_std``), ``.../dice_gain_vs_scratch``."""
    name = key.replace("/mean_std", "_std").replace("/mean", "")
    return f"finetune/f{fraction:.2f}/{init}/{name}"


def _log_mlflow(cfg: RaymimConfig, ref: str | None, results, summary, artifacts, split: Split, quick: bool,
                seconds: float) -> tuple[str, dict[str, str]]:
    """A parent run (nested under the pretraining run it evaluates, in that run's experiment, when
    it is known) and one child per cell; metric names grouped by slashes."""
    import math

    import mlflow
    from mlflow.entities import Metric

    from raymim.train.tracking import log_params_flat, run_status, setup_experiment

    exp_id = setup_experiment(cfg.mlflow.experiment, cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient(mlflow.get_tracking_uri())
    tags = {"raymim.kind": "finetune", "raymim.pretrained": str(ref), "raymim.quick": str(quick)}
    pretrain_run = _pretrain_run_id(ref)
    if pretrain_run:
        try:
            exp_id = client.get_run(pretrain_run).info.experiment_id
            tags.update({"raymim.pretrain_run_id": pretrain_run, "mlflow.parentRunId": pretrain_run})
        except Exception:  # noqa: BLE001 - a run of another store: keep the link as a tag only
            tags["raymim.pretrain_run_id"] = pretrain_run
    parent = client.create_run(exp_id, run_name=f"finetune-{cfg.name}", tags=tags).info.run_id
    with run_status(client, parent):
        params = {k: v for k, v in flatten(cfg).items()
                  if k.split(".")[0] in ("model", "method", "finetune", "prepare")}
        params.update({"split.train": len(split.train), "split.val": len(split.val), "split.test": len(split.test)})
        log_params_flat(client, parent, params)
        now = int(time.time() * 1000)

        def finite(d: Mapping[str, Any]) -> list[Metric]:
            return [Metric(k, float(v), now, 0) for k, v in d.items()
                    if isinstance(v, int | float) and math.isfinite(float(v))]

        children = {}
        for r in results:
            run = client.create_run(exp_id, run_name=r["key"], tags={
                "mlflow.parentRunId": parent, "raymim.init": r["init"], "raymim.kind": "finetune-cell"})
            cid = run.info.run_id
            client.log_batch(cid, params=[mlflow.entities.Param(k, str(v)) for k, v in
                                          {"fraction": r["fraction"], "seed": r["seed"], "init": r["init"],
                                           "n_train": r["n_train"], "steps": r["steps"]}.items()])
            ms = finite({f"test/{k}": v for k, v in r["test"].items()})
            ms += finite({f"val/{k}": v for k, v in r["val"].items()})
            ms += finite({"train/loss_last": r["loss_last"], "train/seconds": r["train_seconds"],
                          "train/best_step": r.get("best_step", r["steps"])})
            for i in range(0, len(ms), 500):
                client.log_batch(cid, metrics=ms[i:i + 500])
            if r.get("load_report"):
                client.log_dict(cid, r["load_report"], "load_report.json")
            client.set_terminated(cid)
            children[r["key"]] = cid
        summ = {metric_key(row["fraction"], row["init"], k): v for row in summary for k, v in row.items()
                if "/" in k or k == "dice_gain_vs_scratch"}
        summ["finetune/seconds"] = seconds
        ms = finite(summ)
        for i in range(0, len(ms), 500):
            client.log_batch(parent, metrics=ms[i:i + 500])
        for art in artifacts:
            client.log_artifact(parent, str(art), artifact_path="overlays" if art.parent.name == "overlays" else None)
    return parent, children


def _pretrain_run_id(ref: str | None) -> str | None:
    if not ref:
        return None
    if ref.startswith("runs:/"):
        return ref[len("runs:/"):].split("/")[0]
    path = Path(ref)
    for meta in (path / "meta.json", path.parent / "meta.json"):
        if meta.is_file():
            return json.loads(meta.read_text()).get("mlflow_run_id")
    if len(ref) == 32 and ref.isalnum() and not Path(ref).exists():
        return ref
    return None
