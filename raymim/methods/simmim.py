"""SimMIM for 3D volumes: all tokens through the encoder, masked ones as a learned mask token,
a light head, L1 on the masked voxels.

Xie et al., "SimMIM: a Simple Framework for Masked Image Modeling", CVPR 2022. Paper defaults:
L1 loss (``method.recon_loss="auto"``), random masking of patches larger than the model's
tokens (2D: 32 px masks over 4 px Swin patches, ratio 0.6), a one-layer prediction head.
Backbones:

* ``vit`` / ``convvit``: mask unit = one token (``model.patch_size``), ``method.mask_block``
  tokens per cube side; linear head per token.
* ``swin`` (MONAI ``SwinTransformer``): mask unit = ``model.patch_size`` voxels, applied to the
  stride-2 patch embedding; a 1x1x1 conv + pixel-shuffle head from the stride-32 stage.
  ``model.img_size`` must be a multiple of 32.

The mask token is a parameter of the method (``mask_token``), not of the encoder, so
``encoder.state_dict()`` stays exactly MONAI's layout.

Example::

    >>> out = build_method("simmim", cfg)({"image": torch.rand(2, 1, 32, 32, 32)})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raymim.config import RaymimConfig
from raymim.masking.tokens import mask_to_volume, patchify, random_masking, unpatchify
from raymim.methods.base import MethodOutput, PretrainMethod, register_method
from raymim.methods.losses import denormalize_patches, masked_recon_loss, patch_targets
from raymim.methods.mae import MAEConfig, first_case_id, input_label, masked_visuals
from raymim.methods.strategies import BlockMasking, MaskStrategy
from raymim.models.heads import LinearHead, PixelShuffleHead
from raymim.models.registry import build_encoder


@dataclass
class SimMIMConfig(MAEConfig):
    """SimMIM's ``method`` section (``name: simmim``): MAE's fields (``recon_loss="auto"`` is L1 here)."""


@register_method("simmim", config=SimMIMConfig)
class SimMIM(PretrainMethod):
    """SimMIM: ``forward_encoder`` (mask tokens) -> ``forward_decoder`` (head) -> ``forward_loss``."""

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__(config)
        m = config.model
        self.encoder = build_encoder(m)
        self.swin = m.backbone == "swin"
        self.patch = m.patch_size
        self.grid = (m.img_size // m.patch_size,) * 3
        if self.swin:
            stride = self.encoder.stride
            if m.img_size % stride or m.patch_size % 2:
                raise ValueError(
                    f"model.img_size should be a multiple of {stride} and model.patch_size even for the swin "
                    f"backbone, got img_size={m.img_size}, patch_size={m.patch_size}."
                )
            self.mask_token = nn.Parameter(torch.zeros(m.swin_feature_size))
            self.head = PixelShuffleHead(self.encoder.hidden_size, m.in_channels, stride)
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, m.hidden_size))
            self.head = LinearHead(m.hidden_size, m.patch_size**3 * m.in_channels)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        mc: SimMIMConfig = config.method
        self.loss_kind = "l1" if mc.recon_loss == "auto" else mc.recon_loss
        self.mask_strategy: MaskStrategy = BlockMasking(self.grid, mc.mask_ratio, mc.mask_block)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token backbones: [N, L, hidden]; Swin: last stage [N, 16F, D/32, H/32, W/32]."""
        if self.swin:
            half = tuple(s // 2 for s in imgs.shape[2:])
            return self.encoder.forward_masked(imgs, mask_to_volume(mask, self.grid, half), self.mask_token)[-1]
        return self.encoder.forward_masked(imgs, mask, self.mask_token)

    def forward_decoder(self, feats: torch.Tensor) -> torch.Tensor:
        """Prediction as patches [N, L, p^3 C] (same layout for every backbone)."""
        if self.swin:
            return patchify(self.head(feats), self.patch)
        return self.head(feats)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patch_targets(imgs, self.patch, self.config.method.norm_pix_loss)
        return masked_recon_loss(pred, target, mask, self.loss_kind)

    @torch.no_grad()
    def probe_loss(self, images: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor | None:
        """Pixel-space MSE of the masked patches under a fixed token-wise random mask."""
        imgs = self.fit_input(images)
        tokens = self.grid[0] * self.grid[1] * self.grid[2]
        mask = random_masking(imgs.shape[0], tokens, ratio, generator=self.probe_generator(seed)).mask.to(imgs.device)
        pred = self.forward_decoder(self.forward_encoder(imgs, mask))
        if self.config.method.norm_pix_loss:
            pred = denormalize_patches(pred, imgs, self.patch)
        return masked_recon_loss(pred.float(), patch_targets(imgs, self.patch), mask, "mse")

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        imgs = self.fit_input(batch["image"])
        tm = self.mask_strategy(imgs, batch, self.progress)
        pred = self.forward_decoder(self.forward_encoder(imgs, tm.mask))
        loss = self.forward_loss(imgs, pred, tm.mask)
        metrics = {"loss": loss.detach(), "loss_rec": loss.detach(), "mask_ratio": tm.mask.mean().detach()}
        with torch.no_grad():
            shown = denormalize_patches(pred, imgs, self.patch) if self.config.method.norm_pix_loss else pred
            recon = unpatchify(shown, self.patch, self.grid, imgs.shape[1])
            vox = mask_to_volume(tm.mask, self.grid, imgs.shape[2:])
            visuals = masked_visuals(imgs, recon, vox, label=input_label(batch["image"], imgs),
                                     case_id=first_case_id(batch))
        return MethodOutput(loss, metrics, visuals)
