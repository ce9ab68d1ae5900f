"""``raymim inspect``: what training will see in a folder of prepared shards, before GPU hours go in.

Prints the stored volumes (count, voxels, bytes on disk, spacing and dtype), then ``--samples N``
crops drawn and augmented as the training stream draws them (:func:`raymim.data.crops.sample_crops`
then :func:`raymim.data.augment.augment_crops`, data pass 0 in the order a single worker reads
it, with the run seed ``--seed`` and the crop settings of the config): case id, origin, size,
foreground fraction and the augmentation drawn (flipped axes, quarter turns, intensity scale and
shift); the arrays are the augmented crops training receives. ``--png FILE`` renders the crops' middle
axial slices as a grid. Reads the shards with pyarrow directly; no Ray.

Example::

    raymim inspect --data prepared/ --samples 8 --png crops.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["add_inspect_arguments", "inspect_shards", "render_png", "run_inspect"]


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    from raymim.cli import add_config_arguments

    parser.add_argument("--data", required=True, help="prepared shards (a folder written by `raymim prepare`)")
    parser.add_argument("--samples", type=int, default=8, help="crops to sample and describe (default 8)")
    parser.add_argument("--seed", type=int, default=None, help="run seed of the sampler (default: train.seed)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--png", metavar="FILE", help="write a grid of the sampled crops' middle slices")
    add_config_arguments(parser)


def inspect_shards(data: str, cfg: Any, samples: int = 8, seed: int | None = None) -> dict[str, Any]:
    """The report ``raymim inspect`` prints (``cfg``: a :class:`raymim.config.RaymimConfig`), plus
    the sampled crops' arrays under the private key ``_images``."""
    from raymim.data.augment import augment_crops
    from raymim.data.crops import CropSpec, sample_crops
    from raymim.data.shards import read_volume, shard_files, volume_index
    from raymim.data.stream import epoch_items

    index = volume_index(data)
    spacing = np.asarray([v["spacing"] for v in index], np.float64).reshape(-1, 3)
    shapes = np.asarray([v["shape"] for v in index], np.int64).reshape(-1, 3)
    report: dict[str, Any] = {
        "data": str(Path(data).resolve()), "volumes": len(index), "voxels": int(shapes.prod(axis=1).sum()),
        "bytes": sum(Path(f).stat().st_size for f in shard_files(data)),
        "dtype": sorted({v["dtype"] for v in index}),
        "spacing_mm": {"min": spacing.min(0).round(3).tolist(), "max": spacing.max(0).round(3).tolist()}
        if len(index) else None,
        "shape": {"min": shapes.min(0).tolist(), "max": shapes.max(0).tolist()} if len(index) else None,
        "labelled": sum(bool(v.get("has_label")) for v in index), "lesion_prior": any(v["prior"] for v in index),
    }
    run_seed = cfg.train.seed if seed is None else seed
    spec = CropSpec.from_config(cfg.prepare, run_seed)
    report["sampler"] = dict(spec.to_dict(), augment=True)
    crops, images = [], []
    items = epoch_items({"items": index, "seed": run_seed}, 0, 0, 1)
    for item in items:
        if len(crops) >= samples:
            break
        vol = read_volume(item["file"], item["row_group"], ["case_id"])
        rows = augment_crops(sample_crops(vol, spec, 0), spec.seed, 0, record=True)  # what the stream yields
        for row in rows[: samples - len(crops)]:
            crops.append({"case_id": row["case_id"], "origin": [int(v) for v in row["origin"]],
                          "size": list(spec.size), "foreground": round(float(row["foreground"]), 4),
                          "augment": row["augment"]})
            images.append(np.asarray(row["image"], np.float32))
    report["crops"] = crops
    report["_images"] = images
    return report


def render_png(images: list[np.ndarray], crops: list[dict[str, Any]], path: str) -> None:
    """A grid of the crops' middle axial slices (array axis 2), one titled panel per crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(images))
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, c in zip(axes.flat, images, crops):
        ax.imshow(img[:, :, img.shape[2] // 2].T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower")
        ax.set_title(f"{c['case_id'][:8]} @ {tuple(c['origin'])}\nforeground {c['foreground']:.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _format(report: dict[str, Any]) -> str:
    lines = [f"volumes: {report['volumes']} ({report['labelled']} labelled), {report['voxels'] / 1e6:.1f} M voxels, "
             f"{report['bytes'] / 1e6:.1f} MB on disk, dtype {', '.join(report['dtype'])}"
             + (", with MPS lesion_prob" if report["lesion_prior"] else "")]
    if report["spacing_mm"]:
        lines.append(f"spacing (mm): {report['spacing_mm']['min']} .. {report['spacing_mm']['max']}; "
                     f"shape: {report['shape']['min']} .. {report['shape']['max']}")
    s = report["sampler"]
    lines.append(f"sampler: {s['k']} crops of {s['size']} per volume read, min_foreground {s['min_foreground']}, "
                 f"seed {s['seed']}, augmented")
    for c in report["crops"]:
        a = c["augment"]
        lines.append(f"  {c['case_id']}  origin {c['origin']}  size {c['size']}  foreground {c['foreground']:.3f}  "
                     f"flips {a['flips']} rot90 x{a['rot90']} intensity x{a['scale']:.3f} {a['shift']:+.3f}")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from raymim.cli import UsageError, check_input
    from raymim.config import load_config

    check_input(args.data, "--data", shards=True)
    if args.samples < 0:
        raise UsageError(f"--samples should be >= 0, got {args.samples}")
    if args.png and not Path(args.png).resolve().parent.is_dir():
        raise UsageError(f"--png {args.png}: no such folder {str(Path(args.png).resolve().parent)!r}")
    cfg = load_config(args.config, args.overrides)
    report = inspect_shards(args.data, cfg, args.samples, args.seed)
    images = report.pop("_images")
    if args.png:
        render_png(images, report["crops"], args.png)
        report["png"] = str(Path(args.png).resolve())
    print(json.dumps(report) if args.json else _format(report) + (f"\nwrote {report['png']}" if args.png else ""))
    return 0
