"""MedIM: report-guided masked image modelling (Xie et al., MICCAI 2023, adapted from 2D X-ray to 3D).

Reports come from the batch's ``report`` column (the phantom generator writes them; users
supply their own). A :class:`~raymim.models.text.ReportTokenizer` and a small trainable
:class:`~raymim.models.text.TextEncoder` turn them into token features; image patch keys are
the encoder's patch embeddings plus position (or its tokens, ``method.medim_keys``), projected
to the text width.

* **KDM** (``method.medim_mode="kdm"``): the attention of the report's keyword tokens (organs,
  sides, findings; ``method.medim_vocab`` replaces the vocabulary) over the patches, averaged;
* **SDM** (``"sdm"``): the attention of one sentence (the first one naming a keyword), mean-pooled;
* masking (:mod:`raymim.masking.report_guided`): the most-attended patches, plus a
  ``method.medim_low_share`` share from the less-attended half; no report -> random masking,
  counted as ``no_report_frac``;
* alignment loss (weight ``method.medim_align_weight``), which trains that attention:

  - **local (word-region)**, after GLoRIA (Huang et al., "GLoRIA: A Multimodal Global-Local
    Representation Learning Framework for Label-efficient Medical Image Recognition", ICCV 2021):
    every mask query ``q_iw`` of report ``i`` (its keywords, or its sentence in SDM) attends
    over the patch keys of *every* image ``j`` of the batch, ``c_ijw = sum_l a_ijwl k_jl``; the
    report-image score ``S_ij`` is the mean over the queries of ``cos(q_iw, c_ijw)`` and a
    symmetric InfoNCE on ``S / tau`` makes report ``i`` pick image ``i``. Only an attended region
    that holds what tells *this* image from the others (on the phantoms: the lesion in the
    named organ and side) lowers the loss; an image-independent attention gives every image
    the same score (chance). The earlier "identify the keyword among the vocabulary" loss was
    solved by attending to any fixed, image-independent set of positions.
  - **global (report-image)**: symmetric InfoNCE between pooled visible-token latents and
    pooled report features over the batch.

  Both need at least two reports in the batch (the other reports are the negatives).

Patch keys (``method.medim_keys``): ``"embed"`` (default, as before) is the patch embedding plus
position, projected; ``"tokens"`` runs the encoder over all tokens of the unmasked image (with
gradients, as GLoRIA trains its image encoder through the local loss): contextual, non-linear
features, at the cost of one more encoder pass over all tokens; ``"stats"`` adds projected
per-patch intensity statistics (:func:`patch_statistics`: mean, std, deviation from the
neighbourhood and its absolute value, z-scored per image) to ``"embed"``: polarity-free local
contrast that a linear patch embedding cannot compute, for almost no cost; ``"prior"`` adds a
projection of the batch's MPS ``lesion_prob`` column (``prepare.lesion_prior``; resampled to the
token grid, rows without it counted as ``medim_prior_missing``) to ``"embed"``;
``"prior_position"`` keeps only the position embedding and the ``lesion_prob`` term: where a patch
is and how lesion-like it is, no other image content (the words can then only learn *where* to
look for *lesion-like* patches, not site or fingerprint cues); ``"position"`` keeps only the
position: each word's attention is one learned map, the same in every image (an anatomical atlas
of the words, for data whose crops are roughly aligned).

Local loss (``method.medim_local``): ``"report"`` (default) is the GLoRIA diagonal InfoNCE above;
``"finding"`` scores each finding (one sentence of one report, its keyword queries averaged)
against every image of the batch and counts as positives all images whose report holds a
sentence with the same keyword set ("nodule left lung" in two reports: both images are
positives, whatever the sizes in mm), a multi-positive InfoNCE (:func:`finding_loss`). The
report-level loss treats those shared findings as negatives and is only lowered by what makes a
report unique (on the phantoms, sizes and site).

Region values (``method.medim_values``): ``"keys"`` (default, GLoRIA) pools the keys themselves;
``"separate"`` pools their own projection of the tokens, so that a term shared by every image's
attended region (the prior) is not what the words are compared with; ``"prior"`` pools the keys
plus the ``lesion_prob`` term; ``"prior_score"`` makes the attended ``lesion_prob`` itself the
score (one channel, no cosine with the query), times a learned logit scale ``exp(prior_scale)``
that starts at 20 tau. With ``"position"`` keys, ``"prior_score"`` values and the finding loss, a
finding's score for an image is how lesion-like the image is where the finding's words look, so
the words learn to look where their findings are: the setting with which the named organ and
side drive the mask on held-out phantoms (below). With ``"prior"`` values that score passes
through a cosine with the query beside the image-independent key term, and the gradient that
moves the attention is weak and seed-dependent.

Negatives (``method.medim_negatives``): ``"batch"`` (default) uses every other report / image of
the batch; ``"domain"`` keeps only pairs of the same ``domain`` column, so that site cues (report
templates, lesion sizes in mm, scanner noise and field of view) cannot lower the loss. A row
alone in its domain has no negatives and adds no alignment loss.

Grounding, measured (``bench/bench_medim_grounding.py``, bench/RESULTS.md "MedIM grounding" and
its follow-ups). With the default ``"embed"`` keys, and with ``"tokens"``, ``"stats"`` and
``"prior"`` keys, grounding is not shown on phantoms: the held-out word-region loss either stays
at chance or falls through a site shortcut (sizes in mm and scanner cues), and a report's own
masks do not cover its named organ more than a same-site shuffled report's. The image side (soft
tissue lesions 0.01-0.04 above their organ) is what a short CPU run does not learn, and longer H100
runs memorise their pools. ``"prior_position"`` keys with the finding loss give the first held-out
effect (finding loss 1.38 -> 1.16), but the prior in the keys already puts untrained masks on the
lesions. ``"position"`` keys with ``"prior"`` values, the finding loss and tau 0.1 ground the
words on a 960-phantom pool for some seeds (fourth follow-up). **``"position"`` keys with
``"prior_score"`` values, the finding loss and tau 0.1 ground them for every seed tried** (fifth
follow-up; ``jobs/configs/medim-grounded-tiny.yaml``; ``tests/methods/test_medim_grounding.py``):
untrained, a report masks its named organ + side at about chance (0.6-1.2x at ratio 0.1); after
300 steps of the word-region loss on a 192-phantom pool, a held-out report masks it 2.4-2.8x as
often as chance and 1.6-1.9x as often as a same-site report naming other organs does (three
seeds, 48 held-out 64^3 phantoms). The position keys assume crops that cover comparable anatomy
(whole volumes, registered scans).

``L = L_rec + medim_align_weight * (L_local + L_global)``.

Reconstruction reuses :meth:`MAE.reconstruct <raymim.methods.mae.MAE.reconstruct>`; the mask
is computed inline rather than by a :mod:`~raymim.methods.strategies` callable because the same
attention also feeds the alignment loss. Which rows hold a report, which queries are valid and
which findings the reports share are decided on the host from the report strings and the
tokenizer's (host) output, so the forward reads nothing back from the accelerator. The
contrastive terms come from :mod:`raymim.methods.losses` and stay *local* to each rank in
multi-worker runs (``gather_distributed=False``): the number of report rows differs between
ranks, and a rank without two reports skips the term, which a collective cannot do.

Example::

    >>> out = build_method("medim", cfg)({"image": torch.rand(2, 1, 32, 32, 32),
    ...     "report": ["A 12 mm hypodense lesion in the right liver.", None]})
    >>> float(out.metrics["no_report_frac"])  # 0.5
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raymim.config import RaymimConfig
from raymim.masking.report_guided import mean_attention, patch_attention, report_guided_masking
from raymim.masking.selection import prior_token_scores
from raymim.methods.base import MethodOutput, host_scalar, register_method
from raymim.methods.losses import info_nce, multi_positive_info_nce, symmetric_ce
from raymim.methods.mae import MAE, first_case_id, input_label
from raymim.models.heads import ProjectionHead
from raymim.models.text import Encoded, ReportTokenizer, TextEncoder, load_keywords

PRIOR_KEYS = ("prior", "prior_position")  # medim_keys values that add the batch's lesion_prob to the keys
POSITION_KEYS = ("position", "prior_position")  # medim_keys values without the patch embedding


def reads_prior(method_config: Any) -> bool:
    """Whether MedIM reads the batch's ``lesion_prob`` column (prior keys or prior values)."""
    return method_config.medim_keys in PRIOR_KEYS or method_config.medim_values in ("prior", "prior_score")


def _info_nce(a: torch.Tensor, b: torch.Tensor, tau: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """MedIM's report-image loss: :func:`raymim.methods.losses.info_nce`, local to the rank."""
    return info_nce(a, b, tau, allowed, gather_distributed=False)


_symmetric_ce = symmetric_ce  # the word-region loss on a score matrix (raymim.methods.losses)


def patch_statistics(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, D, H, W] -> [N, L, 4C] per-patch (mean, std, mean - 3^3-neighbourhood mean, its absolute value),
    z-scored over each image's patches; tokens in the encoder's (d, h, w) order.

    Non-linear, polarity-free local contrast that a linear patch embedding cannot compute: a
    hypodense and a hyperdense lesion both stand out in ``std`` and ``|dev|``.
    """
    mean = F.avg_pool3d(imgs, patch)
    std = (F.avg_pool3d(imgs * imgs, patch) - mean * mean).clamp_min(0.0).sqrt()
    dev = mean - F.avg_pool3d(mean, 3, stride=1, padding=1, count_include_pad=False)
    feats = torch.cat([mean, std, dev, dev.abs()], 1).flatten(2).transpose(1, 2)  # [N, L, 4C]
    return (feats - feats.mean(1, keepdim=True)) / feats.std(1, keepdim=True).clamp_min(1e-6)


def same_domain(domains: list[Any] | None, device: torch.device | None = None) -> torch.Tensor | None:
    """[n, n] bool: pairs from the same domain (a missing domain counts as one more domain); None if all alike."""
    if domains is None:
        return None
    names = ["" if d is None else str(d) for d in domains]
    if len(set(names)) < 2:
        return None
    ids = torch.tensor([sorted(set(names)).index(d) for d in names], device=device)
    return ids.unsqueeze(0) == ids.unsqueeze(1)


def word_region_scores(query: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor,
                       values: torch.Tensor | None = None) -> torch.Tensor:
    """GLoRIA-style report-image scores: query [M, Q, D], valid [M, Q], keys [M, L, D] -> S [M, M].

    ``S[i, j]``: mean over report i's valid queries of the cosine between the query and its
    attention-pooled region of image j (same attention as :func:`patch_attention`); the region
    pools ``values`` [M, L, D] (default: the keys themselves).
    """
    sim = word_region_sims(query, keys, values)  # [M, M, Q]
    w = valid.unsqueeze(1).to(sim.dtype)
    return (sim * w).sum(-1) / w.sum(-1).clamp_min(1.0)


def word_region_sims(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """query [M, Q, D], keys [M, L, D] -> [M, M, Q]: cosine of query q of report i with its
    attention-pooled region of image j (pooling ``values`` [M, L, D], default the keys).

    Keys [1, L, D] are the same in every image (``medim_keys="position"``): the attention is then
    computed once per report instead of once per report-image pair. One-channel values [M, L, 1]
    (``medim_values="prior_score"``) are scores: the result is their attention-weighted mean itself,
    no cosine.
    """
    values = (keys if values is None else values).expand(query.shape[0], -1, -1)
    scale = keys.shape[-1] ** 0.5
    if keys.shape[0] == 1:
        attn = torch.einsum("iqd,ld->iql", query, keys[0]).div(scale).softmax(-1)  # [M, Q, L]
        region = torch.einsum("iql,jld->ijqd", attn, values)
    else:
        attn = torch.einsum("iqd,jld->ijql", query, keys).div(scale).softmax(-1)  # [M, M, Q, L]
        region = torch.einsum("ijql,jld->ijqd", attn, values)  # [M, M, Q, D]
    if values.shape[-1] == 1:
        return region.squeeze(-1)
    return F.cosine_similarity(query.unsqueeze(1), region, dim=-1)


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
    dev = keyword.device
    m, q = q_valid.shape
    if not rows:
        return (torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, q, device=dev),
                torch.zeros(0, m, dtype=torch.bool, device=dev))
    return (torch.tensor(rows, device=dev), torch.tensor(weights, device=dev),
            torch.tensor(positives, dtype=torch.bool, device=dev))


def finding_loss(sims: torch.Tensor, row: torch.Tensor, weight: torch.Tensor, positive: torch.Tensor,
                 tau: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-positive InfoNCE of findings against the batch's images.

    sims [M, M, Q] (:func:`word_region_sims`), row / weight / positive from :func:`finding_groups`;
    ``allowed`` [M, M] restricts each report's candidate images (domain negatives). A finding's
    score for image j is the mean of its queries' sims; the loss raises the softmax mass of the
    images that hold the same finding over the others. Findings whose candidates are all
    positives have nothing to tell apart and are left out. -> mean loss (0 when none is left).
    """
    if row.numel() == 0:
        return sims.new_zeros(())
    w = weight.to(sims.dtype)
    scores = (sims[row] * w.unsqueeze(1)).sum(-1) / w.sum(-1, keepdim=True).clamp_min(1.0) / tau  # [G, M]
    cand = torch.ones_like(positive) if allowed is None else allowed[row]
    return multi_positive_info_nce(scores, positive, cand)


@register_method("medim")
class MedIM(MAE):
    """MAE whose masks follow report-to-patch attention, trained by a word-region + report-image alignment."""

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__(config)
        m, mc = config.model, config.method
        self.tokenizer = ReportTokenizer(load_keywords(mc.medim_vocab), mc.text_buckets, mc.text_max_len)
        self.text_encoder: nn.Module = TextEncoder(self.tokenizer.vocab_size, mc.text_dim, mc.text_layers,
                                                   max_len=mc.text_max_len)
        self.key_proj = nn.Linear(m.hidden_size, mc.text_dim)
        self.stat_proj = nn.Linear(4 * m.in_channels, mc.text_dim) if mc.medim_keys == "stats" else None
        projects_prior = mc.medim_keys in PRIOR_KEYS or mc.medim_values == "prior"
        self.prior_proj = nn.Linear(1, mc.text_dim) if projects_prior else None
        # prior_score: the attended lesion_prob times exp(prior_scale) / tau is the logit; it starts at 20x.
        self.prior_scale = nn.Parameter(torch.tensor(math.log(20.0 * mc.tau))) if mc.medim_values == "prior_score" \
            else None
        self.value_proj = nn.Linear(m.hidden_size, mc.text_dim) if mc.medim_values == "separate" else None
        self.img_proj = ProjectionHead(m.hidden_size, mc.proj_dim)
        self.txt_proj = ProjectionHead(mc.text_dim, mc.proj_dim)

    def patch_keys(self, imgs: torch.Tensor, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, C, D, H, W] -> keys and values [N, L, text_dim]: encoder tokens (or patch embedding +
        position, or position alone), projected; the keys add the ``stats`` / ``prior`` terms; the
        values are the keys, their own projection of the tokens (``medim_values="separate"``) or the
        keys plus the prior term (``"prior"``).

        ``prior``: the batch's ``lesion_prob`` rows when :func:`reads_prior` (None: no prior term).
        """
        mc = self.config.method
        mode = mc.medim_keys
        position = self.encoder.patch_embedding.position_embeddings  # [1, L, hidden]
        tokens = None  # image tokens, only computed where the keys or the values read them
        if mode == "tokens":
            tokens = self.encoder.forward_tokens(imgs)
        elif mode not in POSITION_KEYS or self.value_proj is not None:
            tokens = self.encoder.embed_patches(imgs, None) + position
        if mode in POSITION_KEYS:  # where a patch is (and, for prior_position, how lesion-like): no other content
            keys = self.key_proj(position).expand(imgs.shape[0], -1, -1)
        else:
            keys = self.key_proj(tokens)
        if self.stat_proj is not None:
            keys = keys + self.stat_proj(patch_statistics(imgs, self.patch))
        # The lesion_prob per token [N, L, 1]; without the column no prior term (prior_score: every score 0).
        p = None if prior is None else prior_token_scores(prior.to(imgs.device), self.grid).to(keys.dtype).unsqueeze(-1)
        with_prior = keys if self.prior_proj is None or p is None else keys + self.prior_proj(p)
        if mode in PRIOR_KEYS:
            keys = with_prior
        if mc.medim_values == "separate":
            return keys, self.value_proj(tokens)
        if mc.medim_values == "prior_score":  # one channel: the lesion_prob itself
            return keys, (keys.new_zeros(*keys.shape[:2], 1) if p is None else p)
        return keys, (with_prior if mc.medim_values == "prior" else keys)

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

    def queries(self, enc: Encoded, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask-query features [M, Q, D], validity [M, Q] and sentence index [M, Q] for KDM
        (keywords) or SDM (a sentence)."""
        valid, sentence, sel = self.query_masks(enc)
        if sel is None:
            return feats, valid, sentence
        pooled = (feats * sel.unsqueeze(-1)).sum(1) / sel.sum(1, keepdim=True).clamp_min(1)
        return pooled.unsqueeze(1), valid, sentence

    def report_attention(self, imgs: torch.Tensor, reports: list[str],
                         prior: torch.Tensor | None = None) -> dict[str, Any]:
        """Text features, mask queries, patch keys and the mask map for rows with a report (and
        ``host``, the tokenizer output on the host, for the host-side bookkeeping)."""
        host = Encoded(*self.tokenizer(reports))
        enc = Encoded(*(t.to(imgs.device) for t in host))
        feats = self.text_encoder(enc.ids, enc.padding)  # [M, T, D]
        keys, values = self.patch_keys(imgs, prior)  # [M, L, D] each
        q, q_valid, q_sentence = self.queries(enc, feats)
        attn_map = mean_attention(patch_attention(q, keys, q_valid), q_valid)  # [M, L]
        return {"enc": enc, "host": host, "feats": feats, "keys": keys, "values": values, "q": q,
                "q_valid": q_valid, "q_sentence": q_sentence, "map": attn_map}

    def local_loss(self, r: dict[str, Any], rows: torch.Tensor, allowed: torch.Tensor | None,
                   kind: str | None = None) -> torch.Tensor:
        """The word-region loss over the report rows ``rows``: long indices [M'] into the report rows,
        on the host (the training path), or a bool mask [M] (read back to the host: evaluation code);
        ``kind`` "report" or "finding" (default ``method.medim_local``)."""
        tau = self.config.method.tau
        if rows.dtype == torch.bool:
            rows = rows.cpu().nonzero().flatten()
        rows = rows.cpu()
        idx = rows.to(r["keys"].device)
        keys = r["keys"].index_select(0, idx)
        if self.config.method.medim_keys == "position":
            keys = keys[:1]  # the same in every image: one attention per report, not per report-image pair
        q, values = r["q"].index_select(0, idx), r["values"].index_select(0, idx)
        scale = 1.0 if self.prior_scale is None else self.prior_scale.exp()  # prior_score: a learned logit scale
        if (kind or self.config.method.medim_local) == "report":
            scores = word_region_scores(q, r["q_valid"].index_select(0, idx), keys, values)
            return _symmetric_ce(scores * scale / tau, allowed)
        host = r["host"]
        q_valid, q_sentence, _ = self.query_masks(host)
        # Findings are grouped on the host (from the tokenizer output), then their indices copied over.
        groups = finding_groups(host.keyword[rows], host.sentence[rows], q_sentence[rows], q_valid[rows])
        sims = word_region_sims(q, keys, values) * scale
        return finding_loss(sims, *(t.to(sims.device) for t in groups), tau, allowed)

    def alignment_loss(self, r: dict[str, Any], latent: torch.Tensor,
                       domains: list[Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(word-region InfoNCE, GLoRIA-style; report-image InfoNCE), over the batch or its same-domain pairs."""
        tau = self.config.method.tau
        local = latent.new_zeros(())
        if latent.shape[0] < 2:
            return local, local  # no negatives
        allowed = None
        if self.config.method.medim_negatives == "domain":
            allowed = same_domain(domains, latent.device)
        rows = self.query_masks(r["host"])[0].any(1).nonzero().flatten()  # reports with a query (host)
        if rows.numel() > 1:
            sub = None
            if allowed is not None:
                idx = rows.to(allowed.device)
                sub = allowed.index_select(0, idx).index_select(1, idx)
            local = self.local_loss(r, rows, sub)
        words = ~r["enc"].padding
        text = (r["feats"] * words.unsqueeze(-1)).sum(1) / words.sum(1, keepdim=True).clamp_min(1)
        return local, _info_nce(self.img_proj(latent.mean(1)), self.txt_proj(text), tau, allowed)

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
        uses_prior = reads_prior(mc)
        prior = batch.get("lesion_prob") if uses_prior else None
        if report_rows:
            rows = torch.tensor(report_rows, device=imgs.device)
            r = self.report_attention(imgs.index_select(0, rows), [reports[i] for i in report_rows],
                                      None if prior is None else prior.index_select(0, rows.to(prior.device)))
            attn = attn.index_copy(0, rows, r["map"].detach().float())  # bf16 under autocast
        tm = report_guided_masking(attn, mc.mask_ratio, mc.medim_low_share, has)
        rec = self.reconstruct(imgs, tm)
        loss_rec = rec.loss
        loss_local = loss_global = loss_rec.new_zeros(())
        if r is not None:
            domains = batch.get("domain")
            loss_local, loss_global = self.alignment_loss(
                r, rec.latent.index_select(0, rows), None if domains is None else [domains[i] for i in report_rows])
        loss_align = loss_local + loss_global
        loss = loss_rec + mc.medim_align_weight * loss_align
        metrics = {"loss": loss.detach(), "loss_rec": loss_rec.detach(), "loss_align": loss_align.detach(),
                   "loss_local": loss_local.detach(), "loss_global": loss_global.detach(),
                   "mask_ratio": tm.mask.mean().detach(),
                   "no_report_frac": host_scalar(1.0 - len(report_rows) / n)}
        if uses_prior:
            metrics["medim_prior_missing"] = host_scalar(1.0 if prior is None else 0.0)
        visuals = self.reconstruction_visuals(imgs, rec.pred.detach(), tm.mask, label=input_label(batch["image"], imgs),
                                              case_id=first_case_id(batch))
        return MethodOutput(loss, metrics, visuals)


__all__ = ["MedIM", "finding_groups", "finding_loss", "patch_statistics", "same_domain", "word_region_scores",
           "word_region_sims"]
