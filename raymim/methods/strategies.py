"""Mask strategies: explicit callables ``(images, batch, progress) -> TokenMask`` that the methods compose.

A method no longer hides its masking in overridable hooks or in state set just before a call:
it holds a strategy, built from its config with the ratio as an explicit argument (a number, or a
schedule ``progress -> ratio`` for the adaptive masking ratio of MPS-AMS), and calls it with the
network input ``images`` [N, C, D, H, W], the ``batch`` dict (columns such as ``lesion_prob``)
and the training ``progress`` in [0, 1].

* :class:`BlockMasking`: random tokens (MAE, ``block=1``) or whole ``block^3`` cubes (SimMIM);
* :class:`ScoredMasking`: masked patch selection (MPS): lesion-scored tokens first, then random,
  random masking where the scorer returns ``None``;
* :class:`MiMLevels`: MiM's level hierarchy (a list of :class:`~raymim.masking.multilevel.MiMLevel`
  rather than one mask), optionally with MPS-ordered level-1 cubes;
* :class:`RatioSchedule`: the AMS ratio schedule as a callable.

Example::

    >>> strategy = BlockMasking(grid=(4, 4, 4), ratio=0.75)
    >>> tm = strategy(torch.rand(2, 1, 32, 32, 32), {}, 0.0)  # TokenMask, 48 of 64 tokens removed
    >>> BlockMasking((4, 4, 4), RatioSchedule("linear", 0.5, 0.85)).ratio_at(0.5)  # 0.675
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from raymim.masking.mps_levels import mps_mim_levels
from raymim.masking.multilevel import MiMLevel, mim_levels
from raymim.masking.schedules import mask_ratio_at
from raymim.masking.selection import mps_masking
from raymim.masking.tokens import TokenMask, block_masking, random_masking

Ratio = float | Callable[[float], float]  # a fixed ratio, or a schedule of the training progress


class MaskStrategy(Protocol):
    """``(images [N, C, D, H, W], batch, progress in [0, 1]) -> TokenMask`` (mask [N, L], 1 = removed)."""

    def __call__(self, images: torch.Tensor, batch: Mapping[str, Any], progress: float) -> TokenMask: ...


def ratio_at(ratio: Ratio, progress: float) -> float:
    """The masking ratio at ``progress``: ``ratio`` itself, or the schedule's value."""
    return float(ratio(progress)) if callable(ratio) else float(ratio)


@dataclass(frozen=True)
class RatioSchedule:
    """The adaptive masking ratio (AMS, :func:`raymim.masking.schedules.mask_ratio_at`) as ``progress -> ratio``."""

    schedule: str
    start: float
    end: float
    warmup: float = 0.0
    stages: int = 4

    def __call__(self, progress: float) -> float:
        return mask_ratio_at(progress, self.schedule, self.start, self.end, self.warmup, self.stages)


@dataclass(frozen=True)
class BlockMasking:
    """MAE's random token masking (``block=1``) or SimMIM's whole ``block^3``-token cubes, at ``ratio``.

    ``grid``: tokens per axis of the network input. Drawn on the images' device.
    """

    grid: tuple[int, int, int]
    ratio: Ratio
    block: int = 1

    def ratio_at(self, progress: float) -> float:
        return ratio_at(self.ratio, progress)

    def __call__(self, images: torch.Tensor, batch: Mapping[str, Any], progress: float) -> TokenMask:
        return block_masking(images.shape[0], self.grid, self.ratio_at(progress), self.block, device=images.device)


Scorer = Callable[[torch.Tensor, Mapping[str, Any]], "torch.Tensor | None"]


@dataclass(frozen=True)
class ScoredMasking:
    """Masked patch selection (MPS): ``scores(images, batch)`` -> lesion scores [N, L] in [0, 1]
    (or ``None``: random masking); tokens scoring >= ``threshold`` are masked first (at most
    ``share`` of the masked tokens), then random ones, at ``ratio``
    (:func:`raymim.masking.selection.mps_masking`)."""

    scores: Scorer
    num_tokens: int
    ratio: Ratio
    share: float = 1.0
    threshold: float = 0.5

    def ratio_at(self, progress: float) -> float:
        return ratio_at(self.ratio, progress)

    def mask_from(self, scores: torch.Tensor | None, batch: int, device: torch.device, ratio: float) -> TokenMask:
        """The mask of precomputed ``scores`` [N, L] at ``ratio``; random masking where ``scores`` is None."""
        if scores is None:
            return random_masking(batch, self.num_tokens, ratio, device=device)
        return mps_masking(scores, ratio, self.share, self.threshold)

    def with_stats(self, images: torch.Tensor, batch: Mapping[str, Any],
                   progress: float) -> tuple[TokenMask, dict[str, torch.Tensor]]:
        """The mask and, when scored, ``mps_cluster_share`` (share of tokens in the lesion cluster)
        and ``mps_masked_lesion_share`` (share of masked tokens that are lesion tokens), as
        detached 0-d tensors on the images' device."""
        scores = self.scores(images, batch)
        tm = self.mask_from(scores, images.shape[0], images.device, self.ratio_at(progress))
        if scores is None:
            return tm, {}
        lesion = scores >= self.threshold
        stats = {
            "mps_cluster_share": lesion.float().mean().detach(),
            "mps_masked_lesion_share": ((lesion & tm.mask.bool()).sum() / tm.mask.sum().clamp_min(1)).detach(),
        }
        return tm, stats

    def __call__(self, images: torch.Tensor, batch: Mapping[str, Any], progress: float) -> TokenMask:
        return self.with_stats(images, batch, progress)[0]


LevelScorer = Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class MiMLevels:
    """MiM's level hierarchy at ``ratio`` (:func:`raymim.masking.multilevel.mim_levels`): called as
    ``(image, batch, progress) -> list[MiMLevel]`` on the batch's crop (any size; level 1 is cut
    from it). With ``level1_scores(volumes, batch) -> [N, L]`` the level-1 cubes are ordered by
    MPS lesion scores (:func:`raymim.masking.mps_levels.mps_mim_levels`, MPS-AMS with levels > 1)."""

    img_size: int
    patch_size: int
    level_sizes: Sequence[int]
    ratio: Ratio
    gamma: int
    levels: int
    block: int = 1
    level1_scores: LevelScorer | None = None
    share: float = 1.0
    threshold: float = 0.5

    def ratio_at(self, progress: float) -> float:
        return ratio_at(self.ratio, progress)

    def __call__(self, image: torch.Tensor, batch: Mapping[str, Any], progress: float) -> list[MiMLevel]:
        ratio = self.ratio_at(progress)
        if self.level1_scores is None:
            return mim_levels(image.float(), self.img_size, self.patch_size, self.level_sizes, ratio, self.gamma,
                              levels=self.levels, mask_block=self.block)
        scorer = self.level1_scores

        def score_fn(volumes: torch.Tensor) -> torch.Tensor:
            return scorer(volumes, batch)

        return mps_mim_levels(image.float(), self.img_size, self.patch_size, self.level_sizes, ratio, self.gamma,
                              self.levels, score_fn, self.block, self.share, self.threshold)


__all__ = ["BlockMasking", "MaskStrategy", "MiMLevels", "RatioSchedule", "ScoredMasking", "ratio_at"]
