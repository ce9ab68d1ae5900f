"""MedIM: report-guided masked image modelling (Xie et al., MICCAI 2023), adapted from 2D X-ray to 3D.

Reports come from the batch's ``report`` column (the phantom generator writes them; users
supply their own). A :class:`~raymim.models.text.ReportTokenizer` and a small trainable
:class:`~raymim.models.text.TextEncoder` turn them into token features, the mask queries:

* **KDM** (``method.medim_mode="kdm"``): the report's keyword tokens (organs, sides, findings;
  ``method.medim_vocab`` replaces the vocabulary), their attention maps averaged;
* **SDM** (``"sdm"``): one sentence (the first one naming a keyword), its tokens mean-pooled.

**The patch keys are where a patch is, nothing else.** A key is MedIM's own fixed 3D sin-cos
code of the patch's position on the token grid, through a trainable projection (``key_proj``).
So **the attention map is image-independent by design**: for a report it is an atlas over the
token grid of where its words point, the same for every image (two images with the same report
get the same mask, up to the random low-attention share). The image enters only through the
batch's MPS lesion prior (the ``lesion_prob`` column, ``prepare.lesion_prior``) under that atlas,
in the alignment loss below. Why: the variants whose keys read the image (patch embedding plus
position, encoder tokens, intensity statistics, the prior added to the keys) did not ground on
phantoms; the held-out alignment stayed at chance or fell through site cues, and a report's masks
did not cover its named organ more than another report's did
(``bench/results/medim_grounding_2026-11-23.md``). Why MedIM's own code, not the encoder's
learned position embeddings: through those the alignment loss would train the encoder's position
embeddings, and the reconstruction loss would move the masks. With the fixed code the word
attention reads only the text encoder and ``key_proj``, which the reconstruction loss does not
reach. An atlas assumes crops that cover comparable anatomy: whole-volume crops
(``prepare.crops_per_volume=1`` with the crop the size of the volume, as in
``jobs/configs/medim-tiny.yaml``) or registered scans; random sub-crops make it meaningless, and
so do spatial flips and rotations of the crops (:mod:`raymim.data.augment`): a flipped crop puts
the right liver where the atlas expects the left side (not measured).

* Masking (:mod:`raymim.masking.report_guided`): the most-attended patches, plus a
  ``method.medim_low_share`` share drawn from the less-attended half; rows without a report are
  masked at random, counted as ``no_report_frac``.
* **Word-region (finding) loss**: a *finding* is one sentence of one report that names keywords
  ("A 12 mm hypodense lesion in the right liver." -> {hypodense, lesion, right, liver}). Its score
  for image ``j`` of the batch is the mean over its queries ``w`` of the lesion prior under the
  query's attention, ``exp(s) * sum_l a_wl p_jl / tau`` (``s`` a learned logit scale, starting at
  20 tau). A multi-positive InfoNCE (:func:`finding_loss`) raises the softmax mass of every image
  whose report holds a sentence with the same keyword set, its own included, over the other
  images. The loss is lowered only by words that look where *their* images are lesion-like and
  the others are not: the named organ and side. It trains the text encoder, ``key_proj`` and
  ``s``; no encoder parameter.
* **Report-image loss**: a symmetric InfoNCE between the pooled visible-token latents and the
  pooled report features over the batch (this one trains the encoder).

Both alignment terms need at least two reports in the batch (the other rows are the negatives).
``L = L_rec + medim_align_weight * (L_finding + L_report_image)``. A batch holding a report
without the ``lesion_prob`` column raises (prepare the shards with ``prepare.lesion_prior=true``).

Checked on phantoms by ``tests/methods/test_medim_grounding.py``: after a short training of the
finding loss, held-out reports mask the organ + side they name more often than chance, more often
than untrained, and more often than a same-site report naming other organs does.

Deviations from the paper: 3D volumes; a hashed word tokenizer and a small text encoder trained
from scratch instead of a pretrained clinical BERT (no downloads; ``method.text_encoder`` can be
replaced); the attention is over patch positions, not image features, and the word-region loss
scores the MPS lesion prior under it instead of comparing image and text features (both for the
grounding reasons above); a finding-level multi-positive loss, so that two reports with the same
finding are not each other's negatives.

Reconstruction reuses :meth:`MAE.reconstruct <raymim.methods.mae.MAE.reconstruct>`; the mask is
computed inline rather than by a :mod:`~raymim.methods.strategies` callable because the same
attention also feeds the alignment loss. Which rows hold a report, which queries are valid and
which findings the reports share are decided on the host from the report strings and the
tokenizer's (host) output, so the forward reads nothing back from the accelerator. The
contrastive terms come from :mod:`raymim.methods.losses` and stay *local* to each rank in
multi-worker runs (``gather_distributed=False``): the number of report rows differs between
ranks, and a rank without two reports skips the term, which a collective cannot do.

Example::

    >>> out = build_method("medim", cfg)({"image": torch.rand(2, 1, 32, 32, 32),
    ...     "report": ["A 12 mm hypodense lesion in the right liver.", None],
    ...     "lesion_prob": torch.rand(2, 4, 4, 4)})
    >>> float(out.metrics["no_report_frac"])  # 0.5
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import nn

from raymim.config import RaymimConfig, check_choice, check_positive, check_range
from raymim.masking.report_guided import mean_attention, patch_attention, report_guided_masking
from raymim.masking.selection import prior_token_scores
from raymim.methods.base import MethodOutput, ProjectionConfig, host_scalar, register_method
from raymim.methods.losses import info_nce, multi_positive_info_nce
from raymim.methods.mae import MAE, MaskedReconstructionConfig, first_case_id, input_label
from raymim.models.heads import ProjectionHead
from raymim.models.text import Encoded, ReportTokenizer, TextEncoder, load_keywords

POSITION_CODE_DIM = 96  # width of MedIM's fixed sin-cos position code (16 frequencies per axis)
MISSING_PRIOR = ("MedIM needs the batch's lesion_prob column (the MPS lesion prior) for its report rows: "
                 "prepare the shards with prepare.lesion_prior=true (see jobs/configs/medim-tiny.yaml).")


def position_code(grid: tuple[int, ...] | list[int], dim: int = POSITION_CODE_DIM) -> torch.Tensor:
    """The fixed 3D sin-cos code of every token of ``grid`` (encoder token order): [L, dim]."""
    with warnings.catch_warnings():  # MONAI 1.6 calls torch.meshgrid without `indexing` (torch warns)
        warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release", category=UserWarning)
        return build_sincos_position_embedding([int(g) for g in grid], dim, 3).detach()[0].clone()


def word_region_sims(attn: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """attn [M, Q, L] (each report's query maps), prior [M, L] (each image's lesion_prob tokens) ->
    [M, M, Q]: the lesion prior of image j under query q of report i, ``sum_l a_iql p_jl``."""
    return torch.einsum("iql,jl->ijq", attn, prior.to(attn.dtype))


def finding_groups(keyword: torch.Tensor, sentence: torch.Tensor, q_sentence: torch.Tensor,
                   q_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group a batch's mask queries by finding (one sentence of one report) and find which images share it.

    keyword / sentence [M, T]: the tokenizer's keyword index and sentence index of every token;
    q_sentence / q_valid [M, Q]: the sentence of every mask query and whether it is real.
    A finding is identified by the *set* of keywords its sentence holds ("A 12 mm hypodense
    lesion in the right liver." -> {hypodense, lesion, right, liver}); sentences without keywords
    are no findings. -> (row [G]: the report of each finding, weight [G, Q]: its queries,
    positive [G, M]: images whose report holds a sentence with the same keyword set, its own included).
    """
    sets: list[dict[int, frozenset[int]]] = []
    for kw_row, s_row in zip(keyword.tolist(), sentence.tolist(), strict=True):
        per: dict[int, set[int]] = {}
        for k, s in zip(kw_row, s_row, strict=True):
            if k >= 0 and s >= 0:
                per.setdefault(s, set()).add(k)
        sets.append({s: frozenset(v) for s, v in per.items()})
    held = [set(d.values()) for d in sets]
    rows, weights, positives = [], [], []
    for i, (qs_row, v_row) in enumerate(zip(q_sentence.tolist(), q_valid.tolist(), strict=True)):
        for s in sorted({s for s, v in zip(qs_row, v_row, strict=True) if v and s in sets[i]}):
            rows.append(i)
            weights.append([float(v and qs == s) for qs, v in zip(qs_row, v_row, strict=True)])
            positives.append([j == i or sets[i][s] in held[j] for j in range(len(sets))])
    m, q = q_valid.shape
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, q), torch.zeros(0, m, dtype=torch.bool)
    return torch.tensor(rows), torch.tensor(weights), torch.tensor(positives, dtype=torch.bool)


def finding_loss(sims: torch.Tensor, row: torch.Tensor, weight: torch.Tensor, positive: torch.Tensor,
                 tau: float) -> torch.Tensor:
    """Multi-positive InfoNCE of findings against the batch's images.

    sims [M, M, Q] (:func:`word_region_sims`, times the logit scale), row / weight / positive from
    :func:`finding_groups`. A finding's score for image j is the mean of its queries' sims over
    ``tau``; the loss raises the softmax mass of the images that hold the same finding over the
    others. Findings whose images are all positives have nothing to tell apart and are left out.
    -> mean loss (0 when none is left).
    """
    if row.numel() == 0:
        return sims.new_zeros(())
    w = weight.to(sims.dtype)
    scores = (sims[row] * w.unsqueeze(1)).sum(-1) / w.sum(-1, keepdim=True).clamp_min(1.0) / tau  # [G, M]
    return multi_positive_info_nce(scores, positive)


@dataclass
class MedIMConfig(ProjectionConfig, MaskedReconstructionConfig):
    """MedIM's ``method`` section (``name: medim``): MAE's reconstruction fields (the mask comes
    from the reports, so no ``mask_block``), the report-guided masking and the text encoder;
    ``tau`` / ``proj_dim`` are the alignment losses' temperature and projection width."""

    # "kdm" keyword attention or "sdm" one sentence's attention.
    medim_mode: str = "kdm"
    medim_low_share: float = 0.1  # share of masked tokens drawn from low-attention patches
    medim_vocab: str | None = None  # keyword file (one term a line); None: the built-in vocabulary
    medim_align_weight: float = 1.0  # weight of the alignment losses (finding + report-image)
    text_dim: int = 96
    text_layers: int = 1
    text_max_len: int = 64
    text_buckets: int = 4096  # hashed word-piece vocabulary of the built-in tokenizer

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method.medim_mode", self.medim_mode, ("kdm", "sdm"))
        check_range("method.medim_low_share", self.medim_low_share, 0.0, 1.0, lo_open=False, hi_open=False)
        for name in ("text_dim", "text_layers", "text_max_len", "text_buckets"):
            check_positive(f"method.{name}", getattr(self, name))
        if self.medim_align_weight < 0:
            raise ValueError(f"method.medim_align_weight should be >= 0, got {self.medim_align_weight}.")


@register_method("medim", config=MedIMConfig)
class MedIM(MAE):
    """MAE whose masks follow a per-keyword positional atlas, trained against the MPS lesion prior."""

    def configure_masking(self, mc: MedIMConfig) -> None:
        """MAE's loss kind; no mask strategy: :meth:`forward` draws the report-guided mask, whose
        attention also feeds the alignment loss."""
        self.loss_kind = "mse" if mc.recon_loss == "auto" else mc.recon_loss

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__(config)
        mc = config.method
        self.tokenizer = ReportTokenizer(load_keywords(mc.medim_vocab), mc.text_buckets, mc.text_max_len)
        self.text_encoder: nn.Module = TextEncoder(self.tokenizer.vocab_size, mc.text_dim, mc.text_layers,
                                                   max_len=mc.text_max_len)
        # Fixed (not a parameter, not saved): the keys' only input.
        self.register_buffer("position", position_code(self.grid), persistent=False)
        self.key_proj = nn.Linear(POSITION_CODE_DIM, mc.text_dim)
        # The finding score is the attended lesion_prob times exp(prior_scale) / tau; it starts at 20x.
        self.prior_scale = nn.Parameter(torch.tensor(math.log(20.0 * mc.tau)))
        self.img_proj = ProjectionHead(config.model.hidden_size, mc.proj_dim)
        self.txt_proj = ProjectionHead(mc.text_dim, mc.proj_dim)

    def patch_keys(self) -> torch.Tensor:
        """The keys of the word attention [1, L, text_dim]: the projected position code, the same for every image."""
        return self.key_proj(self.position).unsqueeze(0)

    def prior_tokens(self, prob: torch.Tensor) -> torch.Tensor:
        """The batch's ``lesion_prob`` [N, L'] (or [N, d, h, w]) on this model's token grid: [N, L]."""
        return prior_token_scores(prob, self.grid)

    def query_masks(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Validity [M, Q] and sentence index [M, Q] of the mask queries, and (SDM) the tokens [M, T]
        each sentence query pools; pure functions of the tokenizer output, so the host copy of
        ``enc`` gives them without reading the accelerator."""
        if self.config.method.medim_mode == "kdm":
            return enc.keyword >= 0, enc.sentence, None
        # SDM: the first sentence that names a keyword (else the first sentence), mean-pooled.
        named = (enc.keyword >= 0) & (enc.sentence >= 0)
        first = torch.where(named, enc.sentence, torch.full_like(enc.sentence, 10**6)).amin(1)
        first = torch.where(first == 10**6, torch.zeros_like(first), first)
        sel = (enc.sentence == first.unsqueeze(1)) & ~enc.padding
        return sel.any(1, keepdim=True), first.unsqueeze(1), sel

    def report_attention(self, reports: list[str], device: torch.device | str = "cpu") -> dict[str, Any]:
        """Text features, mask queries and their maps over the token grid for ``reports`` (and
        ``host``, the tokenizer output on the host, for the host-side bookkeeping). No image:
        ``attn`` [M, Q, L] (one map per query) and ``map`` [M, L] (their mean, the mask map)."""
        host = Encoded(*self.tokenizer(reports))
        enc = Encoded(*(t.to(device) for t in host))
        feats = self.text_encoder(enc.ids, enc.padding)  # [M, T, D]
        valid, _, sel = self.query_masks(enc)
        q = feats
        if sel is not None:  # SDM: one query, the sentence's mean token feature
            q = ((feats * sel.unsqueeze(-1)).sum(1) / sel.sum(1, keepdim=True).clamp_min(1)).unsqueeze(1)
        keys = self.patch_keys().expand(len(reports), -1, -1)
        attn = patch_attention(q, keys, valid)  # [M, Q, L]
        return {"enc": enc, "host": host, "feats": feats, "attn": attn, "map": mean_attention(attn, valid)}

    def local_loss(self, r: dict[str, Any], prior: torch.Tensor) -> torch.Tensor:
        """The finding loss of the reports of ``r`` (:meth:`report_attention`) against their images'
        lesion prior tokens ``prior`` [M, L] (:meth:`prior_tokens`)."""
        host = r["host"]
        q_valid, q_sentence, _ = self.query_masks(host)
        # Findings are grouped on the host (from the tokenizer output), then their indices copied over.
        groups = finding_groups(host.keyword, host.sentence, q_sentence, q_valid)
        sims = word_region_sims(r["attn"], prior) * self.prior_scale.exp()
        return finding_loss(sims, *(t.to(sims.device) for t in groups), self.config.method.tau)

    def global_loss(self, r: dict[str, Any], latent: torch.Tensor) -> torch.Tensor:
        """Report-image InfoNCE between the pooled visible latents [M, K, hidden] and the pooled report features."""
        words = ~r["enc"].padding
        text = (r["feats"] * words.unsqueeze(-1)).sum(1) / words.sum(1, keepdim=True).clamp_min(1)
        return info_nce(self.img_proj(latent.mean(1)), self.txt_proj(text), self.config.method.tau,
                        gather_distributed=False)

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        mc = self.config.method
        imgs = self.fit_input(batch["image"])
        n = imgs.shape[0]
        reports = batch.get("report") or [None] * n
        has_report = [isinstance(t, str) and bool(t.strip()) for t in reports]  # decided on the host
        report_rows = [i for i, h in enumerate(has_report) if h]
        has = torch.tensor(has_report, device=imgs.device)
        attn = torch.full((n, self.encoder.num_tokens), 1.0 / self.encoder.num_tokens, device=imgs.device)
        r = rows = None
        if report_rows:
            if batch.get("lesion_prob") is None:
                raise ValueError(MISSING_PRIOR)
            rows = torch.tensor(report_rows, device=imgs.device)
            r = self.report_attention([reports[i] for i in report_rows], imgs.device)
            attn = attn.index_copy(0, rows, r["map"].detach().float())  # bf16 under autocast
        tm = report_guided_masking(attn, mc.mask_ratio, mc.medim_low_share, has)
        rec = self.reconstruct(imgs, tm)
        loss_rec = rec.loss
        loss_local = loss_global = loss_rec.new_zeros(())
        if r is not None and len(report_rows) > 1:  # the other report rows are the negatives
            prob = batch["lesion_prob"]
            prior = self.prior_tokens(prob.index_select(0, rows.to(prob.device)).to(imgs.device))
            loss_local = self.local_loss(r, prior)
            loss_global = self.global_loss(r, rec.latent.index_select(0, rows))
        loss_align = loss_local + loss_global
        loss = loss_rec + mc.medim_align_weight * loss_align
        metrics = {"loss": loss.detach(), "loss_rec": loss_rec.detach(), "loss_align": loss_align.detach(),
                   "loss_local": loss_local.detach(), "loss_global": loss_global.detach(),
                   "mask_ratio": tm.mask.mean().detach(),
                   "no_report_frac": host_scalar(1.0 - len(report_rows) / n)}
        visuals = self.reconstruction_visuals(imgs, rec.pred.detach(), tm.mask, label=input_label(batch["image"], imgs),
                                              case_id=first_case_id(batch))
        return MethodOutput(loss, metrics, visuals)


__all__ = ["MISSING_PRIOR", "MedIM", "MedIMConfig", "finding_groups", "finding_loss", "position_code",
           "word_region_sims"]
