"""Typed configuration for every raymim command.

One dataclass tree (nanoGPT-style), loadable from YAML, overridable from the command line with
``--set a.b=value`` and flattened with :func:`flatten` for Ray's ``train_loop_config``, Tune's
``param_space`` and MLflow params. Every section validates itself in ``__post_init__`` and names
the bad value in its error, the way MONAI does.

Example::

    cfg = load_config("jobs/configs/mim-tiny.yaml", ["method.mask_ratio=0.6", "train.steps=20"])
    cfg.method.mask_ratio  # 0.6
    flatten(cfg)["method.mask_ratio"]  # 0.6

The ``method`` section is the chosen method's own dataclass (a :class:`MethodConfig` subclass
declared and registered beside the method, e.g. :class:`raymim.methods.mim.MiMConfig`): it holds
``name`` and that method's fields only, and a field of another method is an error that says so.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open=True, hi_open=True) -> None:
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} should be in the range {lb}{lo}, {hi}{rb}, got {value}.")


def check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} should be one of {choices}, got {value!r}.")


def check_positive(name: str, value: float) -> None:
    if value is None or value <= 0:
        raise ValueError(f"{name} should be > 0, got {value}.")


@dataclass
class PrepareConfig:
    """How raw scans become shards of preprocessed volumes (``raymim prepare``), and how training
    draws crops from them (the crop sampler, :mod:`raymim.data.crops`).

    Stored per volume: reoriented to ``orientation``, resampled to ``spacing``, windowed to
    [0, 1] (``modality``), cropped to the body (``crop_foreground``), in ``dtype``. The crop
    fields (``crop_size``, ``crops_per_volume``, ``min_foreground``, ``crop_pos_fraction``) are
    read at *training* time: every pass draws ``crops_per_volume`` fresh crops per volume read,
    seeded by (``train.seed``, pass, volume); ``raymim prepare`` only pads volumes smaller than
    ``crop_size``. Streaming mode (pretraining from raw scans) runs the same preprocessing and
    the same sampler without writing shards.
    """

    orientation: str = "RAS"
    # Target voxel spacing in mm (x, y, z): MiM's 1.5 x 1.5 x 2.0 by default, so a 96^3 crop covers
    # 144 x 144 x 192 mm on every scan; null keeps each scan's native grid.
    spacing: list[float] | None = field(default_factory=lambda: [1.5, 1.5, 2.0])
    # "ct": HU window then scale to [0, 1]; "mr": percentile clip then scale; "auto": by range.
    modality: str = "auto"
    ct_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    mr_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    crop_foreground: bool = True
    # Crop sampler (training time): crop side in voxels of the stored grid, crops per volume read
    # (amortises the read), and the foreground fraction a uniformly drawn crop must reach.
    crop_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    crops_per_volume: int = 4
    min_foreground: float = 0.05
    # Positive / negative sampling by label (MONAI RandCropByPosNegLabeld, pos / (pos + neg)): the
    # share of crops centred on a label voxel; null draws uniform origins (pretraining).
    crop_pos_fraction: float | None = None
    # Stored dtype of the volumes. float16 keeps ~3 significant digits on [0, 1]
    # (a 2000 HU window -> ~1 HU resolution), half the bytes of float32.
    dtype: str = "float16"
    shard_mb: int = 128  # volumes per shard file: about this many MB (one Parquet row group each)
    max_rejected: float = 0.2
    # Largest volume read (voxels in the header), checked before decoding: 1 Gi voxels = 4 GiB as float32.
    max_voxels: int = 1 << 30
    # Most memory (GiB) one case may need, estimated from its header (raymim.data.memory); the
    # task preparing it asks Ray for that much. A case needing more than this or than the largest
    # Ray node's memory resource is rejected (and examined again by a rerun). null: the node's.
    max_case_memory_gb: float | None = None
    # Seconds one case may take to read and preprocess; a case running longer (a hung decoder) is
    # rejected "timed out" (examined again by a rerun) and the job goes on. 0: no limit.
    case_timeout_s: float = 600.0
    seed: int = 0  # the MPS prior fit's sampling / clustering seed (crops use train.seed)
    # MPS prior mode (raymim.data.patch_stats): store a per-patch ``lesion_prob`` grid per volume
    # (aligned with it: patch (i, j, k) covers voxels [p i, p i + p) ...; crops are cut on multiples of
    # ``prior_patch`` and take their sub-grid), from intensity + blobness descriptors clustered with
    # scikit-learn ("kmeans", or the paper's ablation choices "agglomerative" / "dbscan" with ``prior_eps``).
    lesion_prior: bool = False
    prior_patch: int = 8
    # "population": cluster the patches of ``prior_fit_cases`` sampled cases once (normal anatomy),
    # lesion cluster = patches beyond the ``prior_quantile`` distance to every normal centre;
    # "volume": the paper's per-image clustering, most atypical cluster of each volume.
    prior_scope: str = "population"
    prior_clusters: int | None = None  # None: 32 for "population", 4 for "volume"
    prior_algorithm: str = "kmeans"
    prior_eps: float = 1.5
    prior_fit_cases: int = 32
    prior_quantile: float = 0.9

    def __post_init__(self) -> None:
        if self.spacing is not None:
            if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
                raise ValueError(f"prepare.spacing should be three positive numbers or null, got {self.spacing}.")
        check_choice("prepare.modality", self.modality, ("auto", "ct", "mr"))
        if len(self.ct_window) != 2 or self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"prepare.ct_window should be [low, high] with low < high, got {self.ct_window}.")
        if len(self.crop_size) != 3 or any(int(s) < 8 for s in self.crop_size):
            raise ValueError(f"prepare.crop_size should be three sizes >= 8, got {self.crop_size}.")
        check_positive("prepare.crops_per_volume", self.crops_per_volume)
        if self.crop_pos_fraction is not None:
            check_range("prepare.crop_pos_fraction", self.crop_pos_fraction, 0.0, 1.0, lo_open=False, hi_open=False)
        check_range("prepare.min_foreground", self.min_foreground, 0.0, 1.0, lo_open=False, hi_open=False)
        check_choice("prepare.dtype", self.dtype, ("float16", "float32", "uint8"))
        check_positive("prepare.shard_mb", self.shard_mb)
        check_range("prepare.max_rejected", self.max_rejected, 0.0, 1.0, lo_open=False, hi_open=False)
        check_positive("prepare.max_voxels", self.max_voxels)
        if self.max_case_memory_gb is not None:
            check_positive("prepare.max_case_memory_gb", self.max_case_memory_gb)
        if not self.case_timeout_s >= 0:
            raise ValueError(f"prepare.case_timeout_s should be >= 0 (0: no limit), got {self.case_timeout_s}.")
        check_positive("prepare.prior_patch", self.prior_patch)
        if self.lesion_prior and any(int(s) % int(self.prior_patch) for s in self.crop_size):
            raise ValueError(f"prepare.prior_patch should divide prepare.crop_size={list(self.crop_size)}, "
                             f"got {self.prior_patch}.")
        check_choice("prepare.prior_scope", self.prior_scope, ("population", "volume"))
        if self.prior_clusters is None:
            self.prior_clusters = 32 if self.prior_scope == "population" else 4
        if self.prior_clusters < 2:
            raise ValueError(f"prepare.prior_clusters should be >= 2, got {self.prior_clusters}.")
        check_choice("prepare.prior_algorithm", self.prior_algorithm, ("kmeans", "agglomerative", "dbscan"))
        check_positive("prepare.prior_eps", self.prior_eps)
        check_positive("prepare.prior_fit_cases", self.prior_fit_cases)
        check_range("prepare.prior_quantile", self.prior_quantile, 0.0, 1.0)


@dataclass
class ModelConfig:
    """Backbone shape. ``backbone`` is a key of :data:`raymim.models.BACKBONES`."""

    backbone: str = "vit"
    img_size: int = 96
    in_channels: int = 1
    patch_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    dropout: float = 0.0
    # MAE-style transformer decoder
    decoder_hidden_size: int = 384
    decoder_layers: int = 4
    decoder_heads: int = 12
    # Swin (MONAI SwinTransformer / SwinUNETR encoder)
    swin_feature_size: int = 48
    swin_window_size: int = 7
    swin_depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    swin_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    # Hybrid ConvViT: channels of the convolution stages before the transformer, and the masked
    # convolution blocks per stage (ConvMAE / the MiM reference: 2)
    conv_channels: list[int] = field(default_factory=lambda: [32, 64])
    # Attention of the ViT / ConvViT blocks and the MAE decoder through torch's fused
    # scaled_dot_product_attention (MONAI's `use_flash_attention`); same weights and keys. Only
    # where the block's dropout is 0 (MONAI's fused path would drop attention weights in eval too).
    fused_attention: bool = True
    conv_depth: int = 2

    def __post_init__(self) -> None:
        check_choice("model.backbone", self.backbone, ("vit", "swin", "convvit"))
        check_positive("model.img_size", self.img_size)
        check_positive("model.patch_size", self.patch_size)
        if self.img_size % self.patch_size:
            raise ValueError(
                f"model.img_size should be a multiple of model.patch_size={self.patch_size}, got {self.img_size}."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size should be divisible by model.num_heads={self.num_heads}, got {self.hidden_size}."
            )
        check_range("model.dropout", self.dropout, 0.0, 1.0, lo_open=False)
        # The MAE decoder uses a fixed 3D sin-cos position embedding (MONAI's), which splits the
        # width into 6 sin/cos parts, and multi-head attention.
        if self.decoder_hidden_size % 6 or self.decoder_hidden_size % self.decoder_heads:
            raise ValueError(
                "model.decoder_hidden_size should be divisible by 6 and by "
                f"model.decoder_heads={self.decoder_heads}, got {self.decoder_hidden_size}."
            )
        if self.conv_depth < 0:
            raise ValueError(f"model.conv_depth should be >= 0, got {self.conv_depth}.")
        if self.backbone == "convvit" and self.patch_size % 2 ** len(self.conv_channels):
            raise ValueError(
                f"model.patch_size should be divisible by 2**len(model.conv_channels)="
                f"{2 ** len(self.conv_channels)} for the convvit backbone, got {self.patch_size}."
            )
        if len(self.swin_depths) != 4 or len(self.swin_heads) != 4:
            raise ValueError(
                f"model.swin_depths and model.swin_heads should have 4 stages, got {self.swin_depths} "
                f"and {self.swin_heads}."
            )
        if self.swin_feature_size % 12:
            raise ValueError(f"model.swin_feature_size should be divisible by 12, got {self.swin_feature_size}.")


DEFAULT_METHOD = "mae"


@dataclass
class MethodConfig:
    """Base of every method's own config section (``method``).

    Each method declares a dataclass of exactly the fields it reads, beside its code, and registers
    both together: ``@register_method("mim", config=MiMConfig)``
    (:func:`raymim.methods.base.register_method`). The YAML ``method`` section holds ``name`` plus
    the chosen method's fields; the loader builds it from the class registered for ``name``
    (:func:`method_config`), so a field of another method is an error, not a silently ignored
    value. ``name`` is not an argument: it is the name the class is registered under.

    Subclasses validate their fields in ``__post_init__`` (calling ``super().__post_init__()``
    first) and name the bad value in the error (``method.alpha should be >= 0, got -1``).
    """

    name: str = field(default="", init=False)
    # The registry key, set on the class by register_method (not a field).
    method_name: typing.ClassVar[str | None] = None

    def __post_init__(self) -> None:
        registered = vars(type(self)).get("method_name")
        if registered is None:
            raise TypeError(f"{type(self).__name__} is not a registered method config; register it with "
                            f"@register_method(name, config={type(self).__name__}).")
        self.name = registered

    def __setattr__(self, key: str, value: Any) -> None:
        # `cfg.method.levels = 2` on a MAE config would otherwise add an attribute nothing reads.
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise AttributeError(f"method.{key} is not a field of method {self.name!r}.")
        super().__setattr__(key, value)

    def inert_fields(self) -> set[str]:
        """Fields that cannot change what this method trains given its other fields (an end ratio
        under a constant schedule, MiM's alignment fields at one level, ...). Two Tune grid points
        that differ only in these are the same experiment (``raymim.tune.driver`` runs one)."""
        return set()

    def effective(self) -> dict[str, Any]:
        """This section as a dict without its :meth:`inert_fields`: what identifies the experiment."""
        inert = self.inert_fields()
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in inert}


def method_configs() -> dict[str, type[MethodConfig]]:
    """``{method name: its config class}`` for every registered method.

    Imports :mod:`raymim.methods` on first use (which registers the methods): the methods import
    this module, so the registry is resolved when a config is built, not when this module loads.
    """
    import raymim.methods  # noqa: F401  (registers every method and its config)
    from raymim.methods.base import registered_configs

    return registered_configs()


def method_config(name: str = DEFAULT_METHOD, **fields: Any) -> MethodConfig:
    """The ``method`` section of method ``name`` with ``fields`` set, checked like a YAML section:
    ``method_config("mim", levels=2, level_sizes=[32, 16])``."""
    return _build_method({"name": name, **fields}, "method")


def _method_class(name: Any, prefix: str = "method") -> type[MethodConfig]:
    classes = method_configs()
    if not isinstance(name, str) or name not in classes:
        close = difflib.get_close_matches(str(name), sorted(classes), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ConfigError(f"{prefix}.name should be one of {tuple(sorted(classes))}, got {name!r}{hint}")
    return classes[name]


def method_fields(cls: type[MethodConfig]) -> set[str]:
    """The settable fields of a method config class (``name`` excluded)."""
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _unknown_method_field(key: str, name: str, prefix: str) -> str:
    """``method.gama is not a field of method 'mim'; did you mean method.gamma?``, or which other
    methods own the field."""
    classes = method_configs()
    owners = sorted(n for n, c in classes.items() if n != name and key in method_fields(c))
    msg = f"{prefix}.{key} is not a field of method {name!r}"
    if owners:
        which = ", ".join(repr(o) for o in owners)
        return f"{msg}; it is a field of method{'s' if len(owners) > 1 else ''} {which} (set {prefix}.name to use it)"
    known = sorted(method_fields(classes[name]))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"{msg}; did you mean {prefix}.{close[0]}?" if close else f"{msg}; its fields: {known}"


def _build_method(data: Any, prefix: str = "method") -> MethodConfig:
    """The ``method`` section from a mapping: the class registered for ``data["name"]`` (default
    ``mae``), every other key one of its fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} should be a mapping, got {data!r}.")
    name = data.get("name", DEFAULT_METHOD)
    cls = _method_class(name, prefix)
    unknown = sorted(set(data) - method_fields(cls) - {"name"})
    if unknown:
        msg = "; ".join(_unknown_method_field(k, name, prefix) for k in unknown)
        raise ConfigError(msg if msg.endswith("?") else msg + ".")
    hints = _field_types(cls)
    kwargs = {k: _coerce(f"{prefix}.{k}", hints[k], v) for k, v in data.items() if k != "name"}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def config_from_saved(data: dict[str, Any] | None) -> RaymimConfig:
    """A config written by a run (a checkpoint's ``config.yaml``). Runs from before the typed
    per-method configs wrote every method's fields into ``method``; the fields the run's method
    does not own are dropped (they never affected that run), so their encoders still load."""
    data = dict(data or {})
    section = data.get("method")
    if isinstance(section, dict):
        cls = _method_class(section.get("name", DEFAULT_METHOD))
        owned = method_fields(cls) | {"name"}
        data["method"] = {k: v for k, v in section.items() if k in owned}
    return config_from_dict(data)


def _switch_method(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    """The method section ``upper`` over ``lower`` (a lower layer: a base YAML, or the file under
    ``--set`` overrides). When ``upper`` names another method than ``lower``, the fields of
    ``lower`` that the new method does not own are dropped (logged) instead of refused; the fields
    set in ``upper`` itself must belong to it as usual."""
    merged = {**lower, **upper}
    new = merged.get("name", DEFAULT_METHOD)
    if new == lower.get("name", DEFAULT_METHOD) or not isinstance(new, str) or new not in method_configs():
        return merged
    owned = method_fields(method_configs()[new]) | {"name"} | set(upper)
    dropped = sorted(k for k in merged if k not in owned)
    if dropped:
        logging.getLogger(__name__).info(
            "method.name=%s: dropped %s of method %r (not fields of %r).", new,
            ", ".join(f"method.{k}" for k in dropped), lower.get("name", DEFAULT_METHOD), new)
    return {k: v for k, v in merged.items() if k in owned}


@dataclass
class TrainConfig:
    """Optimisation and Ray Train scaling for ``raymim pretrain``."""

    steps: int = 45000
    batch_size: int = 2  # per worker, per micro-step
    accumulation: int = 1
    lr: float = 1e-4  # base LR at an effective batch of 256 (scaled linearly)
    scale_lr: bool = True
    weight_decay: float = 0.05
    warmup_steps: int = 0
    clip_grad: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    visual_every: int = 500  # reconstruction panel to MLflow every N steps (0: never)
    max_failures: int = 1
    seed: int = 0
    # torch.compile the method's forward (and, through AOTAutograd, its backward) in the training
    # loop; a compile that fails falls back to eager with one warning line.
    compile: bool = False
    # Probe: held-out crops (whole cases kept out of training) on which every checkpoint report
    # measures a score that does not depend on the method's hyperparameters: the pixel-space
    # reconstruction MSE with a fixed random token mask at `probe_ratio` (NT-Xent at tau 0.2 on
    # fixed views for methods without a reconstruction term). Reported as `probe_loss`; Tune's
    # ASHA stops trials on it. 0 turns it off (a sweep with ASHA turns it on with 4 crops).
    probe_crops: int = 0
    probe_ratio: float = 0.75

    def __post_init__(self) -> None:
        if self.probe_crops < 0:
            raise ValueError(f"train.probe_crops should be >= 0, got {self.probe_crops}.")
        check_range("train.probe_ratio", self.probe_ratio, 0.0, 1.0)
        for name in ("steps", "batch_size", "accumulation", "num_workers", "checkpoint_every", "log_every"):
            check_positive(f"train.{name}", getattr(self, name))
        check_positive("train.lr", self.lr)
        check_choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        check_positive("train.cpus_per_worker", self.cpus_per_worker)


@dataclass
class MlflowConfig:
    experiment: str = "raymim"
    # None: $MLFLOW_TRACKING_URI, else a local SQLite store under the run directory.
    tracking_uri: str | None = None
    # Register each finished pretraining run's encoder in the Model Registry under this name
    # (None: the run name; Tune trials are not registered), as `models:/<name>/<version>`.
    registered_model: str | None = None
    register: bool = True


@dataclass
class FinetuneConfig:
    """Downstream segmentation fine-tuning (``raymim finetune``) and quick Tune objectives.

    Label fractions subsample the training cases of a split fixed by ``split_seed``; each seed
    trains a pretrained/scratch pair with the same budget.
    """

    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 1.0])
    seeds: int = 3
    split_seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    # Original label values to keep (mapped to 1..K in order); None keeps every label > 0 as is.
    classes: list[int] | None = None
    class_names: list[str] | None = None
    # Budget per cell: ``steps`` when set (every cell the same), else ``steps_per_case`` x the
    # cell's training cases, clamped to [min_steps, max_steps]: a 10 % cell trains less than a
    # 100 % cell, and a pretrained cell exactly as long as its scratch twin.
    steps: int | None = None
    steps_per_case: int = 40
    min_steps: int = 100
    max_steps: int = 2000
    batch_size: int = 2
    # AdamW with a linear warm-up over this share of the budget, then cosine decay (MONAI's
    # UNETR / Swin-UNETR BTCV recipe: AdamW 1e-4, weight decay 1e-5).
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.1
    # Layer-wise LR decay of the pretrained encoder (BEiT / MAE fine-tuning): block i of L gets
    # lr x layer_decay^(L + 1 - i), the patch embedding layer_decay^(L + 1); 1.0 turns it off.
    layer_decay: float = 1.0
    # Training crops by label (MONAI RandCropByPosNegLabeld): the share of crops centred on a
    # label voxel, pos / (pos + neg); 0.5 is MONAI's BTCV recipe (pos = neg = 1).
    pos_fraction: float = 0.5
    # MONAI's BTCV training augmentation after the positive/negative crop: flips on each axis
    # and 90-degree rotations (p 0.1), intensity scale (p 0.1) and shift (+-0.1, p 0.5).
    augment: bool = True
    # Validation Dice every `val_every` steps (None: 5 times per cell); the best-scoring weights
    # are the cell's model ("best_val"), or the last weights ("last"). No validation cases: last.
    val_every: int | None = None
    select: str = "best_val"
    # Pretraining overlap: a validation / test case whose content is in the pretraining shards
    # is reported as a warning, or with `strict_overlap` refused (exit 2).
    strict_overlap: bool = False
    # Training crop / sliding-window ROI; None uses model.img_size in every axis.
    roi_size: list[int] | None = None
    feature_size: int = 16
    norm_name: str = "instance"
    freeze_encoder: bool = False
    nsd_tolerance_mm: float = 2.0
    sw_batch_size: int = 2
    sw_overlap: float = 0.25
    # "ray": one Ray Train job runs the whole grid (cells split over workers); "local": in-process.
    engine: str = "ray"
    num_workers: int = 1
    cpus_per_worker: float = 0.5
    use_gpu: bool = False
    overlays: int = 2
    # Quick mode (demo, Tune trials): first fraction only, one seed, quick_steps steps.
    quick_steps: int = 20

    def __post_init__(self) -> None:
        if not self.fractions:
            raise ValueError(f"finetune.fractions should list at least one fraction, got {self.fractions}.")
        for f in self.fractions:
            check_range("finetune.fractions", f, 0.0, 1.0, hi_open=False)
        for name in ("seeds", "steps_per_case", "min_steps", "max_steps", "batch_size", "feature_size",
                     "sw_batch_size", "num_workers", "quick_steps"):
            check_positive(f"finetune.{name}", getattr(self, name))
        for name in ("steps", "val_every"):
            if getattr(self, name) is not None:
                check_positive(f"finetune.{name}", getattr(self, name))
        if self.min_steps > self.max_steps:
            raise ValueError(f"finetune.min_steps should be <= finetune.max_steps, got {self.min_steps} > "
                             f"{self.max_steps}.")
        check_range("finetune.warmup_fraction", self.warmup_fraction, 0.0, 1.0, lo_open=False)
        check_range("finetune.pos_fraction", self.pos_fraction, 0.0, 1.0, lo_open=False, hi_open=False)
        check_range("finetune.layer_decay", self.layer_decay, 0.0, 1.0, hi_open=False)
        check_choice("finetune.select", self.select, ("best_val", "last"))
        check_range("finetune.val_fraction", self.val_fraction, 0.0, 1.0, lo_open=False)
        check_range("finetune.test_fraction", self.test_fraction, 0.0, 1.0)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "finetune.val_fraction + finetune.test_fraction should be < 1, got "
                f"{self.val_fraction} + {self.test_fraction}."
            )
        if self.classes is not None and (not self.classes or any(int(c) <= 0 for c in self.classes)):
            raise ValueError(f"finetune.classes should be positive label values or null, got {self.classes}.")
        if self.class_names is not None and self.classes is not None and len(self.class_names) != len(self.classes):
            raise ValueError(
                f"finetune.class_names should name each of finetune.classes={self.classes}, got {self.class_names}."
            )
        check_positive("finetune.lr", self.lr)
        if self.roi_size is not None and (len(self.roi_size) != 3 or any(int(s) < 8 for s in self.roi_size)):
            raise ValueError(f"finetune.roi_size should be three sizes >= 8 or null, got {self.roi_size}.")
        check_choice("finetune.norm_name", self.norm_name, ("instance", "batch"))
        check_positive("finetune.nsd_tolerance_mm", self.nsd_tolerance_mm)
        check_range("finetune.sw_overlap", self.sw_overlap, 0.0, 1.0, lo_open=False)
        check_choice("finetune.engine", self.engine, ("ray", "local"))
        check_positive("finetune.cpus_per_worker", self.cpus_per_worker)
        if self.overlays < 0:
            raise ValueError(f"finetune.overlays should be >= 0, got {self.overlays}.")


@dataclass
class TuneConfig:
    """A Ray Tune sweep (``raymim tune``): search space over any config field, search algorithm,
    ASHA early stopping on the held-out probe (``train.probe_*``: a reconstruction error with a
    fixed mask at one reference ratio, comparable across swept mask ratios, alphas, level counts
    and selection modes, unlike the training loss), and the objective: validation Dice of a
    quick fine-tune. Test metrics are computed for the selected trial only.

    ``space`` maps a dotted config key to one spec: ``{grid: [...]}``, ``{choice: [...]}``,
    ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}``.
    """

    space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1
    # "random" / "grid": Tune's variant generator (grid entries enumerated, the rest sampled);
    # "optuna": TPE via Optuna (needs `pip install optuna`).
    algorithm: str = "random"
    scheduler: str = "asha"  # "asha" (on the held-out probe_loss, by step) or "none"
    grace_period: int = 4  # steps before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent: int = 2
    trial_cpus: float = 1.0  # the trial's own process (driver of its Train run + quick fine-tune)
    # Objective: quick downstream fine-tune Dice on the validation cases of `labelled` (split by
    # finetune.split_seed / val_fraction; a labelled set without validation cases is refused).
    labelled: str | None = None
    finetune_steps: int = 20
    seed: int = 0
    # Stop starting/continuing trials after this many seconds (None: no limit).
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.time_budget_s is not None:
            check_positive("tune.time_budget_s", self.time_budget_s)
        kinds = ("grid", "choice", "uniform", "loguniform", "randint")
        for key, spec in self.space.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in kinds:
                raise ValueError(f"tune.space.{key} should be one of {{{', '.join(kinds)}: ...}}, got {spec!r}.")
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list) or not values:
                raise ValueError(f"tune.space.{key}.{kind} should be a non-empty list, got {values!r}.")
            if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
                raise ValueError(f"tune.space.{key}.{kind} should be [low, high], got {values!r}.")
        check_positive("tune.num_samples", self.num_samples)
        check_choice("tune.algorithm", self.algorithm, ("random", "grid", "optuna"))
        check_choice("tune.scheduler", self.scheduler, ("asha", "none"))
        check_positive("tune.grace_period", self.grace_period)
        if self.reduction_factor < 2:
            raise ValueError(f"tune.reduction_factor should be >= 2, got {self.reduction_factor}.")
        check_positive("tune.max_concurrent", self.max_concurrent)
        check_positive("tune.trial_cpus", self.trial_cpus)
        check_positive("tune.finetune_steps", self.finetune_steps)


@dataclass
class RaymimConfig:
    """The whole configuration tree; each command reads the sections it needs."""

    name: str = "raymim"
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # The chosen method's own config class (method_config): MAE's by default.
    method: MethodConfig = field(default_factory=lambda: method_config())
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# --------------------------------------------------------------------------------------------
# Loading, overrides, flattening
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config file or override that cannot be applied (unknown key, wrong type, bad value)."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML or a ``--set`` string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, inner[0], value)
    if _is_dataclass_type(tp) and issubclass(tp, MethodConfig):
        return _build_method(value, path)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} should be a mapping, got {value!r}.")
        return _build(tp, value, path)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{path} should be a list, got {value!r}.")
        return [_coerce(f"{path}[{i}]", args[0] if args else Any, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} should be true or false, got {value!r}.")
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"{path} should be an integer, got {value!r}.")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path} should be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} should be a string, got {value!r}.")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = prefix or "the top level"
        hints_ = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            name = f"{prefix}.{key}" if prefix else key
            hints_.append(f"{name} (did you mean {close[0]}?)" if close else name)
        known_list = "" if all("did you mean" in h for h in hints_) else f"; known: {sorted(known)}"
        raise ConfigError(f"unknown config key(s) {', '.join(hints_)} in {where}{known_list}.")
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(path, hints[key], value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a section.")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", parsed)``; the value is parsed as YAML (``0.6``, ``[1, 2]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. method.mask_ratio=0.6), got {text!r}.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_values(tree: dict[str, Any], values: typing.Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the config tree ``tree`` with dotted-key ``values`` set (``--set`` overrides, a
    Tune trial's params). A ``method.name`` among them that names another method than ``tree``
    does keeps the tree's method fields the new method owns and drops the others (a ``--set
    method.name=mim`` on a MAE file keeps its ``mask_ratio``); the ``method.*`` values set here
    must all belong to the new method."""
    out = json.loads(json.dumps(tree or {}))  # deep copy, plain types
    lower = dict(out["method"]) if isinstance(out.get("method"), dict) else None
    for key, value in values.items():
        _set_path(out, key, value)
    if lower is not None and isinstance(out.get("method"), dict) and "method" not in values:
        here = {k.split(".")[1] for k in values if k.startswith("method.")}
        out["method"] = _switch_method(lower, {k: out["method"][k] for k in here if k in out["method"]})
    return out


def config_from_dict(data: dict[str, Any] | None, overrides: typing.Sequence[str] = ()) -> RaymimConfig:
    """The config of a plain tree (``to_dict`` output, parsed YAML) with ``--set`` strings applied."""
    return _build(RaymimConfig, set_values(data or {}, dict(parse_override(t) for t in overrides)))


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RaymimConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides.

    A config file may name a ``base:`` file (relative to itself) whose values it extends. A file
    (or an override) that changes ``method.name`` keeps the lower layer's method fields that the
    new method owns and drops the others; see :func:`set_values`.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml_with_base(Path(path))
    return config_from_dict(data, overrides)


def _read_yaml_with_base(path: Path, depth: int = 0) -> dict[str, Any]:
    if depth > 8:
        raise ConfigError(f"config base chain too deep at {path}.")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} should hold a mapping, got {type(data).__name__}.")
    base = data.pop("base", None)
    if base is None:
        return data
    lower = _read_yaml_with_base((path.parent / base).resolve(), depth + 1)
    merged = _deep_merge(lower, data)
    if isinstance(lower.get("method"), dict) and isinstance(data.get("method"), dict):
        merged["method"] = _switch_method(lower["method"], data["method"])  # a file that changes method.name
    return merged


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (``dataclasses.asdict``)."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"method.mask_ratio": 0.75, ...}``: the form MLflow params and Tune search spaces use."""
    tree = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        _set_path(tree, key, value)
    return tree


def config_hash(section: Any) -> str:
    """Stable short hash of a config (section), for resume checks and cache keys."""
    blob = json.dumps(to_dict(section) if dataclasses.is_dataclass(section) else section, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
