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
    parser.add_argument("--classes", metavar="MAP", default=None,
                        help="label classes: 'liver=1,tumour=2' (ROI / segment name = label value 1..255), "
                             "'liver,tumour' (values 1..K in that order) or a .json / .yaml file holding such a "
                             "mapping or list. Selects and numbers the ROIs of RTSTRUCT / DICOM-SEG labels (a "
                             "case missing one is rejected); names the values of label maps. Kept in manifest.json")
    parser.add_argument("--domain", metavar="NAME", default=None,
                        help="domain (site / scanner tag) of every case whose manifest gives none")
    parser.add_argument("--domain-column", metavar="COLUMN", default=None,
                        help="manifest column holding each case's domain (default: 'domain', else 'dataset')")
    parser.add_argument("--max-rejected", type=float, default=None,
                        help="fail (exit 1) when more than this fraction of cases is quarantined")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def parse_classes(text: str | None) -> dict[str, int] | None:
    """``--classes``: ``"a=1,b=2"``, ``"a,b"`` (1..K) or a JSON / YAML file with a mapping or a list
    -> ``{name: value}``. Raises :class:`ConfigError` (exit 2) for anything else."""
    if text is None:
        return None
    from pathlib import Path

    path = Path(text).expanduser()
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        import yaml

        try:
            spec = yaml.safe_load(path.read_text()) if path.suffix.lower() != ".json" else json.loads(path.read_text())
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"--classes {text}: cannot be read ({type(exc).__name__}).") from None
    else:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise ConfigError(f"--classes {text!r}: an empty entry; expected 'name=value,...' or 'name,...'.")
        if any("=" in p for p in parts):
            if not all("=" in p for p in parts):
                raise ConfigError(f"--classes {text!r}: give a value to every name or to none.")
            spec = dict(tuple(x.strip() for x in p.split("=", 1)) for p in parts)
        else:
            spec = parts
    if isinstance(spec, list):
        spec = {str(n): i for i, n in enumerate(spec, start=1)}
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"--classes {text}: expected a mapping of names to label values or a list of names.")
    out: dict[str, int] = {}
    for name, value in spec.items():
        try:
            number = int(str(value))
        except ValueError:
            raise ConfigError(f"--classes: the value of {name!r} should be an integer 1..255, got {value!r}.") from None
        if not str(name).strip() or not 0 < number < 256:
            raise ConfigError(f"--classes: {name!r}={value!r}; names must be non-empty and values 1..255.")
        out[str(name).strip()] = number
    return out


def run_prepare(args: argparse.Namespace) -> int:
    from raymim.cli import check_input
    from raymim.config import load_config
    from raymim.data.pipeline import format_summary, prepare

    cfg = load_config(args.config, args.overrides).prepare
    check_input(args.input, "--input", scans=True)
    if args.max_rejected is not None and not 0.0 <= args.max_rejected <= 1.0:
        raise ConfigError(f"--max-rejected should be in the range [0, 1], got {args.max_rejected}.")
    classes = parse_classes(args.classes)
    for option, value in (("--domain", args.domain), ("--domain-column", args.domain_column)):
        if value is not None and not value.strip():
            raise ConfigError(f"{option} should not be empty.")
    from raymim.data.lock import PrepareLocked

    try:
        summary = prepare(args.input, args.out, cfg, overwrite=args.overwrite, keep_paths=args.keep_paths,
                          max_rejected=args.max_rejected, progress=not args.no_progress,
                          deid_key_file=args.deid_key, report=args.report, classes=classes,
                          domain=args.domain, domain_column=args.domain_column)
    except PrepareLocked as exc:  # another run writes --out: a usage error, nothing was touched
        print(f"raymim prepare: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary) if args.json else format_summary(summary))
    if summary["exit_code"] == 1:
        print(f"raymim prepare: rejected fraction {summary['rejected_fraction']} above the limit; "
              "see the operator report (paths) or quarantine.csv", flush=True)
    return int(summary["exit_code"])
