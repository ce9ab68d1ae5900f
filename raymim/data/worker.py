"""Per-case work done inside Ray Data tasks: hash, preprocess, write volume shards, report status.

Every exception of a case is caught here and becomes its quarantine reason, so one bad file
never stops a job. Reasons name the failure, never the input's path or a header value.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from raymim.config import PrepareConfig
from raymim.data import shards as shard_io
from raymim.io.checks import CaseRejected
from raymim.io.deid import content_digest, keyed_id
from raymim.io.discover import case_input

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
    image = case_input(case)
    for p in [*(image if isinstance(image, list) else [image]), case.get("label")]:
        if p and Path(p).is_dir():
            total += sum(f.stat().st_size for f in Path(p).iterdir() if f.is_file())
        elif p and Path(p).is_file():
            total += Path(p).stat().st_size
    return total


def _pad_to(a: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pad [X, Y, Z] at the far end to multiples of ``multiple`` (the prior's patch grid)."""
    pad = [(0, -s % multiple) for s in a.shape]
    return np.pad(a, pad) if any(p for _, p in pad) else a


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] float -> stored dtype (uint8 keeps 1/255 steps, float16 ~1e-3 relative)."""
    if dtype == "uint8":
        return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    return x.astype(dtype)


def preprocess_case(case: dict[str, Any], cfg: PrepareConfig, cfg_hash: str) -> dict[str, Any]:
    """One case through the MONAI preprocessing: ``image`` float32 [X, Y, Z] in [0, 1], ``label``
    uint8 or None, ``modality``, ``spacing`` (padded to multiples of the prior patch when the
    prior is on, so its grid tiles the volume)."""
    from raymim.data.transforms import voxel_spacing

    with_label = bool(case.get("label"))
    data = {"image": case_input(case), **({"label": case["label"]} if with_label else {})}
    out = _preprocess(cfg, cfg_hash, with_label)(data)
    image = out["image"][0].numpy().astype(np.float32, copy=False)
    label = out["label"][0].numpy().astype(np.uint8) if with_label else None
    if cfg.lesion_prior:
        image = _pad_to(image, int(cfg.prior_patch))
        label = _pad_to(label, int(cfg.prior_patch)) if label is not None else None
    return {"image": image, "label": label, "modality": out["modality"], "spacing": voxel_spacing(out["image"])}


def _volume_row(case: dict[str, Any], cid: str, pre: dict[str, Any], cfg: PrepareConfig,
                ctx: dict[str, Any]) -> dict[str, Any]:
    """The shard row of one preprocessed volume (+ its MPS ``lesion_prob`` grid when enabled)."""
    from raymim.data.transforms import is_foreground

    image = pre["image"]
    row = {"case_id": cid, "domain": case.get("domain") or "default", "modality": pre["modality"],
           "spacing": pre["spacing"], "orientation": cfg.orientation, "report": case.get("report"),
           "image": _stored(image, cfg.dtype), "shape": list(image.shape),
           "foreground": float(is_foreground(image).mean()), "has_label": pre["label"] is not None,
           "label": pre["label"]}
    if ctx.get("keep_paths"):
        row["source"] = case["rel"]
    if cfg.lesion_prior and not ctx.get("prior_fit"):
        from raymim.data.patch_stats import PriorModel, lesion_prob

        model = PriorModel.from_dict(ctx["prior_model"]) if ctx.get("prior_model") else None
        grid = lesion_prob(image, cfg, model)
        row.update(lesion_prob=grid, prior_shape=list(grid.shape))
    return row


def process_case(case: dict[str, Any], ctx: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One case -> (status record, volume row or None). Status is ``ok``, ``rejected`` or ``skipped``."""
    cfg = PrepareConfig(**ctx["cfg"])
    key = bytes.fromhex(ctx["key"])
    status: dict[str, Any] = {"index": case["index"], "case_id": None, "status": "rejected", "reason": None,
                              "voxels": 0, "domain": case.get("domain"), "input_bytes": 0}
    if ctx.get("keep_paths"):
        status["source"] = case["rel"]
    if case.get("error"):
        cid = keyed_id(key, "input:" + case["rel"])
        skipped = cid in ctx.get("done", ())
        status.update(case_id=cid, reason=case["error"], status="skipped" if skipped else "rejected")
        return status, None
    try:
        digest = content_digest(case_input(case), case.get("label"))
        status["input_bytes"] = _input_bytes(case)
    except OSError as exc:
        status.update(case_id=keyed_id(key, "input:" + case["rel"]), reason=f"unreadable input ({type(exc).__name__})")
        return status, None
    cid = keyed_id(key, digest)
    status["case_id"] = cid
    if cid in ctx.get("done", ()):
        status["status"] = "skipped"
        return status, None
    try:
        pre = preprocess_case(case, cfg, ctx["config_hash"])
        if ctx.get("prior_fit"):
            from raymim.data.patch_stats import patch_descriptors

            return status, {"prior_desc": patch_descriptors(pre["image"], int(cfg.prior_patch))}
        row = _volume_row(case, cid, pre, cfg, ctx)
    except Exception as exc:  # noqa: BLE001 - any failure quarantines this case only
        status["reason"] = _reason(exc, case)
        return status, None
    if row["foreground"] < cfg.min_foreground:
        status["reason"] = f"foreground {row['foreground']:.3f} below min_foreground={cfg.min_foreground}"
        return status, None
    status.update(status="ok", voxels=int(np.prod(row["shape"])))
    return status, row


def _flush(rows: list[dict[str, Any]], statuses: list[dict[str, Any]], ctx: dict[str, Any]) -> None:
    """Write the volume rows of ``statuses`` as one shard (or a status record when none is ok)."""
    if not statuses:
        return
    ids = "|".join(s["case_id"] for s in statuses)
    name = "part-" + hashlib.sha256(ids.encode()).hexdigest()[:16]
    commit = {"schema_version": shard_io.SCHEMA_VERSION, "config_hash": ctx["config_hash"],
              "cases": [{k: v for k, v in s.items() if k != "index"} for s in statuses]}
    out = Path(ctx["out"])
    if rows:
        cfg = PrepareConfig(**ctx["cfg"])
        sch = shard_io.schema(cfg.dtype, bool(ctx.get("keep_paths")), cfg.lesion_prior)
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
        status, row = process_case(json.loads(str(text)), ctx)
        out.append(status)
        if status["status"] == "skipped":
            continue
        pending.append(status)
        if row is not None:
            rows.append(row)
            size += row["image"].nbytes + (row["label"].nbytes if row["label"] is not None else 0)
        if size >= ctx["shard_bytes"]:
            _flush(rows, pending, ctx)
            rows, pending, size = [], [], 0
    _flush(rows, pending, ctx)
    return {"status": np.asarray([json.dumps(s) for s in out], dtype=object)}


def case_descriptors(row: dict[str, Any], ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """``flat_map`` body for fitting the MPS prior: the patch descriptors ``desc`` [L, F] of one volume."""
    _, out = process_case(json.loads(row["case"]), dict(ctx, prior_fit=True, done=[]))
    return [{"desc": out["prior_desc"]}] if out is not None else []


def case_volume(case: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any] | None:
    """Streaming mode (no shards): one raw case as the volume row training's sampler reads, or
    None when it is rejected."""
    _, row = process_case(case, dict(ctx, done=[]))
    return row
