"""``raymim export --checkpoint CKPT --format monai-bundle|unetr|swinunetr --out DIR``.

Every format is checked before the command returns: the exported weights are loaded into
MONAI's own class and the command fails if any encoder key is missing.

Outputs:

- ``unetr``: ``unetr_state_dict.pt`` (``vit.*`` keys; ``UNETR(**unetr_args.json)``
  ``.load_state_dict(sd, strict=False)`` misses only decoder keys) and ``unetr_args.json``;
- ``swinunetr``: ``swinunetr_state_dict.pt`` (``swinViT.*``), ``swinunetr_load_from.pt``
  (the ``SwinUNETR.load_from`` layout) and ``swinunetr_args.json``;
- ``monai-bundle``: a bundle folder (see :mod:`raymim.export.bundle`).

A checkpoint that cannot be exported in the requested format (another backbone, a ViT that is
not MONAI UNETR's 12-layer, patch-16 shape, an image size that is not a multiple of the patch
size, ...) is refused by :func:`check_exportable` before ``--out`` is created: the command prints
one line, ``raymim export: <reason>; <what would work>``, and exits 2. ``--out`` is removed again
when a later check fails and the command had created it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

FORMATS = ("monai-bundle", "unetr", "swinunetr")
EXIT_REFUSED = 2
CHECKPOINT_FORMS = ("a checkpoint folder with encoder.pt and config.yaml (e.g. runs/ray/<name>/best), an encoder.pt "
                    "beside its config.yaml, or runs:/<mlflow_run_id>/encoder")
UNETR_FIX = ("MONAI's UNETR hard-codes 12 transformer layers and patch size 16: pretrain with model.num_layers=12 "
             "and model.patch_size=16 (the *-tiny configs of jobs/configs/ do), or fine-tune this encoder with "
             "`raymim finetune`, whose network takes any depth and patch 8 or 16")


class ExportRefused(ValueError):
    """A checkpoint that cannot be exported in the requested format; raised before anything is written.

    ``str(exc)`` is one line: ``<reason>; <what would work>``."""

    def __init__(self, reason: str, fix: str) -> None:
        self.reason, self.fix = " ".join(reason.split()), " ".join(fix.split())
        super().__init__(f"{self.reason}; {self.fix}")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from raymim.cli import add_config_arguments

    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, encoder.pt, or MLflow run ref")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--img-size", type=int, default=None,
                        help="target image size (ViT position embeddings are interpolated); default: model.img_size")
    parser.add_argument("--num-classes", type=int, default=2, help="output channels of the exported network")
    parser.add_argument("--schema", default=None,
                        help="local copy of MONAI's bundle meta schema for verify_metadata (not shipped with monai)")
    add_config_arguments(parser)


def export_checkpoint(checkpoint: str, fmt: str, out: str | Path, img_size: int | None = None,
                      num_classes: int = 2, schema: str | None = None, overrides: list[str] | None = None
                      ) -> dict[str, Any]:
    """Python API behind the command; returns a report dict (also written to ``export.json``).

    Raises :class:`ExportRefused` (nothing written, ``out`` not created) when the checkpoint
    cannot be exported as ``fmt``."""
    from raymim.config import config_from_dict, to_dict
    from raymim.weights import load_pretrained

    if fmt not in FORMATS:
        raise ExportRefused(f"unknown --format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    try:
        state, cfg = load_pretrained(checkpoint)
    except FileNotFoundError as exc:
        raise ExportRefused(f"--checkpoint {checkpoint}: {exc}", f"pass {CHECKPOINT_FORMS}") from None
    if overrides:
        cfg = config_from_dict(to_dict(cfg), overrides)
    out = Path(out)
    size = img_size or cfg.model.img_size
    check_exportable(state, cfg, fmt, size, num_classes=num_classes, schema=schema, out=out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        roi = (size, size, size)
        if fmt == "unetr":
            report = _export_unetr(state, cfg, out, roi, num_classes)
        elif fmt == "swinunetr":
            report = _export_swinunetr(state, cfg, out, num_classes)
        else:
            from raymim.export.bundle import validate_bundle, write_monai_bundle

            write_monai_bundle(state, cfg, out, num_classes=num_classes, roi_size=roi)
            report = {"format": fmt, **validate_bundle(out, schema_file=schema)}
        report["checkpoint"] = str(checkpoint)
        (out / "export.json").write_text(json.dumps(report, indent=2, default=str))
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # no half-written export left behind
        raise
    return report


def check_exportable(state, cfg, fmt: str, img_size: int, num_classes: int = 2, schema: str | None = None,
                     out: str | Path | None = None) -> None:
    """Refuse (:class:`ExportRefused`) a checkpoint that MONAI's class for ``fmt`` could not take.

    Checks what is known before building anything: the backbone, a ViT encoder's depth, patch
    size and widths (read from its weights, and compared with its config) against MONAI
    ``UNETR``'s fixed 12 layers / patch 16, the target image size against the patch size (UNETR)
    or Swin's 2^5 downsampling, ``num_classes``, the ``--schema`` file and ``--out``."""
    from raymim.weights import MONAI_UNETR_LAYERS, MONAI_UNETR_PATCH, normalize_vit_state, vit_layout

    backbone = cfg.model.backbone
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ExportRefused(f"--out {out} is a file", "pass a folder (it is created when missing)")
    if num_classes < 1:
        raise ExportRefused(f"--num-classes {num_classes} is not a class count", "pass --num-classes 2 or more "
                            "(background + foreground classes)")
    if img_size <= 0:
        raise ExportRefused(f"--img-size {img_size} is not an image size", "pass a positive size, e.g. "
                            f"--img-size {cfg.model.img_size}")
    if schema is not None and not Path(schema).is_file():
        raise ExportRefused(f"--schema {schema}: no such file", "pass a local copy of MONAI's bundle meta schema "
                            "(JSON), or leave --schema out for the structural check")
    wants = {"unetr": ("vit",), "swinunetr": ("swin",), "monai-bundle": ("vit", "swin", "convvit")}[fmt]
    if backbone not in wants:
        if backbone == "convvit":
            fix = ("MONAI has no class for the hybrid ConvViT encoder: export it with --format monai-bundle "
                   "(raymim's ConvViT-UNETR, the network `raymim finetune` trains)")
        elif backbone == "swin":
            fix = "export a swin encoder with --format swinunetr or --format monai-bundle"
        else:
            fix = "export a vit encoder with --format unetr or --format monai-bundle"
        raise ExportRefused(f"--format {fmt} needs a {' or '.join(wants)} encoder; this checkpoint has "
                            f"model.backbone={backbone!r}", fix)
    if backbone == "vit":
        layout = vit_layout(normalize_vit_state(state))
        if layout["hidden_size"] is None or layout["patch_size"] is None:
            raise ExportRefused("the checkpoint's encoder.pt is not a ViT encoder state (no patch_embedding "
                                "weights)", f"pass {CHECKPOINT_FORMS} written by `raymim pretrain`")
        layers, patch = layout["num_layers"], layout["patch_size"]
        problems = []
        if layers != MONAI_UNETR_LAYERS:
            problems.append(f"num_layers={layers}")
        if patch != (MONAI_UNETR_PATCH,) * 3:
            problems.append(f"patch_size={patch[0] if len(set(patch)) == 1 else patch}")
        if problems:
            raise ExportRefused(f"MONAI's UNETR needs a {MONAI_UNETR_LAYERS}-layer, patch-{MONAI_UNETR_PATCH} ViT; "
                                f"this encoder has {', '.join(problems)}", UNETR_FIX)
        m = cfg.model
        for key, have in (("patch_size", patch[0]), ("hidden_size", layout["hidden_size"]),
                          ("mlp_dim", layout["mlp_dim"])):
            if have is not None and getattr(m, key) != have:
                raise ExportRefused(f"the config says model.{key}={getattr(m, key)} but the encoder's weights have "
                                    f"{key}={have}", f"drop the --set model.{key} override (or pass --set "
                                    f"model.{key}={have})")
        if img_size % MONAI_UNETR_PATCH:
            low = max(MONAI_UNETR_PATCH, img_size // MONAI_UNETR_PATCH * MONAI_UNETR_PATCH)
            raise ExportRefused(f"--img-size {img_size} is not a multiple of the patch size {MONAI_UNETR_PATCH}",
                                f"pass --img-size {low} or {low + MONAI_UNETR_PATCH}")
    if backbone == "convvit" and img_size % cfg.model.patch_size:
        low = max(cfg.model.patch_size, img_size // cfg.model.patch_size * cfg.model.patch_size)
        raise ExportRefused(f"--img-size {img_size} is not a multiple of the patch size {cfg.model.patch_size}",
                            f"pass --img-size {low} or {low + cfg.model.patch_size}")
    if backbone == "swin" and fmt == "monai-bundle" and img_size % 32:
        low = max(32, img_size // 32 * 32)
        raise ExportRefused(f"--img-size {img_size}: MONAI's SwinUNETR needs an image size divisible by 32 "
                            "(five 2x downsamplings)", f"pass --img-size {low} or {low + 32}")


def _export_unetr(state, cfg, out: Path, roi, num_classes: int) -> dict[str, Any]:
    import torch
    from monai.networks.nets import UNETR

    from raymim.weights import check_encoder_load, to_unetr_state_dict

    if cfg.model.backbone != "vit":
        raise ValueError(f"--format unetr needs a vit encoder, got model.backbone={cfg.model.backbone!r}.")
    sd = to_unetr_state_dict(state, img_size=roi)
    args = {"in_channels": cfg.model.in_channels, "out_channels": num_classes, "img_size": list(roi),
            "hidden_size": cfg.model.hidden_size, "mlp_dim": cfg.model.mlp_dim, "num_heads": cfg.model.num_heads,
            "qkv_bias": "vit.blocks.0.attn.qkv.bias" in sd}
    result = UNETR(**args).load_state_dict(sd, strict=False)
    report = check_encoder_load(result.missing_keys, result.unexpected_keys, "vit.")
    if report["unexpected"]:
        raise ValueError(f"keys MONAI's UNETR does not have: {report['unexpected'][:5]}")
    torch.save(sd, out / "unetr_state_dict.pt")
    (out / "unetr_args.json").write_text(json.dumps(args, indent=2))
    return {"format": "unetr", "encoder_keys": len(sd), "missing_encoder_keys": 0,
            "missing_decoder_keys": len(report["missing_other"]), "args": args}


def _export_swinunetr(state, cfg, out: Path, num_classes: int) -> dict[str, Any]:
    import torch
    from monai.networks.nets import SwinUNETR

    from raymim.weights import (
        check_encoder_load,
        infer_swin_args,
        to_swinunetr_load_from,
        to_swinunetr_state_dict,
    )

    if cfg.model.backbone != "swin":
        raise ValueError(f"--format swinunetr needs a swin encoder, got model.backbone={cfg.model.backbone!r}.")
    args = {**infer_swin_args(state), "out_channels": num_classes}
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    sd = to_swinunetr_state_dict(state)
    net = SwinUNETR(**args)
    result = net.load_state_dict(sd, strict=False)
    report = check_encoder_load(result.missing_keys, result.unexpected_keys, "swinViT.")
    if report["unexpected"]:
        raise ValueError(f"keys MONAI's SwinUNETR does not have: {report['unexpected'][:5]}")
    weights = to_swinunetr_load_from(state)
    SwinUNETR(**args).load_from(weights)  # the load_from layout must be complete too (KeyError otherwise)
    torch.save(sd, out / "swinunetr_state_dict.pt")
    torch.save(weights, out / "swinunetr_load_from.pt")
    (out / "swinunetr_args.json").write_text(json.dumps(args, indent=2))
    return {"format": "swinunetr", "encoder_keys": len(sd), "missing_encoder_keys": 0,
            "missing_decoder_keys": len(report["missing_other"]), "args": args}


def run_export(args: argparse.Namespace) -> int:
    from raymim.config import ConfigError

    if args.config:
        raise ConfigError("raymim export reads the model config from the checkpoint; use --set to override it.")
    try:
        report = export_checkpoint(args.checkpoint, args.format, args.out, img_size=args.img_size,
                                   num_classes=args.num_classes, schema=args.schema, overrides=args.overrides)
    except ExportRefused as exc:
        print(f"raymim export: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(json.dumps(report, indent=2, default=str))
    return 0
