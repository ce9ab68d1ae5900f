"""``raymim synth`` and ``raymim prepare`` command-line entry points (dispatched by raymim.cli)."""

from __future__ import annotations

import argparse
import json
import sys

from raymim.config import ConfigError


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (images/, labels/, manifest.csv)")
    parser.add_argument("--cases", type=int, required=True, help="number of phantoms")
    parser.add_argument("--size", type=int, default=64, help="voxels per side (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (deterministic output)")
    parser.add_argument("--sites", type=int, default=3, help="number of simulated scanner sites (domains)")


def run_synth(args: argparse.Namespace) -> int:
    from raymim.data.synth import generate_phantoms

    try:
        manifest = generate_phantoms(args.out, args.cases, size=args.size, seed=args.seed, sites=args.sites)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"wrote {args.cases} phantoms; manifest: {manifest}")
    return 0


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    from raymim.cli import add_config_arguments

    parser.add_argument("--input", required=True,
                        help="folder (recursive), glob, manifest (.csv/.jsonl) or MSD dataset.json")
    parser.add_argument("--out", required=True, help="output folder (the dataset: shards/, manifest.json, "
                        "quarantine.csv, deid.json; never an input path)")
    add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="delete previous outputs and start over")
    parser.add_argument("--keep-paths", action="store_true",
                        help="keep input paths (relative) in shards and reports; off by default (de-identification)")
    parser.add_argument("--deid-key", metavar="FILE", default=None,
                        help="de-identification key file, kept outside --out (created 0600 on first use); default "
                             "$RAYMIM_DEID_KEY (the key itself), else $RAYMIM_DEID_KEY_FILE, else "
                             "~/.config/raymim/deid.key; a resume must use the same key")
    parser.add_argument("--report", metavar="FILE", default=None,
                        help="operator report: every rejected / skipped input with its path and reason (not part "
                             "of the dataset; default <out>.operator-report.csv beside --out)")
    parser.add_argument("--max-rejected", type=float, default=None,
                        help="fail (exit 1) when more than this fraction of cases is quarantined")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_prepare(args: argparse.Namespace) -> int:
    from raymim.cli import check_input
    from raymim.config import load_config
    from raymim.data.pipeline import format_summary, prepare

    cfg = load_config(args.config, args.overrides).prepare
    check_input(args.input, "--input", scans=True)
    if args.max_rejected is not None and not 0.0 <= args.max_rejected <= 1.0:
        raise ConfigError(f"--max-rejected should be in the range [0, 1], got {args.max_rejected}.")
    from raymim.data.lock import PrepareLocked

    try:
        summary = prepare(args.input, args.out, cfg, overwrite=args.overwrite, keep_paths=args.keep_paths,
                          max_rejected=args.max_rejected, progress=not args.no_progress,
                          deid_key_file=args.deid_key, report=args.report)
    except PrepareLocked as exc:  # another run writes --out: a usage error, nothing was touched
        print(f"raymim prepare: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary) if args.json else format_summary(summary))
    if summary["exit_code"] == 1:
        print(f"raymim prepare: rejected fraction {summary['rejected_fraction']} above the limit; "
              "see the operator report (paths) or quarantine.csv", flush=True)
    return int(summary["exit_code"])
