"""The driver's step bar: fed from the run's MLflow history, with rate, ETA and loss; off when
stderr is not a terminal."""

from __future__ import annotations

import io
import time

import mlflow

from raymim.train.progress import StepBar, wants_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_follows_the_logged_steps(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("bar")).info.run_id
    for step in (1, 2, 3, 4):  # a resumed run: steps 1-4 were trained before
        client.log_metric(run_id, "train/loss", 1.0 / step, step=step)
    out = _Terminal()
    with StepBar(client, run_id, total=12, initial=4, file=out, poll_s=0.05) as bar:
        for step in range(5, 13):
            client.log_metric(run_id, "train/loss", 0.5 / step, step=step)
            time.sleep(0.02)
        bar.poll()
    text = out.getvalue()
    assert "12/12" in text and "step/s" in text and "loss=0.04167" in text, text
    assert " 4/12" in text  # it starts at the resumed step, not at 0


def test_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("RAYMIM_QUIET", raising=False)
    assert wants_bar(_Terminal()) and not wants_bar(io.StringIO())
    monkeypatch.setenv("RAYMIM_QUIET", "1")
    assert not wants_bar(_Terminal())
    with StepBar(object(), "x", total=3, enabled=False) as bar:  # inert: never reads the store
        bar.poll()
