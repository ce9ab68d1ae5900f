"""``raymim finetune --pretrained CKPT_OR_MLFLOW_RUN --data LABELLED [--fractions ...] [--seeds N] [--quick]``."""

from __future__ import annotations

import argparse
import sys


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from raymim.cli import add_config_arguments

    parser.add_argument("--pretrained", required=True,
                        help="checkpoint dir, encoder.pt, runs:/<id>/encoder or a bare MLflow run id")
    parser.add_argument("--data", required=True, help="labelled manifest (image,label[,split]), folder or dataset.json")
    parser.add_argument("--fractions", default=None, help="comma-separated label fractions, e.g. 0.05,0.1,1.0")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per fraction (each a pretrained/scratch pair)")
    parser.add_argument("--steps", type=int, default=None,
                        help="fixed training steps per cell (default: finetune.steps_per_case x the cell's "
                             "training cases, within [finetune.min_steps, finetune.max_steps])")
    parser.add_argument("--classes", default=None, help="label values to keep, e.g. 2,8 (mapped to 1..K)")
    parser.add_argument("--freeze-encoder", action="store_true", help="train the decoder only (linear-probe style)")
    parser.add_argument("--engine", choices=("ray", "local"), default=None, help="Ray Train job or in-process")
    parser.add_argument("--quick", action="store_true", help="first fraction, one seed, finetune.quick_steps steps")
    parser.add_argument("--out", default=None, help="output folder (default runs/finetune/<name>)")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--pretrain-data", default=None, metavar="SHARDS",
                        help="the encoder's pretraining shards, to check that no validation / test case was "
                             "pretrained on (default: the folder the checkpoint records)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse (exit 2) when a validation / test case is in the pretraining shards, or "
                             "when that cannot be checked (finetune.strict_overlap)")
    add_config_arguments(parser)


def run_finetune(args: argparse.Namespace) -> int:
    from raymim.cli import check_input
    from raymim.config import load_config

    check_input(args.pretrained, "--pretrained", checkpoint=True)
    check_input(args.data, "--data", labelled=True)
    check_input(args.pretrain_data, "--pretrain-data", shards=True)
    from raymim.downstream.evaluate import run_finetune as _run
    from raymim.train.tracking import DEFAULT_ROOT

    overrides = list(args.overrides)
    if args.fractions:
        overrides.append(f"finetune.fractions=[{args.fractions}]")
    if args.seeds is not None:
        overrides.append(f"finetune.seeds={args.seeds}")
    if args.steps is not None:
        overrides.append(f"finetune.steps={args.steps}")
        if args.quick:
            overrides.append(f"finetune.quick_steps={args.steps}")
    if args.classes:
        overrides.append(f"finetune.classes=[{args.classes}]")
    if args.freeze_encoder:
        overrides.append("finetune.freeze_encoder=true")
    if args.strict:
        overrides.append("finetune.strict_overlap=true")
    cfg = load_config(args.config, overrides)
    out = args.out or str(DEFAULT_ROOT / "finetune" / pretrain_run_name(args.pretrained))
    from raymim.downstream.overlap import OverlapError

    try:
        res = _run(args.pretrained, args.data, cfg, out, quick=args.quick, engine=args.engine,
                   log_mlflow=not args.no_mlflow, pretrain_data=args.pretrain_data)
    except OverlapError as exc:
        print(f"raymim finetune: {exc}", file=sys.stderr)
        return 2
    print((res.out_dir / "results.md").read_text())
    print(f"results: {res.out_dir} (results.md, results.csv, dice_vs_fraction.png, overlays/)")
    if res.parent_run_id:
        from raymim.train.tracking import resolve_tracking_uri

        print(f"MLflow run {res.parent_run_id} with {len(res.child_run_ids)} cell runs; browse with "
              f"`mlflow ui --backend-store-uri {resolve_tracking_uri(cfg.mlflow.tracking_uri)}`")
    return 0


def pretrain_run_name(ref: str) -> str:
    """The pretraining run a checkpoint reference belongs to (names the default output folder):
    ``runs/ray/mim-try1/best`` -> ``mim-try1``; ``runs:/<id>/encoder`` -> that MLflow run's name."""
    from pathlib import Path

    if ref.startswith("runs:/") or (len(ref) == 32 and ref.isalnum() and not Path(ref).exists()):
        run_id = ref[len("runs:/"):].split("/")[0] if ref.startswith("runs:/") else ref
        try:
            import mlflow

            from raymim.train.tracking import resolve_tracking_uri

            return mlflow.MlflowClient(resolve_tracking_uri()).get_run(run_id).info.run_name or run_id
        except Exception:  # noqa: BLE001 - the name is cosmetic
            return run_id
    path = Path(ref).resolve()
    if path.is_file():
        path = path.parent
    while path.name.startswith("checkpoint_") or path.name in ("best", "encoder"):
        path = path.parent
    return path.name or "finetune"
