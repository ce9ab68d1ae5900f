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
