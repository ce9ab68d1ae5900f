"""Training's data plane: per-worker Ray Datasets that read stored volumes and cut fresh crops.

:func:`stream_spec` (driver) describes the data once: the volume index of prepared shards
(:func:`raymim.data.shards.volume_index`), or the raw cases in streaming mode, minus the probe's
held-out cases, plus the crop sampler's settings. Every training worker then builds, for each of
its iterator passes ("epochs"), :func:`crop_stream`: a Ray Dataset of ``(pass, volume)`` items
whose ``map_batches`` (one volume per call) runs in Ray Data tasks on the cluster's CPUs (any
node, ``num_cpus=1`` each), reads one volume (one Parquet row group: exactly its bytes), cuts
its K crops (:func:`raymim.data.crops.sample_crops`) and augments them (flips, 90-degree
rotations, intensity scale / shift: :mod:`raymim.data.augment`, seeded by (seed, pass, volume,
crop index)). The training process only iterates the batches: neither cropping nor
augmentation runs on its critical path. Without Ray, :func:`local_batches` gives one worker the
same items and crops through a torch DataLoader. (Per-step randomness that belongs to a method, such as
masks, MiM's level boxes or HSSL's two views, is drawn by the method in the training process.)

Passes. Iterator pass ``e`` covers data passes ``e R .. e R + R - 1`` (``R = epochs_per_pass``,
so short epochs do not restart the iterator each time, which stalls the workers). Data pass
``p`` visits every volume once in an order permuted by ``(seed, p)``; the concatenated
``(pass, volume)`` list of the iterator pass is dealt round-robin to the ``world`` workers and
cut to equal lengths (every worker gets the same number of crops, so DDP steps stay in lock
step; the few volumes cut off differ from pass to pass). Crops and their augmentation depend
only on (seed, pass, volume), and the dataset keeps its order (``preserve_order``), so a
resumed worker redraws the exact augmented crops of its pass and skips the batches it had
trained on.

Why per-worker datasets rather than one dataset split by Ray Train (``datasets=`` +
``get_dataset_shard``): the pass number must reach the sampler, and a dataset handed to the
trainer is the same plan at every epoch. Deviation: in streaming mode a rejected raw case
yields no crop, so workers may see slightly different batch counts in a pass (their steps
still pair up; the run ends at ``train.steps`` on every worker).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from raymim.config import RaymimConfig
from raymim.data.augment import augment_crops
from raymim.data.crops import CropSpec, sample_crops

# Object store a worker's crop stream may fill ahead of the training loop (about 60 96^3 float16 crops).
READ_AHEAD_MB = 128
# Volume columns the training reader takes besides the image (``lesion_prob`` when stored).
READ_COLUMNS = ["case_id", "domain", "modality", "report", "spacing"]
# Methods whose targets depend on where a patch is in the crop: no spatial augmentation.
POSITIONAL_METHODS = frozenset({"medim"})

__all__ = ["crop_batch", "crop_stream", "epoch_items", "local_batches", "stream_spec", "volume_crops"]


def stream_spec(data: str, cfg: RaymimConfig, exclude: set[str] | frozenset[str] = frozenset(),
                augment: bool = True) -> dict[str, Any]:
    """Everything a worker needs to build its crop streams (plain, picklable values).

    ``data``: prepared shards (a folder with ``manifest.json``) or raw scans (streaming mode).
    ``exclude``: case ids held out (the probe's). ``augment``: augment the crops (training does;
    off only to measure the sampler alone)."""
    crop = CropSpec.from_config(cfg.prepare, cfg.train.seed).to_dict()
    crop["augment"] = bool(augment)
    # MedIM's word maps are positional (the same map over the patch grid for every image): a flip
    # or rotation would put the named side where the map expects the other, so it gets intensity
    # augmentation only
    crop["spatial"] = cfg.method.name not in POSITIONAL_METHODS
    path = Path(data)
    if (path / "manifest.json").is_file():
        from raymim.data.shards import volume_index

        index = [v for v in volume_index(path) if v["case_id"] not in exclude]
        prior = bool(index and index[0]["prior"])
        items = [{"file": v["file"], "row_group": v["row_group"]} for v in index]
        return {"mode": "shards", "items": items, "crop": crop, "seed": cfg.train.seed,
                "columns": READ_COLUMNS + (["lesion_prob"] if prior else []), "rows": len(items) * crop["k"]}
    from raymim.data.pipeline import streaming_context

    cases, ctx = streaming_context(data, cfg.prepare)
    items = [{"case": json.dumps(c)} for c in cases if not c.get("error")]
    return {"mode": "raw", "items": items, "crop": crop, "seed": cfg.train.seed, "ctx": ctx,
            "rows": len(items) * crop["k"]}


def epoch_items(spec: dict[str, Any], epoch: int, rank: int, world: int, passes_per_epoch: int = 1) -> list[dict]:
    """The ``(pass, volume)`` items worker ``rank`` of ``world`` reads in iterator pass ``epoch``."""
    n = len(spec["items"])
    seq = []
    for p in range(epoch * passes_per_epoch, (epoch + 1) * passes_per_epoch):
        order = np.random.default_rng([int(spec["seed"]) & 0xFFFFFFFF, p, 0x5EED]).permutation(n)
        seq += [dict(spec["items"][int(i)], **{"pass": p}) for i in order]
    per_worker = len(seq) // world
    return seq[rank::world][:per_worker]


def volume_crops(item: dict[str, Any], spec: dict[str, Any], copy: bool = True) -> list[dict[str, Any]]:
    """One item: read one volume (or preprocess one raw case), cut its K crops (rows) and, when
    the spec says so, augment them (``copy=False``: flipped / rotated views into the volume)."""
    crop = CropSpec.from_dict(spec["crop"])
    pass_index = int(item["pass"])
    if spec["mode"] == "shards":
        from raymim.data.shards import read_volume

        volume = read_volume(item["file"], int(item["row_group"]), spec["columns"])
    else:
        from raymim.data.worker import case_volume

        volume = case_volume(json.loads(item["case"]), spec["ctx"])
        if volume is None:
            return []
        volume.pop("label", None)  # pretraining does not read labels
    rows = sample_crops(volume, crop, pass_index, copy=copy)
    if spec["crop"].get("augment"):
        rows = augment_crops(rows, crop.seed, pass_index, spatial=spec["crop"].get("spatial", True))
    for r in rows:
        r.pop("spacing", None)
        r.pop("modality", None)
        r.setdefault("report", None)
    return rows


def crop_batch(batch: dict[str, np.ndarray], spec: dict[str, Any], owner: Any = None) -> dict[str, np.ndarray]:
    """``map_batches`` body: the crops of the batch's volumes as one numpy batch (tensor columns
    stacked once, straight from views of the volume: one copy per crop, and no per-row Arrow
    conversion, which made a ``flat_map`` of row dicts several times slower).

    ``owner``: a small object put by the training driver; reading it fails once the driver is
    gone (``OwnerDiedError``), so the stream, and the worker iterating it, stop at the next
    volume instead of training on until Ray reaps them (Ray Train's own dataset split had this
    fate sharing through its coordinator actor)."""
    if owner is not None:
        import ray

        ray.get(owner[0])
    n = len(next(iter(batch.values())))
    rows = [r for i in range(n) for r in volume_crops({k: v[i] for k, v in batch.items()}, spec, copy=False)]
    if not rows:
        return {"image": np.zeros((0, *spec["crop"]["size"]), np.float16)}
    return _columns(rows)


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Crop rows as one numpy batch of columns (tensor columns stacked, text as object arrays)."""
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], np.ndarray):
            out[key] = np.stack(values)
        elif isinstance(values[0], list):
            out[key] = np.asarray(values, np.int32)
        elif key in ("case_id", "domain", "report"):
            out[key] = np.asarray(values, dtype=object)
        else:
            out[key] = np.asarray(values)
    return out


def crop_stream(spec: dict[str, Any], epoch: int, rank: int = 0, world: int = 1, passes_per_epoch: int = 1,
                owner: Any = None) -> Any:
    """The Ray Dataset of crop rows worker ``rank`` trains on in iterator pass ``epoch``
    (``owner``: the driver's liveness object, see :func:`crop_batch`).

    Rows: ``image`` [D, H, W] float16, ``case_id``, ``domain``, ``origin``, ``foreground``,
    ``pass``, and ``report`` / ``lesion_prob`` when the data has them."""
    import ray

    items = epoch_items(spec, epoch, rank, world, passes_per_epoch)
    if not items:
        return ray.data.from_items([{"pass": -1}]).filter(lambda r: False)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * _cpus())))
    kwargs = {"spec": spec, "owner": None if owner is None else [owner]}  # in a list: Ray leaves it unresolved
    ds = ds.map_batches(crop_batch, batch_size=1, batch_format="numpy", fn_kwargs=kwargs, num_cpus=1)
    opts = ds.context.execution_options
    opts.preserve_order = True  # a resumed worker skips exactly what it trained on
    # Read-ahead budget of this stream's executor (Ray Data's default is a share of the whole object
    # store, per worker). Measured with and without it in bench/results/data_plane_2026-12-01.md
    # ("memory"): it lowers the peaks but does not make them flat in the run's length yet.
    opts.resource_limits = opts.resource_limits.copy(object_store_memory=READ_AHEAD_MB << 20)
    return ds


class _VolumeItems:
    """Map-style dataset for :func:`local_batches`: item ``i`` is the crop rows of one volume."""

    def __init__(self, items: list[dict[str, Any]], spec: dict[str, Any]) -> None:
        self.items, self.spec = items, spec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return volume_crops(self.items[i], self.spec)


def _as_is(rows: Any) -> Any:  # the DataLoader's collate: keep a volume's rows as numpy
    return rows


def local_batches(spec: dict[str, Any], epoch: int, batch_size: int, passes_per_epoch: int = 1,
                  shuffle_buffer: int = 8, shuffle_seed: int = 0, workers: int = 0) -> Any:
    """Without Ray: the numpy batches of iterator pass ``epoch`` for a single worker (rank 0 of 1).

    The same ``(pass, volume)`` items, crops and augmentation as :func:`crop_stream` (read by a
    ``torch`` DataLoader, ``workers`` processes, in order), then a local shuffle buffer seeded by
    ``shuffle_seed`` and batches of ``batch_size`` rows (the last partial one dropped), so a
    resumed run skips exactly the batches it trained on. Deviation from ``iter_torch_batches``'
    local shuffle: the buffer draws with numpy's generator, so the row order within a pass is not
    the one Ray Data would give (both are deterministic)."""
    import torch
    import torch.utils.data

    items = epoch_items(spec, epoch, 0, 1, passes_per_epoch)
    loader = torch.utils.data.DataLoader(_VolumeItems(items, spec), batch_size=None, shuffle=False,
                                         num_workers=workers, collate_fn=_as_is,
                                         prefetch_factor=2 if workers else None,
                                         # its own generator: the loader's base seed must not draw from
                                         # torch's global RNG, which the checkpoints restore (masks)
                                         generator=torch.Generator().manual_seed(int(shuffle_seed)))
    rng = np.random.default_rng([int(shuffle_seed) & 0xFFFFFFFF, 0xB0F])
    buf: list[dict[str, Any]] = []

    def draw() -> dict[str, np.ndarray]:
        picks = sorted(rng.choice(len(buf), size=batch_size, replace=False).tolist(), reverse=True)
        return _columns([buf.pop(i) for i in picks])

    for rows in loader:
        buf += rows
        while len(buf) >= max(shuffle_buffer, batch_size) + batch_size:
            yield draw()
    while len(buf) >= batch_size:
        yield draw()


def _cpus() -> int:
    import ray

    return max(1, math.ceil(ray.cluster_resources().get("CPU", 1)))
