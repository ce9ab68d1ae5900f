"""``raymim export --checkpoint CKPT --format monai-bundle|unetr|swinunetr --out DIR``.

Every format is checked before the command returns: the exported weights are loaded into
MONAI's own class and the command fails if any encoder key is missing.

Outputs:

- ``unetr``: ``unetr_state_dict.pt`` (``vit.*`` keys; ``UNETR(**unetr_args.json)``
  ``.load_state_dict(sd, strict=False)`` misses only decoder keys) and ``unetr_args.json``;
- ``swinunetr``: ``swinunetr_state_dict.pt`` (``swinViT.*``), ``swinunetr_load_from.pt``
  (the ``SwinUNETR.load_from`` layout) and ``swinunetr_args.json``;
- ``monai-bundle``: a bundle folder (see :mod:`raymim.export.bundle`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FORMATS = ("monai-bundle", "unetr", "swinunetr")


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
    """Python API behind the command; returns a report dict (also written to ``export.json``)."""
    from raymim.config import config_from_dict, to_dict
    from raymim.train.checkpoint import load_pretrained

    state, cfg = load_pretrained(checkpoint)
    if overrides:
        cfg = config_from_dict(to_dict(cfg), overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = img_size or cfg.model.img_size
    roi = (size, size, size)
    if fmt == "unetr":
        report = _export_unetr(state, cfg, out, roi, num_classes)
    elif fmt == "swinunetr":
        report = _export_swinunetr(state, cfg, out, num_classes)
    elif fmt == "monai-bundle":
        from raymim.export.bundle import validate_bundle, write_monai_bundle

        write_monai_bundle(state, cfg, out, num_classes=num_classes, roi_size=roi)
        report = {"format": fmt, **validate_bundle(out, schema_file=schema)}
    else:
        raise ValueError(f"--format should be one of {FORMATS}, got {fmt!r}.")
    report["checkpoint"] = str(checkpoint)
    (out / "export.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _export_unetr(state, cfg, out: Path, roi, num_classes: int) -> dict[str, Any]:
    import torch
    from monai.networks.nets import UNETR

    from raymim.export.converters import check_encoder_load, to_unetr_state_dict

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

    from raymim.export.converters import (
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
    report = export_checkpoint(args.checkpoint, args.format, args.out, img_size=args.img_size,
                               num_classes=args.num_classes, schema=args.schema, overrides=args.overrides)
    print(json.dumps(report, indent=2, default=str))
    return 0
