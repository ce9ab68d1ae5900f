"""MiM (Mask in Mask): multi-level masked volumes, per-level reconstruction, cross-level alignment.

Zhuang et al., "MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical Image Analysis",
IEEE TMI 2025 (arXiv:2404.15580). Defaults (``method.*``): L = 3 levels of 192^3 / 96^3 / 16^3
voxels at the stored spacing (the reference code's sizes, ``level_sizes=[192, 96, 16]``, level 1 a
192^3 crop drawn from the volume at train time; the paper quotes 384^2x192) resized to a 96^3 input,
mask ratio 0.6, gamma = 4 volumes per level, alpha = 0.1, a hybrid conv + ViT backbone
(``model.backbone="convvit"``) encoding visible tokens only. Loss (Eq. 10)::

    L = L_R + alpha * L_C
    L_R = mean over levels of the masked-token MSE (Eq. 2-3)
    L_C = mean over levels l >= 2 of InfoNCE(context of a level-l volume, tokens of its
          level-(l-1) parent; positive = the parent token it was cropped from)   (Eq. 4-7)

Context vectors are the mean of a volume's visible-token latents; parent token features are the
decoder's states (they exist for masked tokens, where the children come from). Both go through
projection heads of width ``method.proj_dim``. Every alignment term compares two *different*
levels. With ``levels=1`` MiM is exactly MAE (same masks, same loss).

Level-1 scale (``method.level1_scale`` = [lo, hi], default [0.2, 1.0]): at every training step
the level-1 box's volume is drawn as a fraction v ~ U(lo, hi) of ``level_sizes[0]^3``
(RandomResizedCrop-style, cubes), so its side is ``level_sizes[0] * v^(1/3)`` (192 -> 112..192
voxels), cut from the train-time crop and resized to the network input; the deeper levels keep
their ratios to it (96 / 16 voxels at scale 1), which keeps MiM's cube geometry (a level-2 box
fills a masked cube of level 1). Sides are whole voxels: the side nearest the drawn one among
those whose levels still nest in whole masking cubes (:func:`level1_side_choices`). Deviations:
the MiM reference code crops a fixed 192^3 (``RandSpatialCrop(random_size=False)``) and has no
level-1 scale; the range is the minimum of its unused ``crop_scale_min`` option (0.2, MAE's
RandomResizedCrop scale) applied to the volume. One scale per batch (all samples of a step
share it), so the hierarchy stays one batched cut per level. Drawn with torch's generator in
the training process (a method's per-step randomness, like its masks; checkpointed with the RNG
state). Not drawn with ``levels=1`` (MiM stays exactly MAE) nor by MPS-AMS's own level strategy.

Composition: the hierarchy comes from a level strategy (``level_strategy``, a
:class:`~raymim.methods.strategies.MiMLevels`: ``(image, batch, progress) -> list[MiMLevel]``,
the ratio an explicit argument), and all levels go through :meth:`MAE.reconstruct` in one
encoder/decoder pass (:meth:`MiM.hierarchy_output`); MPS-AMS passes its own level strategy.

Example::

    >>> cfg.method.levels, cfg.method.level_sizes, cfg.method.gamma = 2, [32, 16], 2
    >>> out = build_method("mim", cfg)({"image": torch.rand(2, 1, 32, 32, 32)})
    >>> out.metrics["loss_rec_l2"], out.visuals["l2/recon"].shape
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from raymim.config import RaymimConfig
from raymim.masking.multilevel import MiMLevel, cube_block, level_box_sides
from raymim.masking.tokens import TokenMask, num_masked
from raymim.methods.base import MethodOutput, host_scalar, register_method
from raymim.methods.losses import cross_level_infonce, masked_mean
from raymim.methods.mae import MAE, first_case_id
from raymim.methods.strategies import MiMLevels
from raymim.models.heads import ProjectionHead


def level_label(index: int, level: MiMLevel) -> str:
    """Panel row label of level ``index`` (0-based): the crop side of its volumes (image voxels,
    ``level.side``, known on the host) and the network input side it was resized to."""
    side = int(level.side)
    size = int(level.volumes.shape[-1])
    where = f" of a masked level-{index} cube" if index else ""
    resized = f", resized to {size}^3" if side != size else " (network input size)"
    return f"level {index + 1}: {side}^3 crop{where}{resized}"


def level1_side_choices(image_side: int, level_sizes: Sequence[int], levels: int, grid: int, mask_ratio: float,
                        mask_block: int = 1, scale: Sequence[float] = (1.0, 1.0)) -> list[list[int]]:
    """The level side lists (image voxels, level 1 first) a level-1 volume scale in ``scale``
    can give on an image of smallest side ``image_side``: level 1 from ``base * lo^(1/3)`` to
    ``base * hi^(1/3)`` (``base``: its side at scale 1, :func:`level_box_sides`), the deeper levels
    at their ratio to it, kept only when every level nests in whole masking cubes of its parent
    (:func:`~raymim.masking.multilevel.cube_block`) that ``mask_ratio`` can mask. Never empty:
    the scale-1 sides when nothing else fits."""
    base = level_box_sides((image_side,) * 3, level_sizes, levels)
    lo, hi = math.ceil(base[0] * scale[0] ** (1 / 3) - 1e-9), math.floor(base[0] * scale[1] ** (1 / 3) + 1e-9)
    out = []
    for s1 in range(max(1, lo), min(base[0], hi) + 1):
        sides = [s1] + [max(1, round(b * s1 / base[0])) for b in base[1:]]
        try:
            blocks = [cube_block(a, grid, b, mask_block) for a, b in zip(sides, sides[1:])]
        except ValueError:
            continue
        if all(num_masked(grid**3, mask_ratio) >= k**3 for k in blocks):
            out.append(sides)
    return out or [base]


@register_method("mim")
class MiM(MAE):
    """MAE encoder/decoder shared by all levels, plus the two alignment projection heads."""

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__(config)
        m, mc = config.model, config.method
        self.context_proj = ProjectionHead(m.hidden_size, mc.proj_dim)
        self.token_proj = ProjectionHead(m.decoder_hidden_size, mc.proj_dim)
        self.level_strategy = MiMLevels(m.img_size, m.patch_size, tuple(mc.level_sizes), mc.mask_ratio, mc.gamma,
                                        mc.levels, mc.mask_block)
        self._side_choices: dict[int, list[list[int]]] = {}  # smallest image side -> level1_side_choices

    def forward_levels(
        self, levels: list[MiMLevel]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """One :meth:`reconstruct` pass over the volumes of all levels (same input size).

        Returns per level: latents [B n, K, hidden], predictions [B n, L, p^3 C], decoder
        features [B n, L, dec_hidden], masked reconstruction loss (scalar).
        """
        counts = [lv.volumes.shape[0] for lv in levels]
        vols = torch.cat([lv.volumes for lv in levels])
        tm = TokenMask(*(torch.cat([getattr(lv.mask, f) for lv in levels]) for f in TokenMask._fields))
        rec = self.reconstruct(vols, tm)
        errors = rec.error.split(counts)
        losses = [masked_mean(err, lv.mask.mask) for err, lv in zip(errors, levels, strict=True)]
        return list(rec.latent.split(counts)), list(rec.pred.split(counts)), list(rec.feats.split(counts)), losses

    def forward_alignment(
        self, child: MiMLevel, child_latent: torch.Tensor, parent_feats: torch.Tensor
    ) -> torch.Tensor:
        """InfoNCE between each level-(l+1) volume and the tokens of its level-l parent."""
        batch, n_child = child.parent.shape
        n_parent = parent_feats.shape[0] // batch
        device = parent_feats.device
        parent = child.parent.to(device)
        rows = (torch.arange(batch, device=device).unsqueeze(1) * n_parent + parent).flatten()
        context = self.context_proj(child_latent.mean(dim=1))  # [B n_child, P]
        keys = self.token_proj(parent_feats)[rows]  # [B n_child, L, P]
        positive = child.parent_token.flatten().to(device)
        return cross_level_infonce(context, keys, positive, self.config.method.tau)

    def hierarchy_output(self, batch: Mapping[str, Any], levels: list[MiMLevel]) -> MethodOutput:
        """MiM's loss, metrics (detached tensors) and panels for a level hierarchy of ``batch``."""
        latents, preds, feats, rec_terms = self.forward_levels(levels)
        metrics: dict[str, torch.Tensor] = {}
        align_terms = []
        for i, lv in enumerate(levels):
            metrics[f"loss_rec_l{i + 1}"] = rec_terms[i].detach()
            if i > 0:
                align = self.forward_alignment(lv, latents[i], feats[i - 1])
                align_terms.append(align)
                metrics[f"loss_align_l{i + 1}"] = align.detach()
        loss_rec = torch.stack(rec_terms).mean()
        loss_align = torch.stack(align_terms).mean() if align_terms else loss_rec.new_zeros(())
        loss = loss_rec + self.config.method.alpha * loss_align
        metrics.update(
            loss=loss.detach(),
            loss_rec=loss_rec.detach(),
            loss_align=loss_align.detach(),
            mask_ratio=levels[0].mask.mask.mean().detach(),
            volumes_per_sample=host_scalar(sum(lv.boxes.shape[1] for lv in levels)),
        )
        visuals: dict[str, torch.Tensor] = {}
        case_id = first_case_id(batch)
        for i, lv in enumerate(levels):
            panels = self.reconstruction_visuals(lv.volumes, preds[i].detach(), lv.mask.mask, label=level_label(i, lv),
                                                 case_id=case_id)
            if i == 0:
                visuals.update(panels)  # plain "input" / "masked" / "recon" like MAE
            visuals.update({f"l{i + 1}/{k}": v for k, v in panels.items()})
        return MethodOutput(loss, metrics, visuals)

    def level1_sides(self, image_shape: Sequence[int]) -> list[int]:
        """This step's level sides (image voxels): a level-1 volume fraction drawn uniformly in
        ``method.level1_scale`` (torch's generator, on the host), the nearest valid side list of
        :func:`level1_side_choices`."""
        mc, m = self.config.method, self.config.model
        key = min(int(s) for s in image_shape)
        if key not in self._side_choices:
            self._side_choices[key] = level1_side_choices(key, mc.level_sizes, mc.levels, m.img_size // m.patch_size,
                                                          mc.mask_ratio, mc.mask_block, mc.level1_scale)
        choices = self._side_choices[key]
        lo, hi = mc.level1_scale
        target = (lo + (hi - lo) * float(torch.rand(()))) ** (1 / 3) * level_box_sides(
            (key,) * 3, mc.level_sizes, mc.levels)[0]
        return min(choices, key=lambda c: abs(c[0] - target))

    def training_levels(self, batch: Mapping[str, Any]) -> list[MiMLevel]:
        """This step's level hierarchy of ``batch``: level 1 at a random scale (module docstring)."""
        strategy = self.level_strategy
        if self.config.method.levels > 1 and tuple(self.config.method.level1_scale) != (1.0, 1.0):
            strategy = dataclasses.replace(strategy, level_sizes=tuple(self.level1_sides(batch["image"].shape[2:])))
        return strategy(batch["image"], batch, self.progress)

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        return self.hierarchy_output(batch, self.training_levels(batch))


__all__ = ["MiM", "level1_side_choices"]
