"""``raymim evidence``: the paired-gain statistics on known differences, and one smoke-preset run
end to end (real pretraining on Ray, real fine-tuning, MLflow), rerun to check it resumes; the
same command in an interpreter where Ray cannot be imported (the GPU preset's Ray-less path)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raymim.evidence import PRESETS, evidence, evidence_rows, paired_gain


def _cells(values: dict[int, dict[str, float]], init: str, fraction: float = 0.1) -> list[dict]:
    return [{"seed": s, "init": init, "fraction": fraction, "n_train": 3,
             "test": {"dice/mean": float(np.mean(list(v.values())))},
             "test_cases": {c: {"dice/mean": x} for c, x in v.items()}} for s, v in values.items()]


def test_paired_gain_of_a_constant_shift_is_exact():
    rng = np.random.default_rng(0)
    scratch = {s: {f"c{i}": float(rng.uniform(0.2, 0.6)) for i in range(6)} for s in range(3)}
    pre = {s: {c: v + 0.05 for c, v in cases.items()} for s, cases in scratch.items()}
    g = paired_gain(_cells(pre, "pretrained"), _cells(scratch, "scratch"))
    assert g["pairs"] == 18 and g["seeds"] == 3
    assert g["gain"] == pytest.approx(0.05) and g["lo"] == pytest.approx(0.05) and g["hi"] == pytest.approx(0.05)


def test_paired_gain_interval_covers_noise_and_excludes_zero_only_with_a_real_gain():
    rng = np.random.default_rng(1)
    scratch = {s: {f"c{i}": float(rng.uniform(0.2, 0.6)) for i in range(10)} for s in range(3)}
    noisy = {s: {c: v + float(rng.normal(0.0, 0.05)) for c, v in cases.items()} for s, cases in scratch.items()}
    g = paired_gain(_cells(noisy, "pretrained"), _cells(scratch, "scratch"))
    assert g["lo"] < g["gain"] < g["hi"] and g["lo"] < 0 < g["hi"]
    better = {s: {c: v + 0.1 + float(rng.normal(0.0, 0.02)) for c, v in cases.items()}
              for s, cases in scratch.items()}
    g = paired_gain(_cells(better, "pretrained"), _cells(scratch, "scratch"))
    assert g["lo"] > 0.05


def test_paired_gain_skips_unscorable_cases_and_unpaired_seeds():
    scratch = {0: {"a": 0.5, "b": math.nan}, 1: {"a": 0.4}}
    pre = {0: {"a": 0.7, "b": 0.9}, 2: {"a": 0.1}}
    g = paired_gain(_cells(pre, "pretrained"), _cells(scratch, "scratch"))
    assert g["pairs"] == 1 and g["gain"] == pytest.approx(0.2)
    assert math.isnan(paired_gain([], [])["gain"])


def test_rows_put_scratch_once_and_a_gain_per_method():
    scratch = _cells({0: {"a": 0.5}, 1: {"a": 0.4}}, "scratch")
    results = {"mae": scratch + _cells({0: {"a": 0.6}, 1: {"a": 0.5}}, "pretrained"),
               "mim": scratch + _cells({0: {"a": 0.3}, 1: {"a": 0.2}}, "pretrained")}
    rows = evidence_rows(results)
    assert [r["init"] for r in rows] == ["scratch", "mae", "mim"]
    assert rows[1]["gain"] == pytest.approx(0.1) and rows[2]["gain"] == pytest.approx(-0.2)
    assert "gain" not in rows[0]


def test_usage_errors_exit_2_in_one_line(tmp_path):
    for argv in (["--methods", "nope"], ["--fractions", "0,1"], ["--seeds", "0"],
                 ["--real-data", str(tmp_path / "absent")]):
        proc = subprocess.run([sys.executable, "-m", "raymim.cli", "evidence", "--out", str(tmp_path), *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_smoke_preset_end_to_end_then_resumes(ray_session, tmp_path, capsys):
    import mlflow

    preset = PRESETS["smoke"]
    assert evidence(preset, tmp_path) == 0
    report = (tmp_path / "evidence.md").read_text()
    assert "| 50% | scratch |" in report and "| 50% | mae |" in report and "## Targets" in report
    data = json.loads((tmp_path / "evidence.json").read_text())
    rows = {(r["fraction"], r["init"]): r for r in data["rows"]}
    assert set(rows) == {(0.5, "scratch"), (0.5, "mae"), (1.0, "scratch"), (1.0, "mae")}
    mae = rows[(0.5, "mae")]
    assert 0.0 <= mae["dice/mean"] <= 1.0 and mae["seeds"] == preset.seeds
    assert mae["gain_lo"] <= mae["gain"] <= mae["gain_hi"] and mae["gain_pairs"] > 0
    assert (tmp_path / "evidence.png").stat().st_size > 1000
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("raymim-evidence")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`raymim.kind` = 'evidence'")
    assert len(runs) == 1 and "evidence/mae/f0.50/gain" in runs[0].data.metrics
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"evidence.md", "evidence.png"}
    capsys.readouterr()

    # a rerun trains nothing again: pretraining is finished, every fine-tuning cell is reused
    cells = sorted((tmp_path / "finetune" / "mae" / "cells").glob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in cells}
    assert evidence(preset, tmp_path) == 0
    out = capsys.readouterr().out
    n = len(preset.fractions) * preset.seeds * 2
    assert f"{n} of {n} cell(s) already finished" in out
    assert {p: p.stat().st_mtime_ns for p in cells} == stamps
    assert json.loads((tmp_path / "evidence.json").read_text())["rows"] == data["rows"]


NO_RAY = """import sys


class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoRay())
"""


@pytest.mark.slow
def test_smoke_preset_runs_where_ray_cannot_be_imported(tmp_path):
    """Every interpreter of the run (the command, prepare's spawned processes, the DataLoader's
    workers) gets a ``sitecustomize`` that makes ``import ray`` fail, as on a box without Ray."""
    import os

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_RAY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "RAYMIM_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    check = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "No module named 'ray'" in check.stderr
    out = tmp_path / "ev"
    cmd = [sys.executable, "-m", "raymim.cli", "evidence", "--preset", "smoke", "--seeds", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Ray is not installed" in proc.stdout and "(no Ray) device cpu" in proc.stdout
    report = (out / "evidence.md").read_text()
    assert "| 50% | scratch |" in report and "| 50% | mae |" in report
    assert (out / "ray" / "evidence-mae" / "checkpoint_step00000004" / "encoder.pt").is_file()
    rows = json.loads((out / "evidence.json").read_text())["rows"]
    assert {(r["fraction"], r["init"]) for r in rows} == {(0.5, "scratch"), (0.5, "mae"), (1.0, "scratch"),
                                                         (1.0, "mae")}
    # a command that does need Ray says so in one line (exit 2)
    tune = subprocess.run([sys.executable, "-m", "raymim.cli", "tune", "--config", "jobs/configs/tune-mim-tiny.yaml",
                           "--data", str(out / "pool-shards"), "--labelled", str(out / "task" / "manifest.csv"),
                           "--name", "t"], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert tune.returncode == 2 and "needs Ray" in tune.stderr, tune.stderr[-2000:]
    assert len(tune.stderr.strip().splitlines()) == 1, tune.stderr
    # rerun: nothing is trained again
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 of 4 cell(s) already finished" in again.stdout
    assert json.loads((out / "evidence.json").read_text())["rows"] == rows


def test_real_scans_join_the_pool_and_the_real_task_is_complete(shared_data, tmp_path):
    from raymim.data.synth import reuse_or_generate_phantoms
    from raymim.evidence import REAL_POOL, pool_with_real_scans, real_data_missing, real_task_records
    from raymim.io.discover import discover_cases

    assert real_data_missing(shared_data) == []
    assert len(real_data_missing(tmp_path)) == len(REAL_POOL) + 4
    manifest = pool_with_real_scans(reuse_or_generate_phantoms(tmp_path / "pool", 2, 16), shared_data)
    cases = discover_cases(manifest)
    assert len(cases) == 2 + len(REAL_POOL) and not [c for c in cases if c.get("error")]
    real = [c for c in cases if c.get("domain") == "real-ct"]
    assert len(real) == len(REAL_POOL) and all(not c.get("label") for c in real)
    assert all(str(tmp_path) in c["image"] for c in real)  # copies inside the working folder
    assert pool_with_real_scans(tmp_path / "pool" / "manifest.csv", shared_data).read_text() == manifest.read_text()
    records = real_task_records(shared_data)
    assert [r["split"] for r in records] == ["train", "test"]
