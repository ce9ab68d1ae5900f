"""``raymim evidence``: does pretraining help? One command that pretrains every method with one
budget, fine-tunes each encoder and its scratch twin at a few label fractions and seeds, and
reports the gain over scratch with its uncertainty.

The experiment, in order (every step goes through the normal product path):

1. **Data.** Two disjoint phantom sets from :func:`raymim.data.synth.generate_phantoms`: an
   unlabelled *pool* for pretraining and a labelled *task* (organs and lesions) for fine-tuning,
   drawn with different seeds, so no fine-tuning or test case was seen in pretraining.
2. **Pretraining.** The pool is prepared into shards (:func:`raymim.data.pipeline.prepare`, the
   first method's ``prepare`` section, resumable), then each method's ``jobs/configs/<method>-tiny.yaml`` (all share
   ``base-tiny.yaml``'s backbone) with the preset's budget (steps x batch, seed) through
   :func:`raymim.train.trainer.pretrain` (Ray Train, or in this process without Ray; MLflow), resumed when rerun.
3. **Fine-tuning.** :func:`raymim.downstream.evaluate.run_finetune` per encoder: the label
   fractions x seeds grid of pretrained and scratch cells, weights selected on validation cases,
   scored on the fixed test cases. Cells are reused by fingerprint, so a rerun continues where it
   stopped and every method shares one scratch twin (same architecture, seeds and cases).
4. **Report.** A table per fraction (rows: scratch and each method; Dice, NSD, HD95, PPV,
   sensitivity as mean +- std over seeds), the paired Dice gain over scratch with a 95 % interval
   from a two-level bootstrap (seeds, then test cases, resampled with replacement; the pairs are
   (seed, test case): the same split, training cases and test case for both inits), the lesion
   class alone, a Dice-vs-fraction plot, all written to ``<out>/evidence.md`` (and with
   ``--results`` to ``bench/results/evidence_<date>.md``) and logged to one MLflow run.

Real data (``--real-data``, default ``../shared/data``): five unlabelled real CTs join the
pretraining pool, and a real task (the TotalSegmentator example: its NIfTI CT to train, its DICOM
series to test, spleen and liver) is fine-tuned and reported beside the phantom task.

Presets: ``cpu`` is sized for about an hour on 2 CPU cores, ``smoke`` is the minutes-long shape
the tests run, ``gpu`` is a budget for one accelerator (the shapes the CPU attempts pointed to).

Without Ray (a GPU box where only torch, MONAI and MLflow are installed) the same command runs
in one process: :func:`raymim.data.pipeline.prepare` in a pool of local processes,
:func:`raymim.train.trainer.pretrain` through :class:`raymim.train.loop.LocalRuntime` (the same
method, training step, checkpoints and resume) and fine-tuning in-process as always.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from raymim.cli import UsageError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
DEFAULT_METHODS = ("mae", "mim", "mps_ams", "simmim", "hssl")
# the phantom labels fine-tuned (raymim.data.synth.LABELS): liver, kidneys, lungs, lesion
TASK_CLASSES = [2, 3, 4, 5, 6, 8]
TASK_NAMES = ["liver", "kidney_right", "kidney_left", "lung_right", "lung_left", "lesion"]
METRICS = ("dice", "nsd", "hd95", "ppv", "sensitivity")

# The real-data side (../shared/data, see its README): unlabelled real CTs join the pretraining
# pool; the labelled task is the two TotalSegmentator examples that share a class map (silver
# labels), the NIfTI torso CT for training and the DICOM series for testing, on the organs both
# label (TotalSegmentator v2 ids). The Slicer chest CT's lungs and the pyradiomics nodule have no
# second labelled case of their class to test on, so those scans serve as unlabelled pool CTs.
REAL_POOL = ("crlm/CRLM-CT-1004_ct.nii.gz", "crlm/CRLM-CT-1006_ct.nii.gz", "totalsegmentator/aorta_ct_cropped.nii.gz",
             "pyradiomics/lung1_image.nrrd", "slicerio/CTChest4.nrrd")
REAL_TASK = (
    {"id": "ts_example_ct", "image": "totalsegmentator/example_ct.nii.gz",
     "label": "totalsegmentator/example_seg_fast_force_split.nii.gz", "split": "train"},
    {"id": "ts_example_dicom", "image": "totalsegmentator/example_ct_dicom",
     "label": "totalsegmentator/example_seg_dicom.nii.gz", "split": "test"},
)
REAL_CLASSES = [1, 5]
REAL_NAMES = ["spleen", "liver"]
DEFAULT_REAL_DATA = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class Preset:
    methods: tuple[str, ...] = DEFAULT_METHODS
    pool_cases: int = 48
    task_cases: int = 30
    size: int = 64
    pretrain_steps: int = 300
    batch_size: int = 4
    fractions: tuple[float, ...] = (0.1, 1.0)
    seeds: int = 3
    finetune_steps: int | None = None  # None: finetune.steps_per_case budget
    val_fraction: float = 0.2
    test_fraction: float = 0.3
    real: bool = True  # the real-data task too (skipped with a note when the data is absent)
    overrides: tuple[str, ...] = field(default_factory=tuple)


PRESETS: dict[str, Preset] = {
    "cpu": Preset(),
    # One GPU, with or without Ray. Shapes from the CPU preset's second attempt (bench/RESULTS.md):
    # 96^3 phantoms, patch 8 at a 32^3 input (lesions span several tokens), crops the size of the
    # input; fine-tuning at least 300 steps a cell. Sized from the recorded H100 step times (MAE
    # 74 ms, MiM 107 ms at batch 8: bench/results/gpu_h100_2026-11-23.md) for about ten minutes
    # of pretraining in all; not yet timed end to end on a GPU.
    "gpu": Preset(pool_cases=200, task_cases=60, size=96, pretrain_steps=1000, batch_size=8,
                  overrides=("train.use_gpu=true", "finetune.use_gpu=true", "train.num_workers=1",
                             "train.cpus_per_worker=4", "model.patch_size=8", "prepare.crop_size=[32,32,32]",
                             "finetune.min_steps=300")),
    "smoke": Preset(methods=("mae",), pool_cases=6, task_cases=8, size=64, pretrain_steps=4, batch_size=2,
                    fractions=(0.5, 1.0), seeds=2, finetune_steps=2, val_fraction=0.25, test_fraction=0.25, real=False,
                    overrides=("train.num_workers=1", "train.checkpoint_every=4", "train.log_every=2",
                               "train.visual_every=4", "model.num_layers=2")),
}


def add_evidence_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Pretrain each method with one budget, fine-tune every encoder and a scratch twin at label fractions "
        "x seeds on held-out phantoms, and report the Dice gain over scratch with a 95 % interval. "
        "Rerunning the same command resumes (pretraining from its checkpoints, fine-tuning cell by cell)."
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value of every pretraining and fine-tuning config "
                             "(e.g. --set model.num_layers=4; repeatable)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="budget: cpu (sized for about an hour on 2 cores; default), gpu (one GPU; runs "
                             "without Ray when Ray is not installed), smoke (minutes; tests)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per cell (preset default)")
    parser.add_argument("--fractions", default=None, help="comma-separated label fractions (preset: 0.1,1.0)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps per method")
    parser.add_argument("--out", default="raymim-evidence", help="working folder (default: ./raymim-evidence)")
    parser.add_argument("--real-data", default=None, metavar="DIR",
                        help="the shared real scans (default: $RAYMIM_DATA or ../shared/data beside the repository); "
                             "absent: the real-data task is skipped with a note")
    parser.add_argument("--no-real", action="store_true", help="phantom task only")
    parser.add_argument("--results", action="store_true",
                        help="also write bench/results/evidence_<date>.md in the repository")


def preset_from_args(args: argparse.Namespace) -> Preset:
    p = PRESETS[args.preset]
    if args.methods:
        from raymim.methods import list_methods

        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in list_methods()]
        if unknown or not methods:
            raise UsageError(f"--methods {args.methods}: unknown method(s) {unknown or methods}; "
                             f"known: {', '.join(list_methods())}")
        missing = [m for m in methods if not (CONFIGS / f"{m}-tiny.yaml").is_file()]
        if missing:
            raise UsageError(f"--methods: no jobs/configs/<method>-tiny.yaml for {missing}")
        p = replace(p, methods=methods)
    if args.fractions:
        try:
            fr = tuple(sorted(float(f) for f in args.fractions.split(",")))
        except ValueError:
            raise UsageError(f"--fractions {args.fractions}: expected numbers like 0.1,1.0") from None
        if not fr or any(not 0 < f <= 1 for f in fr):
            raise UsageError(f"--fractions {args.fractions}: each fraction must be in (0, 1]")
        p = replace(p, fractions=fr)
    if args.seeds is not None:
        if args.seeds < 1:
            raise UsageError("--seeds must be at least 1")
        p = replace(p, seeds=args.seeds)
    if args.pretrain_steps is not None:
        if args.pretrain_steps < 1:
            raise UsageError("--pretrain-steps must be at least 1")
        p = replace(p, pretrain_steps=args.pretrain_steps)
    if args.no_real:
        p = replace(p, real=False)
    return p


def real_data_root(arg: str | None) -> Path:
    import os

    return Path(arg or os.environ.get("RAYMIM_DATA") or DEFAULT_REAL_DATA).expanduser().resolve()


def real_data_missing(root: Path) -> list[str]:
    """The files of the real-data side missing under ``root`` (empty: all there)."""
    wanted = [*REAL_POOL, *(r[k] for r in REAL_TASK for k in ("image", "label"))]
    return [w for w in wanted if not (root / w).exists()]


# ----------------------------------------------------------------------------- statistics

def _pairs(pre: Sequence[Mapping[str, Any]], scratch: Sequence[Mapping[str, Any]], metric: str
           ) -> dict[int, list[float]]:
    """Per seed, the per-test-case differences pretrained - scratch of ``metric`` (cases where
    either side is not scorable, nan, are left out)."""
    by_seed = {int(c["seed"]): c for c in scratch}
    out: dict[int, list[float]] = {}
    for cell in pre:
        twin = by_seed.get(int(cell["seed"]))
        if twin is None:
            continue
        diffs = []
        for case, m in cell.get("test_cases", {}).items():
            a, b = m.get(metric, math.nan), twin.get("test_cases", {}).get(case, {}).get(metric, math.nan)
            if a == a and b == b:
                diffs.append(float(a) - float(b))
        if diffs:
            out[int(cell["seed"])] = diffs
    return out


def paired_gain(pre: Sequence[Mapping[str, Any]], scratch: Sequence[Mapping[str, Any]], metric: str = "dice/mean",
                reps: int = 4000, seed: int = 0) -> dict[str, float]:
    """Mean paired difference pretrained - scratch over (seed, test case) pairs and its 95 %
    percentile interval from a two-level bootstrap: resample the seeds, then within each drawn
    seed its test cases, with replacement (one seed: the cases only). ``{"gain", "lo", "hi",
    "pairs", "seeds"}`` (nan without pairs)."""
    pairs = _pairs(pre, scratch, metric)
    if not pairs:
        return {"gain": math.nan, "lo": math.nan, "hi": math.nan, "pairs": 0, "seeds": 0}
    seeds = sorted(pairs)
    arrays = [np.asarray(pairs[s]) for s in seeds]
    gain = float(np.mean(np.concatenate(arrays)))
    rng = np.random.default_rng(seed)
    stats = np.empty(reps)
    for r in range(reps):
        drawn = rng.integers(len(arrays), size=len(arrays)) if len(arrays) > 1 else [0]
        parts = [arrays[i][rng.integers(len(arrays[i]), size=len(arrays[i]))] for i in drawn]
        stats[r] = np.mean(np.concatenate(parts))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"gain": gain, "lo": float(lo), "hi": float(hi), "pairs": int(sum(map(len, arrays))),
            "seeds": len(arrays)}


# ----------------------------------------------------------------------------- report

def evidence_rows(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (fraction, init): ``scratch`` once (shared twin), then each method; metric
    means and stds over seeds of the class-averaged test metrics and of the lesion class, and for
    methods the paired gains (Dice averaged over classes, and lesion Dice) over scratch."""
    from raymim.downstream.metrics import aggregate_seeds

    rows = []
    first = next(iter(results.values()))
    fractions = sorted({float(c["fraction"]) for c in first})
    for f in fractions:
        scratch = [c for c in first if c["init"] == "scratch" and float(c["fraction"]) == f]
        entries = [("scratch", scratch)] + [
            (m, [c for c in cells if c["init"] == "pretrained" and float(c["fraction"]) == f])
            for m, cells in results.items()]
        for name, cells in entries:
            if not cells:
                continue
            row: dict[str, Any] = {"fraction": f, "init": name, "seeds": len(cells),
                                   "n_train": int(cells[0]["n_train"])}
            agg = aggregate_seeds([c["test"] for c in cells])
            for m in METRICS:
                row[f"{m}/mean"], row[f"{m}/std"] = agg.get(f"{m}/mean", math.nan), agg.get(f"{m}/mean_std", math.nan)
            row["dice/lesion"], row["dice/lesion_std"] = agg.get("dice/lesion", math.nan), agg.get("dice/lesion_std",
                                                                                                  math.nan)
            if name != "scratch":
                own_scratch = [c for c in results[name] if c["init"] == "scratch" and float(c["fraction"]) == f]
                for key, metric in (("gain", "dice/mean"), ("lesion_gain", "dice/lesion")):
                    g = paired_gain(cells, own_scratch, metric)
                    row[key], row[f"{key}_lo"], row[f"{key}_hi"] = g["gain"], g["lo"], g["hi"]
                    row[f"{key}_pairs"] = g["pairs"]
            rows.append(row)
    return rows


def _f(v: Any, digits: int = 3) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.{digits}f}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ["labels", "init", "train cases", "seeds", "Dice", "NSD", "HD95 (mm)", "PPV", "sensitivity",
            "lesion Dice", "Dice gain vs scratch [95 % CI]", "lesion Dice gain [95 % CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['fraction']:.0%}", r["init"], str(r["n_train"]), str(r["seeds"])]
        cells += [f"{_f(r[f'{m}/mean'], 1 if m == 'hd95' else 3)} ± {_f(r[f'{m}/std'], 1 if m == 'hd95' else 3)}"
                  for m in METRICS]
        cells.append(f"{_f(r['dice/lesion'])} ± {_f(r['dice/lesion_std'])}")
        for key in ("gain", "lesion_gain"):
            cells.append(f"{r[key]:+.3f} [{r[f'{key}_lo']:+.3f}, {r[f'{key}_hi']:+.3f}]"
                         if key in r and r[key] == r[key] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdicts(rows: Sequence[Mapping[str, Any]], low: float) -> list[str]:
    """The issue's targets, checked on the rows: every method beats scratch at the lowest
    fraction by >= 3 Dice points with the 95 % interval above zero; MPS-AMS at least matches MAE
    on the lesion class."""
    out = []
    at_low = {r["init"]: r for r in rows if r["fraction"] == low}
    for name, r in at_low.items():
        if name == "scratch":
            continue
        ok = r["gain"] >= 0.03 and r["gain_lo"] > 0
        out.append(f"- {name} at {low:.0%} labels: Dice gain {r['gain']:+.3f} [{r['gain_lo']:+.3f}, "
                   f"{r['gain_hi']:+.3f}]: target (>= +0.030, interval above 0) {'MET' if ok else 'MISSED'}")
    if "mps_ams" in at_low and "mae" in at_low:
        a, b = at_low["mps_ams"]["dice/lesion"], at_low["mae"]["dice/lesion"]
        out.append(f"- mps_ams vs mae, lesion Dice at {low:.0%}: {_f(a)} vs {_f(b)}: target (>=) "
                   f"{'MET' if a >= b else 'MISSED'}")
    return out


def plot_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for init in dict.fromkeys(r["init"] for r in rows):
        rs = sorted((r for r in rows if r["init"] == init), key=lambda r: r["fraction"])
        ax.errorbar([r["fraction"] for r in rs], [r["dice/mean"] for r in rs], yerr=[r["dice/std"] for r in rs],
                    marker="o", capsize=3, label=init, linestyle="--" if init == "scratch" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of labelled training cases")
    ax.set_ylabel("test Dice (mean over classes)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the run

def _config(method: str, preset: Preset, overrides: Sequence[str], out: Path):
    from raymim.config import load_config

    return load_config(CONFIGS / f"{method}-tiny.yaml", [
        f"train.steps={preset.pretrain_steps}", f"train.batch_size={preset.batch_size}", "train.seed=0",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}", "mlflow.experiment=raymim-evidence",
        f"name=evidence-{method}", *preset.overrides, *overrides])


def _finetune_config(preset: Preset, overrides: Sequence[str], out: Path):
    from raymim.config import load_config

    steps = [f"finetune.steps={preset.finetune_steps}"] if preset.finetune_steps else []
    return load_config(CONFIGS / "base-tiny.yaml", [
        f"finetune.classes={TASK_CLASSES}", f"finetune.class_names=[{', '.join(TASK_NAMES)}]",
        f"finetune.fractions={list(preset.fractions)}", f"finetune.seeds={preset.seeds}",
        f"finetune.val_fraction={preset.val_fraction}", f"finetune.test_fraction={preset.test_fraction}",
        "finetune.overlays=1", f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        "mlflow.experiment=raymim-evidence", *steps, *preset.overrides, *overrides])


def _real_finetune_config(preset: Preset, overrides: Sequence[str], out: Path):
    """The phantom task's recipe on the real task: CT window, its two organs, every labelled
    training case (one), no validation case (the last weights are scored)."""
    from raymim.config import load_config

    steps = [f"finetune.steps={preset.finetune_steps}"] if preset.finetune_steps else []
    return load_config(CONFIGS / "base-tiny.yaml", [
        "prepare.modality=ct", f"finetune.classes={REAL_CLASSES}", f"finetune.class_names=[{', '.join(REAL_NAMES)}]",
        "finetune.fractions=[1.0]", f"finetune.seeds={preset.seeds}", "finetune.val_fraction=0.0",
        "finetune.overlays=1", f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        "mlflow.experiment=raymim-evidence", *steps, *preset.overrides, *overrides])


def _phantoms(folder: Path, cases: int, size: int, seed: int) -> Path:
    from raymim.data.synth import reuse_or_generate_phantoms

    try:
        return reuse_or_generate_phantoms(folder, cases, size, seed,
                                          log=lambda m: print(f"[evidence] {m}", flush=True))
    except ValueError as e:
        raise UsageError(f"{e} (another --out, or the preset it was made with)") from None


def pool_with_real_scans(phantom_manifest: Path, root: Path) -> Path:
    """A manifest of the phantom pool plus the real pool CTs, copied beside it (``real/``; the
    data plane reads nothing outside a manifest's folder): ``pool.csv`` in the phantoms' folder.
    The copies live in the evidence working folder, never in the repository."""
    import csv
    import shutil

    from raymim.atomic import atomic_write
    from raymim.data.synth import write_manifest

    folder = phantom_manifest.parent
    with open(phantom_manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    for rel in REAL_POOL:
        dest = folder / "real" / rel.replace("/", "__")
        if not dest.exists():
            with atomic_write(dest) as tmp:
                shutil.copyfile(root / rel, tmp)
        rows.append({"image": f"real/{dest.name}", "label": "", "report": "", "domain": "real-ct"})
    return write_manifest(folder / "pool.csv", rows)


def real_task_records(root: Path) -> list[dict[str, str]]:
    """The labelled real cases as fine-tuning records (fixed sides: train / test)."""
    return [{**r, "image": str(root / r["image"]), "label": str(root / r["label"])} for r in REAL_TASK]


def run_evidence(args: argparse.Namespace) -> int:
    preset = preset_from_args(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    real_root = real_data_root(args.real_data)
    if preset.real and real_data_missing(real_root):
        if args.real_data:
            raise UsageError(f"--real-data {args.real_data}: missing {', '.join(real_data_missing(real_root)[:3])}")
        print(f"[evidence] no real scans at {real_root}: the real-data task is skipped (see --real-data)", flush=True)
        preset = replace(preset, real=False)
    return evidence(preset, out, list(args.overrides), results=args.results, real_root=real_root,
                    command=" ".join(["raymim", "evidence", *sys.argv[2:]]) if sys.argv[1:2] == ["evidence"]
                    else "raymim evidence")


def evidence(preset: Preset, out: Path, overrides: Sequence[str] = (), results: bool = False,
             command: str = "raymim evidence", real_root: Path | None = None) -> int:
    """Run (or resume) the experiment under ``out``; writes ``out/evidence.md``, ``evidence.json``,
    ``evidence.png`` and one MLflow run. Returns the exit code."""
    from raymim.downstream.evaluate import run_finetune
    from raymim.downstream.loop import cell_key
    from raymim.train.trainer import pretrain

    t0 = time.time()
    from raymim.data.pipeline import prepare
    from raymim.ray_session import ensure_ray, pretrain_log_settings, ray_available

    if ray_available():
        # one Ray session for the whole run, with the worker output pretraining prints (its step
        # lines); prepare would otherwise start it without worker output
        ensure_ray(**pretrain_log_settings())
    else:
        print("[evidence] Ray is not installed: preparing, pretraining and fine-tuning in this process", flush=True)
    pool_scans = _phantoms(out / "pool", preset.pool_cases, preset.size, seed=101)
    real_root = real_root or real_data_root(None)
    if preset.real:
        pool_scans = pool_with_real_scans(pool_scans, real_root)
    pool = out / "pool-shards"
    summary = prepare(str(pool_scans), pool, _config(preset.methods[0], preset, overrides, out).prepare,
                      progress=False)
    print(f"[evidence] pretraining pool: {summary.get('volumes')} volume(s) in {pool}"
          f"{f' ({len(REAL_POOL)} real CTs among them)' if preset.real else ''}", flush=True)
    if summary.get("exit_code") == 1:
        raise RuntimeError(f"preparing the pretraining pool failed: {summary.get('rejected')} case(s) rejected "
                           f"(see {pool})")
    task = _phantoms(out / "task", preset.task_cases, preset.size, seed=202)
    print(f"[evidence] {len(preset.methods)} method(s) x {len(preset.fractions)} fraction(s) x {preset.seeds} "
          f"seed(s); pool {preset.pool_cases} phantoms, task {preset.task_cases}", flush=True)
    ft_cfg = _finetune_config(preset, overrides, out)
    real_cfg = _real_finetune_config(preset, overrides, out) if preset.real else None
    per_method: dict[str, list[dict[str, Any]]] = {}
    real_rows: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, dict[str, float]] = {}
    shared_scratch: Path | None = None
    for i, method in enumerate(preset.methods, 1):
        cfg = _config(method, preset, overrides, out)
        print(f"[evidence] {i}/{len(preset.methods)} pretraining {method}: {preset.pretrain_steps} steps x batch "
              f"{preset.batch_size}", flush=True)
        t = time.time()
        res = pretrain(cfg, str(pool), name=f"evidence-{method}", storage=str(out / "ray"))
        pre_s = time.time() - t
        ft_out = out / "finetune" / method
        if shared_scratch is not None:  # the scratch twin is the same computation for every encoder
            _copy_scratch_cells(shared_scratch, ft_out)
        t = time.time()
        ft = run_finetune(res.checkpoint_path, str(task), ft_cfg, ft_out, engine="local", pretrain_data=str(pool))
        timings[method] = {"pretrain_s": pre_s, "finetune_s": time.time() - t, "final_loss": res.final_loss or math.nan,
                           "first_loss": res.first_loss or math.nan}
        shared_scratch = shared_scratch or ft_out
        per_method[method] = [_load(ft_out / "cells" / f"{cell_key(r)}.json") for r in ft.rows]
        if real_cfg is not None:
            real_out = out / "finetune-real" / method
            if method != preset.methods[0]:
                _copy_scratch_cells(out / "finetune-real" / preset.methods[0], real_out)
            t = time.time()
            rt = run_finetune(res.checkpoint_path, real_task_records(real_root), real_cfg, real_out, engine="local",
                              pretrain_data=str(pool))
            timings[method]["real_finetune_s"] = time.time() - t
            real_rows[method] = [_load(real_out / "cells" / f"{cell_key(r)}.json") for r in rt.rows]
        print(f"[evidence] {method}: pretrained in {pre_s:.0f} s, fine-tuned in {timings[method]['finetune_s']:.0f} s",
              flush=True)
    rows = evidence_rows(per_method)
    real = evidence_rows(real_rows) if real_rows else []
    low = min(preset.fractions)
    text = _report(rows, preset, timings, command, low, ft.split, time.time() - t0, real)
    (out / "evidence.md").write_text(text)
    (out / "evidence.json").write_text(json.dumps({"preset": asdict(preset), "rows": rows, "real_rows": real,
                                                   "timings": timings}, indent=1, default=float))
    plot_rows(rows, out / "evidence.png")
    _log_mlflow(rows, preset, out, f"sqlite:///{out / 'mlflow.db'}", real)
    if results:
        dest = REPO / "bench" / "results" / f"evidence_{dt.date.today().isoformat()}.md"
        dest.write_text(text)
        print(f"[evidence] wrote {dest}", flush=True)
    print("\n" + text, flush=True)
    print(f"[evidence] report: {out / 'evidence.md'}, plot: {out / 'evidence.png'}", flush=True)
    return 0


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _copy_scratch_cells(src: Path, dest: Path) -> None:
    (dest / "cells").mkdir(parents=True, exist_ok=True)
    for p in (src / "cells").glob("*_scratch.json"):
        target = dest / "cells" / p.name
        if not target.exists():
            target.write_text(p.read_text())


def _report(rows, preset: Preset, timings, command: str, low: float, split, seconds: float,
            real: Sequence[Mapping[str, Any]] = ()) -> str:
    lines = [f"# Evidence: pretrained vs scratch ({dt.date.today().isoformat()})", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}; "
             f"total {seconds / 60:.1f} min.", "",
             f"Preset: {asdict(preset)}", "",
             f"Fine-tuning task: {len(split.train)} training, {len(split.val)} validation and {len(split.test)} test "
             f"phantoms (disjoint from the {preset.pool_cases}-phantom pretraining pool); classes "
             f"{', '.join(TASK_NAMES)}; metrics on the test cases, mean ± std over seeds; gains paired over "
             "(seed, test case), 95 % two-level bootstrap interval.", "",
             markdown_table(rows), "## Real-data task", "", *_real_section(real), "",
             "## Targets", "", *verdicts(rows, low), "", "## Pretraining", "",
             "| method | pretrain s | fine-tune s | loss first -> last |", "|---|---|---|---|"]
    for m, t in timings.items():
        lines.append(f"| {m} | {t['pretrain_s']:.0f} | {t['finetune_s']:.0f} | {_f(t['first_loss'])} -> "
                     f"{_f(t['final_loss'])} |")
    return "\n".join(lines) + "\n"


def _real_section(real: Sequence[Mapping[str, Any]]) -> list[str]:
    if not real:
        return ["Not run (no real scans found, or --no-real)."]
    return [f"Pretraining pool: the phantoms plus {len(REAL_POOL)} unlabelled real CTs ({', '.join(REAL_POOL)}). "
            f"Fine-tuning: {REAL_TASK[0]['image']} (train) -> {REAL_TASK[1]['image']} (test), classes "
            f"{', '.join(REAL_NAMES)} (TotalSegmentator silver labels); one training and one test case, so the "
            "interval is over seeds only. Whether the two TotalSegmentator examples are the same patient is not "
            "recorded in the data; read the figures as a check that the pipeline runs on real CT, not as a "
            "generalisation measurement.", "", markdown_table(real)]


def _log_mlflow(rows, preset: Preset, out: Path, uri: str, real: Sequence[Mapping[str, Any]] = ()) -> None:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("raymim-evidence")
    exp_id = exp.experiment_id if exp else client.create_experiment("raymim-evidence")
    run = client.create_run(exp_id, run_name="evidence", tags={"raymim.kind": "evidence"})
    rid = run.info.run_id
    for k, v in asdict(preset).items():
        client.log_param(rid, f"evidence.{k}", str(v))
    for r in [*rows, *({**r, "init": f"real/{r['init']}"} for r in real)]:
        base = f"evidence/{r['init']}/f{r['fraction']:.2f}"
        for key in ("dice/mean", "dice/lesion", "gain", "gain_lo", "gain_hi", "lesion_gain"):
            if key in r and r[key] == r[key]:
                client.log_metric(rid, f"{base}/{key.replace('/', '_')}", float(r[key]))
    for name in ("evidence.md", "evidence.json", "evidence.png"):
        client.log_artifact(rid, str(out / name))
    client.set_terminated(rid, "FINISHED")
