"""HSSL: multi-domain pretraining, contrastive (NT-Xent) + domain classification; and plain SimCLR.

HSSL (seed paper): pool unlabelled scans from several domains (datasets, sites, body regions)
and pretrain an encoder-decoder with a contrastive loss plus a loss for *which domain* a sample
came from. Here, per crop:

* two augmented views (:func:`augment_view`: a random resized crop with per-axis flips,
  intensity scale / shift, Gaussian noise);
* NT-Xent (Chen et al., SimCLR, ICML 2020; temperature ``method.tau``) between the projected,
  mean-pooled *decoder* features of the two views (the encoder-decoder's features);
* domain classification: a linear head on the mean + std pooled encoder latent, cross-entropy
  against the batch's ``domain`` strings mapped to ids by ``method.domains`` or, when unset, by a
  vocabulary built from the data as seen (saved in the state dict, at most ``method.max_domains``;
  unknown or missing domains are ignored).

``L = contrast_weight * L_NT-Xent + domain_weight * L_domain (+ rec_weight * L_rec)``. By default
(``method.rec_weight = 0``) there is no reconstruction term, as the seed describes: the views are
encoded whole. Deviation (opt-in, ``rec_weight > 0``): each view is masked MAE-style at
``method.mask_ratio`` and the decoder also reconstructs the masked patches (an MAE term added to
HSSL's losses; the encoder then sees the visible tokens only).

``"simclr"`` is plain SimCLR, the baseline of the MPS-AMS paper: the same two augmented crops,
the encoder (no decoder, no masking) mean-pooled into a projection head, NT-Xent; no domain head,
no reconstruction (it reads ``tau`` and ``proj_dim`` only; a batch needs >= 2 samples for
negatives). Deviation: SimCLR's colour jitter / blur become 3D intensity scale / shift / noise.

Negatives across DDP ranks: NT-Xent gathers the other ranks' projections as negatives in
multi-worker runs (:func:`raymim.methods.losses.nt_xent`, ``gather_distributed``); the probe
(rank 0 only) stays local.

Example::

    >>> out = build_method("hssl", cfg)({"image": torch.rand(4, 1, 32, 32, 32),
    ...                                  "domain": ["site0", "site1", "site0", "site2"]})
    >>> out.metrics["loss_domain"], out.metrics["domain_acc"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raymim.config import RaymimConfig, check_positive
from raymim.methods.base import MethodOutput, PretrainMethod, ProjectionConfig, register_method
from raymim.methods.losses import nt_xent
from raymim.methods.mae import MAE, MaskedReconstructionConfig, first_case_id, input_label
from raymim.methods.strategies import BlockMasking
from raymim.models.heads import ProjectionHead

CROP_VOLUME = (0.5, 1.0)  # volume fraction of the random resized crop of a view (side: its cube root)


def augment_view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random view of x [N, C, D, H, W]: per sample a random resized crop (a box of
    ``CROP_VOLUME`` of the volume, resampled to the input size) with random flips per axis, then
    intensity scale / shift and noise. The crop parameters are drawn on the host and applied with
    one batched ``affine_grid`` / ``grid_sample`` (no read-back from the device)."""
    n = x.shape[0]
    lo, hi = CROP_VOLUME
    side = (lo + (hi - lo) * torch.rand(n, 1, generator=generator)) ** (1.0 / 3.0)  # [N, 1]
    flip = torch.where(torch.rand(n, 3, generator=generator) < 0.5, -1.0, 1.0)
    offset = (2.0 * torch.rand(n, 3, generator=generator) - 1.0) * (1.0 - side)
    theta = torch.cat([torch.diag_embed(side * flip), offset.unsqueeze(-1)], dim=-1).to(x)  # [N, 3, 4]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    scale = (1.0 + 0.1 * (torch.rand(n, 1, 1, 1, 1, generator=generator) - 0.5)).to(x)
    shift = (0.1 * (torch.rand(n, 1, 1, 1, 1, generator=generator) - 0.5)).to(x)
    # Light noise: the domain head must still see a site's own noise level and contrast. Drawn on
    # x's device unless a (host) generator is given: a volume of host noise is a host-bound copy.
    noise = 0.003 * (torch.randn(x.shape, generator=generator).to(x) if generator is not None
                     else torch.randn(x.shape, device=x.device, dtype=x.dtype))
    return out * scale + shift + noise


def view_visuals(imgs: torch.Tensor, views: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """Panels of sample 0: the network ``input`` and its two augmented views (``view1``, ``view2``)."""
    return {"input": PretrainMethod.panel(imgs), "view1": PretrainMethod.panel(views[:n]),
            "view2": PretrainMethod.panel(views[n:])}


@dataclass
class HSSLConfig(ProjectionConfig, MaskedReconstructionConfig):
    """HSSL's ``method`` section (``name: hssl``): NT-Xent (``tau``, ``proj_dim``), the domain head,
    the loss weights, and MAE's reconstruction fields for the opt-in ``rec_weight > 0`` term."""

    domains: list[str] | None = None  # domain vocabulary; None: built from the data as seen
    max_domains: int = 16  # domain-head width when `domains` is None
    contrast_weight: float = 1.0
    domain_weight: float = 1.0
    rec_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("method.max_domains", self.max_domains)
        for name in ("contrast_weight", "domain_weight", "rec_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"method.{name} should be >= 0, got {getattr(self, name)}.")
        if self.domains is not None and len(set(self.domains)) != len(self.domains):
            raise ValueError(f"method.domains should hold distinct names, got {self.domains}.")

    def inert_fields(self) -> set[str]:
        no_rec = {"mask_ratio", "norm_pix_loss", "recon_loss"}  # no reconstruction term: the views are not masked
        return super().inert_fields() | (no_rec if self.rec_weight == 0 else set())


@dataclass
class SimCLRConfig(ProjectionConfig):
    """SimCLR's ``method`` section (``name: simclr``): the NT-Xent temperature and projection width."""


@register_method("hssl", config=HSSLConfig)
class HSSL(MAE):
    """Two augmented views -> encoder -> decoder; NT-Xent + domain head (+ masked reconstruction)."""

    use_domain = True
    use_decoder = True

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__(config)
        m, mc = config.model, config.method
        if not self.use_decoder:
            self.decoder = None
        self.proj = ProjectionHead(m.decoder_hidden_size if self.use_decoder else m.hidden_size, mc.proj_dim)
        self.domain_names: list[str] = []
        self.fixed_domains = False
        self.domain_head: nn.Linear | None = None
        if self.use_domain:
            self.domain_names = list(mc.domains) if mc.domains else []
            self.fixed_domains = mc.domains is not None
            width = len(self.domain_names) if self.fixed_domains else mc.max_domains
            self.domain_head = nn.Linear(2 * m.hidden_size, max(width, 1))

    def configure_masking(self, mc: HSSLConfig) -> None:
        """MAE's loss kind; with a reconstruction term each view is masked MAE-style (random tokens)."""
        self.loss_kind = "mse" if mc.recon_loss == "auto" else mc.recon_loss
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

    def features(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The features the projection head pools: the decoder's [N, L, dec_hidden] (HSSL) or the encoder's latent."""
        return self.decoder(latent, ids_restore)[1] if self.decoder is not None else latent

    def reconstructs(self) -> bool:
        return self.decoder is not None and self.config.method.rec_weight > 0

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        mc = self.config.method
        imgs = self.fit_input(batch["image"])
        n = imgs.shape[0]
        views = torch.cat([augment_view(imgs), augment_view(imgs)])  # [2N, ...]
        metrics: dict[str, torch.Tensor] = {}
        if self.reconstructs():
            tm = self.mask_strategy(views, batch, self.progress)
            rec = self.reconstruct(views, tm)  # latent [2N, K, hidden], decoder feats [2N, L, dec_hidden]
            latent, feats = rec.latent, rec.feats
            metrics.update(loss_rec=rec.loss.detach(), mask_ratio=tm.mask.mean().detach())
            label = f"view 1 (crop, flips, intensity jitter) of a {input_label(batch['image'], imgs)}"
            visuals = self.reconstruction_visuals(views[:n], rec.pred[:n].detach(), tm.mask[:n], label=label,
                                                  case_id=first_case_id(batch))
        else:
            latent = self.encoder.forward_tokens(views)  # [2N, L, hidden], every token
            ids = torch.arange(latent.shape[1], device=latent.device).expand(latent.shape[0], -1)
            feats = self.features(latent, ids)
            metrics["mask_ratio"] = latent.new_zeros(()).detach()
            visuals = view_visuals(imgs.detach(), views.detach(), n)
        proj = self.proj(feats.mean(dim=1))  # [2N, P]
        loss_con = nt_xent(proj[:n], proj[n:], mc.tau)
        metrics["loss_contrast"] = loss_con.detach()
        if self.domain_head is None:  # plain SimCLR
            metrics["loss"] = loss_con.detach()
            return MethodOutput(loss_con, metrics, visuals)
        loss = mc.contrast_weight * loss_con
        if self.reconstructs():
            loss = loss + mc.rec_weight * rec.loss
        ids = self.domain_ids(batch.get("domain"))
        loss_dom = loss.new_zeros(())
        if ids is not None and any(i >= 0 for i in ids):  # decided on the host, from the strings
            logits = self.domain_head(self.pool(latent))  # [2N, D]
            target = torch.tensor(ids, device=imgs.device).repeat(2)
            loss_dom = F.cross_entropy(logits, target, ignore_index=-100)
            valid = (target >= 0).float()
            hits = (logits.argmax(1) == target).float() * valid
            metrics["domain_acc"] = (hits.sum() / valid.sum().clamp_min(1.0)).detach()
        loss = loss + mc.domain_weight * loss_dom
        metrics.update(loss_domain=loss_dom.detach(), loss=loss.detach())
        return MethodOutput(loss, metrics, visuals)

    @torch.no_grad()
    def probe_loss(self, images: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor | None:
        """With a reconstruction term (HSSL, ``rec_weight > 0``): MAE's probe. Without one (the
        default HSSL, SimCLR): NT-Xent at a fixed temperature of 0.2 between two fixed augmented
        views under the probe's fixed token mask at ``ratio`` (a harder, deterministic task that
        does not depend on the swept hyperparameters)."""
        if self.reconstructs():
            return super().probe_loss(images, ratio, seed)
        imgs = self.fit_input(images)
        n = imgs.shape[0]
        g = self.probe_generator(seed)
        views = torch.cat([augment_view(imgs.cpu(), g), augment_view(imgs.cpu(), g)]).to(imgs.device)
        tm = self.probe_mask(2 * n, ratio, seed, imgs.device)
        feats = self.features(self.forward_encoder(views, tm), tm.ids_restore)
        proj = self.proj(feats.mean(dim=1)).float()
        return nt_xent(proj[:n], proj[n:], 0.2, gather_distributed=False)  # rank 0 alone

    @torch.no_grad()
    def predict_domain(self, image: torch.Tensor) -> list[str]:
        """Domain names predicted from the unmasked encoder (evaluation of the domain head)."""
        logits = self.domain_head(self.pool(self.encoder.forward_tokens(self.fit_input(image))))
        names = self.domain_names
        return [names[i] if i < len(names) else "?" for i in logits.argmax(1).tolist()]


@register_method("simclr", config=SimCLRConfig)
class SimCLR(HSSL):
    """Plain SimCLR: two augmented crops -> encoder -> mean pool -> projection head -> NT-Xent."""

    use_domain = False
    use_decoder = False

    def configure_masking(self, mc: SimCLRConfig) -> None:
        """Nothing to configure: SimCLR neither masks nor reconstructs."""


__all__ = ["HSSL", "HSSLConfig", "SimCLR", "SimCLRConfig", "augment_view", "nt_xent"]
