"""Case-level splits and label fractions.

Splits are made over *case ids*, never over crops, so no case is on both sides. The val/test
split is a function of ``split_seed`` only, so every fraction and every seed is scored on the
same held-out cases. Label fractions subsample the training cases with a per-seed permutation
and take a prefix of it, so for one seed the 10 % set is contained in the 25 % set (nested, as
in the label-efficiency protocols of the seed papers), and at least one case is always kept.

Example::

    split = make_split(["a", "b", "c", "d", "e"], split_seed=0, val_fraction=0.2, test_fraction=0.2)
    fraction_subset(split.train, 0.5, seed=1)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Split:
    train: list[str]
    val: list[str]
    test: list[str]
    meta: dict = field(default_factory=dict)

    def check_disjoint(self) -> None:
        a, b, c = set(self.train), set(self.val), set(self.test)
        overlap = (a & b) | (a & c) | (b & c)
        if overlap:
            raise ValueError(f"split has cases on more than one side: {sorted(overlap)}")


def _stable_rng(*parts: object) -> np.random.Generator:
    """A generator seeded from a stable hash of ``parts`` (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def make_split(
    case_ids: Sequence[str],
    split_seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    fixed: Mapping[str, str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> Split:
    """Deterministic train/val/test split of ``case_ids``.

    ``fixed`` maps case ids to "train" / "val" / "test" for cases whose side is given (a
    manifest's ``split`` column, e.g. an official test set); the rest are split at random.
    ``groups`` maps case ids to a patient (a manifest's ``patient`` column): all cases of one
    patient land on the same side (a fixed case takes its patient's other cases with it), so two
    scans of one patient are never on both sides. Cases without a group are their own group.
    With fewer than 3 free cases the test side gets one case and val may be empty.
    """
    ids = sorted(dict.fromkeys(str(c) for c in case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("case ids should be unique")
    fixed = {str(k): v for k, v in (fixed or {}).items() if v}
    bad = {k: v for k, v in fixed.items() if v not in ("train", "val", "test")}
    if bad:
        raise ValueError(f"split values should be train, val or test, got {bad}")
    groups = {str(k): str(v) for k, v in (groups or {}).items() if v not in (None, "")}
    members: dict[str, list[str]] = {}
    for c in ids:
        members.setdefault(groups.get(c, "case:" + c), []).append(c)
    side_of: dict[str, str] = {}
    for group, cs in members.items():
        sides = {fixed[c] for c in cs if c in fixed}
        if len(sides) > 1:
            raise ValueError(f"patient {group!r} has cases fixed to different sides {sorted(sides)}: "
                             "one patient's cases should share a side")
        if sides:
            side_of[group] = sides.pop()
    free_units = [cs for g, cs in members.items() if g not in side_of]  # in sorted order of first case
    order = [free_units[i] for i in _stable_rng("split", split_seed).permutation(len(free_units))]
    n = sum(len(u) for u in order)
    n_test = max(1, round(test_fraction * n)) if n >= 2 and test_fraction > 0 else 0
    n_val = round(val_fraction * n) if n >= 3 else 0
    if n_val and n - n_test - n_val < 1:
        n_val = max(0, n - n_test - 1)
    sides: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for unit in order:  # fill test, then val, whole patients at a time; the rest trains
        side = "test" if len(sides["test"]) < n_test else "val" if len(sides["val"]) < n_val else "train"
        if side != "train" and len(order) > 1 and not sides["train"] and unit is order[-1]:
            side = "train"  # keep at least one patient for training
        sides[side] += unit
    for group, side in side_of.items():
        sides[side] += members[group]
    split = Split(sorted(sides["train"]), sorted(sides["val"]), sorted(sides["test"]),
                  {"split_seed": split_seed, **({"grouped_by": "patient"} if groups else {})})
    split.check_disjoint()
    if not split.train or not split.test:
        raise ValueError(
            f"need at least one training and one test case, got {len(split.train)} train and "
            f"{len(split.test)} test from {len(ids)} cases."
        )
    return split


def fraction_subset(train_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """The first ``ceil(fraction * n)`` (at least 1) training cases of a per-seed permutation."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction should be in the range (0, 1], got {fraction}.")
    ids = sorted(train_ids)
    k = max(1, math.ceil(fraction * len(ids) - 1e-9))
    order = _stable_rng("fraction", seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:k])
