"""Encoder weights below their two users: checkpoints read, layouts converted, networks loaded.

``raymim.export`` (MONAI bundle, UNETR / SwinUNETR files) and ``raymim.downstream`` (fine-tuning)
both import this module and never each other; it imports neither (``tests/test_layering.py``).

- :func:`load_pretrained` reads ``(encoder_state, config)`` from what ``raymim pretrain`` writes
  (a checkpoint folder, an ``encoder.pt`` beside its ``config.yaml``, or an MLflow reference).
- Converters (timm's ``checkpoint_filter_fn`` idea): raymim's ViT encoder uses MONAI ``ViT``'s key
  layout (``patch_embedding.*``, ``blocks.N.*``, ``norm.*``) and its Swin encoder is MONAI's
  ``SwinTransformer``, so the conversions are mostly prefixing, but each one also

  - strips wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``,
    ``encoder.`` / ``backbone.`` from method wrappers),
  - renames the timm-style names peers' checkpoints use (``mlp.fc1`` -> ``mlp.linear1``,
    ``attn.proj`` -> ``attn.out_proj``, ``patch_embed.proj`` -> ``patch_embedding.patch_embeddings``),
  - interpolates the ViT position embeddings (trilinear, on the 3D token grid) when the target
    image size differs from the pretraining one,
  - fills the never-used ``norm_cross_attn`` LayerNorms of MONAI's ``TransformerBlock`` with
    their identity initialisation when a checkpoint lacks them (MONAI creates them even without
    cross-attention; they take no part in the forward pass),

  and returns the keys it could not place, so callers can fail loudly on a missing key.
- :func:`convvit_layout` / :func:`convvit_unetr_args` read a hybrid ConvViT encoder's shape from its
  weights; it loads like a ViT (its transformer part has MONAI ``ViT``'s keys, and its position
  embeddings are interpolated the same way, on the token grid of the overall ``model.patch_size``).
- :func:`load_encoder` puts an encoder state into a segmentation network (raymim's or MONAI's own
  ``UNETR`` / ``SwinUNETR``) and raises :class:`EncoderKeyError` if any encoder key is missing.

Example::

    state, cfg = load_pretrained("runs/ray/mae-tiny/best")
    sd = to_unetr_state_dict(state, img_size=(96, 96, 96))
    UNETR(1, 14, (96, 96, 96), hidden_size=768).load_state_dict(sd, strict=False)  # no missing vit.* key
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from raymim.config import ModelConfig, RaymimConfig, config_from_saved
from raymim.train.checkpoint import CONFIG_FILE, ENCODER_FILE

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "encoder.", "backbone.", "model.")
VIT_RENAMES = (
    (re.compile(r"\.mlp\.fc1\."), ".mlp.linear1."),
    (re.compile(r"\.mlp\.fc2\."), ".mlp.linear2."),
    (re.compile(r"\.attn\.proj\."), ".attn.out_proj."),
    (re.compile(r"^patch_embed\.proj\."), "patch_embedding.patch_embeddings."),
    (re.compile(r"^pos_embed$"), "patch_embedding.position_embeddings"),
)
# MONAI SwinTransformer uses attn.proj and mlp.linear1/2 itself; peers' Swin checkpoints use fc1/fc2.
SWIN_RENAMES = (
    (re.compile(r"\.mlp\.fc1\."), ".mlp.linear1."),
    (re.compile(r"\.mlp\.fc2\."), ".mlp.linear2."),
)
MONAI_UNETR_LAYERS, MONAI_UNETR_PATCH = 12, 16


class EncoderKeyError(KeyError):
    """An encoder state dict that does not fill the target encoder (missing keys)."""


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: Sequence[str] = WRAPPER_PREFIXES,
                   extra: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (repeatedly: ``module.encoder.x`` -> ``x``)."""
    prefixes = tuple(prefixes) + tuple(extra)
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def _rename(state: Mapping[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def normalize_vit_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ViT encoder state in MONAI ``ViT`` key layout (prefixes stripped, timm names renamed)."""
    return _rename(strip_prefixes(state, extra=("vit.",)), VIT_RENAMES)


def normalize_swin_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Swin encoder state in MONAI ``SwinTransformer`` key layout."""
    return _rename(strip_prefixes(state, extra=("swinViT.",)), SWIN_RENAMES)


def vit_num_layers(state: Mapping[str, torch.Tensor]) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def vit_layout(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """What a ViT encoder state (MONAI ``ViT`` key layout, see :func:`normalize_vit_state`) holds:
    ``num_layers``, ``patch_size`` (a 3-tuple, or None without a conv patch embedding),
    ``hidden_size`` and ``mlp_dim`` (None when the keys are absent)."""
    pos = state.get("patch_embedding.position_embeddings")
    weight = state.get("patch_embedding.patch_embeddings.weight")
    fc1 = state.get("blocks.0.mlp.linear1.weight")
    return {
        "num_layers": vit_num_layers(state),
        "patch_size": tuple(int(p) for p in weight.shape[2:]) if weight is not None and weight.ndim == 5 else None,
        "hidden_size": int(pos.shape[-1]) if pos is not None else None,
        "mlp_dim": int(fc1.shape[0]) if fc1 is not None else None,
    }


def vit_grid(state: Mapping[str, torch.Tensor], grid: Sequence[int] | None = None) -> tuple[int, int, int]:
    """Token grid of a ViT state's position embeddings (a cube unless ``grid`` says otherwise)."""
    n = state["patch_embedding.position_embeddings"].shape[1]
    if grid is not None:
        grid = tuple(int(g) for g in grid)
        if math.prod(grid) != n:
            raise ValueError(f"grid {grid} does not match {n} position embeddings")
        return grid  # type: ignore[return-value]
    side = round(n ** (1 / 3))
    if side**3 != n:
        raise ValueError(f"cannot infer a cubic token grid from {n} position embeddings; pass grid=")
    return (side, side, side)


def interpolate_pos_embed(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Resample ``pos: [1, N_old, D]`` on its 3D token grid to ``[1, N_new, D]`` (trilinear)."""
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if old_grid == new_grid:
        return pos.clone()
    d = pos.shape[-1]
    vol = pos.reshape(1, *old_grid, d).permute(0, 4, 1, 2, 3).float()  # [1, D, gx, gy, gz]
    vol = F.interpolate(vol, size=new_grid, mode="trilinear", align_corners=False)
    return vol.permute(0, 2, 3, 4, 1).reshape(1, math.prod(new_grid), d).to(pos.dtype)


def _fill_cross_attn_norms(state: dict[str, torch.Tensor], hidden: int) -> list[str]:
    filled = []
    for i in range(vit_num_layers(state)):
        for name, init in (("weight", torch.ones), ("bias", torch.zeros)):
            key = f"blocks.{i}.norm_cross_attn.{name}"
            if key not in state:
                state[key] = init(hidden)
                filled.append(key)
    return filled


def adapt_vit_state(
    state: Mapping[str, torch.Tensor],
    img_size: Sequence[int] | int | None = None,
    patch_size: int | Sequence[int] | None = None,
    old_grid: Sequence[int] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Normalise a ViT encoder state and resize its position embeddings to ``img_size``.

    Returns ``(state, notes)``; ``notes`` lists ``filled`` keys and ``interpolated`` ones.
    """
    sd = normalize_vit_state(state)
    notes: dict[str, list[str]] = {"filled": [], "interpolated": []}
    key = "patch_embedding.position_embeddings"
    if key not in sd:
        raise EncoderKeyError(f"not a ViT encoder state: no {key} (keys start with {sorted(sd)[:5]})")
    hidden = sd[key].shape[-1]
    if img_size is not None:
        weight = sd.get("patch_embedding.patch_embeddings.weight")
        if patch_size is None:
            if weight is None or weight.ndim != 5:
                raise ValueError("patch_size is needed to interpolate position embeddings of this encoder")
            patch_size = tuple(weight.shape[2:])
        img = (img_size,) * 3 if isinstance(img_size, int) else tuple(img_size)
        patch = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
        if any(i % p for i, p in zip(img, patch)):
            raise ValueError(f"img_size {img} should be a multiple of the patch size {patch}")
        new_grid = tuple(i // p for i, p in zip(img, patch))
        grid = vit_grid(sd, old_grid)
        if grid != new_grid:
            sd[key] = interpolate_pos_embed(sd[key], grid, new_grid)
            notes["interpolated"].append(f"{key}: {grid} -> {new_grid}")
    notes["filled"] = _fill_cross_attn_norms(sd, hidden)
    return sd, notes


def to_unetr_state_dict(
    encoder_state: Mapping[str, torch.Tensor],
    img_size: Sequence[int] | int | None = None,
    old_grid: Sequence[int] | None = None,
    require_monai_layout: bool = True,
) -> dict[str, torch.Tensor]:
    """Keys for MONAI ``UNETR`` (``vit.*``), position embeddings resized to ``img_size``.

    MONAI's ``UNETR`` hard-codes 12 transformer layers and a patch size of 16; with
    ``require_monai_layout`` an encoder of another depth or patch size is refused (it could not
    load with zero missing keys). raymim's own fine-tuning network relaxes both.
    Load with ``unetr.load_state_dict(sd, strict=False)``: only decoder keys are then missing.
    """
    sd, _ = adapt_vit_state(encoder_state, img_size=img_size, old_grid=old_grid)
    if require_monai_layout:
        layers = vit_num_layers(sd)
        if layers != MONAI_UNETR_LAYERS:
            raise ValueError(
                f"MONAI's UNETR has {MONAI_UNETR_LAYERS} transformer layers; this encoder has num_layers={layers}."
            )
        patch = tuple(sd["patch_embedding.patch_embeddings.weight"].shape[2:])
        if patch != (MONAI_UNETR_PATCH,) * 3:
            raise ValueError(f"MONAI's UNETR uses patch size {MONAI_UNETR_PATCH}; this encoder has patch_size={patch}.")
    return {f"vit.{k}": v for k, v in sd.items()}


def to_swinunetr_state_dict(encoder_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys for MONAI ``SwinUNETR`` (``swinViT.*``); load with ``strict=False``.

    Swin uses relative position bias inside fixed-size windows, so no interpolation is needed
    when the image size changes (the window size must match; see :func:`infer_swin_args`).
    """
    return {f"swinViT.{k}": v for k, v in normalize_swin_state(encoder_state).items()}


def to_swinunetr_load_from(encoder_state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The layout ``SwinUNETR.load_from(weights)`` reads (the one MONAI's published self-supervised
    Swin weights use): ``{"state_dict": {"module.<key>": tensor}}`` with ``mlp.fc1`` / ``mlp.fc2``."""
    sd = normalize_swin_state(encoder_state)
    out = {}
    for key, value in sd.items():
        key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        out[f"module.{key}"] = value
    return {"state_dict": out}


def infer_swin_args(encoder_state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """``SwinUNETR`` constructor arguments implied by a Swin encoder state: in_channels,
    feature_size, patch_size, depths, num_heads, window_size, use_v2."""
    sd = normalize_swin_state(encoder_state)
    w = sd["patch_embed.proj.weight"]  # [feature, in, p, p, p]
    depths, heads = [], []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"layers{stage}\.0\.blocks\.(\d+)\.", k))}
        depths.append(max(blocks) + 1 if blocks else 0)
        table = sd.get(f"layers{stage}.0.blocks.0.attn.relative_position_bias_table")
        heads.append(int(table.shape[1]) if table is not None else 0)
    table = sd["layers1.0.blocks.0.attn.relative_position_bias_table"]
    window = (round(table.shape[0] ** (1 / 3)) + 1) // 2
    return {
        "in_channels": int(w.shape[1]),
        "feature_size": int(w.shape[0]),
        "patch_size": int(w.shape[2]),
        "depths": tuple(depths),
        "num_heads": tuple(heads),
        "window_size": int(window),
        "use_v2": any(k.startswith("layers1c.") for k in sd),
    }


def convvit_layout(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """What a hybrid ConvViT encoder state (:mod:`raymim.models.convvit` key layout, wrapper
    prefixes allowed) holds: ``num_layers``, ``conv_channels`` (a list), ``conv_depth`` (blocks
    per stage), ``hidden_size``, ``mlp_dim``, ``in_channels``. Raises :class:`EncoderKeyError`
    on a state without conv stages."""
    sd = normalize_vit_state(state)
    widths = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"conv_stages\.(\d+)\.embed\.proj\.weight", key):
            widths[int(m.group(1))] = value
    if not widths or sorted(widths) != list(range(len(widths))):
        raise EncoderKeyError(f"not a ConvViT encoder state: no conv_stages.N.embed.proj.weight (keys start with "
                              f"{sorted(sd)[:5]})")
    depth = {int(m.group(1)) for k in sd if (m := re.match(r"conv_stages\.0\.blocks\.(\d+)\.", k))}
    layout = vit_layout(sd)
    return {"num_layers": layout["num_layers"], "conv_channels": [int(widths[i].shape[0]) for i in sorted(widths)],
            "conv_depth": max(depth) + 1 if depth else 0, "hidden_size": layout["hidden_size"],
            "mlp_dim": layout["mlp_dim"], "in_channels": int(widths[0].shape[1])}


def convvit_unetr_args(model_cfg: ModelConfig, encoder_state: Mapping[str, torch.Tensor] | None,
                       num_classes: int, roi_size: Sequence[int], feature_size: int = 16,
                       norm_name: str = "instance") -> dict[str, object]:
    """Constructor arguments of :class:`raymim.models.unetr.ConvViTUNETR` (what ``raymim finetune``
    builds and a ConvViT MONAI bundle's ``network_def`` holds): the encoder's shape from its
    weights when given (so a pretrained and a scratch network are the same architecture), else
    from ``model_cfg``; plain values only (JSON-serialisable)."""
    m = model_cfg
    args: dict[str, object] = {"in_channels": m.in_channels, "out_channels": num_classes,
                               "img_size": [int(s) for s in roi_size], "num_layers": m.num_layers,
                               "feature_size": feature_size, "hidden_size": m.hidden_size, "mlp_dim": m.mlp_dim,
                               "num_heads": m.num_heads, "norm_name": norm_name, "dropout_rate": m.dropout,
                               "patch_size": m.patch_size, "conv_channels": list(m.conv_channels),
                               "conv_depth": m.conv_depth}
    if encoder_state is not None:
        layout = convvit_layout(encoder_state)
        args.update({k: v for k, v in layout.items() if v is not None})
    return args


def check_encoder_load(missing: Sequence[str], unexpected: Sequence[str], prefix: str) -> dict[str, list[str]]:
    """Split ``load_state_dict(strict=False)``'s report: encoder keys (``prefix``) must all load."""
    enc_missing = [k for k in missing if k.startswith(prefix)]
    report = {"missing_encoder": enc_missing, "missing_other": [k for k in missing if not k.startswith(prefix)],
              "unexpected": list(unexpected)}
    if enc_missing:
        raise EncoderKeyError(f"{len(enc_missing)} encoder key(s) missing, e.g. {enc_missing[:5]}")
    return report


# Encoder prefix of each backbone's segmentation network (raymim's and MONAI's own classes).
ENCODER_PREFIX = {"vit": "vit.", "swin": "swinViT.", "convvit": "vit."}


def load_encoder(net: nn.Module, encoder_state: Mapping[str, torch.Tensor], model_cfg: ModelConfig,
                 roi_size: Sequence[int]) -> dict[str, object]:
    """Load pretrained encoder weights into ``net``; raise if any encoder key is missing.

    Returns ``{"loaded": n, "missing_encoder": [], "missing_other": [...], "unexpected": [...],
    "filled": [...], "interpolated": [...]}`` (the decoder keys are the expected ``missing_other``).
    """
    notes: dict[str, list[str]] = {"filled": [], "interpolated": []}
    backbone = model_cfg.backbone
    if backbone in ("vit", "convvit"):
        # ConvViT's token embedding runs after the conv stages: pass the overall patch size.
        sd, notes = adapt_vit_state(encoder_state, img_size=tuple(roi_size), patch_size=model_cfg.patch_size)
        sd = {f"vit.{k}": v for k, v in sd.items()}
    else:
        sd = to_swinunetr_state_dict(encoder_state)
    prefix = ENCODER_PREFIX[backbone]
    target = net.state_dict()
    # Keys the encoder has but the network does not (e.g. MAE's mask token) are reported, not loaded.
    unexpected = [k for k in sd if k not in target]
    result = net.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    report = check_encoder_load(result.missing_keys, unexpected, prefix)
    report["loaded"] = len(sd) - len(unexpected)  # type: ignore[assignment]
    report.update(notes)
    return report  # type: ignore[return-value]


def load_pretrained(path: str | Path) -> tuple[dict[str, torch.Tensor], RaymimConfig]:
    """``(encoder_state_dict, config)`` from a checkpoint directory, an ``encoder.pt`` file with
    ``config.yaml`` beside it, or an MLflow reference (``runs:/<id>/encoder`` or a bare run id)."""
    path = _resolve(str(path))
    if path.is_dir():
        enc_file, cfg_file = path / ENCODER_FILE, path / CONFIG_FILE
    else:
        enc_file, cfg_file = path, path.parent / CONFIG_FILE
    if not enc_file.is_file():
        raise FileNotFoundError(f"no {ENCODER_FILE} at {path}")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} beside {enc_file}: cannot tell which backbone it is")
    state = torch.load(enc_file, map_location="cpu", weights_only=True)
    cfg = config_from_saved(yaml.safe_load(cfg_file.read_text()))
    return state, cfg


def _resolve(ref: str) -> Path:
    local = Path(ref)
    if local.exists():
        return local
    if ref.startswith("runs:/") or ref.startswith("models:/") or (len(ref) == 32 and ref.isalnum()):
        import mlflow

        from raymim.train.tracking import resolve_tracking_uri

        uri = ref if "/" in ref else f"runs:/{ref}/encoder"
        mlflow.set_tracking_uri(resolve_tracking_uri())
        return Path(mlflow.artifacts.download_artifacts(uri))
    raise FileNotFoundError(f"pretrained checkpoint not found: {ref}")
