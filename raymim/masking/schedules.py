"""Adaptive masking strategy (AMS): the masking ratio as a function of training progress.

Wang et al. (MPS-AMS) let the masking ratio change over training instead of fixing it; the
extension describes a ratio that *grows* as the encoder gets better (easy -> hard). The exact
curve is not public, so it is explicit and configurable here. With ``t`` the fraction of
training done (``PretrainMethod.set_progress``) and ``w`` the warm-up fraction::

    t < w:          ratio = start                       (hold while the encoder warms up)
    u = (t - w) / (1 - w)  in [0, 1]
    constant:       ratio = end                         (start is ignored: a fixed ratio)
    linear:         ratio = start + (end - start) * u
    cosine:         ratio = start + (end - start) * (1 - cos(pi * u)) / 2
    step:           ratio = start + (end - start) * min(floor(u * n), n - 1) / (n - 1)   (n stages)

Every non-constant curve starts exactly at ``start`` (t <= w) and ends exactly at ``end``
(t = 1), and is monotonic between them (non-decreasing when end >= start).

Example::

    >>> mask_ratio_at(0.0, "linear", 0.5, 0.9)  # 0.5
    >>> mask_ratio_at(1.0, "cosine", 0.5, 0.9)  # 0.9
    >>> mask_ratio_at(0.3, "step", 0.5, 0.9, stages=3)  # 0.5 (first of three stages)
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine", "step")


def mask_ratio_at(
    progress: float,
    schedule: str,
    start: float,
    end: float,
    warmup: float = 0.0,
    stages: int = 4,
) -> float:
    """Masking ratio at ``progress`` in [0, 1] (values outside are clamped)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule should be one of {SCHEDULES}, got {schedule!r}.")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup should be in the range [0, 1), got {warmup}.")
    if stages < 2 and schedule == "step":
        raise ValueError(f"stages should be >= 2 for the step schedule, got {stages}.")
    if schedule == "constant":
        return float(end)
    t = min(max(float(progress), 0.0), 1.0)
    if t <= warmup:
        return float(start)
    u = (t - warmup) / (1.0 - warmup)
    if schedule == "linear":
        f = u
    elif schedule == "cosine":
        f = 0.5 * (1.0 - math.cos(math.pi * u))
    else:  # step
        f = min(math.floor(u * stages), stages - 1) / (stages - 1)
    return float(start + (end - start) * f)


__all__ = ["SCHEDULES", "mask_ratio_at"]
