"""Typed configuration for every raymim command.

One dataclass tree (nanoGPT-style), loadable from YAML, overridable from the command line with
``--set a.b=value`` and flattened with :func:`flatten` for Ray's ``train_loop_config``, Tune's
``param_space`` and MLflow params. Every section validates itself in ``__post_init__`` and names
the bad value in its error, the way MONAI does.

Example::

    cfg = load_config("jobs/configs/mim-tiny.yaml", ["method.mask_ratio=0.6", "train.steps=20"])
    cfg.method.mask_ratio  # 0.6
    flatten(cfg)["method.mask_ratio"]  # 0.6
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _check_range(name: str, value: float, lo: float, hi: float, *, lo_open=True, hi_open=True) -> None:
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} should be in the range {lb}{lo}, {hi}{rb}, got {value}.")


def _check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} should be one of {choices}, got {value!r}.")


def _check_positive(name: str, value: float) -> None:
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
        _check_choice("prepare.modality", self.modality, ("auto", "ct", "mr"))
        if len(self.ct_window) != 2 or self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"prepare.ct_window should be [low, high] with low < high, got {self.ct_window}.")
        if len(self.crop_size) != 3 or any(int(s) < 8 for s in self.crop_size):
            raise ValueError(f"prepare.crop_size should be three sizes >= 8, got {self.crop_size}.")
        _check_positive("prepare.crops_per_volume", self.crops_per_volume)
        if self.crop_pos_fraction is not None:
            _check_range("prepare.crop_pos_fraction", self.crop_pos_fraction, 0.0, 1.0, lo_open=False, hi_open=False)
        _check_range("prepare.min_foreground", self.min_foreground, 0.0, 1.0, lo_open=False, hi_open=False)
        _check_choice("prepare.dtype", self.dtype, ("float16", "float32", "uint8"))
        _check_positive("prepare.shard_mb", self.shard_mb)
        _check_range("prepare.max_rejected", self.max_rejected, 0.0, 1.0, lo_open=False, hi_open=False)
        _check_positive("prepare.max_voxels", self.max_voxels)
        if self.max_case_memory_gb is not None:
            _check_positive("prepare.max_case_memory_gb", self.max_case_memory_gb)
        _check_positive("prepare.prior_patch", self.prior_patch)
        if self.lesion_prior and any(int(s) % int(self.prior_patch) for s in self.crop_size):
            raise ValueError(f"prepare.prior_patch should divide prepare.crop_size={list(self.crop_size)}, "
                             f"got {self.prior_patch}.")
        _check_choice("prepare.prior_scope", self.prior_scope, ("population", "volume"))
        if self.prior_clusters is None:
            self.prior_clusters = 32 if self.prior_scope == "population" else 4
        if self.prior_clusters < 2:
            raise ValueError(f"prepare.prior_clusters should be >= 2, got {self.prior_clusters}.")
        _check_choice("prepare.prior_algorithm", self.prior_algorithm, ("kmeans", "agglomerative", "dbscan"))
        _check_positive("prepare.prior_eps", self.prior_eps)
        _check_positive("prepare.prior_fit_cases", self.prior_fit_cases)
        _check_range("prepare.prior_quantile", self.prior_quantile, 0.0, 1.0)


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
    # Hybrid ConvViT: channels of the convolution stages before the transformer
    conv_channels: list[int] = field(default_factory=lambda: [32, 64])

    def __post_init__(self) -> None:
        _check_choice("model.backbone", self.backbone, ("vit", "swin", "convvit"))
        _check_positive("model.img_size", self.img_size)
        _check_positive("model.patch_size", self.patch_size)
        if self.img_size % self.patch_size:
            raise ValueError(
                f"model.img_size should be a multiple of model.patch_size={self.patch_size}, got {self.img_size}."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size should be divisible by model.num_heads={self.num_heads}, got {self.hidden_size}."
            )
        _check_range("model.dropout", self.dropout, 0.0, 1.0, lo_open=False)
        # The MAE decoder uses a fixed 3D sin-cos position embedding (MONAI's), which splits the
        # width into 6 sin/cos parts, and multi-head attention.
        if self.decoder_hidden_size % 6 or self.decoder_hidden_size % self.decoder_heads:
            raise ValueError(
                "model.decoder_hidden_size should be divisible by 6 and by "
                f"model.decoder_heads={self.decoder_heads}, got {self.decoder_hidden_size}."
            )
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


@dataclass
class MethodConfig:
    """Which pretraining method, and its hyperparameters. ``name`` is a registry key."""

    name: str = "mae"
    # MAE and SimMIM papers: 0.75 (MAE) / 0.6 (SimMIM); MiM paper: 0.6.
    mask_ratio: float = 0.75
    # Normalise each target patch by its own mean / std (MAE's norm_pix_loss).
    norm_pix_loss: bool = False
    # Reconstruction loss: "auto" picks each paper's choice (MAE / MiM: mse, SimMIM: l1).
    recon_loss: str = "auto"
    # SimMIM-style block masking: side of a masked block, in tokens (1 = token-wise random).
    mask_block: int = 1
    # MiM (Mask in Mask)
    levels: int = 3
    # Crop side of each level in voxels of the stored grid (scaled down only when the train-time
    # crop is smaller than level 1); level 1 is the large crop, each further level a sub-volume of a
    # masked cube of the level above.
    # Defaults: the MiM reference code's 192 -> 96 -> 16 voxels at the stored spacing, with a
    # prepare.crop_size of 192^3 (the paper's 384 x 384 x 192 level 1 exceeds most resampled CTs).
    level_sizes: list[int] = field(default_factory=lambda: [192, 96, 16])
    # MiM: range of the level-1 box's *volume* as a fraction of level_sizes[0]^3, drawn uniformly
    # per training step (RandomResizedCrop-style; the box, resized to the network input, and every
    # deeper level scale together, so level_sizes are the sizes at scale 1). The MiM reference
    # crops a fixed 192^3 (none); 0.2 is the minimum of its (unused) crop_scale_min option and of
    # MAE's RandomResizedCrop. [1.0, 1.0] turns it off. Not drawn at levels=1 (MiM = MAE there).
    level1_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    # MiM: level-(l+1) volumes drawn from the masked cubes of level l, per sample (paper: 4).
    gamma: int = 4
    # MiM: weight of the cross-level alignment loss, L = L_R + alpha * L_C (paper Eq. 10: 0.1).
    alpha: float = 0.1
    # MiM: InfoNCE temperature of the cross-level alignment (Eq. 7).
    tau: float = 0.2
    # Output width of the projection heads used by the contrastive / alignment losses.
    proj_dim: int = 128
    # AMS (adaptive masking strategy, raymim.masking.schedules): ratio over training progress.
    # "constant" uses mask_ratio; the others go from mask_ratio_start to mask_ratio_end (None:
    # mask_ratio), holding the start ratio for the first mask_warmup fraction of training. Default:
    # the paper's growing ratio, linear from 0.5 to mask_ratio (only mps_ams reads these fields).
    mask_schedule: str = "linear"
    mask_ratio_start: float | None = 0.5
    mask_ratio_end: float | None = None
    mask_warmup: float = 0.0
    mask_stages: int = 4  # number of plateaus of the "step" schedule
    # MPS (masked patch selection, raymim.masking.selection). "online": clustering of the
    # patch-to-patch similarity matrix of the current encoder's patch features, per volume;
    # "prior": the shards' lesion_prob column; "none": AMS only.
    mps_mode: str = "online"
    mps_clusters: int = 4
    # online clustering of the similarity matrix: "kmeans" (torch, on the training device) or
    # scikit-learn's "agglomerative" / "spectral" (on the host: one synchronisation per step)
    mps_algorithm: str = "kmeans"
    mps_iters: int = 10  # k-means iterations
    mps_features: str = "embed"  # online descriptors: "embed" (patch embedding) or "tokens" (encoder)
    mps_share: float = 1.0  # at most this share of the masked tokens comes from the lesion cluster
    mps_threshold: float = 0.5  # prior mode: lesion_prob >= threshold marks a lesion-cluster patch
    # MedIM (report-guided masking; reads the shards' lesion_prob, prepare.lesion_prior): "kdm"
    # keyword attention or "sdm" one sentence's attention.
    medim_mode: str = "kdm"
    medim_low_share: float = 0.1  # share of masked tokens drawn from low-attention patches
    medim_vocab: str | None = None  # keyword file (one term a line); None: the built-in vocabulary
    medim_align_weight: float = 1.0  # weight of the alignment losses (finding + report-image)
    text_dim: int = 96
    text_layers: int = 1
    text_max_len: int = 64
    text_buckets: int = 4096  # hashed word-piece vocabulary of the built-in tokenizer
    # HSSL: NT-Xent on two views + domain classification (+ masked reconstruction when rec_weight > 0).
    # SimCLR reads only tau and proj_dim (NT-Xent on two augmented crops).
    domains: list[str] | None = None  # domain vocabulary; None: built from the data as seen
    max_domains: int = 16  # domain-head width when `domains` is None
    contrast_weight: float = 1.0
    domain_weight: float = 1.0
    rec_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_range("method.mask_ratio", self.mask_ratio, 0.0, 1.0)
        _check_choice("method.mask_schedule", self.mask_schedule, ("constant", "linear", "cosine", "step"))
        for name in ("mask_ratio_start", "mask_ratio_end"):
            if getattr(self, name) is not None:
                _check_range(f"method.{name}", getattr(self, name), 0.0, 1.0)
        _check_range("method.mask_warmup", self.mask_warmup, 0.0, 1.0, lo_open=False)
        if self.mask_stages < 2:
            raise ValueError(f"method.mask_stages should be >= 2, got {self.mask_stages}.")
        _check_choice("method.mps_mode", self.mps_mode, ("online", "prior", "none"))
        if self.mps_clusters < 2:
            raise ValueError(f"method.mps_clusters should be >= 2, got {self.mps_clusters}.")
        _check_choice("method.mps_algorithm", self.mps_algorithm, ("kmeans", "agglomerative", "spectral"))
        _check_positive("method.mps_iters", self.mps_iters)
        _check_choice("method.mps_features", self.mps_features, ("embed", "tokens"))
        _check_range("method.mps_share", self.mps_share, 0.0, 1.0, lo_open=False, hi_open=False)
        _check_range("method.mps_threshold", self.mps_threshold, 0.0, 1.0, hi_open=False)
        _check_choice("method.medim_mode", self.medim_mode, ("kdm", "sdm"))
        _check_range("method.medim_low_share", self.medim_low_share, 0.0, 1.0, lo_open=False, hi_open=False)
        for name in ("text_dim", "text_layers", "text_max_len", "text_buckets", "max_domains"):
            _check_positive(f"method.{name}", getattr(self, name))
        for name in ("medim_align_weight", "contrast_weight", "domain_weight", "rec_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"method.{name} should be >= 0, got {getattr(self, name)}.")
        if self.domains is not None and len(set(self.domains)) != len(self.domains):
            raise ValueError(f"method.domains should hold distinct names, got {self.domains}.")
        _check_choice("method.recon_loss", self.recon_loss, ("auto", "mse", "l1"))
        _check_positive("method.proj_dim", self.proj_dim)
        _check_positive("method.mask_block", self.mask_block)
        if not 1 <= self.levels <= 4:
            raise ValueError(f"method.levels should be in the range [1, 4], got {self.levels}.")
        if len(self.level_sizes) < self.levels or any(s <= 0 for s in self.level_sizes):
            raise ValueError(
                f"method.level_sizes should hold method.levels={self.levels} positive sizes, got {self.level_sizes}."
            )
        if any(b > a for a, b in zip(self.level_sizes, self.level_sizes[1:])):
            raise ValueError(f"method.level_sizes should not increase from level to level, got {self.level_sizes}.")
        if len(self.level1_scale) != 2 or not 0.0 < self.level1_scale[0] <= self.level1_scale[1] <= 1.0:
            raise ValueError(f"method.level1_scale should be [lo, hi] with 0 < lo <= hi <= 1, got {self.level1_scale}.")
        _check_positive("method.gamma", self.gamma)
        if self.alpha < 0:
            raise ValueError(f"method.alpha should be >= 0, got {self.alpha}.")
        _check_positive("method.tau", self.tau)


_RECON = {"mask_ratio", "norm_pix_loss", "recon_loss", "mask_block"}
_LEVELS = {"levels", "level_sizes", "gamma", "alpha", "tau", "proj_dim"}
_SCHEDULE = {"mask_schedule", "mask_ratio_start", "mask_ratio_end", "mask_warmup", "mask_stages"}
_MPS = {"mps_mode", "mps_clusters", "mps_algorithm", "mps_iters", "mps_features", "mps_share", "mps_threshold"}
_CONTRAST = {"mask_ratio", "norm_pix_loss", "recon_loss", "proj_dim", "tau", "contrast_weight", "rec_weight"}
# method.name -> the MethodConfig fields that method reads (the rest are ignored by it).
METHOD_FIELDS: dict[str, set[str]] = {
    "mae": _RECON,
    "simmim": _RECON,
    "mim": _RECON | _LEVELS | {"level1_scale"},
    "mps_ams": _RECON | _LEVELS | _SCHEDULE | _MPS,
    "medim": _RECON | {"proj_dim", "tau"} | {f.name for f in dataclasses.fields(MethodConfig)
                                             if f.name.startswith(("medim_", "text_"))},
    "hssl": _CONTRAST | {"domains", "max_domains", "domain_weight"},
    "simclr": {"proj_dim", "tau"},
}


def ignored_method_fields(mc: MethodConfig) -> set[str]:
    """MethodConfig fields that cannot change what ``mc.name`` trains, given the other fields:
    fields the method does not read, the schedule's fields under a constant schedule, the MPS
    fields a selection mode does not use, MiM's alignment fields at one level... Two Tune trials
    that differ only in these are the same experiment (``raymim.tune.driver`` collapses them)."""
    every = {f.name for f in dataclasses.fields(MethodConfig)} - {"name"}
    used = set(METHOD_FIELDS.get(mc.name, every))
    if mc.name in ("mim", "mps_ams") and mc.levels == 1:
        used -= {"gamma", "alpha", "tau", "proj_dim", "level1_scale"}
    if "mask_schedule" in used:
        if mc.mask_schedule == "constant":
            used -= _SCHEDULE - {"mask_schedule"}
        else:
            if mc.mask_schedule != "step":
                used.discard("mask_stages")
            if mc.mask_ratio_start is not None and mc.mask_ratio_end is not None:
                used.discard("mask_ratio")
    if "mps_mode" in used:
        used -= {"none": _MPS - {"mps_mode"}, "prior": {"mps_clusters", "mps_algorithm", "mps_iters", "mps_features"},
                 "online": {"mps_threshold"}}[mc.mps_mode]
    if "mps_algorithm" in used and mc.mps_algorithm != "kmeans":
        used.discard("mps_iters")
    if mc.name == "hssl" and mc.rec_weight == 0:  # no reconstruction: the views are not masked
        used -= {"mask_ratio", "norm_pix_loss", "recon_loss"}
    return every - used


def effective_method(mc: MethodConfig) -> dict[str, Any]:
    """``mc`` as a dict without its ignored fields (``level_sizes`` cut to ``levels``)."""
    out = {k: v for k, v in dataclasses.asdict(mc).items() if k not in ignored_method_fields(mc)}
    if "level_sizes" in out:
        out["level_sizes"] = list(out["level_sizes"])[: mc.levels]
    return out


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
        _check_range("train.probe_ratio", self.probe_ratio, 0.0, 1.0)
        for name in ("steps", "batch_size", "accumulation", "num_workers", "checkpoint_every", "log_every"):
            _check_positive(f"train.{name}", getattr(self, name))
        _check_positive("train.lr", self.lr)
        _check_choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check_positive("train.cpus_per_worker", self.cpus_per_worker)


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
            _check_range("finetune.fractions", f, 0.0, 1.0, hi_open=False)
        for name in ("seeds", "steps_per_case", "min_steps", "max_steps", "batch_size", "feature_size",
                     "sw_batch_size", "num_workers", "quick_steps"):
            _check_positive(f"finetune.{name}", getattr(self, name))
        for name in ("steps", "val_every"):
            if getattr(self, name) is not None:
                _check_positive(f"finetune.{name}", getattr(self, name))
        if self.min_steps > self.max_steps:
            raise ValueError(f"finetune.min_steps should be <= finetune.max_steps, got {self.min_steps} > "
                             f"{self.max_steps}.")
        _check_range("finetune.warmup_fraction", self.warmup_fraction, 0.0, 1.0, lo_open=False)
        _check_range("finetune.pos_fraction", self.pos_fraction, 0.0, 1.0, lo_open=False, hi_open=False)
        _check_range("finetune.layer_decay", self.layer_decay, 0.0, 1.0, hi_open=False)
        _check_choice("finetune.select", self.select, ("best_val", "last"))
        _check_range("finetune.val_fraction", self.val_fraction, 0.0, 1.0, lo_open=False)
        _check_range("finetune.test_fraction", self.test_fraction, 0.0, 1.0)
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
        _check_positive("finetune.lr", self.lr)
        if self.roi_size is not None and (len(self.roi_size) != 3 or any(int(s) < 8 for s in self.roi_size)):
            raise ValueError(f"finetune.roi_size should be three sizes >= 8 or null, got {self.roi_size}.")
        _check_choice("finetune.norm_name", self.norm_name, ("instance", "batch"))
        _check_positive("finetune.nsd_tolerance_mm", self.nsd_tolerance_mm)
        _check_range("finetune.sw_overlap", self.sw_overlap, 0.0, 1.0, lo_open=False)
        _check_choice("finetune.engine", self.engine, ("ray", "local"))
        _check_positive("finetune.cpus_per_worker", self.cpus_per_worker)
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
            _check_positive("tune.time_budget_s", self.time_budget_s)
        kinds = ("grid", "choice", "uniform", "loguniform", "randint")
        for key, spec in self.space.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in kinds:
                raise ValueError(f"tune.space.{key} should be one of {{{', '.join(kinds)}: ...}}, got {spec!r}.")
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list) or not values:
                raise ValueError(f"tune.space.{key}.{kind} should be a non-empty list, got {values!r}.")
            if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
                raise ValueError(f"tune.space.{key}.{kind} should be [low, high], got {values!r}.")
        _check_positive("tune.num_samples", self.num_samples)
        _check_choice("tune.algorithm", self.algorithm, ("random", "grid", "optuna"))
        _check_choice("tune.scheduler", self.scheduler, ("asha", "none"))
        _check_positive("tune.grace_period", self.grace_period)
        if self.reduction_factor < 2:
            raise ValueError(f"tune.reduction_factor should be >= 2, got {self.reduction_factor}.")
        _check_positive("tune.max_concurrent", self.max_concurrent)
        _check_positive("tune.trial_cpus", self.trial_cpus)
        _check_positive("tune.finetune_steps", self.finetune_steps)


@dataclass
class RaymimConfig:
    """The whole configuration tree; each command reads the sections it needs."""

    name: str = "raymim"
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
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
        import difflib

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


def config_from_dict(data: dict[str, Any] | None, overrides: typing.Sequence[str] = ()) -> RaymimConfig:
    tree = json.loads(json.dumps(data or {}))  # deep copy, plain types
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    return _build(RaymimConfig, tree)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RaymimConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides.

    A config file may name a ``base:`` file (relative to itself) whose values it extends.
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
    return _deep_merge(_read_yaml_with_base((path.parent / base).resolve(), depth + 1), data)


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
