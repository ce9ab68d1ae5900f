"""``raymim pretrain``: run or resume a pretraining job (see :mod:`raymim.train.trainer`)."""

from __future__ import annotations

import argparse
import sys

from raymim.cli import EXIT_USAGE, add_config_arguments, check_input


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Pretrain an encoder with a registered method on Ray Train. Re-running the same command with the "
        "same --name resumes from the latest checkpoint and continues the same MLflow run."
    )
    add_config_arguments(parser)
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="prepared shards (a `raymim prepare` output folder), or raw scans "
                             "(folder / glob / manifest) to stream through the preparation pipeline")
    parser.add_argument("--name", help="run name (default: the config's `name`); the key for resume")
    parser.add_argument("--quiet", action="store_true",
                        help="no worker output (step lines, Ray's own messages): only warnings and the final summary")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                        help="level of Ray's and raymim's log messages on the driver (default: info; "
                             "warning with --quiet)")
    parser.add_argument("--storage", metavar="PATH_OR_URI",
                        help="where checkpoints live: a shared path or s3:// / gs:// URI on multi-node "
                             "clusters (default: $RAYMIM_STORAGE or ./runs/ray)")


def run_pretrain(args: argparse.Namespace) -> int:
    import logging
    import os

    from raymim.config import load_config
    from raymim.train.checkpoint import CheckpointMismatchError
    from raymim.train.trainer import pretrain

    cfg = load_config(args.config, args.overrides)
    check_input(args.data, "--data", shards=True, scans=True)
    if args.quiet:
        os.environ["RAYMIM_QUIET"] = "1"
    if args.log_level:
        os.environ["RAYMIM_LOG_LEVEL"] = args.log_level
    logging.getLogger("raymim").setLevel((args.log_level or ("warning" if args.quiet else "info")).upper())
    try:
        res = pretrain(cfg, args.data, name=args.name, storage=args.storage)
    except CheckpointMismatchError as exc:
        print(f"raymim pretrain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"run {res.run_name}: {res.steps} steps; loss {res.first_loss:.4f} at the first log -> "
          f"{res.final_loss:.4f} at the end")
    print(f"MLflow run {res.mlflow_run_id} at {res.tracking_uri}")
    print(f"checkpoint: {res.checkpoint_path}")
    print("next:")
    print(f"  raymim finetune --pretrained {res.checkpoint_path} --data LABELLED_MANIFEST  # pretrained vs scratch")
    print(f"  raymim export --checkpoint {res.checkpoint_path} --format monai-bundle --out exported/")
    print(f"  mlflow ui --backend-store-uri {res.tracking_uri}  # then open http://127.0.0.1:5000")
    return 0
