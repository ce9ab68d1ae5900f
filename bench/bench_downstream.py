"""Evidence run: tiny MiM and tiny MAE pretrained for a fixed budget on phantoms with lesions, then
fine-tuned at 10 % and 100 % of the labels, 3 seeds, each against scratch (same budget, same seeds).

    .venv/bin/python bench/bench_downstream.py --cases 40 --pretrain-steps 200 --finetune-steps 150

Writes ``bench/results/downstream_<date>.md`` (the command, the environment, both tables) and
keeps the run folders under ``runs/bench_downstream/``. Fine-tuning classes: liver, kidneys,
lungs and lesion of :data:`raymim.data.synth.LABELS`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import torch

from raymim.config import load_config
from raymim.data.synth import generate_phantoms
from raymim.downstream.evaluate import run_finetune
from raymim.train.trainer import pretrain

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--engine", choices=("ray", "local"), default="local")
    ap.add_argument("--methods", default="mim,mae")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_downstream"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    manifest = generate_phantoms(out / "phantoms", cases=args.cases, size=args.size, seed=0)
    sections = []
    for method in args.methods.split(","):
        cfg = load_config(ROOT / "jobs" / "configs" / f"{method}-tiny.yaml",
                          [f"train.steps={args.pretrain_steps}", "mlflow.experiment=raymim-bench-downstream"])
        t0 = time.time()
        res = pretrain(cfg, str(manifest), name=f"bench-{method}", storage=str(out / "ray"))
        pre_s = time.time() - t0
        ft_cfg = load_config(None, [
            "finetune.classes=[2, 3, 4, 5, 6, 8]",
            "finetune.class_names=[liver, kidney_right, kidney_left, lung_right, lung_left, lesion]",
            "finetune.fractions=[0.1, 1.0]", f"finetune.seeds={args.seeds}", f"finetune.steps={args.finetune_steps}",
            "finetune.feature_size=8", "finetune.norm_name=batch", "finetune.batch_size=2",
            "finetune.lr=5e-4", "mlflow.experiment=raymim-bench-downstream", f"name=bench-ft-{method}",
        ])
        t0 = time.time()
        ft = run_finetune(res.checkpoint_path, str(manifest), ft_cfg, out / f"finetune-{method}",
                          engine=args.engine)
        sections.append(f"## {method}\n\npretraining: {args.pretrain_steps} steps in {pre_s:.0f} s (final loss "
                        f"{res.final_loss:.4f}); fine-tuning grid in {time.time() - t0:.0f} s\n\n"
                        + (ft.out_dir / "results.md").read_text())
    stamp = dt.date.today().isoformat()
    report = ROOT / "bench" / "results" / f"downstream_{stamp}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(
        f"# Downstream evidence ({stamp})\n\nCommand: `{' '.join([sys.executable, *sys.argv])}`\n\n"
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads, CPU only.\n\n"
        + "\n".join(sections)
    )
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
