"""The ``raymim`` command line: synth, prepare, inspect, pretrain, finetune, tune, export, evidence, demo.

Each subcommand lives beside the code it drives (``raymim/data/commands.py`` and so on) and
exposes ``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int``. The module is imported
only when its subcommand runs, so ``raymim --help`` stays instant (no torch or Ray import).

Exit codes: 0 success, 2 usage or config errors, 3 partial success (some inputs quarantined),
1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("raymim.data.commands", "generate CT-like phantoms with lesions, labels, reports and domains"),
    "prepare": ("raymim.data.commands", "turn scans into de-identified preprocessed volumes in Parquet shards"),
    "inspect": ("raymim.data.inspect", "show prepared shards and crops sampled as training will draw them"),
    "pretrain": ("raymim.train.commands", "pretrain an encoder with a registered method (Ray Train)"),
    "finetune": ("raymim.downstream.commands", "fine-tune segmentation on a label fraction vs scratch"),
    "tune": ("raymim.tune.commands", "sweep hyperparameters with Ray Tune, scored downstream"),
    "export": ("raymim.export.commands", "export an encoder as a MONAI bundle or UNETR/SwinUNETR weights"),
    "evidence": ("raymim.evidence", "pretrain every method, fine-tune against scratch at label fractions, "
                                    "report the gain with a 95 % interval"),
    "demo": ("raymim.demo", "synth -> prepare -> pretrain on a local Ray instance, with a local MLflow store"),
}

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


class UsageError(ValueError):
    """A bad command-line value: ``main`` prints it as one line and exits 2 (no traceback)."""


def check_input(value: str | None, option: str, *, shards: bool = False, scans: bool = False,
                labelled: bool = False, checkpoint: bool = False) -> None:
    """Refuse a bad path argument before anything expensive (Ray, MLflow) starts.

    ``shards`` / ``scans``: prepared shards, or (``scans``) raw scans to stream; ``labelled``: a
    labelled manifest / folder; ``checkpoint``: a checkpoint folder, ``encoder.pt`` or an MLflow
    reference. URIs are left to the code that reads them."""
    if value is None or "://" in value and not value.startswith(("runs:/", "models:/")):
        return
    if checkpoint and (value.startswith(("runs:/", "models:/")) or (len(value) == 32 and value.isalnum()
                                                                      and not Path(value).exists())):
        return
    is_glob = any(c in value for c in "*?[") and not Path(value).exists()
    if not is_glob and not Path(value).expanduser().exists():
        raise UsageError(f"{option} {value}: no such file or folder")
    path = Path(value).expanduser()
    if checkpoint:
        enc = path / "encoder.pt" if path.is_dir() else path
        if not enc.is_file() or not (enc.parent / "config.yaml").is_file():
            raise UsageError(f"{option} {value}: not a raymim checkpoint (expected a folder with encoder.pt and "
                             "config.yaml, an encoder.pt beside its config.yaml, or runs:/<run_id>/encoder)")
        return
    if shards and (path / "manifest.json").is_file():
        from raymim.data.shards import shard_files

        try:
            shard_files(path)
        except FileNotFoundError:
            raise UsageError(f"{option} {value}: has manifest.json but no shards/*.parquet "
                             "(an interrupted `raymim prepare`? rerun it to finish)") from None
        return
    if shards and not scans:
        raise UsageError(f"{option} {value}: not a folder of prepared shards (manifest.json + shards/*.parquet, "
                         "written by `raymim prepare`)")
    from raymim.io.discover import ManifestError, discover_cases

    try:
        records = discover_cases(value)
    except ManifestError as exc:  # names the bad row: that is the message
        raise UsageError(f"{option} {value}: {exc}") from None
    except ValueError:
        records = []
    if labelled:
        records = [r for r in records if r.get("label")]
    if not records:
        looked = "prepared shards (manifest.json + shards/*.parquet) or " if shards else ""
        kind = "labelled scans (a manifest with image and label columns, or a folder of images with labels)" \
            if labelled else "scans (NIfTI, NRRD, DICOM series, a CSV/JSONL manifest or dataset.json)"
        raise UsageError(f"{option} {value}: found no {looked}{kind}")


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="raymim",
        description="Self-supervised pretraining for 3D medical images on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{lines}\n\nRun `raymim COMMAND --help` for a command's options.",
        usage="raymim [-h] [--version] COMMAND [options]",
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--config FILE`` / ``--set a.b=c`` pair every config-driven command shares."""
    parser.add_argument("--config", metavar="FILE", help="YAML config (see jobs/configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set method.mask_ratio=0.6 (repeatable)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] == "--version":
        from raymim import __version__

        print(f"raymim {__version__}")
        return EXIT_OK
    name = argv[0]
    if name not in COMMANDS:
        top.print_usage(sys.stderr)
        print(f"raymim: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"raymim {name}", description=help_)
    getattr(module, f"add_{name}_arguments")(parser)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    from raymim.config import ConfigError

    try:
        return int(getattr(module, f"run_{name}")(args) or 0)
    except ConfigError as exc:
        print(f"raymim {name}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"raymim {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"raymim {name}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if exc.name != "ray" and not str(exc.name or "").startswith("ray."):
            raise
        print(f"raymim {name}: this needs Ray, which is not installed here (pip install -e . installs it; "
              "prepare, pretrain, finetune and evidence run without it)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    # `python -m raymim.cli`: run the imported module's main, so that the UsageError the commands
    # raise (raymim.cli.UsageError) is the class main() catches, not a copy in __main__
    from raymim.cli import main as _main

    sys.exit(_main())
