"""MPS-AMS: masked patch selection (lesion cluster masked first) + adaptive masking ratio.

Wang et al. (MPS-AMS, seed paper). Two parts, both explicit because the paper's formulas are
not public:

* **MPS** (:mod:`raymim.masking.selection`): per-patch descriptors, each volume's
  patch-to-patch covariance and cosine-similarity matrices, a clustering of the patches through
  the similarity matrix (``method.mps_algorithm``, ``mps_clusters`` groups), and the *most
  atypical* cluster (largest norm of its mean deviation from the volume's mean patch) masked
  first, then random patches up to the ratio. ``method.mps_mode``:

  - ``"online"``: descriptors are the current encoder's patch features (``mps_features``:
    ``"embed"`` the patch embedding, ``"tokens"`` a no-grad pass of the whole encoder),
    clustered per volume every step (``"kmeans"``: batched torch k-means on the training
    device);
  - ``"prior"``: the shards' ``lesion_prob`` column [B, L'] (intensity descriptors clustered
    with scikit-learn during ``raymim prepare``, :mod:`raymim.data.patch_stats`); batches
    without it fall back to online selection (counted as ``mps_prior_missing``);
  - ``"none"``: AMS only (random masking at the scheduled ratio).

* **AMS** (:mod:`raymim.masking.schedules`): the ratio follows ``method.mask_schedule`` from
  ``mask_ratio_start`` to ``mask_ratio_end`` over training (``set_progress``); by default it
  grows linearly from 0.5 to ``mask_ratio`` (the paper's easy-to-hard ratio), logged as
  ``mask_ratio`` (achieved) and ``mask_ratio_target`` (scheduled).

With ``method.levels == 1`` this is MAE with MPS-AMS masks; with ``levels > 1`` it is MiM whose
level-1 masking cubes MPS orders (:func:`raymim.masking.mps_levels.mps_mim_levels`), so the
finer levels re-see lesion cubes.

Composition: the masks come from explicit strategies (:mod:`raymim.methods.strategies`) built
in ``__init__`` with the AMS schedule as their ratio: a
:class:`~raymim.methods.strategies.ScoredMasking` (``levels == 1``, then MAE's
:meth:`~raymim.methods.mae.MAE.masked_output`) or a :class:`~raymim.methods.strategies.MiMLevels`
with MPS level-1 scores (``levels > 1``, then MiM's
:meth:`~raymim.methods.mim.MiM.hierarchy_output`); the batch and the ratio are arguments of the
calls, not state set on the method.

Example::

    >>> cfg.method = MPSAMSConfig(levels=1, mask_schedule="linear", mask_ratio_start=0.5, mask_ratio_end=0.85)
    >>> m = build_method("mps_ams", cfg); m.set_progress(50, 100)
    >>> float(m({"image": torch.rand(2, 1, 32, 32, 32)}).metrics["mask_ratio_target"])  # 0.675
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from raymim.config import RaymimConfig, check_choice, check_positive, check_range
from raymim.masking.multilevel import level_box_sides
from raymim.masking.selection import (
    centre,
    cluster_similarity,
    lesion_scores,
    patch_covariance,
    patch_similarity,
    prior_token_scores,
)
from raymim.masking.tokens import TokenMask
from raymim.methods.base import MethodOutput, host_scalar, register_method
from raymim.methods.mim import MiM, MultiLevelConfig
from raymim.methods.strategies import MiMLevels, RatioSchedule, ScoredMasking


@dataclass
class MPSAMSConfig(MultiLevelConfig):
    """MPS-AMS's ``method`` section (``name: mps_ams``): the level fields (``levels: 1`` is MAE
    with MPS-AMS masks), the AMS schedule and the MPS selection."""

    # AMS (raymim.masking.schedules): ratio over training progress. "constant" uses mask_ratio;
    # the others go from mask_ratio_start to mask_ratio_end (None: mask_ratio), holding the start
    # ratio for the first mask_warmup fraction of training. Default: the paper's growing ratio,
    # linear from 0.5 to mask_ratio.
    mask_schedule: str = "linear"
    mask_ratio_start: float | None = 0.5
    mask_ratio_end: float | None = None
    mask_warmup: float = 0.0
    mask_stages: int = 4  # number of plateaus of the "step" schedule
    # MPS (raymim.masking.selection). "online": clustering of the patch-to-patch similarity matrix
    # of the current encoder's patch features, per volume; "prior": the shards' lesion_prob
    # column; "none": AMS only.
    mps_mode: str = "online"
    mps_clusters: int = 4
    # online clustering of the similarity matrix: "kmeans" (torch, on the training device) or
    # scikit-learn's "agglomerative" / "spectral" (on the host: one synchronisation per step)
    mps_algorithm: str = "kmeans"
    mps_iters: int = 10  # k-means iterations
    mps_features: str = "embed"  # online descriptors: "embed" (patch embedding) or "tokens" (encoder)
    mps_share: float = 1.0  # at most this share of the masked tokens comes from the lesion cluster
    mps_threshold: float = 0.5  # prior mode: lesion_prob >= threshold marks a lesion-cluster patch

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method.mask_schedule", self.mask_schedule, ("constant", "linear", "cosine", "step"))
        for name in ("mask_ratio_start", "mask_ratio_end"):
            if getattr(self, name) is not None:
                check_range(f"method.{name}", getattr(self, name), 0.0, 1.0)
        check_range("method.mask_warmup", self.mask_warmup, 0.0, 1.0, lo_open=False)
        if self.mask_stages < 2:
            raise ValueError(f"method.mask_stages should be >= 2, got {self.mask_stages}.")
        check_choice("method.mps_mode", self.mps_mode, ("online", "prior", "none"))
        if self.mps_clusters < 2:
            raise ValueError(f"method.mps_clusters should be >= 2, got {self.mps_clusters}.")
        check_choice("method.mps_algorithm", self.mps_algorithm, ("kmeans", "agglomerative", "spectral"))
        check_positive("method.mps_iters", self.mps_iters)
        check_choice("method.mps_features", self.mps_features, ("embed", "tokens"))
        check_range("method.mps_share", self.mps_share, 0.0, 1.0, lo_open=False, hi_open=False)
        check_range("method.mps_threshold", self.mps_threshold, 0.0, 1.0, hi_open=False)

    def inert_fields(self) -> set[str]:
        out = super().inert_fields()
        schedule = {"mask_ratio_start", "mask_ratio_end", "mask_warmup", "mask_stages"}
        if self.mask_schedule == "constant":
            out |= schedule
        else:
            if self.mask_schedule != "step":
                out.add("mask_stages")
            if self.mask_ratio_start is not None and self.mask_ratio_end is not None:
                out.add("mask_ratio")
        mps = {"mps_clusters", "mps_algorithm", "mps_iters", "mps_features", "mps_share", "mps_threshold"}
        out |= {"none": mps, "prior": {"mps_clusters", "mps_algorithm", "mps_iters", "mps_features"},
                "online": {"mps_threshold"}}[self.mps_mode]
        if self.mps_algorithm != "kmeans":
            out.add("mps_iters")
        return out


@register_method("mps_ams", config=MPSAMSConfig)
class MPSAMS(MiM):
    """MAE (``levels=1``) or MiM (``levels>1``) with MPS-selected masks at an AMS-scheduled ratio."""

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__(config)
        m, mc = config.model, config.method
        start = mc.mask_ratio if mc.mask_ratio_start is None else mc.mask_ratio_start
        end = mc.mask_ratio if mc.mask_ratio_end is None or mc.mask_schedule == "constant" else mc.mask_ratio_end
        self.ratio_schedule = RatioSchedule(mc.mask_schedule, start, end, mc.mask_warmup, mc.mask_stages)
        self.mask_strategy = ScoredMasking(self.scores_for, self.encoder.num_tokens, self.ratio_schedule,
                                           mc.mps_share, mc.mps_threshold)
        self.level_strategy = MiMLevels(m.img_size, m.patch_size, tuple(mc.level_sizes), self.ratio_schedule,
                                        mc.gamma, mc.levels, mc.mask_block, level1_scores=self.level1_scores,
                                        share=mc.mps_share, threshold=mc.mps_threshold)

    def current_ratio(self) -> float:
        """The AMS ratio at the current progress (``method.mask_ratio`` for a constant schedule)."""
        return self.ratio_schedule(self.progress)

    # ---- MPS scores -------------------------------------------------------------------------

    @torch.no_grad()
    def online_scores(self, imgs: torch.Tensor) -> torch.Tensor:
        """Lesion scores [N, L] from the current encoder's patch features: each volume's patch
        covariance and similarity matrices, the clustering of the similarity matrix, the rule."""
        mc = self.config.method
        if mc.mps_features == "tokens":
            feats = self.encoder.forward_tokens(imgs)
        else:
            feats = self.encoder.embed_patches(imgs, None)
        sim = patch_similarity(patch_covariance(feats))  # [N, L, L]
        k = min(mc.mps_clusters, sim.shape[1])
        assign = cluster_similarity(sim, k, mc.mps_iters, mc.mps_algorithm)  # [N, L]
        return lesion_scores(centre(feats), assign, k)

    def prior_scores(self, prob: torch.Tensor, n: int) -> torch.Tensor:
        """The shards' lesion_prob [B, L'] (or [B, d, h, w]) resampled to this model's token grid: [B, L]."""
        return prior_token_scores(prob, self.grid).reshape(n, -1)

    def scores_for(self, imgs: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """Lesion scores [N, L] of the network input ``imgs`` for the MAE path (None: plain random masking)."""
        mode = self.config.method.mps_mode
        if mode == "none":
            return None
        prob = batch.get("lesion_prob") if mode == "prior" else None
        if prob is not None:
            return self.prior_scores(prob.to(imgs.device), imgs.shape[0])
        return self.online_scores(imgs)

    def level1_scores(self, vols: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Lesion scores [N, L] of the level-1 volumes (MiM path): the prior map when it covers them."""
        mc = self.config.method
        if mc.mps_mode == "none":
            return torch.zeros(vols.shape[0], self.encoder.num_tokens, device=vols.device)
        if self.prior_covers(batch):
            return self.prior_scores(batch["lesion_prob"].to(vols.device), vols.shape[0])
        return self.online_scores(vols)

    def prior_covers(self, batch: Mapping[str, Any]) -> bool:
        """Whether the batch's prior map can score the level-1 volumes: it covers the whole stored
        crop, so the level-1 box must be that crop (MiM path, ``mps_mode="prior"``)."""
        mc = self.config.method
        if mc.mps_mode != "prior" or batch.get("lesion_prob") is None:
            return False
        shape = batch["image"].shape[2:]
        side0 = level_box_sides(shape, mc.level_sizes, mc.levels)[0]
        return len(set(shape)) == 1 and side0 == shape[0]

    # ---- masks ------------------------------------------------------------------------------

    def mask_from(self, scores: torch.Tensor | None, batch: int, device: torch.device, ratio: float) -> TokenMask:
        """The MPS mask of precomputed ``scores`` [N, L] at ``ratio`` (random where ``scores`` is None)."""
        return self.mask_strategy.mask_from(scores, batch, device, ratio)

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        mc = self.config.method
        ratio = self.current_ratio()
        stats: dict[str, torch.Tensor] = {}
        if mc.levels > 1:
            out = self.hierarchy_output(batch, self.level_strategy(batch["image"], batch, self.progress))
            if mc.mps_mode == "prior":
                stats["mps_prior_missing"] = host_scalar(0.0 if self.prior_covers(batch) else 1.0)
        else:
            imgs = self.fit_input(batch["image"])
            tm, stats = self.mask_strategy.with_stats(imgs, batch, self.progress)
            out = self.masked_output(batch, imgs, tm)
            if mc.mps_mode == "prior":
                stats["mps_prior_missing"] = host_scalar(0.0 if batch.get("lesion_prob") is not None else 1.0)
        out.metrics.update(stats, mask_ratio_target=host_scalar(ratio))
        return out


__all__ = ["MPSAMS", "MPSAMSConfig"]
