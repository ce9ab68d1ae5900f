"""Losses of the pretraining methods: masked reconstruction, and every contrastive loss in one place.

Reconstruction:

* :func:`masked_recon_loss`: MSE / L1 on masked patches only (MAE Eq.; MiM Eq. 2-3 per level),
  optionally against per-patch normalised targets (MAE's ``norm_pix_loss``);
  :func:`token_recon_error` is its per-token error.

Contrastive (InfoNCE family; ``sim`` is cosine similarity, ``tau`` the temperature):

* :func:`nt_xent`: SimCLR's NT-Xent over two views (HSSL, SimCLR);
* :func:`info_nce`: symmetric (CLIP-style) InfoNCE between two paired sets of embeddings, and
  :func:`symmetric_ce`, the same loss on a precomputed score matrix (MedIM);
* :func:`multi_positive_info_nce`: InfoNCE with several positives per query (MedIM findings);
* :func:`cross_level_infonce`: MiM's cross-level alignment (Eq. 4-7).

Negatives across DDP ranks: :func:`nt_xent` and :func:`info_nce` take ``gather_distributed``
(as lightly's ``NTXentLoss(gather_distributed=...)``): the other ranks' embeddings are gathered
(:func:`gather_with_grad`) and serve as extra negatives for the local queries. ``None`` (the
default) means *on* when ``torch.distributed`` is initialised with a world size > 1, a no-op
otherwise. Every rank must then call the loss the same number of times with the same local batch
size (``drop_last=True`` batches; a rank-0-only probe must pass ``False``). Each rank's loss is the
mean over its local queries, so the mean over ranks (what DDP's gradient averaging optimises) is
the loss of the whole global batch, gradient included. The score-matrix losses
(:func:`symmetric_ce`, :func:`multi_positive_info_nce`) and :func:`cross_level_infonce` have no
such option: the first two receive scores that their caller computed for the local batch, and the
cross-level loss draws its negatives from each query's own parent volume, not from the batch.

Example::

    >>> target = patch_targets(torch.rand(2, 1, 32, 32, 32), patch=8, norm_pix=True)  # [2, 64, 512]
    >>> masked_recon_loss(torch.zeros_like(target), target, random_masking(2, 64, 0.75).mask)
    >>> nt_xent(torch.randn(8, 16), torch.randn(8, 16), tau=0.2)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
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


def token_recon_error(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-token mean error: pred, target [N, L, P] -> [N, L] (``kind`` "mse" or "l1")."""
    if kind == "mse":
        return (pred - target).pow(2).mean(dim=-1)
    if kind == "l1":
        return (pred - target).abs().mean(dim=-1)
    raise ValueError(f"kind should be one of ('mse', 'l1'), got {kind!r}.")


def masked_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``err`` [N, L] over the masked tokens (mask [N, L], 1 = removed, the only ones that count)."""
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


def masked_recon_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean over masked patches of the per-patch mean error.

    pred, target: [N, L, P]; mask: [N, L] (1 = removed, the only patches that count).
    """
    return masked_mean(token_recon_error(pred, target, kind), mask)


# ---- negatives across DDP ranks ------------------------------------------------------------------


def distributed_world() -> int:
    """World size of the default process group; 1 when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _gathers(gather_distributed: bool | None) -> bool:
    """Resolve a loss's ``gather_distributed`` option (``None``: on when the world size is > 1)."""
    world = distributed_world()
    return world > 1 if gather_distributed is None else bool(gather_distributed) and world > 1


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward hands each rank the gradient of its own slice, summed over ranks.

    Every rank's loss reads every rank's embeddings, so the gradient of rank r's embeddings is the
    sum over ranks of d(loss_rank) / d(slice r): an ``all_reduce`` of the stacked gradients, then
    rank r keeps slice r (lightly's ``GatherLayer``; works on gloo and NCCL, unlike
    reduce-scatter on gloo).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: D102
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # noqa: D102
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [n, ...] on every rank (same shape everywhere) -> (all ranks' x concatenated [W n, ...],
    offset of this rank's rows in it). Gradients flow back to each rank's local ``x``."""
    parts = _GatherWithGrad.apply(x)
    return torch.cat(parts), dist.get_rank() * x.shape[0]


# ---- contrastive losses --------------------------------------------------------------------------


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.2,
            gather_distributed: bool | None = None) -> torch.Tensor:
    """NT-Xent (Chen et al., SimCLR, ICML 2020) over 2N views; row i of z1 [N, P] and z2 [N, P] is a
    positive pair.

    With ``z = normalize([z1; z2])`` (2N rows) and ``pos(a)`` the other view of row a::

        loss = mean over a of  -log( exp(z_a . z_pos(a) / tau) / sum_{b != a} exp(z_a . z_b / tau) )

    A batch of one (N = 1) has no negatives: the loss is 0. With ``gather_distributed`` the
    candidates b range over the views of the whole global batch (all ranks), the queries a over
    the local ones.
    """
    q = F.normalize(torch.cat([z1, z2]), dim=-1)  # [2n, P] local queries
    n = z1.shape[0]
    if _gathers(gather_distributed):
        g1, offset = gather_with_grad(z1)
        g2, _ = gather_with_grad(z2)
        total = g1.shape[0]
        k = F.normalize(torch.cat([g1, g2]), dim=-1)  # [2N, P]: views 1 of all ranks, then views 2
    else:
        total, offset, k = n, 0, q
    local = torch.arange(n, device=q.device) + offset
    self_idx = torch.cat([local, local + total])  # each query's own column
    target = torch.cat([local + total, local])  # the other view of the same sample
    sim = q @ k.t() / tau  # [2n, 2N]
    sim = sim.masked_fill(F.one_hot(self_idx, 2 * total).bool(), float("-inf"))
    return F.cross_entropy(sim, target)


def symmetric_ce(logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of a square score matrix whose diagonal holds the positives (logits [M, M],
    already divided by the temperature)::

        loss = 1/2 * ( CE over rows: -log softmax_j(logits[i, j])[i] + same over columns )

    ``allowed`` [M, M] bool (diagonal true) keeps only those pairs as candidates (e.g. same-domain
    negatives); a row whose only candidate is its positive contributes 0.
    """
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float = 0.2, allowed: torch.Tensor | None = None,
             gather_distributed: bool | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021; MedIM's report-image loss) between paired
    embeddings a [M, P] and b [M, P] (row i of each is a positive pair)::

        S = normalize(a) @ normalize(b).T / tau
        loss = 1/2 * ( mean_i -log softmax_j S[i, j] at j = i  +  mean_j -log softmax_i S[i, j] at i = j )

    ``allowed`` [M, M]: see :func:`symmetric_ce`; it describes the local batch, so it turns
    gathering off (``gather_distributed=None``) or is refused with ``gather_distributed=True``.
    With gathering each local a (b) is scored against the b (a) of all ranks.
    """
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    gathers = _gathers(gather_distributed) and (allowed is None or gather_distributed is not None)
    if gathers and allowed is not None:  # only reached with an explicit gather_distributed=True
        raise ValueError("info_nce: allowed describes the local batch; it cannot be combined with "
                         "gather_distributed=True.")
    if not gathers:
        return symmetric_ce(a @ b.t() / tau, allowed)
    a_all, offset = gather_with_grad(a)
    b_all, _ = gather_with_grad(b)
    target = torch.arange(a.shape[0], device=a.device) + offset
    return 0.5 * (F.cross_entropy(a @ b_all.t() / tau, target) + F.cross_entropy(b @ a_all.t() / tau, target))


def multi_positive_info_nce(logits: torch.Tensor, positive: torch.Tensor,
                            candidates: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with several positives per query (logits [G, M], already over the temperature;
    positive, candidates [G, M] bool; default: every column a candidate)::

        loss_g = logsumexp_{j in cand(g)} logits[g, j] - logsumexp_{j in pos(g) & cand(g)} logits[g, j]

    averaged over the queries that have at least one candidate negative (the others have nothing
    to tell apart and are left out; 0 when none is left). Every query needs a positive candidate.
    Without a host synchronisation: the left-out queries are weighted out, not indexed out.
    """
    cand = torch.ones_like(positive) if candidates is None else candidates
    pos = positive & cand
    keep = (cand & ~pos).any(1)  # [G]
    neg_inf = torch.finfo(logits.dtype).min
    total = logits.masked_fill(~cand, neg_inf).logsumexp(1)
    good = logits.masked_fill(~pos, neg_inf).logsumexp(1)
    w = keep.to(logits.dtype)
    return ((total - good) * w).sum() / w.sum().clamp_min(1.0)


def cross_level_infonce(
    query: torch.Tensor, region_keys: torch.Tensor, positive: torch.Tensor, tau: float = 0.2
) -> torch.Tensor:
    """InfoNCE across levels (MiM Eq. 4-7), cosine similarity over temperature ``tau``::

        loss = mean_m -log softmax_r( sim(query_m, region_keys[m, r]) / tau )[positive_m]

    query: [M, P] pooled features of M level-(l+1) volumes; region_keys: [M, R, P] keys of the R
    regions (masking cubes) of each one's parent volume (level l; the caller detaches them, as
    the reference does); positive: [M] index of the region each volume was cut from. Every logit
    compares a level-(l+1) vector with a level-l region; the negatives are the parent volume's
    other regions, so there is nothing to gather across ranks.
    """
    q = F.normalize(query, dim=-1)
    k = F.normalize(region_keys, dim=-1)
    logits = torch.einsum("mp,mrp->mr", q, k) / tau  # [M, R]
    return F.cross_entropy(logits, positive)
