"""A progress bar for pretraining steps on the driver's terminal.

The training loop runs in Ray Train workers, whose output reaches the driver line by line (Ray's
log forwarding), so a bar redrawn with carriage returns cannot come from them. The driver draws
it instead: while ``trainer.fit()`` blocks, a thread reads the newest step the run has logged to
MLflow (``train/loss``, written by rank 0 every ``train.log_every`` steps) and advances one
``tqdm`` bar with the step rate, the ETA and the latest loss.

The bar is on only when the driver's stderr is a terminal. Otherwise (nohup, CI, ``ray job
logs``) the workers' periodic ``[raymim] step N/M ...`` lines are the progress report, since
redraws written to a file become thousands of lines. With the bar on, the workers leave the step
lines out (``console="bar"`` in the loop config), so the two never interleave.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import IO, Any

POLL_S = 2.0


def wants_bar(stream: IO[str] | None = None) -> bool:
    """The bar is drawn on a terminal, unless ``RAYMIM_QUIET=1`` (``raymim pretrain --quiet``)."""
    stream = stream if stream is not None else sys.stderr
    return os.environ.get("RAYMIM_QUIET") != "1" and bool(getattr(stream, "isatty", lambda: False)())


def _latest(client: Any, run_id: str, key: str) -> tuple[int, float] | None:
    history = client.get_metric_history(run_id, key)
    if not history:
        return None
    last = max(history, key=lambda m: m.step)
    return int(last.step), float(last.value)


class StepBar:
    """``with StepBar(client, run_id, total, initial): trainer.fit()`` draws one bar of training
    steps (from ``initial``, a resumed run's step, to ``total``) fed from MLflow every
    ``poll_s`` seconds. ``file`` defaults to stderr; ``enabled=False`` makes it inert."""

    def __init__(self, client: Any, run_id: str, total: int, initial: int = 0, *, enabled: bool = True,
                 file: IO[str] | None = None, poll_s: float = POLL_S, key: str = "train/loss") -> None:
        self.client, self.run_id, self.total, self.initial = client, run_id, total, initial
        self.enabled, self.file, self.poll_s, self.key = enabled, file, poll_s, key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def __enter__(self) -> StepBar:
        if not self.enabled:
            return self
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.total, initial=self.initial, unit="step", desc="[raymim] pretraining",
                         file=self.file if self.file is not None else sys.stderr, dynamic_ncols=True,
                         smoothing=0.1)
        self._thread = threading.Thread(target=self._run, name="raymim-step-bar", daemon=True)
        self._thread.start()
        return self

    def poll(self) -> None:
        """Advance the bar to the newest logged step (a failed read is retried at the next poll)."""
        if self._bar is None:
            return
        try:
            latest = _latest(self.client, self.run_id, self.key)
        except Exception:  # noqa: BLE001 - a busy store: the bar waits for the next poll
            return
        if latest is None:
            return
        step, loss = latest
        if step > self._bar.n:
            self._bar.update(min(step, self.total) - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=True)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def __exit__(self, *exc: object) -> None:
        if self._bar is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)
        self.poll()
        self._bar.close()
