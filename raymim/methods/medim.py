"""MedIM: report-guided masked image modelling (Xie et al., adapted from 2D X-ray to 3D).

Reports come from the batch's ``report`` column (the phantom generator writes them; users
supply their own). A :class:`~raymim.models.text.ReportTokenizer` and a small trainable
:class:`~raymim.models.text.TextEncoder` turn them into token features; image patch keys are
the encoder's patch embeddings plus its position embeddings, projected to the text width.

* **KDM** (``method.medim_mode="kdm"``): the attention of the report's keyword tokens (organs,
  sides, findings; ``method.medim_vocab`` replaces the vocabulary) over the patches, averaged;
* **SDM** (``"sdm"``): the attention of one sentence (the first one naming a keyword), mean-pooled;
* masking (:mod:`raymim.masking.report_guided`): the most-attended patches, plus a
  ``method.medim_low_share`` share from the less-attended half; no report -> random masking,
  counted as ``no_report_frac``;
* alignment loss (weight ``method.medim_align_weight``), which trains the attention:
  word-patch: each keyword's attention-pooled patch feature must identify that keyword among
  the whole keyword vocabulary (InfoNCE with the other keywords as negatives, so the attention
  has to find patches that distinguish, e.g., the right kidney from the liver) + report-image:
  symmetric InfoNCE between pooled visible-token latents and pooled report features (batch).

``L = L_rec + medim_align_weight * (L_word + L_report)``.

Example::

    >>> out = build_method("medim", cfg)({"image": torch.rand(2, 1, 32, 32, 32),
    ...     "report": ["A 12 mm hypodense lesion in the right liver.", None]})
    >>> out.metrics["no_report_frac"]  # 0.5
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raymim.config import RaymimConfig
from raymim.masking.report_guided import mean_attention, patch_attention, report_guided_masking
from raymim.methods.base import MethodOutput, register_method
from raymim.methods.mae import MAE
from raymim.models.heads import ProjectionHead
from raymim.models.text import Encoded, ReportTokenizer, TextEncoder, load_keywords


def _info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / tau
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@register_method("medim")
class MedIM(MAE):
    """MAE whose masks follow report-to-patch attention, trained by an image-report alignment."""

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__(config)
        m, mc = config.model, config.method
        self.tokenizer = ReportTokenizer(load_keywords(mc.medim_vocab), mc.text_buckets, mc.text_max_len)
        self.text_encoder: nn.Module = TextEncoder(self.tokenizer.vocab_size, mc.text_dim, mc.text_layers,
                                                   max_len=mc.text_max_len)
        self.key_proj = nn.Linear(m.hidden_size, mc.text_dim)
        self.img_proj = ProjectionHead(m.hidden_size, mc.proj_dim)
        self.txt_proj = ProjectionHead(mc.text_dim, mc.proj_dim)
        self.kw_proto = nn.Embedding(len(self.tokenizer.keywords), mc.text_dim)

    def patch_keys(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, D, H, W] -> [N, L, text_dim]: patch embedding + position, projected."""
        tokens = self.encoder.embed_patches(imgs, None) + self.encoder.patch_embedding.position_embeddings
        return self.key_proj(tokens)

    def queries(self, enc: Encoded, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask-query features [M, Q, D] and validity [M, Q] for KDM (keywords) or SDM (a sentence)."""
        if self.config.method.medim_mode == "kdm":
            return feats, enc.keyword >= 0
        # SDM: the first sentence that names a keyword (else the first sentence), mean-pooled.
        named = (enc.keyword >= 0) & (enc.sentence >= 0)
        first = torch.where(named, enc.sentence, torch.full_like(enc.sentence, 10**6)).amin(1)
        first = torch.where(first == 10**6, torch.zeros_like(first), first)
        sel = (enc.sentence == first.unsqueeze(1)) & ~enc.padding
        pooled = (feats * sel.unsqueeze(-1)).sum(1) / sel.sum(1, keepdim=True).clamp_min(1)
        return pooled.unsqueeze(1), sel.any(1, keepdim=True)

    def report_attention(self, imgs: torch.Tensor, reports: list[str]) -> dict[str, torch.Tensor]:
        """Text features, keyword attention and the mask map for rows with a report."""
        enc = Encoded(*(t.to(imgs.device) for t in self.tokenizer(reports)))
        feats = self.text_encoder(enc.ids, enc.padding)  # [M, T, D]
        keys = self.patch_keys(imgs)  # [M, L, D]
        kw_valid = enc.keyword >= 0
        kw_attn = patch_attention(feats, keys, kw_valid)  # [M, T, L]
        q, q_valid = self.queries(enc, feats)
        attn_map = mean_attention(patch_attention(q, keys, q_valid), q_valid)  # [M, L]
        return {"enc": enc, "feats": feats, "keys": keys, "kw_attn": kw_attn, "kw_valid": kw_valid, "map": attn_map}

    def alignment_loss(self, r: dict[str, torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        """Word-patch InfoNCE over the keyword vocabulary + report-image InfoNCE over the batch."""
        tau = self.config.method.tau
        valid = r["kw_valid"]
        loss = latent.new_zeros(())
        if bool(valid.any()):
            pooled = torch.einsum("mtl,mld->mtd", r["kw_attn"], r["keys"])[valid]  # [W, D]
            logits = F.normalize(pooled, dim=-1) @ F.normalize(self.kw_proto.weight, dim=-1).t() / tau
            loss = loss + F.cross_entropy(logits, r["enc"].keyword[valid])
        if latent.shape[0] > 1:
            words = ~r["enc"].padding
            text = (r["feats"] * words.unsqueeze(-1)).sum(1) / words.sum(1, keepdim=True).clamp_min(1)
            loss = loss + _info_nce(self.img_proj(latent.mean(1)), self.txt_proj(text), tau)
        return loss

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        mc = self.config.method
        imgs = self.fit_input(batch["image"])
        n = imgs.shape[0]
        reports = batch.get("report") or [None] * n
        has = torch.tensor([isinstance(t, str) and bool(t.strip()) for t in reports], device=imgs.device)
        attn = torch.full((n, self.encoder.num_tokens), 1.0 / self.encoder.num_tokens, device=imgs.device)
        r = None
        if bool(has.any()):
            rows = has.nonzero().flatten()
            r = self.report_attention(imgs[rows], [reports[i] for i in rows.tolist()])
            attn[rows] = r["map"].detach()
        tm = report_guided_masking(attn, mc.mask_ratio, mc.medim_low_share, has)
        latent = self.forward_encoder(imgs, tm)
        pred, _ = self.forward_decoder(latent, tm.ids_restore)
        loss_rec = self.forward_loss(imgs, pred, tm.mask)
        loss_align = loss_rec.new_zeros(())
        if r is not None:
            loss_align = self.alignment_loss(r, latent[has])
        loss = loss_rec + mc.medim_align_weight * loss_align
        metrics = {"loss": float(loss.detach()), "loss_rec": float(loss_rec.detach()),
                   "loss_align": float(loss_align.detach()), "mask_ratio": float(tm.mask.mean()),
                   "no_report_frac": float(1.0 - has.float().mean())}
        return MethodOutput(loss, metrics, self.reconstruction_visuals(imgs, pred.detach(), tm.mask))


__all__ = ["MedIM"]
