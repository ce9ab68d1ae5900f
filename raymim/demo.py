"""``raymim demo``: the README's first command ends here.

On a fresh machine: generate CT-like phantoms, prepare them into shards with Ray Data, pretrain a
tiny MiM with 2 Ray Train workers on a local Ray instance, track it in a local MLflow store, and
(when ``--finetune``, the default) fine-tune a quick segmentation against scratch. Re-running it
reuses the phantoms and shards and resumes or re-uses the finished run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from raymim.cli import UsageError, add_config_arguments

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "jobs" / "configs" / "mim-tiny.yaml"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "synth -> prepare -> pretrain (tiny MiM, 2 workers) on a local Ray instance with a local MLflow "
        "store; prints the loss at the start and the end and where the MLflow run is."
    )
    add_config_arguments(parser)
    parser.add_argument("--out", default="raymim-demo", help="working folder (default: ./raymim-demo)")
    parser.add_argument("--cases", type=int, default=24, help="phantoms to generate (default 24)")
    parser.add_argument("--size", type=int, default=64, help="phantom side in voxels (default 64)")
    parser.add_argument("--name", default=None, help="run name (default: demo-<method>)")
    parser.add_argument("--no-finetune", dest="finetune", action="store_false",
                        help="skip the quick downstream fine-tune against scratch")


def run_demo(args: argparse.Namespace) -> int:
    from raymim.config import load_config

    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAYMIM_HOME", str(out / "runs"))
    cfg = load_config(args.config or DEMO_CONFIG, args.overrides)

    from raymim.data.pipeline import prepare
    from raymim.data.synth import reuse_or_generate_phantoms

    try:
        manifest = reuse_or_generate_phantoms(out / "phantoms", args.cases, args.size, seed=0,
                                              log=lambda m: print(f"[demo] {m}", flush=True))
    except ValueError as e:
        raise UsageError(f"{e} (or the same --cases / --size as before)") from None
    shards = out / "shards"
    print(f"[demo] preparing {manifest} -> {shards}", flush=True)
    summary = prepare(str(manifest), shards, cfg.prepare, progress=True)
    print(f"[demo] prepare: {summary}", flush=True)

    import raymim.train.tracking as tracking
    from raymim.train.trainer import pretrain

    tracking.DEFAULT_ROOT = out / "runs"
    name = args.name or f"demo-{cfg.method.name}"
    res = pretrain(cfg, str(shards), name=name, storage=str(out / "runs" / "ray"))
    lines = [
        f"pretraining {cfg.method.name} ({cfg.model.backbone}, {cfg.train.num_workers} workers, "
        f"{cfg.train.steps} steps)",
        f"  loss at step 1: {res.first_loss:.4f}   at step {res.steps}: {res.final_loss:.4f}   "
        f"({res.final_loss / res.first_loss:.2f}x)",
        f"  MLflow run {res.mlflow_run_id} in {res.tracking_uri}",
        f"  browse: mlflow ui --backend-store-uri {res.tracking_uri}",
        f"  checkpoint: {res.checkpoint_path}",
    ]
    if args.finetune:
        lines += _quick_finetune(res, manifest, cfg)
    lines.append(f"demo finished in {time.time() - t0:.0f} s")
    print("\n".join(["", "=" * 72, *lines, "=" * 72]), flush=True)
    return 0


def _quick_finetune(res, manifest: Path, cfg) -> list[str]:
    """One fraction, one seed, a few steps: the pretrained encoder against the same network from
    scratch on the phantoms' organ + lesion labels (a fixed test split); scores go to the run."""
    import mlflow

    from raymim.downstream.evaluate import quick_finetune
    from raymim.weights import load_pretrained

    encoder_state, pre_cfg = load_pretrained(res.checkpoint_path)
    print("[demo] quick fine-tune: pretrained vs scratch", flush=True)
    scores = quick_finetune(encoder_state, pre_cfg, str(manifest), with_scratch=True, score_test=True)
    client = mlflow.MlflowClient(res.tracking_uri)
    for key in ("test/dice/mean", "scratch/test/dice/mean", "test_dice_gain_vs_scratch"):
        client.log_metric(res.mlflow_run_id, f"demo_finetune/{key}", float(scores[key]))
    return [f"  quick fine-tune ({pre_cfg.finetune.quick_steps} steps, {pre_cfg.finetune.fractions[0]:.0%} of the "
            f"labels, best of the validation checks), mean Dice on held-out test phantoms: pretrained "
            f"{scores['test/dice/mean']:.3f} vs scratch {scores['scratch/test/dice/mean']:.3f}"]
