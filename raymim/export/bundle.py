"""MONAI bundle writer and checks for a pretrained (or fine-tuned) raymim segmentation network.

Layout (MONAI bundle specification)::

    <out>/configs/metadata.json    mandatory metadata keys + network_data_format
    <out>/configs/inference.json   network_def (MONAI's own UNETR / SwinUNETR; for the hybrid
                                   ConvViT encoder, which MONAI has no class for, raymim's
                                   ``raymim.models.unetr.ConvViTUNETR``, the network
                                   ``raymim finetune`` trains), preprocessing,
                                   sliding-window inferer, postprocessing, evaluator
    <out>/models/model.pt          the network's state dict (loads strictly into network_def)
    <out>/docs/README.md

Validation. ``monai.bundle.verify_metadata`` validates against a JSON schema that it *downloads*
from the URL in the metadata's ``schema`` field; it skips the download when ``filepath`` already
holds a file (``monai.apps.utils.download_url``: "File exists ... skipped downloading"), so it
works offline given a local copy of the schema. The schema is **not** shipped in the monai
package (nothing under ``site-packages/monai`` holds it), so without a local copy
:func:`validate_bundle` checks the mandatory keys structurally (the list below, from the MONAI
bundle specification) and runs MONAI's own ``verify_net_in_out`` (a forward pass with the
shapes and dtypes the metadata declares), which needs no schema.

Example::

    write_monai_bundle(encoder_state, cfg, "out/bundle", num_classes=2)
    validate_bundle("out/bundle", schema_file=None)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from raymim.config import RaymimConfig

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
MANDATORY_KEYS = (
    "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
    "task", "description", "authors", "copyright", "network_data_format",
)
CONVVIT_TARGET = "raymim.models.unetr.ConvViTUNETR"
TENSOR_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
               "channel_def")


def monai_network_def(cfg: RaymimConfig, encoder_state: Mapping[str, torch.Tensor], num_classes: int,
                      roi_size: Sequence[int], feature_size: int = 16, norm_name: str = "instance") -> dict[str, Any]:
    """``network_def`` (``_target_`` + constructor args): MONAI's own class for ViT and Swin
    encoders, raymim's ``ConvViTUNETR`` for the hybrid ConvViT (the bundle then needs raymim
    installed; ``required_packages_version`` says so)."""
    from raymim.weights import convvit_unetr_args, infer_swin_args, normalize_vit_state, vit_num_layers

    backbone = cfg.model.backbone
    if backbone == "vit":
        sd = normalize_vit_state(encoder_state)
        layers = vit_num_layers(sd)
        if layers != 12 or cfg.model.patch_size != 16:
            raise ValueError(
                "MONAI's UNETR needs a 12-layer, patch-16 ViT; this encoder has "
                f"num_layers={layers}, patch_size={cfg.model.patch_size}."
            )
        return {"_target_": "monai.networks.nets.UNETR", "in_channels": cfg.model.in_channels,
                "out_channels": num_classes, "img_size": list(roi_size), "feature_size": feature_size,
                "hidden_size": cfg.model.hidden_size, "mlp_dim": cfg.model.mlp_dim, "num_heads": cfg.model.num_heads,
                "norm_name": norm_name, "qkv_bias": "blocks.0.attn.qkv.bias" in sd}
    if backbone == "swin":
        args = infer_swin_args(encoder_state)
        return {"_target_": "monai.networks.nets.SwinUNETR", "out_channels": num_classes, "norm_name": norm_name,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}}
    if backbone == "convvit":
        if len({int(r) for r in roi_size}) != 1 or int(roi_size[0]) % cfg.model.patch_size:
            raise ValueError(f"the convvit encoder takes cubic inputs, a multiple of its patch size "
                             f"{cfg.model.patch_size}; got roi_size={list(roi_size)}.")
        return {"_target_": CONVVIT_TARGET,
                **convvit_unetr_args(cfg.model, encoder_state, num_classes, roi_size, feature_size, norm_name)}
    raise ValueError(f"monai-bundle export supports model.backbone 'vit', 'swin' or 'convvit', got {backbone!r}.")


def build_bundle_network(network_def: Mapping[str, Any]) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser({"network_def": dict(network_def)})
    return parser.get_parsed_content("network_def")


def write_monai_bundle(
    encoder_state: Mapping[str, torch.Tensor],
    cfg: RaymimConfig,
    out_dir: str | Path,
    num_classes: int = 2,
    roi_size: Sequence[int] | None = None,
    network_state: Mapping[str, torch.Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    version: str = "0.1.0",
    seed: int = 0,
) -> Path:
    """Write a bundle whose ``models/model.pt`` holds MONAI's network with the pretrained encoder
    (decoder freshly initialised with ``seed``), or ``network_state`` (e.g. a fine-tuned network)."""
    import monai
    import numpy as np

    from raymim.weights import load_encoder

    out = Path(out_dir)
    roi = list(roi_size or [cfg.model.img_size] * 3)
    net_def = monai_network_def(cfg, encoder_state, num_classes, roi, cfg.finetune.feature_size,
                                cfg.finetune.norm_name)
    torch.manual_seed(seed)
    net = build_bundle_network(net_def)
    if network_state is not None:
        net.load_state_dict(dict(network_state), strict=True)
    else:
        load_encoder(net, encoder_state, cfg.model, roi)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / "models" / "model.pt")

    names = list(class_names or [f"class_{i}" for i in range(1, num_classes)])
    modality = "CT" if cfg.prepare.modality in ("ct", "auto") else "MR"
    meta = {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"raymim export of a {cfg.method.name} {cfg.model.backbone} encoder"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": _version("nibabel"), "einops": _version("einops"),
                                      **({"raymim": _version("raymim")} if net_def["_target_"] == CONVVIT_TARGET
                                         else {})},
        "name": f"raymim_{cfg.model.backbone}_{cfg.method.name}",
        "task": f"3D segmentation ({num_classes - 1} foreground classes) with a self-supervised "
                f"{cfg.method.name} {cfg.model.backbone} encoder",
        "description": "Encoder pretrained by raymim; decoder from scratch unless the bundle holds a fine-tuned "
                       "network. Input: one channel scaled to [0, 1] as raymim's preprocessing does.",
        "authors": "raymim",
        "copyright": "Copyright (c) raymim contributors",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield" if modality == "CT" else "magnitude", "modality": modality,
                "num_channels": cfg.model.in_channels, "spatial_shape": roi, "dtype": "float32",
                "value_range": [0, 1], "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": num_classes, "spatial_shape": roi,
                "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {"0": "background", **{str(i + 1): n for i, n in enumerate(names)}}}},
        },
    }
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    (out / "configs" / "inference.json").write_text(json.dumps(_inference_config(cfg, net_def, roi), indent=2))
    (out / "docs" / "README.md").write_text(
        f"# {meta['name']}\n\n{meta['description']}\n\nRun: `python -m monai.bundle run --config_file "
        "configs/inference.json --bundle_root . --dataset_dir <folder of .nii.gz>`\n"
    )
    return out


def _inference_config(cfg: RaymimConfig, net_def: Mapping[str, Any], roi: list[int]) -> dict[str, Any]:
    lo, hi = cfg.prepare.ct_window
    pre = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": cfg.prepare.orientation},
    ]
    if cfg.prepare.spacing:
        pre.append({"_target_": "Spacingd", "keys": "image", "pixdim": list(cfg.prepare.spacing), "mode": "bilinear"})
    if cfg.prepare.modality == "mr":
        lo_p, hi_p = cfg.prepare.mr_percentiles
        pre.append({"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": lo_p, "upper": hi_p,
                    "b_min": 0.0, "b_max": 1.0, "clip": True})
    else:
        pre.append({"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi, "b_min": 0.0,
                    "b_max": 1.0, "clip": True})
    pre.append({"_target_": "EnsureTyped", "keys": "image"})
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": dict(net_def),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 2, "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "meta_keys": "pred_meta_dict",
             "resample": False, "separate_folder": False}]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "map_location": "@device"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def check_metadata_structure(meta: Mapping[str, Any]) -> list[str]:
    """Problems with the mandatory metadata keys (empty list: none). A structural check, not the
    JSON-schema validation; see the module docstring."""
    problems = [f"missing key {k!r}" for k in MANDATORY_KEYS if k not in meta]
    # MONAI >= 1.4 renamed optional_packages_version to required_packages_version (either is accepted).
    if "required_packages_version" not in meta and "optional_packages_version" not in meta:
        problems.append("missing key 'required_packages_version'")
    if "schema" not in meta:
        problems.append("missing key 'schema' (the schema URL verify_metadata reads)")
    ndf = meta.get("network_data_format", {})
    for side in ("inputs", "outputs"):
        tensors = ndf.get(side)
        if not isinstance(tensors, dict) or not tensors:
            problems.append(f"network_data_format.{side} should map names to tensor formats")
            continue
        for name, spec in tensors.items():
            problems += [f"network_data_format.{side}.{name} lacks {k!r}" for k in TENSOR_KEYS if k not in spec]
            if "num_channels" in spec and not isinstance(spec["num_channels"], int):
                problems.append(f"network_data_format.{side}.{name}.num_channels should be an int")
            if "spatial_shape" in spec and not isinstance(spec["spatial_shape"], list):
                problems.append(f"network_data_format.{side}.{name}.spatial_shape should be a list")
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors",
                "copyright"):
        if key in meta and not isinstance(meta[key], str):
            problems.append(f"{key} should be a string")
    return problems


def validate_bundle(bundle_dir: str | Path, schema_file: str | Path | None = None,
                    check_network: bool = True) -> dict[str, Any]:
    """Validate a bundle folder; raise ``ValueError`` on the first failing check.

    - with ``schema_file`` (a local copy of MONAI's meta schema): ``monai.bundle.verify_metadata``
      against it (no download: the file exists);
    - always: the structural check of :func:`check_metadata_structure`;
    - with ``check_network``: MONAI's ``verify_net_in_out`` on ``network_def`` and a strict load of
      ``models/model.pt`` into it.
    """
    from monai.bundle import verify_metadata, verify_net_in_out

    root = Path(bundle_dir)
    meta_file, infer_file, model_file = (root / "configs" / "metadata.json", root / "configs" / "inference.json",
                                         root / "models" / "model.pt")
    for f in (meta_file, infer_file, model_file):
        if not f.is_file():
            raise ValueError(f"bundle file missing: {f}")
    report: dict[str, Any] = {"schema_validated": False}
    if schema_file is not None:
        if not Path(schema_file).is_file():
            raise ValueError(f"schema file not found: {schema_file}")
        verify_metadata(meta_file=str(meta_file), filepath=str(schema_file))
        report["schema_validated"] = True
    problems = check_metadata_structure(json.loads(meta_file.read_text()))
    if problems:
        raise ValueError("bundle metadata: " + "; ".join(problems))
    report["structure_ok"] = True
    if check_network:
        verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=str(infer_file), device="cpu")
        net = build_bundle_network(json.loads(infer_file.read_text())["network_def"])
        net.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=True), strict=True)
        report["network_ok"] = True
    return report


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"
