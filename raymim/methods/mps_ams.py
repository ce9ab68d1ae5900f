"""MPS-AMS: masked patch selection (lesion cluster masked first) + adaptive masking ratio.

Wang et al. (MPS-AMS, seed paper). Two parts, both explicit because the paper's formulas are
not public:

* **MPS** (:mod:`raymim.masking.selection`): per-patch descriptors, per-volume standardisation
  (the volume's patch covariance, diagonal), k-means, and the *most atypical* cluster (largest
  distance of its mean descriptor from the volume's mean patch) masked first, then random
  patches up to the ratio. ``method.mps_mode``:

  - ``"online"``: descriptors are the current encoder's patch features (``mps_features``:
    ``"embed"`` the patch embedding, ``"tokens"`` a no-grad pass of the whole encoder);
    a torch k-means runs on the batch's pooled, per-volume-standardised patches on the
    training device every ``mps_every`` steps (in between: nearest cached centre);
  - ``"prior"``: the shards' ``lesion_prob`` column [B, L'] (intensity descriptors clustered
    with scikit-learn during ``raymim prepare``, :mod:`raymim.data.patch_stats`); batches
    without it fall back to online selection (counted as ``mps_prior_missing``);
  - ``"none"``: AMS only (random masking at the scheduled ratio).

* **AMS** (:mod:`raymim.masking.schedules`): the ratio follows ``method.mask_schedule`` from
  ``mask_ratio_start`` to ``mask_ratio_end`` over training (``set_progress``), logged as
  ``mask_ratio`` (achieved) and ``mask_ratio_target`` (scheduled).

With ``method.levels == 1`` this is MAE with MPS-AMS masks; with ``levels > 1`` it is MiM whose
level-1 masking cubes MPS orders (:func:`raymim.masking.mps_levels.mps_mim_levels`), so the
finer levels re-see lesion cubes.

Example::

    >>> cfg.method = MethodConfig(name="mps_ams", levels=1, mask_schedule="linear",
    ...                           mask_ratio_start=0.5, mask_ratio_end=0.85)
    >>> m = build_method("mps_ams", cfg); m.set_progress(50, 100)
    >>> m({"image": torch.rand(2, 1, 32, 32, 32)}).metrics["mask_ratio_target"]  # 0.675
"""

from __future__ import annotations

from typing import Any

import torch

from raymim.config import RaymimConfig
from raymim.masking.mps_levels import mps_mim_levels
from raymim.masking.multilevel import MiMLevel, level_box_sides
from raymim.masking.schedules import mask_ratio_at
from raymim.masking.selection import kmeans, lesion_scores, mps_masking, prior_token_scores, standardize
from raymim.masking.tokens import TokenMask, random_masking
from raymim.methods.base import MethodOutput, register_method
from raymim.methods.mae import first_case_id, input_label
from raymim.methods.mim import MiM


@register_method("mps_ams")
class MPSAMS(MiM):
    """MAE (``levels=1``) or MiM (``levels>1``) with MPS-selected masks at an AMS-scheduled ratio."""

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__(config)
        self._step = 0
        self._centres: torch.Tensor | None = None  # online k-means centres (not checkpointed)
        self._stats: dict[str, float] = {}
        self._batch: dict[str, Any] | None = None
        self._ratio: float | None = None

    def set_progress(self, step: int, total_steps: int) -> None:
        super().set_progress(step, total_steps)
        self._step = int(step)

    def current_ratio(self) -> float:
        """The AMS ratio at the current progress (``method.mask_ratio`` for a constant schedule)."""
        mc = self.config.method
        start = mc.mask_ratio if mc.mask_ratio_start is None else mc.mask_ratio_start
        end = mc.mask_ratio if mc.mask_ratio_end is None else mc.mask_ratio_end
        if mc.mask_schedule == "constant":
            end = mc.mask_ratio
        return mask_ratio_at(self.progress, mc.mask_schedule, start, end, mc.mask_warmup, mc.mask_stages)

    # ---- MPS scores -------------------------------------------------------------------------

    @torch.no_grad()
    def online_scores(self, imgs: torch.Tensor) -> torch.Tensor:
        """Lesion scores [N, L] from the current encoder's patch features (batched torch k-means)."""
        mc = self.config.method
        if mc.mps_features == "tokens":
            feats = self.encoder.forward_tokens(imgs)
        else:
            feats = self.encoder.embed_patches(imgs, None)
        z = standardize(feats.float())  # [N, L, F]: per-volume z-scores, the volume mean at 0
        n, length, _ = z.shape
        flat = z.reshape(n * length, -1)
        k = mc.mps_clusters
        refit = self._centres is None or self._centres.shape[-1] != flat.shape[-1] or self._step % mc.mps_every == 0
        if refit:
            assign, centres = kmeans(flat, k, mc.mps_iters)
            self._centres = centres.detach()
        else:
            assign = torch.cdist(flat, self._centres.to(flat)).argmin(1)
        return lesion_scores(z, assign.view(n, length), self._centres.shape[0])

    def prior_scores(self, prob: torch.Tensor, n: int) -> torch.Tensor:
        """The shards' lesion_prob [B, L'] (or [B, d, h, w]) resampled to this model's token grid: [B, L]."""
        return prior_token_scores(prob, self.grid).reshape(n, -1)

    def scores_for(self, batch: dict[str, Any], imgs: torch.Tensor) -> torch.Tensor | None:
        """Lesion scores [N, L] for the MAE path (None: plain random masking)."""
        mode = self.config.method.mps_mode
        if mode == "none":
            return None
        if mode == "prior":
            prob = batch.get("lesion_prob")
            self._stats["mps_prior_missing"] = 1.0 if prob is None else 0.0
            if prob is not None:
                return self.prior_scores(prob.to(imgs.device), imgs.shape[0])
        return self.online_scores(imgs)

    # ---- masks ------------------------------------------------------------------------------

    def mask_from(self, scores: torch.Tensor | None, batch: int, device: torch.device, ratio: float) -> TokenMask:
        mc = self.config.method
        if scores is None:
            return random_masking(batch, self.encoder.num_tokens, ratio, device=device)
        tm = mps_masking(scores, ratio, mc.mps_share, mc.mps_threshold)
        lesion = scores >= mc.mps_threshold
        self._stats["mps_cluster_share"] = float(lesion.float().mean())
        self._stats["mps_masked_lesion_share"] = float((lesion & tm.mask.bool()).sum() / tm.mask.sum().clamp_min(1))
        return tm

    def make_levels(self, image: torch.Tensor) -> list[MiMLevel]:
        """MiM levels with MPS-ordered level-1 cubes (``self._batch`` / ``self._ratio`` set by forward)."""
        mc, m = self.config.method, self.config.model
        batch = self._batch or {}
        ratio = self.current_ratio() if self._ratio is None else self._ratio
        prob = batch.get("lesion_prob") if mc.mps_mode == "prior" else None
        # The prior map covers the whole stored crop: usable when the level-1 box is that crop.
        side0 = level_box_sides(image.shape[2:], mc.level_sizes, mc.levels)[0]
        whole = len(set(image.shape[2:])) == 1 and side0 == image.shape[2]
        if mc.mps_mode == "prior":
            self._stats["mps_prior_missing"] = 0.0 if (prob is not None and whole) else 1.0

        def score_fn(vols: torch.Tensor) -> torch.Tensor:
            if mc.mps_mode == "none":
                return torch.zeros(vols.shape[0], self.encoder.num_tokens, device=vols.device)
            if prob is not None and whole:
                return self.prior_scores(prob.to(vols.device), vols.shape[0])
            return self.online_scores(vols)

        levels = mps_mim_levels(
            image.float(), m.img_size, m.patch_size, mc.level_sizes, ratio, mc.gamma, mc.levels, score_fn,
            mc.mask_block, mc.mps_share, mc.mps_threshold,
        )
        return levels

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        self._stats = {}
        ratio = self.current_ratio()
        if self.config.method.levels > 1:
            self._batch, self._ratio = batch, ratio
            try:
                out = MiM.forward(self, batch)  # calls self.make_levels
            finally:
                self._batch, self._ratio = None, None
        else:
            imgs = self.fit_input(batch["image"])
            tm = self.mask_from(self.scores_for(batch, imgs), imgs.shape[0], imgs.device, ratio)
            latent = self.forward_encoder(imgs, tm)
            pred, _ = self.forward_decoder(latent, tm.ids_restore)
            loss = self.forward_loss(imgs, pred, tm.mask)
            metrics = {"loss": float(loss.detach()), "loss_rec": float(loss.detach()),
                       "mask_ratio": float(tm.mask.mean())}
            visuals = self.reconstruction_visuals(imgs, pred.detach(), tm.mask, label=input_label(batch["image"], imgs),
                                                  case_id=first_case_id(batch))
            out = MethodOutput(loss, metrics, visuals)
        out.metrics.update(self._stats, mask_ratio_target=ratio)
        return out


__all__ = ["MPSAMS"]
