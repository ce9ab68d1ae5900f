"""The README's walk-through, end to end, through the `raymim` command line.

The commands are read from README.md ("Pretraining" and "Downstream evaluation and export"), so a
changed README is what this test runs. Each runs as a subprocess in a fresh folder (the README's
relative paths: data/, runs/, exported/) joined to the test's Ray session (``RAY_ADDRESS``); the
only changes are sizes (fewer phantoms, a few steps), ``--engine local`` / ``--quick`` for the
fine-tunes, the MLflow run id the README leaves as ``<mlflow_run_id>``, and a second export as
``--format monai-bundle``. The exported weights must load into MONAI's own classes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SECTIONS = ("## Pretraining", "## Downstream evaluation and export")


def readme_commands() -> list[list[str]]:
    """The ``raymim ...`` lines of the first bash block of each walk-through section, as argv lists."""
    text = README.read_text()
    commands = []
    for section in SECTIONS:
        assert section in text, f"README.md has no {section!r} section"
        block = text.split(section, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
        commands += [shlex.split(line) for line in block.splitlines() if line.strip().startswith("raymim ")]
    return commands


def _set(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option``'s value replaced (or the option appended)."""
    argv = list(argv)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


def _fast(argv: list[str], run_id: str | None) -> list[str]:
    """The README command at test size. Paths into the repository (jobs/configs/...) are made absolute."""
    argv = [str(REPO / a) if a.startswith("jobs/") else a for a in argv]
    name = argv[1]
    if name == "synth":
        argv = _set(argv, "--cases", "6")
    elif name == "pretrain":
        # 4 steps, one checkpoint, no reconstruction panels: the run, not its quality, is under test here.
        argv += ["--set", "train.steps=4", "--set", "train.checkpoint_every=4", "--set", "train.log_every=1",
                 "--set", "train.visual_every=1000", "--set", "train.batch_size=2"]
    elif name == "finetune":
        assert run_id, "the pretraining run printed no MLflow run id"
        argv = [a.replace("<mlflow_run_id>", run_id) for a in argv]
        if argv[argv.index("--data") + 1] != "data/phantoms/manifest.csv":
            argv = _set(argv, "--data", "data/phantoms/manifest.csv")  # the README's `labelled/` placeholder
        argv = _set(_set(argv, "--steps", "2"), "--engine", "local")
        if "--quick" not in argv:
            argv.append("--quick")
    return argv


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "raymim.cli", *argv[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    print(f"[walkthrough] {shlex.join(argv)}: exit {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def test_readme_walkthrough_is_what_this_test_runs():
    names = [argv[1] for argv in readme_commands()]
    assert names == ["synth", "prepare", "inspect", "pretrain", "finetune", "finetune", "export"], names
    export = readme_commands()[-1]
    pretrain = readme_commands()[3]
    # The export reads the checkpoint the pretraining run writes.
    name = pretrain[pretrain.index("--name") + 1]
    assert export[export.index("--checkpoint") + 1] == f"runs/ray/{name}/best"


@pytest.mark.slow
@pytest.mark.ray
def test_readme_walkthrough_end_to_end(ray_session, tmp_path):
    import torch
    from monai.networks.nets import UNETR

    from raymim.export.bundle import build_bundle_network

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAYMIM_HOME", "RAYMIM_STORAGE")}
    env.update(RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, OMP_NUM_THREADS="1")
    run_id = None
    exports = []
    for argv in readme_commands():
        argv = _fast(argv, run_id)
        out = _run(argv, tmp_path, env).stdout
        if argv[1] == "pretrain":
            match = re.search(r"MLflow run ([0-9a-f]{32})", out)
            run_id = match.group(1) if match else None
        if argv[1] == "export":
            # The README exports a UNETR state dict; export the same checkpoint as a MONAI bundle too.
            bundle = _set(_set(argv, "--format", "monai-bundle"), "--out", "exported-bundle/")
            _run(bundle, tmp_path, env)
            exports += [tmp_path / argv[argv.index("--out") + 1], tmp_path / "exported-bundle"]
    unetr_dir, bundle_dir = exports
    # MONAI's UNETR takes the exported encoder: no vit.* key missing, nothing unexpected.
    args = json.loads((unetr_dir / "unetr_args.json").read_text())
    net = UNETR(**args).eval()
    res = net.load_state_dict(torch.load(unetr_dir / "unetr_state_dict.pt", weights_only=True), strict=False)
    assert not [k for k in res.missing_keys if k.startswith("vit.")] and not res.unexpected_keys
    size = args["img_size"]
    with torch.no_grad():
        assert net(torch.rand(1, 1, *size)).shape == (1, args["out_channels"], *size)
    # The bundle's network_def builds MONAI's UNETR, and models/model.pt loads into it strictly.
    report = json.loads((bundle_dir / "export.json").read_text())
    assert report["structure_ok"] and report["network_ok"]
    infer = json.loads((bundle_dir / "configs" / "inference.json").read_text())
    bundled = build_bundle_network(infer["network_def"])
    assert type(bundled) is UNETR
    bundled.load_state_dict(torch.load(bundle_dir / "models" / "model.pt", weights_only=True), strict=True)
    # The bundle holds the pretrained encoder, not a fresh one.
    exported = torch.load(unetr_dir / "unetr_state_dict.pt", weights_only=True)
    key = "vit.blocks.11.attn.qkv.weight"
    torch.testing.assert_close(bundled.state_dict()[key], exported[key])


def test_export_refuses_a_non_unetr_checkpoint_in_one_line(tmp_path):
    """The tiny configs' former shape (2 layers, patch 8): the `raymim` process exits 2 with one
    stderr line naming what would work, and leaves no --out folder."""
    import torch
    from monai.networks.nets import ViT

    from raymim.config import config_from_dict
    from raymim.train.checkpoint import write_checkpoint

    model = dict(backbone="vit", img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    enc = ViT(1, 32, 8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4)
    ckpt = write_checkpoint(tmp_path / "best", state={}, encoder_state=enc.state_dict(),
                            cfg=config_from_dict({"model": model}), meta={})
    for fmt in ("unetr", "monai-bundle"):
        out = tmp_path / f"exported-{fmt}"
        proc = subprocess.run([sys.executable, "-m", "raymim.cli", "export", "--checkpoint", str(ckpt), "--format",
                               fmt, "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("raymim export: MONAI's UNETR needs a 12-layer, patch-16 ViT; this encoder has "
                                   "num_layers=2, patch_size=8; ")
        assert "model.num_layers=12 and model.patch_size=16" in lines[0]
        assert proc.stdout == "" and not out.exists()
