"""MiM (Mask in Mask): multi-level masked volumes, per-level reconstruction, cross-level alignment.

Zhuang et al., "MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical Image Analysis",
IEEE TMI 2025 (arXiv:2404.15580); reference code github.com/JiaxinZhuang/MiM
(``Pretrain/models_convmae3d_v4.py``, ``engine_pretrain.py``, ``nscripts_gpu6/MiM/pretrain.sh``).
Defaults (``method.*``): L = 3 levels of 192^3 / 96^3 / 16^3 voxels at the stored spacing (the
reference code's sizes, ``level_sizes=[192, 96, 16]``, level 1 a 192^3 crop drawn from the volume
at train time; the paper quotes 384^2x192) resized to a 96^3 input, mask ratio 0.6, gamma = 4
volumes per *parent volume* (:mod:`raymim.masking.multilevel`), alpha = 0.1, the hybrid ConvViT
backbone (``model.backbone="convvit"`` in ``mim.yaml``) encoding visible tokens only. Loss, with
the reference's weights (``reconstruct_weight_* = 1``, ``atten_weight_uu = atten_weight_ud = 0.1``)::

    L = sum over levels l of L_R(l) + alpha * sum over levels l >= 2 of L_C(l-1, l)
    L_R(l)      masked-token MSE of level l (Eq. 2-3)
    L_C(l-1, l) InfoNCE(query of a level-l volume, region keys of its level-(l-1) parent volume;
                positive = the parent region (masking cube) the child was cut from,
                negatives = the parent volume's other regions)               (Eq. 4-7)

Cross-level alignment as in the reference: the query is the mean of the child volume's *decoder*
features (all tokens) through a per-level-pair MLP head (``aggregate_mid`` / ``aggregate_down``
there, ``query_heads`` here); the parent's decoder features are **detached** (no gradient reaches
the parent branch through the keys), mean-pooled over each ``k^3``-token masking cube of the
parent (:func:`region_keys`; the reference pools 27 consecutive flattened tokens at level 1 -> 2
and keeps single tokens at 2 -> 3, where our cube is ``k = 1``) and projected by a second
per-pair head (``aggregate_pred_*_feature`` there, ``key_heads`` here); every logit compares a
level-l vector with a level-(l-1) region. With ``levels=1`` MiM is exactly MAE (same masks, same
loss).

Deliberate deviations from the reference, with their reasons:

* InfoNCE with the parent's other regions as negatives (the reference's ``attn_loss_name='CE'``,
  the paper's Eq. 4-7), not the BYOL-style cosine loss that its released ``pretrain.sh`` selects
  (``--attn_loss_name byol``, no negatives, and a loop that compares unprojected with projected
  features): the paper describes the contrastive form.
* Regions are real ``k^3`` cubes of the token grid (see :mod:`raymim.masking.multilevel`), not 27
  consecutive flattened tokens, so the positive is the region the child was actually cut from.
* Cosine similarity over a temperature ``method.tau`` (0.2) and heads of width ``method.proj_dim``:
  the reference's CE branch uses a temperature of 1 and heads as wide as the decoder; a
  temperature is part of the paper's InfoNCE, and one head width serves every method here.
* The reference's level-2 -> 3 CE branch pools each level-2 volume into a single key (one logit,
  a constant loss); here each level-2 region (single token, ``k = 1``) is a key, which is what
  its ``labels_down`` (a token index) refers to.

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

    >>> cfg.method = MiMConfig(levels=2, level_sizes=[32, 16], gamma=2)
    >>> out = build_method("mim", cfg)({"image": torch.rand(2, 1, 32, 32, 32)})
    >>> out.metrics["loss_rec_l2"], out.visuals["l2/recon"].shape
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from raymim.config import RaymimConfig, check_positive
from raymim.masking.multilevel import MiMLevel, cube_block, level_box_sides, parent_cube
from raymim.masking.tokens import TokenMask, num_masked
from raymim.methods.base import MethodOutput, ProjectionConfig, host_scalar, register_method
from raymim.methods.losses import cross_level_infonce, masked_mean
from raymim.methods.mae import MAE, MAEConfig, first_case_id
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


def region_keys(feats: torch.Tensor, grid: int, block: int) -> torch.Tensor:
    """Token features [N, L, D] (L = grid^3, flat (d, h, w)) -> the mean over each
    ``block^3``-token masking cube, [N, (grid / block)^3, D] (cube order of
    :func:`~raymim.masking.multilevel.parent_cube`)."""
    n, _, d = feats.shape
    c = grid // block
    vol = feats.view(n, c, block, c, block, c, block, d)
    return vol.mean(dim=(2, 4, 6)).reshape(n, c**3, d)


@dataclasses.dataclass
class MultiLevelConfig(ProjectionConfig, MAEConfig):
    """The ``method`` fields of the Mask-in-Mask level hierarchy (MiM, MPS-AMS): MAE's, the
    levels, and the cross-level alignment (``tau``, ``proj_dim``, ``alpha``)."""

    levels: int = 3
    # Crop side of each level in voxels of the stored grid (scaled down only when the train-time
    # crop is smaller than level 1); level 1 is the large crop, each further level a sub-volume of a
    # masked cube of the level above. Defaults: the MiM reference code's 192 -> 96 -> 16 voxels at
    # the stored spacing, with a prepare.crop_size of 192^3 (the paper's 384 x 384 x 192 level 1
    # exceeds most resampled CTs).
    level_sizes: list[int] = dataclasses.field(default_factory=lambda: [192, 96, 16])
    # Level-(l+1) volumes drawn from distinct masked cubes of each level-l volume, per parent
    # volume (the reference's sample_usual = sample_down = 4): level l holds gamma^(l-1) per sample.
    gamma: int = 4
    # Weight of each cross-level alignment term, L = sum_l L_R(l) + alpha * sum_l L_C(l-1, l) (the
    # reference's atten_weight_uu = atten_weight_ud = 0.1; every reconstruction term weighs 1).
    alpha: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.levels <= 4:
            raise ValueError(f"method.levels should be in the range [1, 4], got {self.levels}.")
        if len(self.level_sizes) < self.levels or any(s <= 0 for s in self.level_sizes):
            raise ValueError(
                f"method.level_sizes should hold method.levels={self.levels} positive sizes, got {self.level_sizes}."
            )
        if any(b > a for a, b in zip(self.level_sizes, self.level_sizes[1:])):
            raise ValueError(f"method.level_sizes should not increase from level to level, got {self.level_sizes}.")
        check_positive("method.gamma", self.gamma)
        if self.alpha < 0:
            raise ValueError(f"method.alpha should be >= 0, got {self.alpha}.")

    def inert_fields(self) -> set[str]:
        # One level: no children, no alignment term.
        return super().inert_fields() | ({"gamma", "alpha", "tau", "proj_dim"} if self.levels == 1 else set())

    def effective(self) -> dict[str, Any]:
        out = super().effective()
        out["level_sizes"] = list(self.level_sizes)[: self.levels]  # the sizes past `levels` are not used
        return out


@dataclasses.dataclass
class MiMConfig(MultiLevelConfig):
    """MiM's ``method`` section (``name: mim``)."""

    # Range of the level-1 box's *volume* as a fraction of level_sizes[0]^3, drawn uniformly per
    # training step (module docstring); [1.0, 1.0] turns it off. Not drawn at levels=1.
    level1_scale: list[float] = dataclasses.field(default_factory=lambda: [0.2, 1.0])

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.level1_scale) != 2 or not 0.0 < self.level1_scale[0] <= self.level1_scale[1] <= 1.0:
            raise ValueError(f"method.level1_scale should be [lo, hi] with 0 < lo <= hi <= 1, got {self.level1_scale}.")

    def inert_fields(self) -> set[str]:
        return super().inert_fields() | ({"level1_scale"} if self.levels == 1 else set())


@register_method("mim", config=MiMConfig)
class MiM(MAE):
    """MAE encoder/decoder shared by all levels, plus a query and a key head per level pair."""

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__(config)
        m, mc = config.model, config.method
        pairs = max(mc.levels - 1, 0)
        self.query_heads = torch.nn.ModuleList(ProjectionHead(m.decoder_hidden_size, mc.proj_dim) for _ in range(pairs))
        self.key_heads = torch.nn.ModuleList(ProjectionHead(m.decoder_hidden_size, mc.proj_dim) for _ in range(pairs))
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
        self, pair: int, child: MiMLevel, child_feats: torch.Tensor, parent: MiMLevel, parent_feats: torch.Tensor
    ) -> torch.Tensor:
        """L_C between the level-``pair + 2`` volumes ``child`` and their level-``pair + 1``
        parents: child decoder features [B n_c, L, dec], parent decoder features [B n_p, L, dec]
        (detached here: keys carry no gradient into the parent branch)."""
        batch, n_child = child.parent.shape
        n_parent = parent_feats.shape[0] // batch
        device = parent_feats.device
        grid = self.encoder.grid[0]
        rows = (torch.arange(batch, device=device).unsqueeze(1) * n_parent + child.parent.to(device)).flatten()
        query = self.query_heads[pair](child_feats.mean(dim=1))  # [B n_child, P]
        keys = self.key_heads[pair](region_keys(parent_feats.detach(), grid, parent.block))[rows]  # [B n_child, R, P]
        positive = parent_cube(child.parent_token.flatten().to(device), grid, parent.block)
        return cross_level_infonce(query, keys, positive, self.config.method.tau)

    def hierarchy_output(self, batch: Mapping[str, Any], levels: list[MiMLevel]) -> MethodOutput:
        """MiM's loss, metrics (detached tensors) and panels for a level hierarchy of ``batch``."""
        latents, preds, feats, rec_terms = self.forward_levels(levels)
        metrics: dict[str, torch.Tensor] = {}
        align_terms = []
        for i, lv in enumerate(levels):
            metrics[f"loss_rec_l{i + 1}"] = rec_terms[i].detach()
            if i > 0:
                align = self.forward_alignment(i - 1, lv, feats[i], levels[i - 1], feats[i - 1])
                align_terms.append(align)
                metrics[f"loss_align_l{i + 1}"] = align.detach()
        loss_rec = torch.stack(rec_terms).sum()  # reference: every level weighted 1, summed
        loss_align = torch.stack(align_terms).sum() if align_terms else loss_rec.new_zeros(())
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


__all__ = ["MiM", "MiMConfig", "MultiLevelConfig", "level1_side_choices", "region_keys"]
