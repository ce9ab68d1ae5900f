"""Fixed-size sub-volume sampling and the crop rows that go into shards.

``crop_mode="random"``: up to ``crops_per_volume`` distinct origins drawn uniformly (seeded per case,
so a rerun yields the same crops), keeping those whose foreground fraction reaches
``min_foreground`` (air-only crops are dropped; at most 20 draws per wanted crop).
``crop_mode="grid"``: a regular grid with ``crop_stride`` (default: the crop size, i.e. tiles;
the last tile is aligned to the far edge), keeping tiles above ``min_foreground``.
Origins are voxel indices in the preprocessed (reoriented, resampled, foreground-cropped) grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from raymim.config import PrepareConfig
from raymim.data.transforms import is_foreground


def _grid_starts(extent: int, size: int, stride: int) -> list[int]:
    if extent <= size:
        return [0]
    starts = list(range(0, extent - size + 1, stride))
    if starts[-1] != extent - size:
        starts.append(extent - size)
    return starts


def crop_origins(fg: np.ndarray, cfg: PrepareConfig, seed: int) -> list[tuple[int, int, int]]:
    """Origins of accepted crops in a foreground mask ``fg`` [X, Y, Z] (already >= crop size)."""
    size = [int(s) for s in cfg.crop_size]
    shape = fg.shape
    # Summed-volume table: foreground count of any box in O(1).
    sat = np.pad(fg.astype(np.int64).cumsum(0).cumsum(1).cumsum(2), ((1, 0), (1, 0), (1, 0)))
    total = float(np.prod(size))

    def frac(o: tuple[int, int, int]) -> float:
        (x0, y0, z0), (x1, y1, z1) = o, (o[0] + size[0], o[1] + size[1], o[2] + size[2])
        s = (sat[x1, y1, z1] - sat[x0, y1, z1] - sat[x1, y0, z1] - sat[x1, y1, z0]
             + sat[x0, y0, z1] + sat[x0, y1, z0] + sat[x1, y0, z0] - sat[x0, y0, z0])
        return float(s) / total

    if cfg.crop_mode == "grid":
        stride = [int(s) for s in (cfg.crop_stride or size)]
        axes = [_grid_starts(shape[i], size[i], stride[i]) for i in range(3)]
        grid = [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]
        return [o for o in grid if frac(o) >= cfg.min_foreground]
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int, int]] = []
    for _ in range(20 * cfg.crops_per_volume):
        o = tuple(int(rng.integers(0, shape[i] - size[i] + 1)) for i in range(3))
        # A volume barely larger than the crop has few origins: never write the same crop twice.
        if o not in out and frac(o) >= cfg.min_foreground:
            out.append(o)
            if len(out) == cfg.crops_per_volume:
                break
    return out


def to_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] float -> stored dtype (uint8 keeps 1/255 steps, float16 ~1e-3 relative)."""
    if dtype == "uint8":
        return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    return x.astype(dtype)


def crop_rows(image: np.ndarray, label: np.ndarray | None, cfg: PrepareConfig, seed: int,
              common: dict[str, Any],
              extra: Callable[[np.ndarray], dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Yield one shard row per accepted crop of a preprocessed image [X, Y, Z] in [0, 1].

    ``extra(crop)`` adds fields computed from the float crop (the MPS prior's ``lesion_prob``).
    """
    size = [int(s) for s in cfg.crop_size]
    fg = is_foreground(image)
    for o in crop_origins(fg, cfg, seed):
        sl = tuple(slice(o[i], o[i] + size[i]) for i in range(3))
        crop = image[sl]
        p1, p99 = np.percentile(crop, [1, 99])
        row = dict(common)
        row.update(
            image=to_stored(crop, cfg.dtype),
            origin=list(o),
            mean=float(crop.mean()),
            std=float(crop.std()),
            p1=float(p1),
            p99=float(p99),
            foreground=float(fg[sl].mean()),
            has_label=label is not None,
            label=(label[sl] if label is not None else np.zeros(size, np.uint8)).astype(np.uint8),
        )
        if extra is not None:
            row.update(extra(crop))
        yield row
