"""One fine-tuning cell (fraction x seed x {pretrained, scratch}) and the Ray Train loop over cells.

A cell trains the segmentation network for a fixed number of steps on random ROI crops (MONAI
``RandCropByPosNegLabeld``, half centred on foreground), with ``DiceCELoss``, AdamW and a cosine
schedule, then scores the full volumes of the validation and test cases with MONAI's
``sliding_window_inference``. The pretrained and the scratch cell of a pair share the seed, so
their decoders start from the same initialisation and see the same crops: they differ only by
the encoder's initial weights.

The Ray Train loop (:func:`finetune_train_loop`) runs a whole grid in one ``TorchTrainer`` job:
worker ``r`` of ``w`` takes cells ``r, r + w, ...`` (grid parallelism; each cell is small, so
data-parallel training of one cell would only add communication), writes each cell's result
under ``out_dir/cells/`` and reports once at the end (Train V2's ``report`` is collective).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raymim.config import RaymimConfig, config_from_dict
from raymim.downstream.metrics import class_names_for, per_case_metrics, summarize
from raymim.downstream.networks import build_segmentation_network, freeze_encoder, load_encoder


def cell_key(cell: Mapping[str, Any]) -> str:
    return f"f{cell['fraction']:g}_s{cell['seed']}_{cell['init']}"


def _crop_sampler(roi: Sequence[int], seed: int):
    from monai.transforms import RandCropByPosNegLabeld

    crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=tuple(roi), pos=1.0,
                                  neg=1.0, num_samples=1, allow_smaller=False)
    crop.set_random_state(seed=seed)
    return crop


def predict_volume(net: torch.nn.Module, image: torch.Tensor, roi: Sequence[int], sw_batch_size: int = 2,
                   overlap: float = 0.25) -> torch.Tensor:
    """Full-volume label map ``[X, Y, Z]`` (uint8) by MONAI sliding-window inference."""
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        logits = sliding_window_inference(image[None].float(), tuple(roi), sw_batch_size, net, overlap=overlap,
                                          mode="gaussian")
    logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
    return logits.argmax(1)[0].to(torch.uint8)


def evaluate_cases(net: torch.nn.Module, cases: Sequence[Mapping[str, Any]], num_classes: int, roi: Sequence[int],
                   cfg: RaymimConfig, keep: Sequence[str] = ()) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``(summary metrics, {case id: prediction})`` over ``cases`` (predictions kept for ``keep``)."""
    ft = cfg.finetune
    net.eval()
    per_case, preds = [], {}
    for case in cases:
        pred = predict_volume(net, case["image"], roi, ft.sw_batch_size, ft.sw_overlap)
        per_case.append(per_case_metrics(pred, case["label"][0], num_classes, case["spacing"], ft.nsd_tolerance_mm))
        if case["id"] in keep:
            preds[case["id"]] = pred.numpy()
    return summarize(per_case, class_names_for(num_classes, ft.class_names)), preds


def train_cell(
    cell: Mapping[str, Any],
    cases: Mapping[str, Mapping[str, Any]],
    encoder_state: Mapping[str, torch.Tensor] | None,
    cfg: RaymimConfig,
    num_classes: int,
    steps: int,
    val_ids: Sequence[str] = (),
    test_ids: Sequence[str] = (),
    overlay_ids: Sequence[str] = (),
) -> dict[str, Any]:
    """Train and score one cell. ``cell``: ``{"fraction", "seed", "init", "train_ids"}``."""
    from monai.losses import DiceCELoss

    ft = cfg.finetune
    roi = tuple(int(s) for s in (ft.roi_size or [cfg.model.img_size] * 3))
    seed = int(cell["seed"])
    t0 = time.time()
    torch.manual_seed(seed)
    np.random.seed(seed)
    net, prefix = build_segmentation_network(cfg.model, num_classes, roi, encoder_state, ft.feature_size,
                                             ft.norm_name)
    load_report: dict[str, Any] = {}
    if cell["init"] == "pretrained":
        if encoder_state is None:
            raise ValueError("a pretrained cell needs an encoder state")
        load_report = load_encoder(net, encoder_state, cfg.model, roi)
    if ft.freeze_encoder:
        freeze_encoder(net, prefix)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ft.lr, weight_decay=ft.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    sampler = _crop_sampler(roi, seed)
    rng = np.random.default_rng(seed)
    train = [cases[i] for i in cell["train_ids"]]
    losses = []
    net.train()
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(ft.batch_size):
            case = train[int(rng.integers(len(train)))]
            crop = sampler({"image": case["image"], "label": case["label"]})[0]
            xs.append(torch.as_tensor(crop["image"]))
            ys.append(torch.as_tensor(crop["label"]))
        x, y = torch.stack(xs).float(), torch.stack(ys).long()
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    train_s = time.time() - t0
    val, _ = evaluate_cases(net, [cases[i] for i in val_ids], num_classes, roi, cfg)
    test, preds = evaluate_cases(net, [cases[i] for i in test_ids], num_classes, roi, cfg, keep=overlay_ids)
    return {
        "key": cell_key(cell), "fraction": float(cell["fraction"]), "seed": seed, "init": cell["init"],
        "n_train": len(train), "train_ids": list(cell["train_ids"]), "steps": steps,
        "loss_first": losses[0] if losses else float("nan"), "loss_last": float(np.mean(losses[-5:])) if losses else
        float("nan"), "train_seconds": train_s, "seconds": time.time() - t0,
        "test": test, "val": val, "load_report": load_report, "preds": preds,
    }


def save_cell_result(result: Mapping[str, Any], out_dir: str | Path) -> Path:
    cells = Path(out_dir) / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in result.items() if k != "preds"}
    (cells / f"{result['key']}.json").write_text(json.dumps(body, indent=1, default=float))
    if result.get("preds"):
        np.savez_compressed(cells / f"{result['key']}_preds.npz", **{_safe(k): v for k, v in result["preds"].items()})
    return cells / f"{result['key']}.json"


def load_cell_results(out_dir: str | Path, keys: Sequence[str]) -> list[dict[str, Any]]:
    cells = Path(out_dir) / "cells"
    out = []
    for key in keys:
        res = json.loads((cells / f"{key}.json").read_text())
        npz = cells / f"{key}_preds.npz"
        res["preds"] = dict(np.load(npz)) if npz.is_file() else {}
        out.append(res)
    return out


def _safe(case_id: str) -> str:
    return case_id.replace("/", "__")


def unsafe(name: str) -> str:
    return name.replace("__", "/")


def run_cells(job: Mapping[str, Any], rank: int = 0, world: int = 1) -> list[str]:
    """Run this worker's share of ``job["cells"]``; each result is saved under ``job["out_dir"]``."""
    cfg = config_from_dict(job["cfg"])
    done = []
    for cell in job["cells"][rank::world]:
        result = train_cell(cell, job["cases"], job["encoder_state"], cfg, job["num_classes"], job["steps"],
                            job["val_ids"], job["test_ids"], job["overlay_ids"])
        save_cell_result(result, job["out_dir"])
        done.append(result["key"])
    return done


def finetune_train_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker entry point: ``config["job"]`` is an ObjectRef of the job dict."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    job = ray.get(config["job"])
    done = run_cells(job, ctx.get_world_rank(), ctx.get_world_size())
    ray.train.report({"cells_done": len(done), "rank": ctx.get_world_rank()})
