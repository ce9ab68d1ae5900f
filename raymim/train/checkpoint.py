"""Checkpoint layout and safe loading.

A raymim checkpoint is a directory (the one Ray Train's ``Checkpoint`` points at):

- ``state.pt``: training state: ``model`` (method state dict), ``optimizer``, ``scheduler``,
  ``scaler``, ``step``, ``epoch``, ``rng`` (torch / numpy / python states as tensors), and
  ``config_hash`` (the hash of the sections that shape the model and the optimisation). Plain
  tensors, numbers, strings, lists and dicts only, so ``torch.load(weights_only=True)`` reads it.
- ``encoder.pt``: the backbone's ``state_dict`` alone (what downstream fine-tuning and
  ``raymim export`` load, through :func:`raymim.weights.load_pretrained`), also ``weights_only``-safe.
- ``config.yaml``: the full :class:`raymim.config.RaymimConfig` of the run.
- ``meta.json``: step, metrics at save time, method and backbone names.

The same ``encoder.pt`` + ``config.yaml`` pair is logged to MLflow under the artifact path
``encoder/`` so ``raymim finetune --pretrained runs:/<run_id>/encoder`` (or a bare run id) works.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from raymim.config import RaymimConfig, config_hash, dump_yaml, to_dict

STATE_FILE, ENCODER_FILE, CONFIG_FILE, META_FILE = "state.pt", "encoder.pt", "config.yaml", "meta.json"


class CheckpointMismatchError(RuntimeError):
    """A checkpoint written by a run whose model/method/optimisation config differs."""


def model_config_hash(cfg: RaymimConfig) -> str:
    """Hash of what must match for a checkpoint to resume: model, method and train sections
    (minus the fields that may legitimately change on resume: worker count, logging cadence, and
    how the same weights are computed: fused attention, torch.compile)."""
    train = to_dict(cfg.train)
    for key in ("num_workers", "use_gpu", "cpus_per_worker", "log_every", "max_failures", "keep_checkpoints",
                "compile"):
        train.pop(key, None)
    model = to_dict(cfg.model)
    model.pop("fused_attention", None)
    return config_hash({"model": model, "method": to_dict(cfg.method), "train": train})


def write_checkpoint(path: str | Path, *, state: dict[str, Any], encoder_state: dict[str, torch.Tensor],
                     cfg: RaymimConfig, meta: dict[str, Any]) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / STATE_FILE)
    torch.save(encoder_state, path / ENCODER_FILE)
    (path / CONFIG_FILE).write_text(dump_yaml(cfg))
    (path / META_FILE).write_text(json.dumps(meta, indent=2, default=float))
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder ({} when it is missing or unreadable)."""
    try:
        return json.loads((Path(path) / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def read_state(path: str | Path, cfg: RaymimConfig | None = None) -> dict[str, Any]:
    """Load ``state.pt``; with ``cfg``, refuse a checkpoint from another configuration."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    if cfg is not None:
        want, got = model_config_hash(cfg), state.get("config_hash")
        if got != want:
            raise CheckpointMismatchError(
                f"checkpoint {path} was written by a different config (hash {got}, this run {want}); "
                "use another --name, or the same config to resume."
            )
    return state
