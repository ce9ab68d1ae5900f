"""Per-case work done inside Ray Data tasks: hash, preprocess, crop, write shards, report status.

Every exception of a case is caught here and becomes its quarantine reason, so one bad file
never stops a job. Reasons name the failure, never the input's path or a header value.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from raymim.config import PrepareConfig
from raymim.data import shards as shard_io
from raymim.data.crops import crop_rows
from raymim.io.deid import content_digest, keyed_id
from raymim.io.readers import CaseRejected

_PREPROCESS: dict[tuple[str, bool], Any] = {}


def _preprocess(cfg: PrepareConfig, cfg_hash: str, with_label: bool) -> Any:
    key = (cfg_hash, with_label)
    if key not in _PREPROCESS:
        import torch

        from raymim.data.transforms import build_preprocess

        torch.set_num_threads(1)  # one task per CPU: no oversubscription
        _PREPROCESS[key] = build_preprocess(cfg, with_label)
    return _PREPROCESS[key]


def _reason(exc: BaseException, case: dict[str, Any]) -> str:
    """The root cause of a failure as a one-line reason, with input paths scrubbed."""
    seen = exc
    while True:
        if isinstance(seen, CaseRejected):
            return str(seen)
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    text = f"{type(seen).__name__}: {str(seen).splitlines()[0] if str(seen) else ''}".strip()
    for p in (case.get("image"), case.get("label")):
        if p:
            text = text.replace(str(p), "<input>").replace(str(Path(p).parent), "<dir>")
    return text[:300]


def _input_bytes(case: dict[str, Any]) -> int:
    total = 0
    for p in (case.get("image"), case.get("label")):
        if p and Path(p).is_dir():
            total += sum(f.stat().st_size for f in Path(p).iterdir() if f.is_file())
        elif p and Path(p).is_file():
            total += Path(p).stat().st_size
    return total


def _prior_fields(cfg: PrepareConfig, ctx: dict[str, Any]) -> Callable[[np.ndarray], dict[str, Any]] | None:
    """Per-crop MPS prior fields: descriptors while fitting the prior, else ``lesion_prob``."""
    if not (cfg.lesion_prior or ctx.get("prior_fit")):
        return None
    from raymim.data.patch_stats import PriorModel, lesion_prob, patch_descriptors

    if ctx.get("prior_fit"):
        return lambda crop: {"prior_desc": patch_descriptors(crop, int(cfg.prior_patch))}
    model = PriorModel.from_dict(ctx["prior_model"]) if ctx.get("prior_model") else None
    return lambda crop: {"lesion_prob": lesion_prob(crop, cfg, model)}


def process_case(case: dict[str, Any], ctx: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One case -> (status record, crop rows). Status is ``ok``, ``rejected`` or ``skipped``."""
    cfg = PrepareConfig(**ctx["cfg"])
    key = bytes.fromhex(ctx["key"])
    status: dict[str, Any] = {"index": case["index"], "case_id": None, "status": "rejected", "reason": None,
                              "crops": 0, "domain": case.get("domain"), "input_bytes": 0}
    if ctx.get("keep_paths"):
        status["source"] = case["rel"]
    if case.get("error"):
        cid = keyed_id(key, "input:" + case["rel"])
        skipped = cid in ctx.get("done", ())
        status.update(case_id=cid, reason=case["error"], status="skipped" if skipped else "rejected")
        return status, []
    try:
        digest = content_digest(case["image"], case.get("label"))
        status["input_bytes"] = _input_bytes(case)
    except OSError as exc:
        status.update(case_id=keyed_id(key, "input:" + case["rel"]), reason=f"unreadable input ({type(exc).__name__})")
        return status, []
    cid = keyed_id(key, digest)
    status["case_id"] = cid
    if cid in ctx.get("done", ()):
        status["status"] = "skipped"
        return status, []
    try:
        with_label = bool(case.get("label"))
        data = {"image": case["image"], **({"label": case["label"]} if with_label else {})}
        out = _preprocess(cfg, ctx["config_hash"], with_label)(data)
        from raymim.data.transforms import voxel_spacing

        image = out["image"][0].numpy().astype(np.float32, copy=False)
        label = out["label"][0].numpy().astype(np.uint8) if with_label else None
        common = {"case_id": cid, "domain": case.get("domain") or "default", "modality": out["modality"],
                  "spacing": voxel_spacing(out["image"]), "orientation": cfg.orientation,
                  "report": case.get("report")}
        if ctx.get("keep_paths"):
            common["source"] = case["rel"]
        rows = list(crop_rows(image, label, cfg, int(cid[:12], 16) ^ cfg.seed, common, _prior_fields(cfg, ctx)))
    except Exception as exc:  # noqa: BLE001 - any failure quarantines this case only
        status["reason"] = _reason(exc, case)
        return status, []
    if not rows:
        status["reason"] = f"no crop reaches min_foreground={cfg.min_foreground}"
        return status, []
    status.update(status="ok", crops=len(rows))
    return status, rows


def _flush(rows: list[dict[str, Any]], statuses: list[dict[str, Any]], ctx: dict[str, Any]) -> None:
    if not statuses:
        return
    ids = "|".join(s["case_id"] for s in statuses)
    name = "part-" + hashlib.sha256(ids.encode()).hexdigest()[:16]
    commit = {"schema_version": shard_io.SCHEMA_VERSION, "config_hash": ctx["config_hash"],
              "cases": [{k: v for k, v in s.items() if k != "index"} for s in statuses]}
    out = Path(ctx["out"])
    if rows:
        cfg = PrepareConfig(**ctx["cfg"])
        sch = shard_io.schema(cfg.crop_size, cfg.dtype, bool(ctx.get("keep_paths")),
                              cfg.prior_patch if cfg.lesion_prior else None)
        path = out / shard_io.SHARDS_DIR / f"{name}.parquet"
        shard_io.write_shard(shard_io.rows_to_table(rows, sch), path, commit)
        for s in statuses:
            s["shard"] = path.name
    else:
        shard_io.write_commit(out / shard_io.STATUS_DIR / f"{name}.json", commit)


def process_batch(batch: dict[str, np.ndarray], ctx: dict[str, Any]) -> dict[str, np.ndarray]:
    """``map_batches`` body: process cases in order, flushing a shard every ``shard_bytes``."""
    out, rows, pending = [], [], []
    size = 0
    for text in batch["case"]:
        status, case_rows = process_case(json.loads(str(text)), ctx)
        out.append(status)
        if status["status"] == "skipped":
            continue
        pending.append(status)
        rows += case_rows
        size += sum(r["image"].nbytes + r["label"].nbytes for r in case_rows)
        if size >= ctx["shard_bytes"]:
            _flush(rows, pending, ctx)
            rows, pending, size = [], [], 0
    _flush(rows, pending, ctx)
    return {"status": np.asarray([json.dumps(s) for s in out], dtype=object)}


def case_descriptors(row: dict[str, Any], ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """``flat_map`` body for fitting the MPS prior: one ``desc`` [L, F] per crop of one case."""
    _, rows = process_case(json.loads(row["case"]), dict(ctx, prior_fit=True, done=[]))
    return [{"desc": r["prior_desc"]} for r in rows]


def case_to_rows(row: dict[str, Any], ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """``flat_map`` body for streaming (no shards): the crop rows of one case, or none."""
    _, rows = process_case(json.loads(row["case"]), ctx)
    return rows
