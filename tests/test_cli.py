"""The `raymim` entry point: help, version, usage errors."""

from __future__ import annotations

import subprocess
import sys

from raymim.cli import COMMANDS, main


def test_top_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2


def test_console_script_version():
    out = subprocess.run([sys.executable, "-m", "raymim.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("raymim ")


def test_pretrain_help_explains_resume(capsys):
    assert main(["pretrain", "--help"]) == 0
    assert "resume" in capsys.readouterr().out


def test_bad_override_exits_2(capsys, tmp_path):
    code = main(["pretrain", "--data", str(tmp_path), "--set", "method.mask_ratio=2"])
    assert code == 2
    assert "mask_ratio" in capsys.readouterr().err


def _one_line_usage_error(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_paths_are_refused_before_ray_starts(capsys, tmp_path, monkeypatch):
    """One line naming the bad value and what was expected, exit 2, before any run is recorded."""
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    missing = str(tmp_path / "nope")
    _one_line_usage_error(["pretrain", "--data", missing], capsys, "--data", "no such file or folder")
    (tmp_path / "empty").mkdir()
    _one_line_usage_error(["pretrain", "--data", str(tmp_path / "empty")], capsys, "found no prepared shards",
                          "scans")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text("{}")
    _one_line_usage_error(["pretrain", "--data", str(tmp_path / "half")], capsys, "no shards/*.parquet")
    _one_line_usage_error(["finetune", "--pretrained", missing, "--data", str(tmp_path)], capsys, "--pretrained")
    (tmp_path / "ckpt").mkdir()
    _one_line_usage_error(["finetune", "--pretrained", str(tmp_path / "ckpt"), "--data", str(tmp_path)], capsys,
                          "not a raymim checkpoint", "encoder.pt")
    _one_line_usage_error(["tune", "--data", missing, "--labelled", missing], capsys, "--data")
    _one_line_usage_error(["prepare", "--input", missing, "--out", str(tmp_path / "o")], capsys, "--input")
    assert not store.exists() and not (tmp_path / "o").exists(), "work started before the inputs were checked"
