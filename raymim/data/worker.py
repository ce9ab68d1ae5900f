"""Per-case work done inside Ray tasks: hash, preprocess, write volume shards, report status.

Every exception of a case is caught here and becomes its quarantine reason, so one bad file
never stops a job. Reasons name the failure, never the input's path or a header value: a
:class:`~raymim.io.checks.CaseRejected` message is worded that way, any other exception is reduced
to its type, and its message (which may quote a path) travels only in the status record's
``detail`` to the operator report, never into a commit record (:data:`OPERATOR_ONLY`).
A case's report loses every identifier its own DICOM header holds (:func:`case_report`).

A rejection caused by the machine rather than by the file (the input could not be read, the
worker ran out of memory, the case needs more memory than any node has, the worker died) is
marked ``"retry": true``: a rerun examines the case again instead of skipping it as done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from raymim.config import PrepareConfig
from raymim.data import shards as shard_io
from raymim.io.checks import CaseRejected
from raymim.io.deid import content_digest, keyed_id, scrub_report
from raymim.io.discover import case_input, digest_input

# Status-record fields the driver reads but no commit record (shards/, _status/, manifest.json) holds.
OPERATOR_ONLY = ("index", "detail")

_PREPROCESS: dict[tuple[str, bool], Any] = {}


def _preprocess(cfg: PrepareConfig, cfg_hash: str, with_label: bool) -> Any:
    key = (cfg_hash, with_label)
    if key not in _PREPROCESS:
        import torch

        from raymim.data.transforms import build_preprocess

        torch.set_num_threads(1)  # one task per CPU: no oversubscription
        _PREPROCESS[key] = build_preprocess(cfg, with_label)
    return _PREPROCESS[key]


def _root(exc: BaseException) -> BaseException:
    """The first :class:`CaseRejected` in ``exc``'s cause / context chain, else its last link."""
    seen = exc
    while not isinstance(seen, CaseRejected):
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    return seen


def _reason(exc: BaseException) -> str:
    """The quarantine reason of a failure: a :class:`CaseRejected` message as is, else only the
    exception's type (its message may quote a path or a header value)."""
    root = _root(exc)
    if isinstance(root, CaseRejected):
        return str(root)
    kind = type(root).__name__
    kind = kind if kind[:1].isupper() else f"{type(root).__module__}.{kind}"  # zlib.error
    return f"unexpected {kind} while reading or preprocessing the image"


def _detail(exc: BaseException) -> str | None:
    """The message of an unexpected failure, for the operator report only (may name paths)."""
    root = _root(exc)
    if isinstance(root, CaseRejected):
        return None
    first = str(root).splitlines()[0] if str(root) else ""
    return f"{type(root).__name__}: {first}"[:500]


def case_report(case: dict[str, Any]) -> str | None:
    """The case's report text without the identifiers of its own headers: every person name, ID,
    date and institution of the DICOM headers of its image series (and of a DICOM label), and
    the manifest's ``patient`` value (:func:`raymim.io.deid.scrub_report`). When those headers
    cannot be read the report is dropped rather than stored unchecked. A safety net only: the
    report's own free text (other names, places, dates) must be de-identified upstream."""
    text = case.get("report")
    if not text:
        return text
    from raymim.io.dicom import header_identifiers
    from raymim.io.readers import volume_format

    found: dict[str, set[str]] = {"names": set(), "ids": set(), "dates": set(), "other": set()}
    if case.get("patient"):
        found["ids"].add(str(case["patient"]))
    try:
        for key in ("image", "label"):
            inp = case_input(case, key)
            if inp and volume_format(inp) == "dicom":
                for kind, values in header_identifiers(inp).items():
                    found[kind] |= values
    except Exception:  # noqa: BLE001 - unreadable headers: no unchecked report
        return None
    return scrub_report(text, found)


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
    if dtype == "float16" and x.dtype == np.float32:  # torch's vectorised cast: the same bits, ~3x faster
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float16).numpy()
    return x.astype(dtype)


def preprocess_case(case: dict[str, Any], cfg: PrepareConfig, cfg_hash: str,
                    names: dict[str, int] | None = None) -> dict[str, Any]:
    """One case through the MONAI preprocessing: ``image`` float32 [X, Y, Z] in [0, 1], ``label``
    uint8 or None, ``modality``, ``spacing`` (padded to multiples of the prior patch when the
    prior is on, so its grid tiles the volume), ``classes`` ({class name: label value} or None).

    An RTSTRUCT / DICOM-SEG label is first placed on the image grid
    (:func:`raymim.io.dicom_labels.dicom_label_to_nifti`, a temporary NIfTI the MONAI loader reads
    like any label map); ``names`` selects and numbers its ROIs / segments (all, 1..K, when None).
    For a label map ``names`` only names its values (``classes``)."""
    import tempfile

    from raymim.data.transforms import voxel_spacing
    from raymim.io.dicom_labels import dicom_label_kind, dicom_label_to_nifti

    with_label = bool(case.get("label"))
    label, classes = case.get("label"), dict(names) if names and with_label else None
    with tempfile.TemporaryDirectory(prefix="raymim-label-") as tmp:
        if with_label and dicom_label_kind(label) is not None:
            label = str(Path(tmp) / "label.nii")
            classes = dicom_label_to_nifti(case["label"], case_input(case), label, names)
        data = {"image": case_input(case), **({"label": label} if with_label else {})}
        out = _preprocess(cfg, cfg_hash, with_label)(data)
    image = out["image"][0].numpy().astype(np.float32, copy=False)
    label = out["label"][0].numpy().astype(np.uint8) if with_label else None
    if cfg.lesion_prior:
        image = _pad_to(image, int(cfg.prior_patch))
        label = _pad_to(label, int(cfg.prior_patch)) if label is not None else None
    return {"image": image, "label": label, "modality": out["modality"], "spacing": voxel_spacing(out["image"]),
            "classes": classes}


def _volume_row(case: dict[str, Any], cid: str, pre: dict[str, Any], cfg: PrepareConfig,
                ctx: dict[str, Any]) -> dict[str, Any]:
    """The shard row of one preprocessed volume (+ its MPS ``lesion_prob`` grid when enabled)."""
    from raymim.data.transforms import is_foreground

    image = pre["image"]
    row = {"case_id": cid, "domain": case.get("domain") or "default", "modality": pre["modality"],
           "spacing": pre["spacing"], "orientation": cfg.orientation, "report": case_report(case),
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
    # input_id: a keyed hash of where the case was found (never the path itself); a rerun that
    # finds new content under the same input_id replaces the volume stored for the old content
    status: dict[str, Any] = {"index": case["index"], "case_id": None, "status": "rejected", "reason": None,
                              "voxels": 0, "domain": case.get("domain"), "input_bytes": 0,
                              "input_id": keyed_id(key, "input:" + case["rel"])}
    if ctx.get("keep_paths"):
        status["source"] = case["rel"]
    if case.get("error"):
        cid = keyed_id(key, "input:" + case["rel"])
        skipped = cid in ctx.get("done", ())
        status.update(case_id=cid, reason=case["error"], status="skipped" if skipped else "rejected")
        return status, None
    try:
        digest = content_digest(digest_input(case), digest_input(case, "label"))
        status["input_bytes"] = _input_bytes(case)
    except OSError as exc:
        cid = keyed_id(key, "input:" + case["rel"])
        status.update(case_id=cid, reason=f"unreadable input ({type(exc).__name__})", detail=_detail(exc), retry=True)
        return status, None
    cid = keyed_id(key, digest)
    status["case_id"] = cid
    if cid in ctx.get("done", ()):
        status["status"] = "skipped"
        return status, None
    try:
        pre = preprocess_case(case, cfg, ctx["config_hash"], ctx.get("classes"))
        if pre.get("classes") is not None:
            status["classes"] = pre["classes"]
        if ctx.get("prior_fit"):
            from raymim.data.patch_stats import patch_descriptors

            return status, {"prior_desc": patch_descriptors(pre["image"], int(cfg.prior_patch))}
        row = _volume_row(case, cid, pre, cfg, ctx)
    except Exception as exc:  # noqa: BLE001 - any failure quarantines this case only
        status.update(reason=_reason(exc), detail=_detail(exc))
        if isinstance(_root(exc), MemoryError):  # the machine's limit, not the file's fault
            status["retry"] = True
        return status, None
    if row["foreground"] < cfg.min_foreground:
        status["reason"] = f"foreground {row['foreground']:.3f} below min_foreground={cfg.min_foreground}"
        return status, None
    status.update(status="ok", voxels=int(np.prod(row["shape"])))
    return status, row


def _commit_record(statuses: list[dict[str, Any]], ctx: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": shard_io.SCHEMA_VERSION, "config_hash": ctx["config_hash"], "written": time.time(),
            "cases": [{k: v for k, v in s.items() if k not in OPERATOR_ONLY} for s in statuses]}


def commit_statuses(statuses: list[dict[str, Any]], ctx: dict[str, Any]) -> None:
    """Commit volume-less status records (cases rejected before any volume was read) as one file."""
    if statuses:
        name = shard_io.shard_name([s["case_id"] for s in statuses])
        shard_io.write_commit(Path(ctx["out"]) / shard_io.STATUS_DIR / f"{name}.json", _commit_record(statuses, ctx))


def _close(writer: shard_io.ShardWriter, statuses: list[dict[str, Any]], ctx: dict[str, Any]) -> None:
    """Commit ``statuses``: into the footer of the shard holding their volumes, or as a status
    record when none of them has one."""
    if not statuses:
        return
    if not writer.rows:
        commit_statuses(statuses, ctx)
        return
    name = writer.commit(_commit_record(statuses, ctx), [s["case_id"] for s in statuses])
    for s in statuses:
        s["shard"] = name


def prepare_batch(cases: list[str], ctx: dict[str, Any], progress: str | None = None) -> list[dict[str, Any]]:
    """Ray task body: prepare cases (JSON records) in order; returns their status records.
    ``progress``: a file this task rewrites with the index of the case it starts (the driver's
    per-case timeout, ``prepare.case_timeout_s``, watches it).

    Each volume is written to the open shard as soon as it is preprocessed (its own row group),
    so the task holds one volume at a time; a shard is closed (committed) once it holds
    ``ctx["shard_bytes"]`` of voxels. The shard name is a hash of the case ids it completes, so
    a task retried after a crash writes the same files again, never second copies."""
    cfg = PrepareConfig(**ctx["cfg"])
    ctx = dict(ctx, done=set(ctx.get("done", ())))  # one lookup per case
    sch = shard_io.schema(cfg.dtype, bool(ctx.get("keep_paths")), cfg.lesion_prior)
    folder = Path(ctx["out"]) / shard_io.SHARDS_DIR
    out: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    writer = shard_io.ShardWriter(folder, sch)
    marker = Path(progress) if progress else None
    if marker is not None:  # libraries load before the first case's clock starts (prepare.case_timeout_s)
        _preprocess(cfg, ctx["config_hash"], False)
    try:
        for text in cases:
            case = json.loads(str(text))
            if marker is not None:  # the driver times each case from when this changes
                shard_io.write_progress(marker, case["index"])
            status, row = process_case(case, ctx)
            out.append(status)
            if status["status"] == "skipped":
                continue
            pending.append(status)
            if row is not None:
                writer.write(row)
                del row
            if writer.bytes >= ctx["shard_bytes"]:
                _close(writer, pending, ctx)
                writer, pending = shard_io.ShardWriter(folder, sch), []
        _close(writer, pending, ctx)
    finally:
        writer.abort()  # a no-op once committed
    return out


def case_descriptors(case: dict[str, Any], ctx: dict[str, Any]) -> np.ndarray | None:
    """Ray task body for fitting the MPS prior: the patch descriptors [L, F] of one volume, or
    None when the case is rejected."""
    _, out = process_case(case, dict(ctx, prior_fit=True, done=[]))
    return out["prior_desc"] if out is not None else None


def case_volume(case: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any] | None:
    """Streaming mode (no shards): one raw case as the volume row training's sampler reads, or
    None when it is rejected."""
    _, row = process_case(case, dict(ctx, done=[]))
    return row
