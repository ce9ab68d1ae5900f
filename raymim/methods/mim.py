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

from collections.abc import Mapping
from typing import Any

import torch

from raymim.config import RaymimConfig
from raymim.masking.multilevel import MiMLevel
from raymim.masking.tokens import TokenMask
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

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        return self.hierarchy_output(batch, self.level_strategy(batch["image"], batch, self.progress))


__all__ = ["MiM"]
