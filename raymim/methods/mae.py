"""MAE for 3D volumes: encode visible tokens only, decode with mask tokens, MSE on masked patches.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022. Paper defaults:
mask ratio 0.75 (``method.mask_ratio``), per-patch normalised targets as an option
(``method.norm_pix_loss``), a narrow decoder (``model.decoder_*``). Works with the ``vit``
and ``convvit`` backbones (both encode the visible tokens only).

Example::

    >>> cfg = RaymimConfig(model=ModelConfig(img_size=32, patch_size=8, hidden_size=48, mlp_dim=96,
    ...     num_layers=1, num_heads=4, decoder_hidden_size=48, decoder_layers=1, decoder_heads=4))
    >>> out = build_method("mae", cfg)({"image": torch.rand(2, 1, 32, 32, 32)})
    >>> out.loss.backward(); out.metrics["mask_ratio"]  # 0.75
"""

from __future__ import annotations

from typing import Any

import torch

from raymim.config import RaymimConfig
from raymim.masking.tokens import TokenMask, block_masking, mask_to_volume, random_masking, unpatchify
from raymim.methods.base import MethodOutput, PretrainMethod, register_method
from raymim.methods.losses import denormalize_patches, masked_recon_loss, patch_targets
from raymim.models.heads import MAEDecoder
from raymim.models.registry import build_encoder

VISIBLE_ONLY_BACKBONES = ("vit", "convvit")


@register_method("mae")
class MAE(PretrainMethod):
    """Masked autoencoder: ``forward_encoder`` -> ``forward_decoder`` -> ``forward_loss``."""

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__(config)
        m = config.model
        if m.backbone not in VISIBLE_ONLY_BACKBONES:
            raise ValueError(
                f"model.backbone should be one of {VISIBLE_ONLY_BACKBONES} for {type(self).__name__} "
                f"(visible-only encoding), got {m.backbone!r}."
            )
        self.encoder = build_encoder(m)
        self.grid = self.encoder.grid
        self.patch = m.patch_size
        self.decoder = MAEDecoder(
            self.grid,
            m.hidden_size,
            m.decoder_hidden_size,
            m.decoder_layers,
            m.decoder_heads,
            out_dim=m.patch_size**3 * m.in_channels,
        )
        kind = config.method.recon_loss
        self.loss_kind = "mse" if kind == "auto" else kind

    def make_mask(self, batch: int, device: torch.device) -> TokenMask:
        """Random token mask (``mask_block=1``, MAE) or whole 3D cubes of tokens."""
        mc = self.config.method
        return block_masking(batch, self.grid, mc.mask_ratio, mc.mask_block, device=device)

    def forward_encoder(self, imgs: torch.Tensor, tm: TokenMask) -> torch.Tensor:
        """imgs [N, C, D, H, W] -> latent [N, K, hidden] of the kept tokens."""
        return self.encoder.forward_visible(imgs, tm.ids_keep)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [N, K, hidden] -> pred [N, L, p^3 C], decoder features [N, L, dec_hidden]."""
        return self.decoder(latent, ids_restore)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reconstruction error on the masked patches (mask [N, L], 1 = removed)."""
        target = patch_targets(imgs, self.patch, self.config.method.norm_pix_loss)
        return masked_recon_loss(pred, target, mask, self.loss_kind)

    @torch.no_grad()
    def reconstruction_visuals(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> dict:
        """Input, masked input and reconstruction (visible patches pasted back) of sample 0."""
        if self.config.method.norm_pix_loss:
            pred = denormalize_patches(pred, imgs, self.patch)
        recon = unpatchify(pred, self.patch, self.grid, imgs.shape[1])
        vox = mask_to_volume(mask, self.grid, imgs.shape[2:])
        return {
            "input": self.panel(imgs),
            "masked": self.panel(imgs * (1.0 - vox)),
            "recon": self.panel(recon * vox + imgs * (1.0 - vox)),
        }

    def probe_mask(self, batch: int, ratio: float, seed: int, device: torch.device) -> TokenMask:
        """The probe's fixed token-wise random mask (drawn on the CPU, then moved)."""
        tm = random_masking(batch, self.encoder.num_tokens, ratio, generator=self.probe_generator(seed))
        return TokenMask(*(t.to(device) for t in tm))

    @torch.no_grad()
    def probe_loss(self, images: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor | None:
        """Pixel-space MSE of the masked patches under a fixed random mask (predictions of a
        ``norm_pix_loss`` model are de-normalised first, so both settings are scored alike)."""
        imgs = self.fit_input(images)
        tm = self.probe_mask(imgs.shape[0], ratio, seed, imgs.device)
        pred, _ = self.forward_decoder(self.forward_encoder(imgs, tm), tm.ids_restore)
        if self.config.method.norm_pix_loss:
            pred = denormalize_patches(pred, imgs, self.patch)
        return masked_recon_loss(pred.float(), patch_targets(imgs, self.patch), tm.mask, "mse")

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        imgs = self.fit_input(batch["image"])
        tm = self.make_mask(imgs.shape[0], imgs.device)
        latent = self.forward_encoder(imgs, tm)
        pred, _ = self.forward_decoder(latent, tm.ids_restore)
        loss = self.forward_loss(imgs, pred, tm.mask)
        metrics = {
            "loss": float(loss.detach()),
            "loss_rec": float(loss.detach()),
            "mask_ratio": float(tm.mask.mean()),
        }
        return MethodOutput(loss, metrics, self.reconstruction_visuals(imgs, pred.detach(), tm.mask))
