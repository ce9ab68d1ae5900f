"""``raymim prepare`` on Ray tasks: discover -> estimate memory -> read + preprocess + write shards -> manifest.

Execution: discovery gives one small JSON record per input. A first pass of Ray tasks reads each
case's header and estimates the memory preparing it takes (:mod:`raymim.data.memory`); a case
that needs more than the largest Ray node offers (or ``prepare.max_case_memory_gb``) is rejected
there with that reason, instead of being OOM-killed and retried by Ray without end. The others
are grouped into batches of cases with similar estimates, and each batch runs
:func:`raymim.data.worker.prepare_batch` as one Ray task with ``num_cpus=1`` and
``memory=`` its largest estimate, so Ray never starts more volumes on a node than its memory
holds. A task streams: each volume is written as its own row group as soon as it is
preprocessed, so it holds one decoded volume at a time whatever ``prepare.shard_mb`` is, and
memory stays flat with the number of volumes. Volumes never go through the object store: each
task writes its own shards (temp name, then atomic rename) and returns only small status
records. A batch whose worker dies (out of memory, a crash in a decoder, a lost node) is run
again one case per task, so the case that brought it down is rejected alone; a case that runs
longer than ``prepare.case_timeout_s`` (a hung decoder) is rejected "timed out", its worker killed,
and the rest of its batch run again (:func:`_run_batches`). Without Ray (not installed), the
same batches run in a pool of local processes (:func:`_run_batches_here`). No crop is cut
here: training draws fresh crops from the stored volumes every pass (:mod:`raymim.data.crops`,
:mod:`raymim.data.stream`).

One run per output folder: a second ``prepare`` on the same ``out`` stops with
:class:`raymim.data.lock.PrepareLocked` (exit 2) while the first holds ``<out>/.raymim-prepare.lock``;
a crashed run's lock is taken over (:mod:`raymim.data.lock`).

Resume: a case is finished once a committed shard (or volume-less status record) names its
case id (keyed hash of its content) under the same config hash; a rerun skips it. Rejections
caused by the machine, not the file (``"retry"`` in the record: unreadable input, out of memory,
too large for every node, a dead worker, a timeout) are examined again by every rerun, and so is
a case whose file changed (a new content, a new case id) or appeared (a manifest row whose file
was missing). A changed input *replaces* its old volume: every record carries ``input_id`` (keyed
hash of where the input was found), and once the new content is committed the volume of the old
one is removed from its shard and from the commit records (:func:`_replace_changed`), so readers,
manifest.json and a later resume see one version only. The manifest, quarantine.csv and the
operator report list only rejections of cases in this run's input, each case by its latest
record. ``--overwrite`` deletes previous shards, status records and reports first.

Deviation: rewriting a shard to drop a stale volume moves the row groups after it, so a training
run reading the folder while ``prepare`` updates it may read the wrong row; prepare a folder
while nothing trains on it (the lock covers concurrent prepares only).
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
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from raymim.atomic import write_text_atomic
from raymim.config import ConfigError, PrepareConfig, config_hash
from raymim.data import shards as shard_io
from raymim.data.lock import OutputLock
from raymim.data.memory import estimate_cases, largest_node_memory, request_bytes
from raymim.data.worker import case_descriptors, commit_statuses, prepare_batch, process_case
from raymim.io.deid import dataset_key, deid_key, keyed_id
from raymim.io.discover import discover, discover_cases
from raymim.io.operator_report import report_path, write_operator_report
from raymim.ray_session import ensure_ray, ray_available

__all__ = ["discover_cases", "prepare", "prior_model"]


def _context(cfg: PrepareConfig, key: bytes, out: Path | None, keep_paths: bool, done: set[str],
             labels: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"cfg": dataclasses.asdict(cfg), "key": key.hex(), "out": str(out) if out else None,
            "config_hash": _run_hash(cfg, keep_paths, labels), "keep_paths": keep_paths, "done": sorted(done),
            "shard_bytes": int(cfg.shard_mb) << 20, "classes": (labels or {}).get("classes")}


# Crop-sampler settings that change only what training cuts, not what is stored.
SAMPLER_FIELDS = ("crops_per_volume", "crop_pos_fraction")
# Settings of how a run uses the cluster, not of what it stores (a rerun may change them).
RUNTIME_FIELDS = ("max_case_memory_gb", "case_timeout_s")
TASK_NAME = "raymim-prepare"  # the Ray task name of a batch (``ray list tasks``, the dashboard)
PROGRESS_DIR = "_progress"  # the tasks' progress files, for the per-case timeout (removed after the run)


def _run_hash(cfg: PrepareConfig, keep_paths: bool, labels: dict[str, Any] | None = None) -> str:
    """The hash of what a run stores: the prepare settings but the sampler's and the runtime ones,
    plus the command's ``--classes`` / ``--domain`` / ``--domain-column`` when given (``labels``)."""
    stored = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SAMPLER_FIELDS + RUNTIME_FIELDS}
    extra = {k: v for k, v in (labels or {}).items() if v is not None}
    return config_hash({"prepare": stored, "keep_paths": keep_paths, "schema_version": shard_io.SCHEMA_VERSION,
                        **({"inputs": extra} if extra else {})})


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


def _system_failures() -> tuple[type[BaseException], ...]:
    """Ray's errors for a task whose worker or node died (not an exception of our code)."""
    import ray.exceptions as rx

    names = ("WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "ObjectLostError", "LocalRayletDiedError",
             "TaskUnschedulableError")
    return tuple(getattr(rx, n) for n in names if hasattr(rx, n))


def _task_options(memory: int | None, retries: int) -> dict[str, Any]:
    # SPREAD: volumes go to every node of the cluster from the start (the default policy fills
    # the driver's node first), as reading and preprocessing scale with the nodes' cores and disks
    opts: dict[str, Any] = {"num_cpus": 1, "max_retries": retries, "name": TASK_NAME, "scheduling_strategy": "SPREAD"}
    if memory:
        opts["memory"] = int(memory)
    return opts


def memory_plan(cases: list[dict[str, Any]], cfg: PrepareConfig) -> tuple[list[int | None], int, int]:
    """``(estimates, limit, node)``: each case's estimated bytes (None: no readable header; Ray
    tasks read the headers, in parallel), the most one case may need (``limit``: the largest
    node's ``memory`` resource, capped by ``prepare.max_case_memory_gb``) and that node's
    resource (``node``, 0 when Ray reports none or is not installed: then no task asks for memory)."""
    node = largest_node_memory() if ray_available() else 0
    limit = node or (1 << 62)
    if cfg.max_case_memory_gb is not None:
        limit = min(limit, int(cfg.max_case_memory_gb * (1 << 30)))
    if not cases:
        return [], limit, node
    if not ray_available():  # header reads only: fast enough in this process
        return estimate_cases(cases, dataclasses.asdict(cfg)), limit, node
    import ray

    chunk = max(16, math.ceil(len(cases) / (4 * _cluster_cpus())))
    task = ray.remote(estimate_cases).options(num_cpus=1, name=f"{TASK_NAME}-estimate")
    refs = [task.remote(cases[i:i + chunk], dataclasses.asdict(cfg)) for i in range(0, len(cases), chunk)]
    return [e for part in ray.get(refs) for e in part], limit, node


def too_large_reason(estimate: int, limit: int, node: int, cfg: PrepareConfig) -> str:
    """Why a case is rejected before it is read: its memory estimate exceeds ``limit``."""
    where = "prepare.max_case_memory_gb" if cfg.max_case_memory_gb is not None and \
        (not node or limit < node) else "the largest Ray node's memory"
    return (f"needs about {estimate / (1 << 30):.1f} GiB of memory to prepare (estimated from its header), more "
            f"than {where} ({limit / (1 << 30):.1f} GiB); a larger node or a coarser prepare.spacing fits it")


def plan_batches(cases: list[dict[str, Any]], estimates: list[int | None], per_task: int, limit: int,
                 node: int) -> tuple[list[tuple[list[dict[str, Any]], int | None]], list[tuple[dict[str, Any], int]]]:
    """``(batches, too_large)``: tasks as ``(cases, memory request)``, largest requests first, at
    most ``per_task`` cases each and never a case with less than half its batch's request (so a
    small volume does not hold a large one's memory); and the ``(case, estimate)`` pairs over ``limit``."""
    fits, too_large = [], []
    for case, est in zip(cases, estimates):
        if est is not None and est > limit:
            too_large.append((case, est))
        else:
            fits.append((case, min(request_bytes(est), limit) if node else None))
    fits.sort(key=lambda ce: -(ce[1] or 0))  # stable: discovery order within one request size
    batches: list[tuple[list[dict[str, Any]], int | None]] = []
    for case, req in fits:
        if not batches or len(batches[-1][0]) >= per_task or (req or 0) < (batches[-1][1] or 0) // 2:
            batches.append(([], req))
        batches[-1][0].append(case)
    return batches, too_large


def _done(commits: list[dict[str, Any]]) -> set[str]:
    """Case ids a run skips: every committed case but the rejections marked ``retry``."""
    return {c["case_id"] for r in commits for c in r["cases"] if not c.get("retry")}


def _driver_status(case: dict[str, Any], ctx: dict[str, Any], reason: str) -> dict[str, Any]:
    """The status record of a case rejected by the driver (never read): keyed by its input, and
    marked ``retry`` (the next run examines it again)."""
    input_id = keyed_id(bytes.fromhex(ctx["key"]), "input:" + case["rel"])
    status = {"index": case["index"], "case_id": input_id, "status": "rejected", "reason": reason, "voxels": 0,
              "domain": case.get("domain"), "input_bytes": 0, "retry": True, "input_id": input_id}
    if ctx.get("keep_paths"):
        status["source"] = case["rel"]
    return status


def _run_batches(batches: list[tuple[list[dict[str, Any]], int | None]], ctx: dict[str, Any], out: Path,
                 progress: bool) -> list[dict[str, Any]]:
    """Run :func:`prepare_batch` as one Ray task per batch; returns every case's status record.

    A batch whose worker died is split into one task per case (with the cases its shards had
    committed before it died marked done); a single case whose worker dies is rejected.

    Per-case timeout (``prepare.case_timeout_s``, 0: none): each task rewrites a small progress
    file (``<out>/_progress/``) with the index of the case it starts; the driver polls them once a
    second and times a case from when it first sees that index. A case running longer is
    rejected ("timed out after N s", marked ``retry``), its task is cancelled (``ray.cancel(force=True)``
    kills the worker, whatever the decoder is blocked in), and the batch's other cases that it had
    not committed run again in one new task. Deviation: the clock starts when the driver sees the
    case (up to the poll interval, plus the shared file system's delay, late), and a task's first
    case is timed only once its worker has loaded the libraries."""
    import ray
    from tqdm import tqdm

    task = ray.remote(prepare_batch)
    failures = _system_failures()
    timeout = float(ctx["cfg"].get("case_timeout_s") or 0.0)
    watch_dir = out / PROGRESS_DIR
    shutil.rmtree(watch_dir, ignore_errors=True)
    watch_dir.mkdir(parents=True)
    pending: dict[Any, tuple[list[dict[str, Any]], int | None, Path]] = {}
    seen: dict[Any, tuple[int, float]] = {}  # task -> (case index it runs, when the driver first saw it)

    def submit(cases: list[dict[str, Any]], mem: int | None, retries: int, ctx_ref: Any) -> None:
        marker = watch_dir / uuid.uuid4().hex
        ref = task.options(**_task_options(mem, retries)).remote([json.dumps(c) for c in cases], ctx_ref,
                                                                 str(marker) if timeout else None)
        pending[ref] = (cases, mem, marker)

    def fresh() -> Any:  # the context with every case committed so far marked done
        return ray.put(dict(ctx, done=sorted(_done(shard_io.load_commits(out)))))

    ctx_ref = ray.put(ctx)
    for cases, mem in batches:
        submit(cases, mem, 2, ctx_ref)
    statuses: list[dict[str, Any]] = []
    bar = tqdm(total=sum(len(c) for c, _ in batches), unit="case", desc="prepare", disable=not progress,
               file=sys.stderr)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
        for ref in ready:
            cases, mem, marker = pending.pop(ref)
            seen.pop(ref, None)
            marker.unlink(missing_ok=True)
            try:
                got = ray.get(ref)
            except failures as exc:
                if len(cases) > 1:
                    again = fresh()
                    for c in cases:
                        submit([c], mem, 1, again)
                    continue
                got = [_driver_status(cases[0], ctx, f"the worker preparing it died ({type(exc).__name__}: out of "
                                      "memory, a crash while decoding, or a lost node)")]
                commit_statuses(got, ctx)
            statuses += got
            bar.update(len(got))
        if not timeout:
            continue
        now = time.monotonic()
        for ref in list(pending):
            cases, mem, marker = pending[ref]
            index = shard_io.read_progress(marker)
            if index is None:
                continue  # not started yet (waiting for a CPU or memory)
            if seen.get(ref, (None,))[0] != index:
                seen[ref] = (index, now)
                continue
            if now - seen[ref][1] <= timeout or ray.wait([ref], timeout=0)[0]:
                continue  # within its time, or finished meanwhile (collected next round)
            ray.cancel(ref, force=True)
            del pending[ref], seen[ref]
            marker.unlink(missing_ok=True)
            hung = next(c for c in cases if c["index"] == index)
            got = [_driver_status(hung, ctx, f"timed out after {timeout:g} s (prepare.case_timeout_s)")]
            commit_statuses(got, ctx)
            statuses += got
            bar.update(1)
            rest = [c for c in cases if c["index"] != index]
            if rest:
                submit(rest, mem, 2, fresh())
    bar.close()
    shutil.rmtree(watch_dir, ignore_errors=True)
    return statuses


def _run_batches_here(batches: list[tuple[list[dict[str, Any]], int | None]], ctx: dict[str, Any], out: Path,
                      progress: bool) -> list[dict[str, Any]]:
    """:func:`_run_batches` without Ray: each batch runs :func:`prepare_batch` in a pool of
    local processes (one per core, started with ``spawn``). A batch whose process died (which
    breaks the pool, and fails every batch still in it) is run again one case per process, with
    the cases committed so far marked done; a case that still breaks its pool is run once more
    alone, and rejected if its process dies again.

    Deviations from the Ray path: no per-case timeout (``prepare.case_timeout_s`` needs Ray's
    task cancellation; a hung decoder hangs the run), no ``memory=`` requests (the pool runs
    as many cases at once as there are cores) and one machine only."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state forked from this one
    statuses: list[dict[str, Any]] = []
    bar = tqdm(total=sum(len(c) for c, _ in batches), unit="case", desc="prepare", disable=not progress,
               file=sys.stderr)

    def run(todo: list[list[dict[str, Any]]], context: dict[str, Any], workers: int) -> list[list[dict[str, Any]]]:
        broken: list[list[dict[str, Any]]] = []
        with ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
            futures = {pool.submit(prepare_batch, [json.dumps(c) for c in cases], context): cases for cases in todo}
            for fut in as_completed(futures):
                try:
                    got = fut.result()
                except BrokenProcessPool:
                    broken.append(futures[fut])
                    continue
                statuses.extend(got)
                bar.update(len(got))
        return broken

    def fresh() -> dict[str, Any]:  # the context with every case committed so far marked done
        return dict(ctx, done=sorted(_done(shard_io.load_commits(out))))

    todo = [cases for cases, _ in batches]
    broken = run(todo, ctx, min(len(todo), _cluster_cpus())) if todo else []
    singles = [[c] for cases in broken for c in cases]
    broken = run(singles, fresh(), min(len(singles), _cluster_cpus())) if singles else []
    for cases in broken:  # alone this time: only the case that kills its process fails
        if run([cases], fresh(), 1):
            got = [_driver_status(cases[0], ctx, "the process preparing it died (out of memory or a crash while "
                                  "decoding)")]
            commit_statuses(got, ctx)
            statuses.extend(got)
            bar.update(1)
    bar.close()
    return statuses


def prior_model(cases: list[dict[str, Any]], cfg: PrepareConfig, ctx: dict[str, Any], out: Path | None,
                 progress: bool = True) -> dict[str, Any] | None:
    """The MPS prior's population model (``prepare.prior_scope="population"``), as a dict for the tasks.

    Reused from ``out/prior_model.json`` when it was fitted under this run's config hash (a
    resumed run scores with the same model); otherwise fitted on the volumes of up to
    ``prepare.prior_fit_cases`` cases spread evenly over the input (one Ray task per volume that
    returns only its patch descriptors) and saved there.
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
    if sample and not ray_available():  # in this process, one volume at a time
        estimates, limit, _ = memory_plan(sample, cfg)
        found = [case_descriptors(c, ctx) for c, e in zip(sample, estimates, strict=True) if e is None or e <= limit]
        descs = [d.reshape(-1, d.shape[-1]) for d in found if d is not None and len(d)]
    elif sample:  # one Ray task per volume, asking for its memory (cases too large for any node left out)
        import ray

        estimates, limit, node = memory_plan(sample, cfg)
        task, ctx_ref, failures = ray.remote(case_descriptors), ray.put(ctx), _system_failures()
        refs = [task.options(**_task_options(min(request_bytes(e), limit) if node else None, 1)).remote(c, ctx_ref)
                for c, e in zip(sample, estimates) if e is None or e <= limit]
        for ref in refs:
            try:
                desc = ray.get(ref)
            except failures:
                continue
            if desc is not None and len(desc):
                descs.append(desc.reshape(-1, desc.shape[-1]))
    try:
        model = fit_prior(np.concatenate(descs) if descs else np.empty((0, 0), np.float32), cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if path is not None:
        write_text_atomic(path, json.dumps({"config_hash": ctx["config_hash"], **model.to_dict()}))
    return model.to_dict()


def _cluster_cpus() -> int:
    if not ray_available():
        return max(1, os.cpu_count() or 1)
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _reset(out: Path) -> None:
    for sub in (shard_io.SHARDS_DIR, shard_io.STATUS_DIR, PROGRESS_DIR):
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
            progress: bool = True, deid_key_file: str | os.PathLike | None = None,
            report: str | os.PathLike | None = None, classes: dict[str, int] | None = None,
            domain: str | None = None, domain_column: str | None = None) -> dict[str, Any]:
    """Prepare ``input`` into Parquet shards of preprocessed volumes under ``out_dir``; returns the run summary.

    ``classes`` ({ROI / segment name: label value}) selects and numbers the ROIs of RTSTRUCT /
    DICOM-SEG labels (default: all, 1..K in file order) and names the values of label maps; each
    labelled case's ``{name: value}`` is kept in manifest.json. ``domain``: the domain of every
    case without one; ``domain_column``: the manifest column that holds the domains.

    The summary's ``exit_code`` is 0 when every case is written, 3 when some were quarantined,
    1 when the rejected fraction exceeds ``max_rejected`` (default ``cfg.max_rejected``).
    Raises :class:`raymim.config.ConfigError` for unusable inputs or a config that differs from
    the one ``out_dir`` was prepared with (use ``overwrite=True``), or a de-identification key
    (``deid_key_file``, see :mod:`raymim.io.deid`) other than the one it was prepared with. Input
    paths go only to the operator report ``report`` (default ``<out>.operator-report.csv``,
    outside the dataset; :mod:`raymim.io.operator_report`).

    Raises :class:`raymim.data.lock.PrepareLocked` while another run holds ``out_dir``'s lock.
    """
    out = Path(out_dir).resolve()  # Ray workers run in another working directory
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        return _prepare(input, out, cfg, overwrite=overwrite, keep_paths=keep_paths, max_rejected=max_rejected,
                        progress=progress, deid_key_file=deid_key_file, report=report,
                        labels={"classes": dict(classes) if classes else None, "domain": domain,
                                "domain_column": domain_column})


def _prepare(input: str | os.PathLike, out: Path, cfg: PrepareConfig, *, overwrite: bool, keep_paths: bool,
             max_rejected: float | None, progress: bool, deid_key_file: str | os.PathLike | None,
             report: str | os.PathLike | None, labels: dict[str, Any]) -> dict[str, Any]:
    """:func:`prepare` under the output folder's lock."""
    start = time.perf_counter()
    try:  # input paths go to the operator report, outside the dataset (raymim.io.operator_report)
        report_file = report_path(out, report)
        found = discover(input, domain=labels["domain"], domain_column=labels["domain_column"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cases = found.cases
    # Files that are not image series (RTSTRUCT, SEG, READMEs, ...) and second copies of a scan:
    # named on the console only (their paths never enter the dataset), counted in the summary.
    for rec in found.skipped:
        print(f"not an image: {rec['rel']}: {rec['reason']}", file=sys.stderr)
    for rec in found.duplicates:
        print(f"duplicate: {rec['rel']}: {rec['reason']}", file=sys.stderr)
    if overwrite:
        _reset(out)
    run_hash = _run_hash(cfg, keep_paths, labels)
    previous = shard_io.load_commits(out, clean=True)  # under the lock: no task of another run writes
    other = {r["config_hash"] for r in previous} - {run_hash}
    if other:
        raise ConfigError(f"{out} holds shards prepared with config hash {sorted(other)}, this run has "
                          f"{run_hash}; pass --overwrite or choose another --out.")
    try:  # the key lives outside the dataset, which records its fingerprint (raymim.io.deid)
        key = dataset_key(out, deid_key_file, overwrite=overwrite)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    done = _done(previous)
    if ray_available():
        ensure_ray(log_to_driver=False)
    ctx = _context(cfg, key, out, keep_paths, done, labels)
    ctx["prior_model"] = prior_model(cases, cfg, ctx, out, progress)
    # Inputs known bad before reading (missing, escaping, not a file): rejected here, no task.
    statuses = [process_case(c, ctx)[0] for c in cases if c.get("error")]
    commit_statuses([s for s in statuses if s["status"] != "skipped"], ctx)
    readable = [c for c in cases if not c.get("error")]
    estimates, limit, node = memory_plan(readable, cfg)
    batches, too_large = plan_batches(readable, estimates, _batch_size(cfg, len(readable), _cluster_cpus()),
                                      limit, node)
    big = [_driver_status(c, ctx, too_large_reason(e, limit, node, cfg)) for c, e in too_large]
    commit_statuses(big, ctx)
    statuses += big + (_run_batches if ray_available() else _run_batches_here)(batches, ctx, out, progress)
    replaced = _replace_changed(out, cases, statuses)
    summary, rejected = _finish(out, cfg, cases, statuses, run_hash, keep_paths, max_rejected, start, labels)
    operator = write_operator_report(report_file, found, statuses, rejected)
    return dict(summary, replaced=replaced, not_images=len(found.skipped), duplicates=len(found.duplicates),
                operator_report=operator)


def _replace_changed(out: Path, cases: list[dict[str, Any]], statuses: list[dict[str, Any]]) -> int:
    """Remove the stored volumes of inputs whose content changed; returns how many went.

    A status record carries its input's ``input_id`` (keyed hash of where it was found). A stored
    volume is stale when its input now holds other content: this run read that input and gave it
    another content-based case id (ok or rejected; a case rejected before its content was read,
    whose case id is its input id, says nothing about its content), and no input of this run has
    the volume's content. Its row is removed from its shard (:func:`raymim.data.shards.drop_volumes`),
    so no reader serves it, and its entry from the commit records, so manifest.json drops it and a
    later run that finds the old content again prepares it again. Run after the new version is
    committed: a run killed before this step leaves both, and the next run removes the old one."""
    current = {s["input_id"]: s for s in statuses if s.get("input_id") and s["case_id"] != s["input_id"]}
    present = {s["case_id"] for s in statuses}
    stale: dict[str, set[str]] = defaultdict(set)
    for rec in shard_io.load_commits(out):
        for c in rec["cases"] if rec["shard"] else ():
            now = current.get(c.get("input_id"))
            if c["status"] == "ok" and now is not None and now["case_id"] != c["case_id"] \
                    and c["case_id"] not in present:
                stale[rec["shard"]].add(c["case_id"])
                print(f"replaced: #{now['index']} {cases[now['index']]['rel']}: its content changed; the volume "
                      "of its previous content is removed", file=sys.stderr)
    return sum(shard_io.drop_volumes(out, shard, ids) for shard, ids in stale.items())


def _finish(out: Path, cfg: PrepareConfig, cases: list[dict[str, Any]], statuses: list[dict[str, Any]],
            run_hash: str, keep_paths: bool, max_rejected: float | None, start: float,
            labels: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write manifest.json and quarantine.csv from the committed records; ``(summary, the
    rejections it lists)``."""
    commits = shard_io.load_commits(out, clean=True)  # every task has ended: temp files are orphans
    index_of = {s["case_id"]: s["index"] for s in statuses}
    by_id: dict[str, dict[str, Any]] = {}
    for rec in sorted(commits, key=lambda r: r.get("written", 0.0)):  # a case's latest record wins
        for c in rec["cases"]:
            if c["status"] != "ok" and c["case_id"] not in index_of:
                continue  # rejected by an earlier run, gone from this input (a file added or changed since)
            if by_id.get(c["case_id"], {}).get("status") != "ok":  # a stored volume stays listed
                by_id[c["case_id"]] = dict(c, shard=rec["shard"])
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
                **{k: v for k, v in labels.items() if v is not None},
                "cases": [{k: v for k, v in c.items() if k != "input_bytes"} for c in per_case]}
    named = {json.dumps(c["classes"], sort_keys=True) for c in ok if c.get("classes")}
    if len(named) == 1:  # every labelled volume names its classes alike: the dataset's classes
        manifest["classes"] = json.loads(named.pop())
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
                rejected_fraction=round(fraction, 4), exit_code=code, out=str(out)), rejected


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable one-block summary for the CLI."""
    return (f"cases: {summary['cases']} ok {summary['ok']} rejected {summary['rejected']} "
            f"(skipped as already done: {summary['skipped']}; not images: {summary.get('not_images', 0)}; "
            f"duplicates written once: {summary.get('duplicates', 0)}; previous versions of changed inputs "
            f"replaced: {summary.get('replaced', 0)})\n"
            f"volumes: {summary['volumes']} ({summary['voxels'] / 1e6:.1f} M voxels) in {summary['shards']} shards, "
            f"{summary['bytes'] / 1e6:.1f} MB\n"
            f"throughput: {summary['volumes_per_s']:.2f} volumes/s, {summary['mb_per_s']:.1f} MB/s of input "
            f"({summary['seconds']:.1f} s)")
