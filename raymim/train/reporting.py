"""Rank-0 reporting for pretraining: MLflow metrics, reconstruction panels, best and final
encoders, and a console progress line. Every other rank gets an inert logger, so the loop can
call it unconditionally.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from raymim.config import RaymimConfig, dump_yaml
from raymim.train.checkpoint import CONFIG_FILE, ENCODER_FILE


def say(message: str) -> None:
    """One console line from a Train worker, printed once. Ray Train V2 patches ``print`` on its
    workers to tee into a logger that reaches the driver as well, so a plain ``print`` shows up
    twice in the job's output; this writes to the process's real stdout, which Ray forwards once."""
    stream = sys.__stdout__ or sys.stdout
    stream.write(message + "\n")
    stream.flush()


PERF_METRICS = ("samples_per_s", "data_wait_frac")
_LEVEL_TERM = re.compile(r"^(loss_[a-z]+)_l(\d+)$")


def metric_name(key: str) -> str:
    """MLflow name of a pretraining metric, grouped by slashes: ``loss`` -> ``train/loss``,
    ``loss_rec_l2`` -> ``train/loss_rec/level2``, ``samples_per_s`` -> ``perf/samples_per_s``,
    ``probe_loss`` -> ``probe/loss``."""
    if key == "probe_loss":
        return "probe/loss"
    if key in PERF_METRICS:
        return f"perf/{key}"
    m = _LEVEL_TERM.match(key)
    if m:
        return f"train/{m.group(1)}/level{m.group(2)}"
    return f"train/{key}"


def mlflow_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` under :func:`metric_name` names, without duplicates: a per-level term that is
    the only one of its kind (``loss_align_l2`` with two levels) equals its aggregate and is dropped."""
    per_level: dict[str, list[str]] = {}
    for key in metrics:
        m = _LEVEL_TERM.match(key)
        if m:
            per_level.setdefault(m.group(1), []).append(key)
    drop = {keys[0] for base, keys in per_level.items() if len(keys) == 1 and base in metrics}
    return {metric_name(k): v for k, v in metrics.items() if k not in drop}


class RankZeroLogger:
    def __init__(self, rank: int, uri: str | None, run_id: str | None, cfg: RaymimConfig,
                 best_dir: str | None = None, step_lines: bool = True) -> None:
        self.cfg = cfg
        self.step_lines = step_lines  # off when the driver draws a progress bar (raymim.train.progress)
        self.active = rank == 0
        self.run_id = run_id if self.active else None
        self.best_dir = best_dir if self.active else None
        self.client = None
        if self.run_id and uri:
            import mlflow

            self.client = mlflow.MlflowClient(uri)
        self._t0 = time.time()

    def note_start(self) -> None:
        if self.active:
            say(f"[raymim] pretraining {self.cfg.method.name} ({self.cfg.model.backbone}) "
                f"for {self.cfg.train.steps} steps")

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        show = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in
                        ("loss", "loss_rec", "loss_align", "mask_ratio", "lr", "samples_per_s", "data_wait_frac"))
        if self.step_lines:
            say(f"[raymim] step {step}/{self.cfg.train.steps} {show}")
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in mlflow_metrics(metrics).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def wants_visuals(self, step: int) -> bool:
        every = self.cfg.train.visual_every
        return self.active and self.client is not None and every > 0 and (
            step % every == 0 or step == self.cfg.train.steps)

    def visuals(self, visuals: dict[str, torch.Tensor], step: int) -> None:
        if not visuals:
            return
        from raymim.train.panels import render_panel

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"panel_step{step:08d}.png"
            render_panel(visuals, path, title=f"{self.cfg.method.name} step {step}")
            self.client.log_artifact(self.run_id, str(path), artifact_path="panels")

    def best(self, checkpoint_dir: str, step: int) -> None:
        """Keep a copy of the best checkpoint (by interval mean loss) at ``best_dir``."""
        if not self.best_dir:
            return
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(self.best_dir) if "://" in self.best_dir else (
            pafs.LocalFileSystem(), str(Path(self.best_dir).resolve()))
        fs.delete_dir_contents(root, missing_dir_ok=True)
        fs.create_dir(root)
        pafs.copy_files(checkpoint_dir, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def finish(self, encoder_state: dict[str, torch.Tensor] | None) -> None:
        if not self.active or self.client is None or encoder_state is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(encoder_state, Path(tmp) / ENCODER_FILE)
            (Path(tmp) / CONFIG_FILE).write_text(dump_yaml(self.cfg))
            self.client.log_artifacts(self.run_id, tmp, artifact_path="encoder")
        say(f"[raymim] finished in {time.time() - self._t0:.0f}s; encoder logged to runs:/{self.run_id}/encoder")
