"""``raymim prepare`` on Ray Data: discover -> read + preprocess + write volume shards -> manifest.

Execution: the case list (small: one JSON record per input) becomes a Ray Dataset with one block
per batch of cases; ``map_batches`` runs :func:`raymim.data.worker.process_batch` as tasks with
``num_cpus=1``, so every CPU of every node works on a batch and each task holds at most one
decoded volume plus one shard's worth of preprocessed volumes (``prepare.shard_mb``). Volumes
never go through the object store: each task writes its own shards (temp name, then atomic
rename) and returns only small status records. Memory therefore stays flat with the number of
volumes. No crop is cut here: training draws fresh crops from the stored volumes every pass
(:mod:`raymim.data.crops`, :mod:`raymim.data.stream`).

Resume: a case is finished once a committed shard (or volume-less status record) names its
case id (keyed hash of its content) under the same config hash; a rerun skips it. ``--overwrite``
deletes previous shards, status records and reports first.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from raymim.atomic import write_text_atomic
from raymim.config import ConfigError, PrepareConfig, config_hash
from raymim.data import shards as shard_io
from raymim.data.worker import case_descriptors, process_batch
from raymim.io.deid import deid_key
from raymim.io.discover import discover, discover_cases
from raymim.ray_session import ensure_ray

__all__ = ["discover_cases", "prepare", "prior_model"]


def _context(cfg: PrepareConfig, key: bytes, out: Path | None, keep_paths: bool, done: set[str]) -> dict[str, Any]:
    return {"cfg": dataclasses.asdict(cfg), "key": key.hex(), "out": str(out) if out else None,
            "config_hash": _run_hash(cfg, keep_paths), "keep_paths": keep_paths, "done": sorted(done),
            "shard_bytes": int(cfg.shard_mb) << 20}


# Crop-sampler settings that change only what training cuts, not what is stored.
SAMPLER_FIELDS = ("crops_per_volume", "crop_pos_fraction")


def _run_hash(cfg: PrepareConfig, keep_paths: bool) -> str:
    stored = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SAMPLER_FIELDS}
    return config_hash({"prepare": stored, "keep_paths": keep_paths, "schema_version": shard_io.SCHEMA_VERSION})


def streaming_context(input: str | os.PathLike, cfg: PrepareConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Streaming mode (pretraining from raw scans): ``(cases, ctx)`` for
    :func:`raymim.data.worker.case_volume`. Case ids use ``$RAYMIM_DEID_KEY`` when set, else a
    key that lives only as long as this process; the MPS prior's population model is fitted
    first when the prior is on."""
    ensure_ray(log_to_driver=False)
    cases = discover_cases(input)
    ctx = _context(cfg, deid_key(None), None, False, set())
    ctx["prior_model"] = prior_model(cases, cfg, ctx, None, progress=False)
    return cases, ctx


def _cases_dataset(cases: list[dict[str, Any]], per_block: int) -> Any:
    import ray

    items = [{"case": json.dumps(c)} for c in cases]
    return ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_block)))


def prior_model(cases: list[dict[str, Any]], cfg: PrepareConfig, ctx: dict[str, Any], out: Path | None,
                 progress: bool = True) -> dict[str, Any] | None:
    """The MPS prior's population model (``prepare.prior_scope="population"``), as a dict for the tasks.

    Reused from ``out/prior_model.json`` when it was fitted under this run's config hash (a
    resumed run scores with the same model); otherwise fitted on the volumes of up to
    ``prepare.prior_fit_cases`` cases spread evenly over the input (a Ray Data pass that keeps
    only the patch descriptors of whole volumes) and saved there.
    """
    if not cfg.lesion_prior or cfg.prior_scope != "population":
        return None
    import numpy as np

    from raymim.data.patch_stats import PriorModel, fit_prior

    path = out / shard_io.PRIOR_MODEL_FILE if out is not None else None
    try:  # a resumed run scores with the model it started with (an unreadable file is refitted)
        saved = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        saved = {}
    if saved.get("config_hash") == ctx["config_hash"]:
        return PriorModel.from_dict(saved).to_dict()
    usable = [c for c in cases if not c.get("error")]
    n = min(int(cfg.prior_fit_cases), len(usable))
    sample = [usable[i] for i in sorted({round(x) for x in np.linspace(0, len(usable) - 1, n)})] if n else []
    if progress:
        print(f"fitting the MPS lesion prior on {len(sample)} of {len(cases)} cases", file=sys.stderr)
    descs = []
    if sample:
        ds = _cases_dataset(sample, 1).flat_map(case_descriptors, fn_kwargs={"ctx": ctx}, num_cpus=1)
        descs = [b["desc"].reshape(-1, b["desc"].shape[-1])
                 for b in ds.iter_batches(batch_size=None, batch_format="numpy") if len(b["desc"])]
    try:
        model = fit_prior(np.concatenate(descs) if descs else np.empty((0, 0), np.float32), cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if path is not None:
        write_text_atomic(path, json.dumps({"config_hash": ctx["config_hash"], **model.to_dict()}))
    return model.to_dict()


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _reset(out: Path) -> None:
    for sub in (shard_io.SHARDS_DIR, shard_io.STATUS_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in ("manifest.json", "quarantine.csv", shard_io.PRIOR_MODEL_FILE):
        (out / name).unlink(missing_ok=True)


# Bytes of one stored volume assumed when sizing tasks: a 256 x 256 x 200 abdomen at the stored dtype.
TYPICAL_VOXELS = 256 * 256 * 200


def _batch_size(cfg: PrepareConfig, n_cases: int, n_cpu: int) -> int:
    """Cases per task: about one shard of volumes, but never fewer tasks than CPUs."""
    per_case = TYPICAL_VOXELS * 1.5 * (1 if cfg.dtype == "uint8" else (2 if cfg.dtype == "float16" else 4))
    per_shard = max(1, int((int(cfg.shard_mb) << 20) // per_case))
    return max(1, min(per_shard, math.ceil(n_cases / n_cpu)))


def prepare(input: str | os.PathLike, out_dir: str | os.PathLike, cfg: PrepareConfig, *,
            overwrite: bool = False, keep_paths: bool = False, max_rejected: float | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Prepare ``input`` into Parquet shards of preprocessed volumes under ``out_dir``; returns the run summary.

    The summary's ``exit_code`` is 0 when every case is written, 3 when some were quarantined,
    1 when the rejected fraction exceeds ``max_rejected`` (default ``cfg.max_rejected``).
    Raises :class:`raymim.config.ConfigError` for unusable inputs or a config that differs from
    the one ``out_dir`` was prepared with (use ``overwrite=True``).
    """
    import ray

    start = time.perf_counter()
    out = Path(out_dir).resolve()  # Ray workers run in another working directory
    try:
        found = discover(input)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cases = found.cases
    # Files that are not image series (RTSTRUCT, SEG, READMEs, ...) and second copies of a scan:
    # named on the console only (their paths never enter the dataset), counted in the summary.
    for rec in found.skipped:
        print(f"not an image: {rec['rel']}: {rec['reason']}", file=sys.stderr)
    for rec in found.duplicates:
        print(f"duplicate: {rec['rel']}: {rec['reason']}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _reset(out)
    run_hash = _run_hash(cfg, keep_paths)
    previous = shard_io.load_commits(out)
    other = {r["config_hash"] for r in previous} - {run_hash}
    if other:
        raise ConfigError(f"{out} holds shards prepared with config hash {sorted(other)}, this run has "
                          f"{run_hash}; pass --overwrite or choose another --out.")
    done = {c["case_id"] for r in previous for c in r["cases"]}
    ensure_ray(log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    ctx = _context(cfg, deid_key(out), out, keep_paths, done)
    ctx["prior_model"] = prior_model(cases, cfg, ctx, out, progress)
    n_cpu = _cluster_cpus()
    per_task = _batch_size(cfg, len(cases), n_cpu)
    ds = _cases_dataset(cases, per_task).map_batches(
        process_batch, batch_size=per_task, fn_kwargs={"ctx": ctx}, num_cpus=1)
    statuses = [json.loads(s) for batch in ds.iter_batches(batch_size=None) for s in batch["status"]]
    summary = _finish(out, cfg, cases, statuses, run_hash, keep_paths, max_rejected, start)
    return dict(summary, not_images=len(found.skipped), duplicates=len(found.duplicates))


def _finish(out: Path, cfg: PrepareConfig, cases: list[dict[str, Any]], statuses: list[dict[str, Any]],
            run_hash: str, keep_paths: bool, max_rejected: float | None, start: float) -> dict[str, Any]:
    """Write manifest.json and quarantine.csv from the committed records; build the summary."""
    commits = shard_io.load_commits(out)
    by_id: dict[str, dict[str, Any]] = {}
    for rec in commits:
        for c in rec["cases"]:
            by_id[c["case_id"]] = dict(c, shard=rec["shard"])
    index_of = {s["case_id"]: s["index"] for s in statuses}
    per_case = sorted(by_id.values(), key=lambda c: index_of.get(c["case_id"], 1 << 30))
    ok = [c for c in per_case if c["status"] == "ok"]
    rejected = [c for c in per_case if c["status"] != "ok"]
    this_run = [s for s in statuses if s["status"] != "skipped"]
    seconds = time.perf_counter() - start
    in_bytes = sum(s.get("input_bytes", 0) for s in this_run)
    shard_bytes = sum(r["bytes"] for r in commits if r["shard"])
    counts = {"cases": len(per_case), "ok": len(ok), "rejected": len(rejected),
              "skipped": len(statuses) - len(this_run), "volumes": len(ok),
              "voxels": sum(c["voxels"] for c in ok),
              "shards": sum(1 for r in commits if r["shard"]), "bytes": shard_bytes}
    fraction = len(rejected) / max(1, len(per_case))
    limit = cfg.max_rejected if max_rejected is None else max_rejected
    manifest = {"schema_version": shard_io.SCHEMA_VERSION, "config": dataclasses.asdict(cfg),
                "config_hash": run_hash, "keep_paths": keep_paths, "counts": counts,
                "cases": [{k: v for k, v in c.items() if k != "input_bytes"} for c in per_case]}
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case_id", "input", "reason"])
    for c in rejected:
        ref = c.get("source") if keep_paths else f"#{index_of[c['case_id']]}" if c["case_id"] in index_of else ""
        writer.writerow([c["case_id"], ref, c["reason"]])
    write_text_atomic(out / "quarantine.csv", buf.getvalue())
    for s in this_run:  # name rejected inputs on the console only (never in output files)
        if s["status"] == "rejected":
            print(f"quarantined #{s['index']} {cases[s['index']]['rel']}: {s['reason']}", file=sys.stderr)
    code = 1 if fraction > limit else (3 if rejected else 0)
    return dict(counts, seconds=round(seconds, 3), input_bytes=in_bytes,
                volumes_per_s=round(len(this_run) / seconds, 3) if seconds else 0.0,
                mb_per_s=round(in_bytes / 1e6 / seconds, 3) if seconds else 0.0,
                rejected_fraction=round(fraction, 4), exit_code=code, out=str(out))


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable one-block summary for the CLI."""
    return (f"cases: {summary['cases']} ok {summary['ok']} rejected {summary['rejected']} "
            f"(skipped as already done: {summary['skipped']}; not images: {summary.get('not_images', 0)}; "
            f"duplicates written once: {summary.get('duplicates', 0)})\n"
            f"volumes: {summary['volumes']} ({summary['voxels'] / 1e6:.1f} M voxels) in {summary['shards']} shards, "
            f"{summary['bytes'] / 1e6:.1f} MB\n"
            f"throughput: {summary['volumes_per_s']:.2f} volumes/s, {summary['mb_per_s']:.1f} MB/s of input "
            f"({summary['seconds']:.1f} s)")
