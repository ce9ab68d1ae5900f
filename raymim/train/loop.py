"""The per-worker pretraining loop, on Ray Train or (without Ray) in one process.

:func:`run_loop` is the loop; :func:`train_loop_per_worker` runs it on every worker of a
``TorchTrainer`` (:class:`RayRuntime`), and ``raymim pretrain`` runs it in its own process when Ray
is not installed (:class:`LocalRuntime`: same method, micro-step, optimiser, checkpoints and
resume; crops from :func:`raymim.data.stream.local_batches`).

The loop builds the registered method, wraps it for DDP, streams crops and steps AdamW with
warm-up + cosine, gradient accumulation, clipping and mixed precision. With
``train.compile`` each micro-step (forward + backward) runs through ``torch.compile``
(:class:`CompiledStep`, eager fallback on a compile error).

Checkpoints (every ``train.checkpoint_every`` optimiser steps and at the end) hold everything a
resumed run needs to continue exactly: model, optimiser, scheduler, scaler, step, epoch, the
number of batches already consumed in the current epoch, and the RNG states. A restarted worker
group (``FailureConfig``) or a re-submitted run with the same name picks the latest one up through
``ray.train.get_checkpoint()``.

"Where in the data": every worker builds its own crop stream for each iterator pass
(:func:`raymim.data.stream.crop_stream`: ``epochs_per_pass`` data passes, fresh crops drawn and
augmented in Ray Data tasks, seeded by (seed, pass, volume), order preserved), iterates it with
a local shuffle seeded by ``(seed, pass)``, and on resume skips the batches the checkpoint says were
consumed in the current pass: the same rows, since the stream is deterministic. The ``epoch``
metric counts passes x ``epochs_per_pass``.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # Ray Data picks the batch format from the collate function's class
    from ray.data.collate_fn import NumpyBatchCollateFn
except ImportError:  # without Ray (raymim.train.loop.LocalRuntime) the class is only a callable
    NumpyBatchCollateFn = object  # type: ignore[assignment,misc]

from raymim.config import RaymimConfig, config_from_dict
from raymim.data.stream import crop_stream
from raymim.train import checkpoint as ckpt
from raymim.train.reporting import say
from raymim.train.schedule import (
    autocast,
    build_optimizer,
    build_scaler,
    build_scheduler,
    effective_batch,
    resolve_precision,
)

# Columns that ride along with the image when present (strings stay Python lists).
PASSTHROUGH = ("label", "report", "domain", "lesion_prob", "case_id")


class BatchCollate(NumpyBatchCollateFn):
    """Numeric columns -> tensors (image as float32 ``[B, 1, D, H, W]``), text -> lists."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in batch.items():
            if key != "image" and key not in PASSTHROUGH:
                continue
            arr = np.asarray(value)
            if arr.dtype.kind in "fiub":
                with warnings.catch_warnings():  # Arrow buffers are read-only; the batch is never written
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    out[key] = torch.as_tensor(arr)
            else:
                out[key] = [None if v is None else str(v) for v in arr.tolist()]
        out["image"] = out["image"].float().unsqueeze(1)
        return out


def _rng_state() -> dict[str, Any]:
    """torch / numpy / python RNG states as tensors and numbers (``weights_only``-loadable)."""
    _, np_keys, np_pos, *_ = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.as_tensor(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "python_version": int(version),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": float("nan") if gauss is None else float(gauss),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    gauss = state["python_gauss"]
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()),
                     None if np.isnan(gauss) else gauss))


def _restore_state(run_dir: str | None, cfg: RaymimConfig,
                   recorded: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest of Ray Train's latest checkpoint and the checkpoints found in ``run_dir`` (local
    storage), so a checkpoint that reached storage just before a worker or the driver died, but
    that Ray Train had not recorded yet, still counts. Unreadable (partly copied) ones are skipped.

    Returns ``(state, unrecorded)``: ``unrecorded`` is the folder of the restored checkpoint when
    it is one Ray Train's run snapshot does not list (else ``None``); :func:`_record_restored`
    reports it so Ray Train keeps and prunes it like the checkpoints it recorded itself.
    ``recorded``: the state of Ray Train's latest checkpoint (:meth:`RayRuntime.recorded_state`)."""
    states: list[tuple[dict[str, Any], Path | None]] = []
    if recorded is not None:
        states.append((recorded, None))
    on_disk = sorted(Path(run_dir).glob("checkpoint_step*"), reverse=True) if run_dir else []
    for d in on_disk:
        if states and int(states[0][0]["step"]) >= int(d.name.removeprefix("checkpoint_step") or 0):
            break
        try:
            states.append((ckpt.read_state(d, cfg), d))
            break
        except ckpt.CheckpointMismatchError:
            raise
        except Exception as exc:  # noqa: BLE001 - partly written when its writer died
            say(f"[raymim] ignoring unreadable checkpoint {d}: {exc}")
    if not states:
        return None, None
    return max(states, key=lambda s: int(s[0]["step"]))


def _record_restored(unrecorded: Path | None, state: dict[str, Any] | None, rank: int, world: int,
                     device: torch.device) -> None:
    """Report a restored checkpoint Ray Train had not recorded (written by the workers of a killed
    driver after its last recorded report), under its own folder name, so that Ray Train's run
    snapshot lists it: ``keep_checkpoints`` then prunes the older ones, and the run's result points
    at it even when no step is left to train. Every rank takes part (a report is collective); rank 0
    reports a copy of the folder, as the files are rewritten in place."""
    import ray.train

    flag = torch.tensor([0 if unrecorded is None else 1], device=device)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if not int(flag.item()):
        return
    best = float(state.get("best", float("inf")))
    meta = ckpt.read_meta(unrecorded) if unrecorded is not None else {}
    # the same keys as a checkpoint report, so Tune's schedulers see the metric they select on
    metrics = {"step": int(state["step"]), "epoch": int(state["epoch"]), "loss": float(meta.get("loss", best)),
               "best_loss": best}
    if rank != 0 or unrecorded is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / unrecorded.name
        shutil.copytree(unrecorded, copy)
        say(f"[raymim] recording checkpoint {unrecorded.name} (written after the last recorded one)")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(copy)),
                         checkpoint_dir_name=unrecorded.name)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for ``TorchTrainer(train_loop_per_worker=...)``.

    ``config``: ``{"cfg": <nested RaymimConfig dict>, "mlflow_uri": str | None,
    "mlflow_run_id": str | None}``.
    """
    run_loop(config, RayRuntime())


class RayRuntime:
    """What :func:`run_loop` asks of Ray Train on a worker: its rank, device, DDP wrapping, object
    refs, the crop stream's batches, the restored checkpoint and the checkpoint reports."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def where(self) -> str:
        import ray

        return f"node {ray.get_runtime_context().get_node_id()}"

    def wrap(self, method: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        import ray.train.torch

        if self.world == 1:
            return method.to(device)
        return ray.train.torch.prepare_model(method, parallel_strategy_kwargs={"find_unused_parameters": True})

    def get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref)

    def recorded_state(self, cfg: RaymimConfig) -> dict[str, Any] | None:
        import ray.train

        restored = ray.train.get_checkpoint()
        if restored is None:
            return None
        with restored.as_directory() as d:
            return ckpt.read_state(d, cfg)

    def record_restored(self, unrecorded: Path | None, state: dict[str, Any] | None, device: torch.device) -> None:
        _record_restored(unrecorded, state, self.rank, self.world, device)

    def batches(self, stream: dict[str, Any], epoch: int, per_pass: int, tc: Any, driver: Any) -> Any:
        return crop_stream(stream, epoch, self.rank, self.world, per_pass, driver).iter_torch_batches(
            batch_size=tc.batch_size, collate_fn=BatchCollate(), drop_last=True, prefetch_batches=2,
            local_shuffle_buffer_size=max(4 * tc.batch_size, 8), local_shuffle_seed=tc.seed * 1000 + epoch,
        )

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, dir_name: str | None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics, checkpoint=None)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_dir_name=dir_name)


class LocalRuntime:
    """:func:`run_loop` in this process, without Ray (``raymim pretrain`` when Ray is not installed;
    the GPU evidence preset): one worker, the crops of :func:`raymim.data.stream.local_batches`,
    checkpoints copied to ``run_dir/checkpoint_step<N>`` (atomically: written beside it, then
    renamed) and the ``keep`` newest kept, which is the layout Ray Train writes, so
    :func:`_restore_state` resumes from it the same way.

    Deviations from the Ray path: a single worker (``train.num_workers`` is not used), no restart
    on failure (``train.max_failures``: rerun the command, it resumes), no Tune callbacks."""

    rank, world = 0, 1

    def __init__(self, run_dir: str, keep: int, use_gpu: bool, workers: int) -> None:
        self.run_dir, self.keep, self.use_gpu, self.workers = Path(run_dir), keep, use_gpu, workers
        self.latest: Path | None = None

    def device(self) -> torch.device:
        return torch.device("cuda" if self.use_gpu and torch.cuda.is_available() else "cpu")

    def where(self) -> str:
        import platform

        return f"host {platform.node()} (no Ray)"

    def wrap(self, method: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return method.to(device)

    def get(self, value: Any) -> Any:
        return value

    def recorded_state(self, cfg: RaymimConfig) -> dict[str, Any] | None:
        return None  # the on-disk checkpoints are all there is (_restore_state reads them)

    def record_restored(self, unrecorded: Path | None, state: dict[str, Any] | None, device: torch.device) -> None:
        if unrecorded is not None:
            self.latest = unrecorded

    def batches(self, stream: dict[str, Any], epoch: int, per_pass: int, tc: Any, driver: Any) -> Any:
        from raymim.data.stream import local_batches

        collate = BatchCollate()
        for batch in local_batches(stream, epoch, tc.batch_size, per_pass, shuffle_buffer=max(4 * tc.batch_size, 8),
                                   shuffle_seed=tc.seed * 1000 + epoch, workers=self.workers):
            yield collate(batch)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, dir_name: str | None) -> None:
        if checkpoint_dir is None:
            return
        dest = self.run_dir / str(dir_name)
        part = self.run_dir / f".tmp-{dir_name}"
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(checkpoint_dir, part)
        shutil.rmtree(dest, ignore_errors=True)
        part.rename(dest)
        self.latest = dest
        if self.keep:
            for old in sorted(self.run_dir.glob("checkpoint_step*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)


def run_loop(config: dict[str, Any], rt: RayRuntime | LocalRuntime) -> None:
    """The pretraining loop of one worker; ``rt`` (:class:`RayRuntime` or :class:`LocalRuntime`)
    is everything that differs between a Ray Train worker and a Ray-less process."""
    from raymim.methods import build_method
    from raymim.train.reporting import RankZeroLogger

    cfg = config_from_dict(config["cfg"])
    tc = cfg.train
    rank, world = rt.rank, rt.world
    # a Ray worker uses the CPUs it was given; a Ray-less process keeps torch's default (all cores)
    threads = os.environ.get("RAYMIM_THREADS")
    if threads is None and isinstance(rt, RayRuntime):
        threads = round(tc.cpus_per_worker) or 1
    if not torch.cuda.is_available() and threads:
        torch.set_num_threads(max(1, int(threads)))
    device = rt.device()

    # One line per rank, so job output shows where the workers ran (multi-node checks read it).
    say(f"[raymim] rank {rank}/{world} on {rt.where()} device {device}")
    precision = resolve_precision(tc.precision, device)

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    method = build_method(cfg.method.name, cfg)
    model = rt.wrap(method, device)
    opt = build_optimizer(method, tc, world)
    sched = build_scheduler(opt, tc)
    scaler = build_scaler(precision, device)

    def forward_backward(module: torch.nn.Module, batch: dict[str, Any]) -> Any:
        with autocast(precision, device):
            out = module(batch)
        scaler.scale(out.loss / tc.accumulation).backward()
        return out

    micro_step = CompiledStep(model, forward_backward) if tc.compile else partial(forward_backward, model)

    step, epoch, consumed = 0, 0, 0
    best = float("inf")
    state, unrecorded = _restore_state(config.get("run_dir"), cfg, rt.recorded_state(cfg))
    restored = state is not None
    if state is not None:
        method.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, consumed = int(state["step"]), int(state["epoch"]), int(state["batches_in_epoch"])
        best = float(state.get("best", best))
        _set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
    else:
        random.seed(tc.seed + rank)
        np.random.seed(tc.seed + rank)
        torch.manual_seed(tc.seed + rank)  # different masks per rank (crops are augmented in the stream)

    rt.record_restored(unrecorded, state, device)

    probe = None
    if config.get("probe") is not None and rank == 0:
        probe = torch.as_tensor(rt.get(config["probe"])).float().unsqueeze(1)  # [N, 1, D, H, W] on the host
    log = RankZeroLogger(rank, config.get("mlflow_uri"), config.get("mlflow_run_id"), cfg, config.get("best_dir"),
                         step_lines=config.get("console", "lines") == "lines")
    if not restored:
        log.note_start()
    stream = rt.get(config["stream"])  # raymim.data.stream spec: this worker builds its crop stream per pass
    per_pass = int(config.get("epochs_per_pass", 1))  # `epoch` below counts iterator passes
    samples_per_step = effective_batch(tc, world)
    # Metrics stay tensors on the device between logs: a float() of a loss every step would wait for
    # the accelerator to finish the step (a host synchronisation). MetricWindow converts once per log.
    window = MetricWindow()
    window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
    interval_loss, interval_n = None, 0  # summed step losses since the last checkpoint (a tensor)

    while step < tc.steps:
        batches = rt.batches(stream, epoch, per_pass, tc, config.get("driver"))
        seen, outs, wait = 0, [], 0.0
        t_ready = time.perf_counter()
        for batch in batches:
            seen += 1
            if seen <= consumed:  # resuming mid-pass: these batches were trained on already
                t_ready = time.perf_counter()
                continue
            wait += time.perf_counter() - t_ready
            batch = _to_device(batch, device)
            method.set_progress(step, tc.steps)
            last_micro = len(outs) == tc.accumulation - 1
            with model.no_sync() if (world > 1 and not last_micro) else nullcontext():
                out = micro_step(batch)
            outs.append(out)
            if not last_micro:
                t_ready = time.perf_counter()
                continue

            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(method.parameters(), tc.clip_grad) if tc.clip_grad else None
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            consumed = seen

            loss = torch.stack([o.loss.detach().float() for o in outs]).mean()  # stays on the device
            window.add("loss", loss)
            for o in outs:
                for k, v in o.metrics.items():
                    if k != "loss":  # the total is accumulated above
                        window.add(k, v, 1.0 / len(outs))
            if grad_norm is not None:
                window.add("grad_norm", grad_norm)
            interval_loss = loss if interval_loss is None else interval_loss + loss
            interval_n += 1
            window_steps += 1
            window_wait += wait
            wait = 0.0

            if step % tc.log_every == 0 or step == tc.steps or step == 1:
                # The one host read of the window's metrics. The loss is checked for NaN / inf here,
                # once per log_every steps rather than every step: a non-finite loss stays non-finite
                # in the window's sum, so it is caught at the next log (or checkpoint, below), at the
                # cost of up to log_every - 1 steps trained past it.
                metrics = window.means(window_steps)
                if not np.isfinite(metrics["loss"]):
                    raise FloatingPointError(
                        f"loss became {metrics['loss']} within steps {step - window_steps + 1}-{step}; "
                        "lower train.lr or check the data")
                elapsed = time.perf_counter() - window_start
                metrics.update(lr=sched.get_last_lr()[0], samples_per_s=samples_per_step * window_steps / elapsed,
                               data_wait_frac=window_wait / elapsed, epoch=epoch * per_pass)
                log.metrics(metrics, step)
                window.clear()
                window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
            if log.wants_visuals(step):
                log.visuals(outs[-1].visuals, step)
            outs = []

            if step % tc.checkpoint_every == 0 or step == tc.steps:
                score = float(interval_loss) / max(1, interval_n)  # a float for the checkpoint and Tune
                if not np.isfinite(score):  # never save weights a non-finite loss has touched
                    raise FloatingPointError(
                        f"loss became {score} before step {step}; lower train.lr or check the data")
                interval_loss, interval_n = None, 0
                is_best = score < best
                best = min(best, score)
                extra = {}
                if probe is not None:
                    extra["probe_loss"] = probe_score(method, probe, cfg, device)
                    log.metrics(extra, step)
                _save_and_report(method, opt, sched, scaler, cfg, step, epoch, consumed, best, score,
                                 is_best, rt, log, extra, config.get("data"))
            if step >= tc.steps:
                break
            t_ready = time.perf_counter()
        if seen == 0:
            raise RuntimeError(
                "the training shard yielded no batch: fewer crops than num_workers x batch_size "
                f"({world} x {tc.batch_size}); prepare more data or lower train.batch_size"
            )
        if step < tc.steps:  # pass exhausted; an unfinished accumulation is dropped
            opt.zero_grad(set_to_none=True)
            epoch += 1
            consumed = 0
    log.finish(method.encoder.state_dict() if rank == 0 else None)


class CompiledStep:
    """``step(batch)`` = ``fn(torch.compile(model), batch)``: a micro-step (forward, and the backward
    that AOTAutograd compiled with it) through the compiled module, with an eager fallback.

    ``torch.compile`` compiles lazily: the forward at its first call, the backward at the first
    ``backward()``. A compile error (any ``torch._dynamo`` exception, Inductor's included) raised
    in a micro-step that started with no gradients (the first of an accumulation window, as
    ``zero_grad(set_to_none=True)`` leaves them) clears what it accumulated, runs that micro-step
    eagerly and keeps eager from then on, with one warning line. Checkpoints keep reading the
    uncompiled module's ``state_dict`` (no ``_orig_mod.`` prefix).
    """

    def __init__(self, model: torch.nn.Module, fn: Any, backend: str = "inductor") -> None:
        import torch._dynamo.exc

        self.model = model
        self.fn = fn
        self.errors = torch._dynamo.exc.TorchDynamoException
        # Static shapes (batches are drop_last): without `dynamic=False` Dynamo turns a size that
        # differs between two calls of one function (MiM's per-level masking) into a symbol, and
        # tracing MiM then fails in `torch.rand` of that size.
        self.compiled: torch.nn.Module | None = torch.compile(model, backend=backend, dynamic=False)

    def __call__(self, batch: dict[str, Any]) -> Any:
        if self.compiled is None:
            return self.fn(self.model, batch)
        fresh = all(p.grad is None for p in self.model.parameters())
        try:
            return self.fn(self.compiled, batch)
        except self.errors as exc:
            if not fresh:  # gradients of earlier micro-steps would be counted twice
                raise
            cause = getattr(exc, "inner_exception", None) or exc  # the backend's own error, when it has one
            failure = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
        self.compiled = None
        for p in self.model.parameters():
            p.grad = None
        out = self.fn(self.model, batch)  # an error of the step itself surfaces here, uncompiled
        say(f"[raymim] warning: train.compile failed ({failure[:200]}); training eagerly")
        return out


class MetricWindow:
    """Sums of per-step metrics since the last log, kept as tensors where each metric lives.

    :meth:`add` only queues arithmetic (one in-place add per metric and step, on the accelerator for
    device metrics; a metric the host already knows, a 0-d CPU tensor or a number, is summed on the
    host, with no copy either way); :meth:`means` reads the device sums back in one transfer.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, key: str, value: Any, weight: float = 1.0) -> None:
        v = torch.as_tensor(value, dtype=torch.float32) if not torch.is_tensor(value) else value.detach()
        if v.dtype != torch.float32:
            v = v.float()
        if weight != 1.0:
            v = v * weight
        acc = self.sums.get(key)
        if acc is None or acc.device != v.device:
            # A copy: the first value may share storage with the method's output (a detached loss).
            self.sums[key] = v.clone() if acc is None else acc.to(v.device) + v
        else:
            acc.add_(v)

    def means(self, steps: int) -> dict[str, float]:
        """Each sum over ``steps`` as a Python float: one read per device (the host synchronisation
        of the window; host sums cost nothing)."""
        out: dict[str, float] = {}
        by_device: dict[torch.device, list[str]] = {}
        for k, v in self.sums.items():
            by_device.setdefault(v.device, []).append(k)
        for keys in by_device.values():
            values = torch.stack([self.sums[k] for k in keys]).tolist()
            out.update({k: v / max(steps, 1) for k, v in zip(keys, values, strict=True)})
        return {k: out[k] for k in self.sums}  # the order metrics were first added in

    def clear(self) -> None:
        self.sums.clear()


def _gather_rng(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, gathered so a resumed rank r continues its own stream."""
    state = _rng_state()
    if world == 1 or not torch.distributed.is_initialized():
        return [state]
    states: list[Any] = [None] * world
    torch.distributed.all_gather_object(states, state)
    return states


def probe_score(method, probe: torch.Tensor, cfg: RaymimConfig, device: torch.device) -> float:
    """The method's :meth:`~raymim.methods.base.PretrainMethod.probe_loss` on the held-out probe
    crops (in chunks of ``train.batch_size``, fp32, eval mode), averaged over crops."""
    tc = cfg.train
    was_training = method.training
    method.eval()
    total, n = 0.0, 0
    try:
        for i in range(0, probe.shape[0], tc.batch_size):
            chunk = probe[i : i + tc.batch_size].to(device)
            value = method.probe_loss(chunk, tc.probe_ratio, seed=tc.seed + i)
            if value is None:
                raise ValueError(f"method {cfg.method.name!r} has no probe; set train.probe_crops=0 "
                                 "(and tune.scheduler=none)")
            total += float(value) * chunk.shape[0]
            n += chunk.shape[0]
    finally:
        method.train(was_training)
    return total / max(n, 1)


def _save_and_report(method, opt, sched, scaler, cfg: RaymimConfig, step: int, epoch: int, consumed: int,
                     best: float, score: float, is_best: bool, rt: RayRuntime | LocalRuntime, log,
                     extra: dict[str, float] | None = None, data: str | None = None) -> None:
    rngs = _gather_rng(rt.world)
    metrics = {"step": step, "epoch": epoch, "loss": score, "best_loss": best, **(extra or {})}
    if rt.rank != 0:
        rt.report(metrics, None, None)
        return
    state = {
        "model": method.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "epoch": epoch,
        "batches_in_epoch": consumed,
        "best": best,
        "rng": rngs,
        "config_hash": ckpt.model_config_hash(cfg),
    }
    meta = {"step": step, "epoch": epoch, "loss": score, "best_loss": best, "is_best": is_best,
            "method": cfg.method.name, "backbone": cfg.model.backbone,
            "config_hash": ckpt.model_config_hash(cfg), "data": data, "mlflow_run_id": log.run_id,
            **(extra or {})}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.write_checkpoint(tmp, state=state, encoder_state=method.encoder.state_dict(), cfg=cfg, meta=meta)
        if is_best:
            log.best(tmp, step)
        rt.report(metrics, tmp, f"checkpoint_step{step:08d}")
