"""Report-guided masking (MedIM, Xie et al.): mask the patches a report's words attend to.

Knowledge-driven masking (KDM) averages the attention of the report's keyword tokens over the
patches; sentence-driven masking (SDM) uses one sentence's pooled query (the keys are MedIM's,
:mod:`raymim.methods.medim`). Either gives an attention map ``attn: [N, L]`` (rows sum to 1).
Masking keeps the exact ratio: the ``(1 - low_share)`` part of the masked tokens are the
most-attended patches, the ``low_share`` part is drawn at random from the less-attended half
(diversity, as in MedIM); rows without a report fall back to uniform random masking.

Example::

    >>> attn = patch_attention(torch.randn(2, 3, 32), torch.randn(2, 64, 32), torch.ones(2, 3, dtype=torch.bool))
    >>> tm = report_guided_masking(attn.mean(1), 0.6, low_share=0.1, has_report=torch.tensor([True, False]))
"""

from __future__ import annotations

import torch

from raymim.masking.tokens import TokenMask, mask_from_scores, num_masked


def patch_attention(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of each query over the patches: [N, Q, D] x [N, L, D] -> [N, Q, L].

    ``valid`` [N, Q] marks real queries; invalid ones get a uniform map (they are averaged out
    by :func:`mean_attention`).
    """
    logits = torch.einsum("nqd,nld->nql", query, keys) / keys.shape[-1] ** 0.5
    attn = logits.softmax(dim=-1)
    uniform = torch.full_like(attn, 1.0 / keys.shape[1])
    return torch.where(valid.unsqueeze(-1), attn, uniform)


def mean_attention(attn: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Average over the valid queries: [N, Q, L] -> [N, L] (uniform where a row has none)."""
    w = valid.to(attn.dtype).unsqueeze(-1)
    total = (attn * w).sum(1)
    count = w.sum(1)
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, 1.0 / attn.shape[-1]))


def report_guided_masking(
    attn: torch.Tensor,
    mask_ratio: float,
    low_share: float = 0.1,
    has_report: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> TokenMask:
    """attn [N, L] -> TokenMask (1 = removed): top-attended tokens plus a low-attention share."""
    n, length = attn.shape
    n_mask = num_masked(length, mask_ratio)
    n_low = int(round(low_share * n_mask))
    n_high = n_mask - n_low
    noise = torch.rand(n, length, generator=generator).to(attn.device)
    rank = torch.argsort(torch.argsort(attn, dim=1, descending=True), dim=1)  # 0 = most attended
    high = rank < n_high
    low_pool = rank >= length // 2  # the less-attended half
    # Order: high first (key < -1), then low-pool tokens at random (key in [-1, 0)), then the rest.
    key = torch.where(high, -2.0 + noise * 0.5, torch.where(low_pool, -1.0 + noise * 0.5, noise))
    if has_report is not None:
        key = torch.where(has_report.to(attn.device).unsqueeze(1), key, noise)
    return mask_from_scores(key, n_mask)


__all__ = ["mean_attention", "patch_attention", "report_guided_masking"]
