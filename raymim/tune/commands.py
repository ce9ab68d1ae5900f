"""``raymim tune``: a Ray Tune sweep scored by downstream Dice (see :mod:`raymim.tune.driver`)."""

from __future__ import annotations

import argparse
import sys

from raymim.cli import EXIT_USAGE, add_config_arguments, check_input


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Sweep pretraining hyperparameters with Ray Tune (config section `tune`: space, num_samples, algorithm, "
        "ASHA scheduler, max_concurrent). Each trial pretrains on --data with Ray Train, then fine-tunes on "
        "--labelled; the objective is that Dice. --resume continues an interrupted sweep without rerunning "
        "finished trials."
    )
    add_config_arguments(parser)
    parser.add_argument("--data", required=True, metavar="SHARDS", help="prepared shards (or raw scans) to pretrain on")
    parser.add_argument("--labelled", metavar="PATH", help="labelled manifest/folder for the objective "
                                                           "(default: tune.labelled)")
    parser.add_argument("--name", help="sweep name (default: <config name>-sweep)")
    parser.add_argument("--storage", metavar="PATH_OR_URI", help="Tune/Train storage (default: $RAYMIM_STORAGE "
                                                                 "or ./runs/ray)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same --name")


def run_tune(args: argparse.Namespace) -> int:
    from raymim.config import load_config
    from raymim.tune.driver import OBJECTIVE, sweep

    cfg = load_config(args.config, args.overrides)
    check_input(args.data, "--data", shards=True, scans=True)
    check_input(args.labelled or cfg.tune.labelled, "--labelled", labelled=True)
    try:
        res = sweep(cfg, args.data, labelled=args.labelled, name=args.name, storage=args.storage,
                    resume=args.resume)
    except (ValueError, FileExistsError) as exc:
        print(f"raymim tune: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"\nsweep {res.name}: {len(res.table)} trials")
    for row in res.table:
        params = ", ".join(f"{k}={row[k]}" for k in cfg.tune.space)
        print(f"  {row['trial']}: {params} -> {OBJECTIVE}={row[OBJECTIVE]} ({row['status']})")
    if res.best:
        test = res.best.get("test_dice")
        print(f"best: {res.best['trial']} {OBJECTIVE}={res.best[OBJECTIVE]:.4f}"
              + (f", test Dice {test:.4f} (scored once, after selection)" if test is not None else "") + " "
              f"(MLflow run {res.best['mlflow_run_id']}, encoder: runs:/{res.parent_run_id}/best_encoder)")
    print(f"MLflow parent run {res.parent_run_id} at {res.tracking_uri}; Tune results at {res.path}")
    return 0
