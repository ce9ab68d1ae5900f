"""MAE for 3D volumes: encode visible tokens only, decode with mask tokens, MSE on masked patches.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022. Paper defaults:
mask ratio 0.75 (``method.mask_ratio``), per-patch normalised targets as an option
(``method.norm_pix_loss``), a narrow decoder (``model.decoder_*``). Works with the ``vit``
and ``convvit`` backbones (both encode the visible tokens only).

Example::

    >>> cfg = RaymimConfig(model=ModelConfig(img_size=32, patch_size=8, hidden_size=48, mlp_dim=96,
    ...     num_layers=1, num_heads=4, decoder_hidden_size=48, decoder_layers=1, decoder_heads=4))
    >>> out = build_method("mae", cfg)({"image": torch.rand(2, 1, 32, 32, 32)})
    >>> out.loss.backward(); float(out.metrics["mask_ratio"])  # 0.75

The other reconstruction methods reuse MAE by composition: :meth:`MAE.reconstruct` (encoder on
the visible tokens, decoder, per-token error under the mask) and :meth:`MAE.masked_output` (the
metrics and panels of one masked batch), with their own mask strategy
(:mod:`raymim.methods.strategies`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from raymim.config import MethodConfig, RaymimConfig, check_choice, check_positive, check_range
from raymim.masking.tokens import TokenMask, mask_to_volume, random_masking, unpatchify
from raymim.methods.base import MethodOutput, PretrainMethod, register_method
from raymim.methods.losses import denormalize_patches, masked_mean, masked_recon_loss, patch_targets, token_recon_error
from raymim.methods.strategies import BlockMasking, MaskStrategy
from raymim.models.heads import MAEDecoder
from raymim.models.registry import build_encoder

VISIBLE_ONLY_BACKBONES = ("vit", "convvit")


def side_text(shape: Sequence[int]) -> str:
    """``(32, 32, 32)`` -> ``"32^3"``, ``(96, 96, 64)`` -> ``"96x96x64"``."""
    shape = [int(s) for s in shape]
    return f"{shape[0]}^3" if len(set(shape)) == 1 else "x".join(map(str, shape))


def input_label(raw: torch.Tensor, net_input: torch.Tensor) -> str:
    """What a panel row shows: the batch's crop ``raw`` [B, C, ...] and the network input it became."""
    crop, size = side_text(raw.shape[2:]), side_text(net_input.shape[2:])
    return f"{crop} crop" + (f", resized to {size}" if crop != size else " (network input size)")


def first_case_id(batch: Mapping[str, Any]) -> str | None:
    """Case id of the batch's first sample (the one the panels show), when the batch has one."""
    ids = batch.get("case_id")
    return str(ids[0]) if ids is not None and len(ids) and ids[0] is not None else None


@torch.compiler.disable  # host-side panels (MONAI MetaTensor): one clean graph break, no failed inlining
def masked_visuals(imgs: torch.Tensor, recon: torch.Tensor, vox: torch.Tensor, *, label: str | None = None,
                   case_id: str | None = None) -> dict[str, torch.Tensor]:
    """Panels of sample 0 (``[C, D, H, W]`` each): ``input``, ``masked`` (removed voxels zeroed),
    ``recon`` (the prediction in the removed voxels, the input pasted back in the visible ones) and
    ``mask`` (voxel mask ``vox`` [B, 1, D, H, W], 1 = removed). With a ``label`` (what the row
    shows) or ``case_id``, each is a MONAI ``MetaTensor`` carrying both in ``meta`` for
    :mod:`raymim.train.panels`."""
    out = {
        "input": PretrainMethod.panel(imgs),
        "masked": PretrainMethod.panel(imgs * (1.0 - vox)),
        "recon": PretrainMethod.panel(recon * vox + imgs * (1.0 - vox)),
        "mask": PretrainMethod.panel(vox),
    }
    meta = {k: v for k, v in (("label", label), ("case_id", case_id)) if v}
    if not meta:
        return out
    from monai.data import MetaTensor

    return {k: MetaTensor(v, meta=dict(meta)) for k, v in out.items()}


class Reconstruction(NamedTuple):
    """What :meth:`MAE.reconstruct` returns for images [N, C, D, H, W] under a token mask."""

    latent: torch.Tensor  # [N, K, hidden] encoder output of the visible tokens
    pred: torch.Tensor  # [N, L, p^3 C] predicted patches (all tokens)
    feats: torch.Tensor  # [N, L, dec_hidden] decoder features (all tokens)
    error: torch.Tensor  # [N, L] per-token error against the targets (every token; only masked ones count)
    loss: torch.Tensor  # scalar: mean error over the masked tokens


@dataclass
class MaskedReconstructionConfig(MethodConfig):
    """The ``method`` fields of every method that reconstructs masked tokens with MAE's encoder
    and decoder (:meth:`MAE.reconstruct`): MAE, SimMIM, MiM, MPS-AMS, MedIM, HSSL."""

    # MAE and SimMIM papers: 0.75 (MAE) / 0.6 (SimMIM); MiM paper: 0.6.
    mask_ratio: float = 0.75
    # Normalise each target patch by its own mean / std (MAE's norm_pix_loss).
    norm_pix_loss: bool = False
    # Reconstruction loss: "auto" picks each paper's choice (MAE / MiM: mse, SimMIM: l1).
    recon_loss: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("method.mask_ratio", self.mask_ratio, 0.0, 1.0)
        check_choice("method.recon_loss", self.recon_loss, ("auto", "mse", "l1"))


@dataclass
class MAEConfig(MaskedReconstructionConfig):
    """MAE's ``method`` section (``name: mae``)."""

    # SimMIM-style block masking: side of a masked block, in tokens (1 = token-wise random).
    mask_block: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("method.mask_block", self.mask_block)


@register_method("mae", config=MAEConfig)
class MAE(PretrainMethod):
    """Masked autoencoder: ``forward_encoder`` -> ``forward_decoder`` -> ``forward_loss``.

    ``mask_strategy``: ``(images, batch, progress) -> TokenMask``, random (``mask_block=1``) or
    block masking at ``method.mask_ratio`` (:meth:`configure_masking`).
    """

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
            fused_attention=m.fused_attention,
        )
        self.configure_masking(config.method)

    def configure_masking(self, mc: MAEConfig) -> None:
        """The reconstruction loss kind and the token mask strategy, from the method's config
        section (methods that mask otherwise, or read other fields, override this)."""
        self.loss_kind = "mse" if mc.recon_loss == "auto" else mc.recon_loss
        self.mask_strategy: MaskStrategy = BlockMasking(tuple(self.grid), mc.mask_ratio, mc.mask_block)

    def forward_encoder(self, imgs: torch.Tensor, tm: TokenMask) -> torch.Tensor:
        """imgs [N, C, D, H, W] -> latent [N, K, hidden] of the kept tokens."""
        return self.encoder.forward_visible(imgs, tm.ids_keep)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [N, K, hidden] -> pred [N, L, p^3 C], decoder features [N, L, dec_hidden]."""
        return self.decoder(latent, ids_restore)

    def forward_error(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Per-token reconstruction error [N, L] against the (optionally normalised) patches of ``imgs``."""
        target = patch_targets(imgs, self.patch, self.config.method.norm_pix_loss)
        return token_recon_error(pred, target, self.loss_kind)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reconstruction error on the masked patches (mask [N, L], 1 = removed)."""
        return masked_mean(self.forward_error(imgs, pred), mask)

    def reconstruct(self, imgs: torch.Tensor, tm: TokenMask) -> Reconstruction:
        """Encode the visible tokens of ``imgs`` [N, C, D, H, W] under ``tm``, decode every token,
        and score the prediction: the per-token error and its mean over the masked tokens."""
        latent = self.forward_encoder(imgs, tm)
        pred, feats = self.forward_decoder(latent, tm.ids_restore)
        error = self.forward_error(imgs, pred)
        return Reconstruction(latent, pred, feats, error, masked_mean(error, tm.mask))

    def masked_output(self, batch: Mapping[str, Any], imgs: torch.Tensor, tm: TokenMask,
                      rec: Reconstruction | None = None) -> MethodOutput:
        """MAE's output for network input ``imgs`` under ``tm``: loss = masked reconstruction error,
        metrics ``loss``, ``loss_rec``, ``mask_ratio`` (detached tensors) and the panels."""
        rec = self.reconstruct(imgs, tm) if rec is None else rec
        loss_rec = rec.loss.detach()
        metrics = {"loss": loss_rec, "loss_rec": loss_rec, "mask_ratio": tm.mask.mean().detach()}
        visuals = self.reconstruction_visuals(imgs, rec.pred.detach(), tm.mask, label=input_label(batch["image"], imgs),
                                              case_id=first_case_id(batch))
        return MethodOutput(rec.loss, metrics, visuals)

    @torch.no_grad()
    def reconstruction_visuals(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, *,
                               label: str | None = None, case_id: str | None = None) -> dict:
        """:func:`masked_visuals` of sample 0 from the patch predictions ``pred`` and token ``mask``."""
        if self.config.method.norm_pix_loss:
            pred = denormalize_patches(pred, imgs, self.patch)
        recon = unpatchify(pred, self.patch, self.grid, imgs.shape[1])
        vox = mask_to_volume(mask, self.grid, imgs.shape[2:])
        return masked_visuals(imgs, recon, vox, label=label, case_id=case_id)

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
        return self.masked_output(batch, imgs, self.mask_strategy(imgs, batch, self.progress))
