"""Labelled cases for fine-tuning: discover, preprocess (the data plane's MONAI transforms), remap.

Each case is held in memory as plain tensors (fine-tuning sets are small; the phantom and the
``../shared/data`` sets are a few MB): ``{"id", "image": float32 [1, X, Y, Z] in [0, 1],
"label": uint8 [1, X, Y, Z] with classes 0..K, "spacing": [sx, sy, sz] mm}``.

Example::

    cases = load_labelled_cases("phantoms/manifest.csv", cfg.prepare, classes=[2, 8], roi_size=(32, 32, 32))
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raymim.config import PrepareConfig


def remap_labels(label: torch.Tensor, classes: Sequence[int] | None) -> torch.Tensor:
    """Keep ``classes`` (original values) as 1..K in order; everything else becomes background."""
    label = label.round().long()
    if classes is None:
        return label.to(torch.uint8)
    out = torch.zeros_like(label)
    for new, old in enumerate(classes, start=1):
        out[label == int(old)] = new
    return out.to(torch.uint8)


def case_id(record: dict[str, Any]) -> str:
    return str(record.get("rel") or Path(record["image"]).name)


def load_labelled_cases(
    data: str | Path | Sequence[dict[str, Any]],
    prepare_cfg: PrepareConfig,
    classes: Sequence[int] | None = None,
    roi_size: Sequence[int] = (96, 96, 96),
    label_names: Mapping[str, int] | Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``(cases, fixed_sides)``: preprocessed labelled cases and any manifest ``split`` column.

    Each case also carries ``patient`` (a manifest's ``patient`` / ``patient_id`` column, or
    None: splits keep one patient's cases on one side) and ``source`` (the image and label
    paths, for the pretraining-overlap check; never written anywhere).

    ``data`` is what :func:`raymim.io.discover.discover_cases` accepts (a folder, a manifest, an MSD
    ``dataset.json``) or a list of ``{"image", "label"}`` records. Cases without a label are skipped.

    A label may be a DICOM RTSTRUCT or DICOM-SEG file (found by content): it is placed on its
    image's grid by :func:`raymim.io.dicom_labels.read_dicom_label`, ROI / segment names becoming
    classes (``label_names``: names in order -> 1..K, or ``{name: value}``; default every ROI in file
    order), and the case carries ``class_names`` ``{name: value}``; ``classes`` then selects among
    those values as for any label map.
    """
    from raymim.data.transforms import build_preprocess, voxel_spacing

    if isinstance(data, str | Path):
        from raymim.io.discover import discover_cases

        records = discover_cases(data)
    else:
        records = [dict(r, rel=r.get("rel") or r.get("id") or Path(r["image"]).name) for r in data]
    records = [r for r in records if r.get("label") and not r.get("error")]
    if not records:
        raise ValueError(f"no labelled cases in {data!r} (a manifest needs a 'label' column)")
    # Pad to at least the training ROI so every crop and sliding window fits.
    pre_cfg = dataclasses.replace(prepare_cfg, crop_size=[int(r) for r in roi_size])
    pre = build_preprocess(pre_cfg, with_label=True)
    cases = []
    for rec in records:
        out, names = _preprocess_record(pre, rec, label_names)
        img, lab = out["image"], out["label"]
        cases.append({
            "id": case_id(rec),
            "image": torch.as_tensor(np.asarray(img.detach().cpu()), dtype=torch.float32).contiguous(),
            "label": remap_labels(torch.as_tensor(np.asarray(lab.detach().cpu())), classes).contiguous(),
            "spacing": voxel_spacing(img),
            "patient": rec.get("patient"),
            "source": (rec["image"], rec.get("label")),
            **({"class_names": names} if names is not None else {}),
        })
    fixed = {case_id(r): str(r["split"]).strip().lower() for r in records if r.get("split")}
    return cases, fixed


def _preprocess_record(pre: Any, rec: dict[str, Any],
                       label_names: Mapping[str, int] | Sequence[str] | None) -> tuple[dict[str, Any], dict | None]:
    """One record through ``pre``; an RTSTRUCT / SEG label is first written as a NIfTI label map on
    the image grid (a temporary file the MONAI loader reads like any label)."""
    from raymim.io.dicom_labels import dicom_label_kind, dicom_label_to_nifti
    from raymim.io.discover import case_input

    image = case_input(rec)
    if dicom_label_kind(rec["label"]) is None:
        return pre({"image": image, "label": rec["label"]}), None
    with tempfile.TemporaryDirectory(prefix="raymim-label-") as tmp:
        path = Path(tmp) / "label.nii.gz"
        names = dicom_label_to_nifti(rec["label"], image, path, label_names)
        return pre({"image": image, "label": str(path)}), names


def num_classes_of(cases: Sequence[dict[str, Any]], classes: Sequence[int] | None) -> int:
    """Output channels: K + 1 with explicit ``classes``, else max label + 1 over the cases."""
    if classes is not None:
        return len(classes) + 1
    return int(max(int(c["label"].max()) for c in cases)) + 1
