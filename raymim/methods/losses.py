"""Losses of the masked-image-modelling methods.

* :func:`masked_recon_loss`: MSE / L1 on masked patches only (MAE Eq.; MiM Eq. 2-3 per level),
  optionally against per-patch normalised targets (MAE's ``norm_pix_loss``).
* :func:`cross_level_infonce`: MiM's cross-level alignment (Eq. 4-7): InfoNCE between the
  pooled context vector of a level-(l+1) volume and the token features of its parent level,
  the parent token it came from being the positive and the parent's other tokens negatives.

Example::

    >>> target = patch_targets(torch.rand(2, 1, 32, 32, 32), patch=8, norm_pix=True)  # [2, 64, 512]
    >>> masked_recon_loss(torch.zeros_like(target), target, random_masking(2, 64, 0.75).mask)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymim.masking.tokens import patchify


def patch_targets(imgs: torch.Tensor, patch: int, norm_pix: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """[N, C, D, H, W] -> [N, L, p^3 * C]; with ``norm_pix`` each patch has zero mean, unit var."""
    target = patchify(imgs, patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    return target


def denormalize_patches(pred: torch.Tensor, imgs: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Undo per-patch normalisation with the statistics of ``imgs`` (for visuals only)."""
    raw = patchify(imgs, patch)
    return pred * (raw.var(dim=-1, keepdim=True) + eps).sqrt() + raw.mean(dim=-1, keepdim=True)


def masked_recon_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean over masked patches of the per-patch mean error.

    pred, target: [N, L, P]; mask: [N, L] (1 = removed, the only patches that count).
    """
    if kind == "mse":
        err = (pred - target).pow(2).mean(dim=-1)  # [N, L]
    elif kind == "l1":
        err = (pred - target).abs().mean(dim=-1)
    else:
        raise ValueError(f"kind should be one of ('mse', 'l1'), got {kind!r}.")
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


def cross_level_infonce(
    context: torch.Tensor, parent_tokens: torch.Tensor, positive: torch.Tensor, tau: float = 0.2
) -> torch.Tensor:
    """InfoNCE across levels (MiM Eq. 4-7), cosine similarity over temperature ``tau``.

    context: [M, P] pooled features of M level-(l+1) volumes; parent_tokens: [M, L, P] token
    features of each one's parent volume (level l); positive: [M] index of the parent token
    each volume was cropped from. Every logit compares a level-(l+1) vector with a level-l token.
    """
    q = F.normalize(context, dim=-1)
    k = F.normalize(parent_tokens, dim=-1)
    logits = torch.einsum("mp,mlp->ml", q, k) / tau  # [M, L]
    return F.cross_entropy(logits, positive)
