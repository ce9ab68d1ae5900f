"""Pretraining overlap: downstream validation / test cases whose scan the encoder was pretrained on.

A pretrained encoder that saw a test scan during pretraining makes the pretrained-vs-scratch gap
look larger than it is. Prepared shards hold no paths, only keyed content ids
(:mod:`raymim.io.deid`: ``HMAC(key, SHA-256 of the input files)``), so the check recomputes the
same ids for the downstream cases with the shards' key (the one whose fingerprint the shards
record: ``$RAYMIM_DEID_KEY``, ``$RAYMIM_DEID_KEY_FILE`` or the per-user key file,
:func:`raymim.io.deid.find_dataset_key`) and intersects them with the shards' ``case_id`` column. A pretraining case
is keyed with its label file when its manifest named one, so both variants (image alone, image
and label) are tried. Paths never leave this function; the report names downstream case ids.

Example::

    report = pretraining_overlap(cases, split, "data/shards")
    report.overlapping  # {"val": [...], "test": [...]}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymim.downstream.splits import Split


@dataclass
class OverlapReport:
    checked: bool
    reason: str = ""  # why the check could not run (checked False)
    overlapping: dict[str, list[str]] = field(default_factory=dict)  # side -> downstream case ids

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.overlapping.values())

    def message(self) -> str:
        if not self.checked:
            return f"pretraining overlap not checked: {self.reason}"
        if not self.count:
            return "pretraining overlap: none of the validation / test cases is in the pretraining shards"
        sides = ", ".join(f"{len(v)} {side} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                          for side, v in self.overlapping.items() if v)
        return (f"pretraining overlap: {self.count} held-out case(s) were in the pretraining shards: {sides}; "
                "their scores flatter the pretrained encoder")


class OverlapError(ValueError):
    """``finetune.strict_overlap``: a held-out case was pretrained on, or the check could not run."""


def _key(shards: Path) -> bytes | None:
    from raymim.io.deid import find_dataset_key

    return find_dataset_key(shards)


def pretraining_overlap(cases: Sequence[Mapping[str, Any]], split: Split, shards: str | os.PathLike | None,
                        sides: Sequence[str] = ("val", "test")) -> OverlapReport:
    """Which of ``split``'s ``sides`` cases have the same content as a case of ``shards``."""
    from raymim.data.shards import case_ids
    from raymim.io.deid import content_digest, keyed_id

    if not shards:
        return OverlapReport(False, "the pretraining data is unknown (pass --pretrain-data SHARDS)")
    root = Path(shards)
    if not (root / "manifest.json").is_file():
        return OverlapReport(False, f"{root} is not a folder of prepared shards (streamed pretraining data "
                                    "has no stable case ids)")
    key = _key(root)
    if key is None:
        return OverlapReport(False, f"no de-identification key matches the one {root} was prepared with "
                                    "(set $RAYMIM_DEID_KEY or $RAYMIM_DEID_KEY_FILE)")
    pretrained_ids = set(case_ids(root))
    by_id = {c["id"]: c for c in cases}
    found: dict[str, list[str]] = {}
    for side in sides:
        for cid in getattr(split, side):
            image, label = by_id[cid].get("source") or (None, None)
            if image is None:
                continue
            variants = {keyed_id(key, content_digest(image, None))}
            if label:
                variants.add(keyed_id(key, content_digest(image, label)))
            if variants & pretrained_ids:
                found.setdefault(side, []).append(cid)
    return OverlapReport(True, overlapping=found)


def pretrain_data_of(ref: str | None) -> str | None:
    """The pretraining data a checkpoint records: ``meta.json``'s ``data`` of a checkpoint folder,
    or the ``raymim.data_path`` tag of an MLflow run reference."""
    import json

    if not ref:
        return None
    path = Path(ref)
    for meta in (path / "meta.json", path.parent / "meta.json"):
        if meta.is_file():
            return json.loads(meta.read_text()).get("data")
    if ref.startswith("runs:/") or (len(ref) == 32 and ref.isalnum()):
        import mlflow

        from raymim.train.tracking import resolve_tracking_uri

        run_id = ref[len("runs:/"):].split("/")[0] if ref.startswith("runs:/") else ref
        try:
            return mlflow.MlflowClient(resolve_tracking_uri()).get_run(run_id).data.tags.get("raymim.data_path")
        except Exception:  # noqa: BLE001 - an unreachable store only disables the check
            return None
    return None
