"""The crop sampler: K random crops of one stored volume, drawn anew at every pass.

Training never sees a fixed set of crops. Each pass over the data reads every volume once and
cuts ``prepare.crops_per_volume`` (K) crops of ``prepare.crop_size`` from it (K > 1 amortises
the read), inside Ray Data tasks on the cluster's CPUs (:mod:`raymim.data.stream`). This is
what the reference pipelines do: the MiM code and MONAI's Swin-UNETR pretraining draw random
crops from the whole cached volume every iteration, nnssl (MIC-DKFZ) a random crop per sample
from memory-mapped preprocessed arrays.

**Seeding.** The generator of a volume's crops in a pass is
``numpy.random.default_rng([run seed, pass + 1, case key])`` (:func:`crop_rng`; the case key
is the first 48 bits of the keyed case id), so the crops depend only on (run seed, pass,
volume): never on which worker or node read the volume, nor on timing. A resumed run
therefore redraws exactly the crops of the pass it resumes in, and two passes draw different
crops. ``pass = -1`` is reserved for the probe's fixed crops (:data:`PROBE_PASS`).

**Origins** (``prepare.crop_pos_fraction`` None, the pretraining default): uniform over every
origin that keeps the crop inside the volume (on multiples of ``align``: the MPS prior's patch,
so the crop's ``lesion_prob`` is an exact sub-grid), accepted when the crop's foreground
fraction reaches ``prepare.min_foreground``; up to :data:`ATTEMPTS` draws per crop, then the
most-foreground draw is kept. Deviation from "drop the crop" on purpose: every volume yields
exactly K crops, so every worker gets the same number of batches per pass (DDP needs that).

**Positive / negative sampling** (``prepare.crop_pos_fraction`` = p, for labelled volumes, e.g.
fine-tuning): MONAI ``RandCropByPosNegLabeld``'s logic, with ``pos / (pos + neg) = p``: a
crop is centred on a uniformly chosen voxel with label > 0 with probability p, else on a
foreground voxel with label 0, and the box is then shifted to lie inside the volume (MONAI's
``allow_smaller=False`` behaviour). A volume without label voxels falls back to negatives.

Volumes smaller than the crop are zero-padded at the far end (0 = air after windowing).

**Augmentation** (flips, 90-degree rotations, intensity scale and shift) is applied to the
training stream's crops right after they are cut, in the same Ray Data task
(:mod:`raymim.data.augment`, seeded by (run seed, pass, case, crop index)); the sampler itself
returns un-augmented crops (the probe's crops stay so).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from raymim.config import PrepareConfig

# Scaled intensity above which a voxel counts as foreground (body, not air): -900 HU with the
# default CT window, the lowest 5 % of the range for MR. Defined here, not in
# raymim.data.transforms, so the training reader's tasks never import MONAI (11 s per worker).
FOREGROUND = 0.05

ATTEMPTS = 20
PROBE_PASS = -1
# Volume columns copied onto every crop row (when present).
CARRIED = ("case_id", "domain", "modality", "report", "spacing")

__all__ = ["ATTEMPTS", "FOREGROUND", "PROBE_PASS", "CropSpec", "case_key", "crop_rng", "is_foreground", "sample_crops",
           "sample_origins"]


def is_foreground(x: Any) -> Any:
    """Foreground mask used for cropping and for the per-crop foreground fraction."""
    return x > FOREGROUND


@dataclass(frozen=True)
class CropSpec:
    """What the sampler cuts: ``size`` voxels, ``k`` per volume read, ``min_foreground``,
    ``pos_fraction`` (None: uniform origins), origins on multiples of ``align``, run ``seed``."""

    size: tuple[int, int, int]
    k: int
    min_foreground: float = 0.05
    pos_fraction: float | None = None
    align: int = 1
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: PrepareConfig, seed: int) -> CropSpec:
        return cls(tuple(int(s) for s in cfg.crop_size), int(cfg.crops_per_volume), float(cfg.min_foreground),
                   cfg.crop_pos_fraction, int(cfg.prior_patch) if cfg.lesion_prior else 1, int(seed))

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "k": self.k, "min_foreground": self.min_foreground,
                "pos_fraction": self.pos_fraction, "align": self.align, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropSpec:
        return cls(tuple(d["size"]), d["k"], d["min_foreground"], d["pos_fraction"], d["align"], d["seed"])


def case_key(case_id: str) -> int:
    """The seed word of a case: the first 48 bits of its keyed (hex) id, or of the SHA-256 of
    a caller's own name."""
    try:
        return int(case_id[:12], 16)
    except ValueError:  # not a hex id (a caller's own name): hash it
        return int(hashlib.sha256(case_id.encode()).hexdigest()[:12], 16)


def crop_rng(seed: int, pass_index: int, case_id: str) -> np.random.Generator:
    """The generator of ``case_id``'s crops in pass ``pass_index`` (see the module docstring)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(pass_index) + 1, case_key(case_id)])


def _threshold(dtype: np.dtype) -> float:
    return FOREGROUND * 255 if dtype == np.uint8 else FOREGROUND


def _pad(a: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if a is None or tuple(a.shape) == tuple(shape):
        return a
    return np.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])


def sample_origins(image: np.ndarray, spec: CropSpec, rng: np.random.Generator,
                   label: np.ndarray | None = None) -> list[tuple[tuple[int, int, int], float]]:
    """``spec.k`` crop origins in ``image`` [X, Y, Z] (already >= the crop size) with their
    foreground fractions."""
    size, shape = spec.size, image.shape
    thr = _threshold(image.dtype)
    n = float(np.prod(size))
    hi = [(shape[i] - size[i]) // spec.align for i in range(3)]  # last origin index per axis
    keyed, key_thr = image, thr
    if image.dtype == np.float16:
        # numpy emulates float16 arithmetic (slow); stored values are >= 0, whose bit patterns
        # order like the values, so compare them as integers (about 10x faster)
        keyed, key_thr = image.view(np.uint16), int(np.float16(thr).view(np.uint16))

    def frac(o: tuple[int, int, int]) -> float:
        sl = tuple(slice(o[i], o[i] + size[i]) for i in range(3))
        return float(np.count_nonzero(keyed[sl] > key_thr)) / n

    def clamp(centre: np.ndarray) -> tuple[int, int, int]:
        start = [int(c) - size[i] // 2 for i, c in enumerate(centre)]
        return tuple(min(max(0, s // spec.align), hi[i]) * spec.align for i, s in enumerate(start))

    out = []
    if spec.pos_fraction is not None and label is not None:
        pos = np.flatnonzero(label > 0)
        neg = np.flatnonzero((label == 0) & (image > thr))
        if neg.size == 0:
            neg = np.flatnonzero(label == 0)
        for _ in range(spec.k):
            pool = pos if (pos.size and (rng.random() < spec.pos_fraction or neg.size == 0)) else neg
            o = clamp(np.unravel_index(int(pool[rng.integers(pool.size)]), shape))
            out.append((o, frac(o)))
        return out
    for _ in range(spec.k):
        best = None
        for _ in range(ATTEMPTS):
            o = tuple(int(rng.integers(0, hi[i] + 1)) * spec.align for i in range(3))
            f = frac(o)
            if best is None or f > best[1]:
                best = (o, f)
            if f >= spec.min_foreground:
                break
        out.append(best)
    return out


def sample_crops(volume: dict[str, Any], spec: CropSpec, pass_index: int, copy: bool = True) -> list[dict[str, Any]]:
    """K crop rows of one volume (a :func:`raymim.data.shards.read_volume` dict, or a freshly
    preprocessed one in streaming mode) for pass ``pass_index``.

    Rows: ``image`` [D, H, W] float16 in [0, 1] (float32 when stored so), ``origin``,
    ``foreground``, ``pass``, the :data:`CARRIED` volume columns, and, when the volume has them,
    ``label`` [D, H, W] uint8 and ``lesion_prob`` [D/p, H/p, W/p] float32 (the same box).
    ``copy=False`` returns views into the volume (the caller stacks them: one copy, not two).
    """
    take = np.array if copy else (lambda a: a)
    image = volume["image"]
    a = spec.align
    target = tuple(max(int(s), int(c)) for s, c in zip(image.shape, spec.size))
    target = tuple(-(-t // a) * a for t in target)
    image = _pad(image, target)
    label = _pad(volume.get("label"), target)
    prior = volume.get("lesion_prob")
    if prior is not None:
        prior = _pad(prior, tuple(t // a for t in target))
    rng = crop_rng(spec.seed, pass_index, volume["case_id"])
    rows = []
    for o, f in sample_origins(image, spec, rng, label):
        sl = tuple(slice(o[i], o[i] + spec.size[i]) for i in range(3))
        crop = image[sl]
        crop = (crop.astype(np.float16) / np.float16(255)) if crop.dtype == np.uint8 else take(crop)
        row = {k: volume[k] for k in CARRIED if k in volume}
        row.update(image=crop, origin=list(o), foreground=f, **{"pass": int(pass_index)})
        if label is not None:
            row["label"] = take(label[sl])
        if prior is not None:
            psl = tuple(slice(o[i] // a, (o[i] + spec.size[i]) // a) for i in range(3))
            row["lesion_prob"] = take(prior[psl])
        rows.append(row)
    return rows
