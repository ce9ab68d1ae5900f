"""HSSL: multi-domain pretraining, contrastive (NT-Xent) + domain classification; and SimCLR.

HSSL (seed paper): pool unlabelled scans from several domains (datasets, sites, body regions)
and pretrain an encoder-decoder with a contrastive loss plus a loss for *which domain* a sample
came from. Here, per crop:

* two augmented views (random flips per axis, intensity scale / shift, Gaussian noise), each
  masked MAE-style at ``method.mask_ratio`` (masking is one more augmentation and keeps the
  encoder visible-only);
* NT-Xent (Chen et al., SimCLR, ICML 2020; temperature ``method.tau``) between the projected,
  mean-pooled *decoder* features of the two views (the encoder-decoder's features);
* domain classification: a linear head on the mean + std pooled encoder latent, cross-entropy against the
  batch's ``domain`` strings mapped to ids by ``method.domains`` or, when unset, by a vocabulary
  built from the data as seen (saved in the state dict, at most ``method.max_domains``; unknown
  or missing domains are ignored);
* masked reconstruction of both views (the decoder's job), weight ``method.rec_weight``.

``L = rec_weight * L_rec + contrast_weight * L_NT-Xent + domain_weight * L_domain``.

Negatives across DDP ranks: NT-Xent gathers the other ranks' projections as negatives in
multi-worker runs (:func:`raymim.methods.losses.nt_xent`, ``gather_distributed``); the probe
(rank 0 only) stays local.

``"simclr"`` is the contrastive part alone (no domain head), the baseline of the MPS-AMS
paper; it keeps the masked reconstruction term (set ``method.rec_weight=0`` for pure SimCLR,
which needs a batch of at least 2).

Example::

    >>> out = build_method("hssl", cfg)({"image": torch.rand(4, 1, 32, 32, 32),
    ...                                  "domain": ["site0", "site1", "site0", "site2"]})
    >>> out.metrics["loss_domain"], out.metrics["domain_acc"]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raymim.config import RaymimConfig
from raymim.methods.base import MethodOutput, register_method
from raymim.methods.losses import nt_xent
from raymim.methods.mae import MAE, first_case_id, input_label
from raymim.methods.strategies import BlockMasking
from raymim.models.heads import ProjectionHead


def augment_view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random view of x [N, C, D, H, W]: per-sample flips, intensity scale / shift, noise."""
    n = x.shape[0]
    out = x.clone()
    flips = torch.rand(n, 3, generator=generator) < 0.5
    for i in range(n):
        dims = [2 + a for a in range(3) if flips[i, a]]
        if dims:
            out[i] = out[i : i + 1].flip(dims)[0]
    scale = (1.0 + 0.1 * (torch.rand(n, 1, 1, 1, 1, generator=generator) - 0.5)).to(x)
    shift = (0.1 * (torch.rand(n, 1, 1, 1, 1, generator=generator) - 0.5)).to(x)
    # Light noise: the domain head must still see a site's own noise level and contrast. Drawn on
    # x's device unless a (host) generator is given: a volume of host noise is a host-bound copy.
    noise = 0.003 * (torch.randn(x.shape, generator=generator).to(x) if generator is not None
                     else torch.randn(x.shape, device=x.device, dtype=x.dtype))
    return out * scale + shift + noise


@register_method("hssl")
class HSSL(MAE):
    """Two masked views -> encoder -> decoder; NT-Xent + domain head + masked reconstruction."""

    use_domain = True

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__(config)
        m, mc = config.model, config.method
        self.proj = ProjectionHead(m.decoder_hidden_size, mc.proj_dim)
        self.domain_names: list[str] = list(mc.domains) if mc.domains else []
        self.fixed_domains = mc.domains is not None
        width = len(self.domain_names) if self.fixed_domains else mc.max_domains
        self.domain_head = nn.Linear(2 * m.hidden_size, max(width, 1)) if self.use_domain else None
        # Each view is masked MAE-style (random tokens, whatever method.mask_block says).
        self.mask_strategy = BlockMasking(tuple(self.grid), mc.mask_ratio, 1)

    # The domain vocabulary travels with the weights (a data-built one differs per dataset).
    def get_extra_state(self) -> dict[str, Any]:
        return {"domain_names": list(self.domain_names)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.domain_names = list(state.get("domain_names", self.domain_names))

    def domain_ids(self, domains: list[str | None] | None) -> list[int] | None:
        """Domain strings -> ids (-100 = ignored), on the host; grows the vocabulary when not fixed."""
        if not domains or self.domain_head is None:
            return None
        ids = []
        for d in domains:
            if d is not None and d not in self.domain_names and not self.fixed_domains:
                if len(self.domain_names) < self.domain_head.out_features:
                    self.domain_names.append(d)
            ids.append(self.domain_names.index(d) if d in self.domain_names else -100)
        return ids

    @staticmethod
    def pool(tokens: torch.Tensor) -> torch.Tensor:
        """[N, K, D] -> [N, 2D]: mean and std over tokens (a site's noise shows in the spread)."""
        return torch.cat([tokens.mean(dim=1), tokens.std(dim=1)], dim=-1)

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        mc = self.config.method
        imgs = self.fit_input(batch["image"])
        n = imgs.shape[0]
        views = torch.cat([augment_view(imgs), augment_view(imgs)])  # [2N, ...]
        tm = self.mask_strategy(views, batch, self.progress)
        rec = self.reconstruct(views, tm)  # latent [2N, K, hidden], decoder feats [2N, L, dec_hidden]
        loss_rec = rec.loss
        proj = self.proj(rec.feats.mean(dim=1))  # [2N, P]
        loss_con = nt_xent(proj[:n], proj[n:], mc.tau)
        loss = mc.rec_weight * loss_rec + mc.contrast_weight * loss_con
        metrics = {"loss_rec": loss_rec.detach(), "loss_contrast": loss_con.detach(),
                   "mask_ratio": tm.mask.mean().detach()}
        ids = self.domain_ids(batch.get("domain"))
        if self.domain_head is not None:
            loss_dom = loss.new_zeros(())
            if ids is not None and any(i >= 0 for i in ids):  # decided on the host, from the strings
                logits = self.domain_head(self.pool(rec.latent))  # [2N, D]
                target = torch.tensor(ids, device=imgs.device).repeat(2)
                loss_dom = F.cross_entropy(logits, target, ignore_index=-100)
                valid = (target >= 0).float()
                hits = (logits.argmax(1) == target).float() * valid
                metrics["domain_acc"] = (hits.sum() / valid.sum().clamp_min(1.0)).detach()
            loss = loss + mc.domain_weight * loss_dom
            metrics["loss_domain"] = loss_dom.detach()
        metrics["loss"] = loss.detach()
        label = f"view 1 (flips, intensity jitter) of a {input_label(batch['image'], imgs)}"
        visuals = self.reconstruction_visuals(views[:n], rec.pred[:n].detach(), tm.mask[:n], label=label,
                                              case_id=first_case_id(batch))
        return MethodOutput(loss, metrics, visuals)

    @torch.no_grad()
    def probe_loss(self, images: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor | None:
        """With a reconstruction term (``rec_weight > 0``): MAE's probe. Without one (SimCLR, or
        HSSL with ``rec_weight=0``, whose decoder never learns to reconstruct): NT-Xent at a fixed
        temperature of 0.2 between two fixed augmented views under the probe's fixed mask."""
        if self.config.method.rec_weight > 0:
            return super().probe_loss(images, ratio, seed)
        imgs = self.fit_input(images)
        n = imgs.shape[0]
        g = self.probe_generator(seed)
        views = torch.cat([augment_view(imgs.cpu(), g), augment_view(imgs.cpu(), g)]).to(imgs.device)
        tm = self.probe_mask(2 * n, ratio, seed, imgs.device)
        _, feats = self.forward_decoder(self.forward_encoder(views, tm), tm.ids_restore)
        proj = self.proj(feats.mean(dim=1)).float()
        return nt_xent(proj[:n], proj[n:], 0.2, gather_distributed=False)  # rank 0 alone

    @torch.no_grad()
    def predict_domain(self, image: torch.Tensor) -> list[str]:
        """Domain names predicted from the unmasked encoder (evaluation of the domain head)."""
        logits = self.domain_head(self.pool(self.encoder.forward_tokens(self.fit_input(image))))
        names = self.domain_names
        return [names[i] if i < len(names) else "?" for i in logits.argmax(1).tolist()]


@register_method("simclr")
class SimCLR(HSSL):
    """HSSL's contrastive part alone (NT-Xent on two views, no domain head)."""

    use_domain = False


__all__ = ["HSSL", "SimCLR", "nt_xent"]
