"""One fine-tuning cell (fraction x seed x {pretrained, scratch}) and the Ray Train loop over cells.

The recipe follows MONAI's published UNETR / Swin-UNETR BTCV fine-tuning:

- training crops by label (``RandCropByPosNegLabeld``, ``finetune.pos_fraction`` of them centred
  on a label voxel, the rest on background; default half, MONAI's pos = neg = 1), then flips
  on each axis and 90-degree rotations (p 0.1), intensity scale (p 0.1) and shift (+-0.1,
  p 0.5) (``finetune.augment``);
- ``DiceCELoss``, AdamW, a linear warm-up then cosine decay (MONAI's ``WarmupCosineSchedule``),
  optional layer-wise LR decay of the pretrained encoder (``finetune.layer_decay``);
- a budget that scales with the cell's training cases (``finetune.steps_per_case``, clamped to
  ``[min_steps, max_steps]``; a fixed ``finetune.steps`` overrides it);
- validation (full volumes, MONAI ``sliding_window_inference``) every ``finetune.val_every``
  steps; the weights with the best validation Dice are the cell's model, and only that model is
  scored on the test cases.

The pretrained and the scratch cell of a pair share the seed and the budget, so their decoders
start from the same initialisation and see the same crops: they differ only by the encoder's
initial weights.

The Ray Train loop (:func:`finetune_train_loop`) runs a whole grid in one ``TorchTrainer`` job:
worker ``r`` of ``w`` takes cells ``r, r + w, ...`` (grid parallelism; each cell is small, so
data-parallel training of one cell would only add communication), writes each cell's result
under ``out_dir/cells/`` and reports once at the end (Train V2's ``report`` is collective).
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raymim.config import RaymimConfig, config_from_dict
from raymim.downstream.metrics import class_names_for, per_case_metrics, summarize
from raymim.downstream.networks import build_segmentation_network, freeze_encoder
from raymim.weights import load_encoder


def cell_key(cell: Mapping[str, Any]) -> str:
    return f"f{cell['fraction']:g}_s{cell['seed']}_{cell['init']}"


def finetune_budget(n_train: int, cfg: RaymimConfig, steps: int | None = None) -> int:
    """Training steps of a cell with ``n_train`` training cases: ``steps`` if given, else
    ``finetune.steps`` if set, else ``steps_per_case x n_train`` clamped to ``[min_steps, max_steps]``."""
    ft = cfg.finetune
    if steps is not None:
        return int(steps)
    if ft.steps is not None:
        return int(ft.steps)
    return int(min(ft.max_steps, max(ft.min_steps, ft.steps_per_case * max(1, n_train))))


def train_transforms(roi: Sequence[int], seed: int, augment: bool = True, pos_fraction: float = 0.5):
    """MONAI's BTCV fine-tuning transforms on ``{"image", "label"}`` tensors ``[1, X, Y, Z]``: a
    positive/negative crop (centred on a label voxel with probability ``pos_fraction``, else on
    a background voxel), then (``augment``) flips, 90-degree rotations, intensity scale and
    shift. Returns a seeded ``Compose`` whose output is a one-element list of crops."""
    from monai.transforms import (
        Compose,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    steps = [RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=tuple(roi), pos=float(pos_fraction),
                                    neg=1.0 - float(pos_fraction),
                                    num_samples=1, allow_smaller=False)]
    if augment:
        steps += [RandFlipd(keys=keys, prob=0.1, spatial_axis=axis) for axis in range(3)]
        steps += [RandRotate90d(keys=keys, prob=0.1, max_k=3),
                  RandScaleIntensityd(keys="image", factors=0.1, prob=0.1),
                  RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)]
    return Compose(steps, lazy=False).set_random_state(seed=seed)


_BLOCK = re.compile(r"(?:blocks\.|layers)(\d+)")


def layer_decay_groups(net: torch.nn.Module, prefix: str, lr: float, weight_decay: float,
                       decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise LR decay over the encoder under ``prefix``.

    Encoder layer ids: 0 for the embedding (everything of the encoder outside a numbered block),
    ``i + 1`` for ViT block ``i`` (``blocks.i``; Swin stage ``layers{k}`` counts as block
    ``k - 1``); the decoder and heads are layer ``L + 1``, at the full ``lr``. Biases and norms
    get no weight decay (as in BEiT / MAE fine-tuning)."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    ids = {}
    for name, _ in named:
        if name.startswith(prefix):
            m = _BLOCK.search(name[len(prefix):])
            ids[name] = (int(m.group(1)) + (1 if "blocks." in m.group(0) else 0)) if m else 0
    top = max(ids.values(), default=0) + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named:
        layer = ids.get(name, top)
        no_wd = param.ndim <= 1
        g = groups.setdefault((layer, no_wd), {"params": [], "lr": lr * decay ** (top - layer),
                                              "weight_decay": 0.0 if no_wd else weight_decay, "layer": layer})
        g["params"].append(param)
    return list(groups.values())


def cell_device(cfg: RaymimConfig) -> torch.device:
    """Where fine-tuning cells train: the GPU with ``finetune.use_gpu`` when there is one, else the CPU."""
    return torch.device("cuda" if cfg.finetune.use_gpu and torch.cuda.is_available() else "cpu")


def predict_volume(net: torch.nn.Module, image: torch.Tensor, roi: Sequence[int], sw_batch_size: int = 2,
                   overlap: float = 0.25) -> torch.Tensor:
    """Full-volume label map ``[X, Y, Z]`` (uint8, on the CPU) by MONAI sliding-window inference:
    the windows run where ``net`` is, the volume and its stitched logits stay on the CPU."""
    from monai.inferers import sliding_window_inference

    device = next(net.parameters()).device
    with torch.no_grad():
        logits = sliding_window_inference(image[None].float(), tuple(roi), sw_batch_size, net, overlap=overlap,
                                          mode="gaussian", sw_device=device, device=torch.device("cpu"))
    logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
    return logits.argmax(1)[0].to(torch.uint8)


def evaluate_cases(net: torch.nn.Module, cases: Sequence[Mapping[str, Any]], num_classes: int, roi: Sequence[int],
                   cfg: RaymimConfig, keep: Sequence[str] = (), by_case: dict[str, dict[str, float]] | None = None,
                   ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``(summary metrics, {case id: prediction})`` over ``cases`` (predictions kept for ``keep``);
    ``by_case``, when given, receives each case's own summary (for paired comparisons)."""
    ft = cfg.finetune
    net.eval()
    names = class_names_for(num_classes, ft.class_names)
    per_case, preds = [], {}
    for case in cases:
        pred = predict_volume(net, case["image"], roi, ft.sw_batch_size, ft.sw_overlap)
        per_case.append(per_case_metrics(pred, case["label"][0], num_classes, case["spacing"], ft.nsd_tolerance_mm))
        if by_case is not None:
            by_case[case["id"]] = summarize(per_case[-1:], names)
        if case["id"] in keep:
            preds[case["id"]] = pred.numpy()
    return summarize(per_case, names), preds


def _mean_dice(metrics: Mapping[str, float]) -> float:
    v = metrics.get("dice/mean", float("nan"))
    return float(v) if v == v else -1.0  # no scorable class counts as the worst


def train_cell(
    cell: Mapping[str, Any],
    cases: Mapping[str, Mapping[str, Any]],
    encoder_state: Mapping[str, torch.Tensor] | None,
    cfg: RaymimConfig,
    num_classes: int,
    steps: int | None = None,
    val_ids: Sequence[str] = (),
    test_ids: Sequence[str] = (),
    overlay_ids: Sequence[str] = (),
) -> dict[str, Any]:
    """Train one cell, select its weights on ``val_ids``, score them on ``test_ids``.

    ``cell``: ``{"fraction", "seed", "init", "train_ids"}``; ``steps``: a fixed budget (None:
    :func:`finetune_budget`). Returns the selected model's ``val`` and ``test`` metrics (``test``
    is empty without ``test_ids``), ``best_step``, the validation curve and the predictions of
    ``overlay_ids``."""
    from monai.losses import DiceCELoss
    from monai.optimizers import WarmupCosineSchedule

    ft = cfg.finetune
    roi = tuple(int(s) for s in (ft.roi_size or [cfg.model.img_size] * 3))
    seed = int(cell["seed"])
    t0 = time.time()
    torch.manual_seed(seed)
    np.random.seed(seed)
    train = [cases[i] for i in cell["train_ids"]]
    steps = finetune_budget(len(train), cfg, steps)
    net, prefix = build_segmentation_network(cfg.model, num_classes, roi, encoder_state, ft.feature_size,
                                             ft.norm_name)
    load_report: dict[str, Any] = {}
    if cell["init"] == "pretrained":
        if encoder_state is None:
            raise ValueError("a pretrained cell needs an encoder state")
        load_report = load_encoder(net, encoder_state, cfg.model, roi)
    if ft.freeze_encoder:
        freeze_encoder(net, prefix)
    device = cell_device(cfg)
    net.to(device)
    # Layer decay applies to a pretrained encoder; the scratch twin trains every layer at `lr`.
    decay = ft.layer_decay if cell["init"] == "pretrained" else 1.0
    groups = layer_decay_groups(net, prefix, ft.lr, ft.weight_decay, decay)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=ft.lr, weight_decay=ft.weight_decay)
    warmup = int(round(ft.warmup_fraction * steps))
    sched = WarmupCosineSchedule(opt, warmup_steps=warmup, t_total=max(steps, warmup + 1))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    transform = train_transforms(roi, seed, ft.augment, ft.pos_fraction)
    rng = np.random.default_rng(seed)
    val_cases = [cases[i] for i in val_ids]
    select = ft.select if val_cases else "last"
    val_every = ft.val_every or max(1, steps // 5)
    best_score, best_step, best_state, best_val = -float("inf"), steps, None, {}
    curve: list[tuple[int, float]] = []
    losses = []
    net.train()
    for step in range(1, steps + 1):
        xs, ys = [], []
        for _ in range(ft.batch_size):
            case = train[int(rng.integers(len(train)))]
            crop = transform({"image": case["image"], "label": case["label"]})[0]
            xs.append(torch.as_tensor(crop["image"]))
            ys.append(torch.as_tensor(crop["label"]))
        x, y = torch.stack(xs).float().to(device), torch.stack(ys).long().to(device)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if select == "best_val" and (step % val_every == 0 or step == steps):
            val, _ = evaluate_cases(net, val_cases, num_classes, roi, cfg)
            score = _mean_dice(val)
            curve.append((step, score))
            if score > best_score:  # ties keep the earlier weights
                best_score, best_step, best_val = score, step, val
                best_state = copy.deepcopy(net.state_dict())
            net.train()
    train_s = time.time() - t0
    if best_state is not None:
        net.load_state_dict(best_state)
        val = best_val
    else:
        val, _ = evaluate_cases(net, val_cases, num_classes, roi, cfg)
    test_cases: dict[str, dict[str, float]] = {}
    test, preds = evaluate_cases(net, [cases[i] for i in test_ids], num_classes, roi, cfg, keep=overlay_ids,
                                 by_case=test_cases)
    return {
        "key": cell_key(cell), "fraction": float(cell["fraction"]), "seed": seed, "init": cell["init"],
        "n_train": len(train), "train_ids": list(cell["train_ids"]), "steps": steps, "best_step": best_step,
        "select": select, "val_curve": curve,
        "loss_first": losses[0] if losses else float("nan"), "loss_last": float(np.mean(losses[-5:])) if losses else
        float("nan"), "train_seconds": train_s, "seconds": time.time() - t0,
        "test": test, "test_cases": test_cases, "val": val, "load_report": load_report, "preds": preds,
        "fingerprint": cell.get("fingerprint"),
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
