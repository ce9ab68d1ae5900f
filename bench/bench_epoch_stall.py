"""Data wait at epoch boundaries: one shard-iterator pass per epoch (R=1) against one pass spanning
R epochs (a lazy union of the dataset with itself, what ``raymim.train.trainer.build_dataset``
does), same tiny MAE, 2 workers, in-memory data, in one run.

    .venv/bin/python bench/bench_epoch_stall.py --repeats 1,6

Prints the ``data_wait_frac`` of each log window (read back from MLflow) for each R.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import ray
import ray.train
from ray.train.torch import TorchTrainer

from raymim.config import load_config, to_dict
from raymim.train.loop import train_loop_per_worker
from raymim.train.reporting import metric_name
from raymim.train.tracking import setup_experiment

ROOT = Path(__file__).resolve().parents[1]


def run(repeat: int, rows: int, steps: int, work: Path) -> list[tuple[int, float]]:
    cfg = load_config(ROOT / "jobs/configs/mae-tiny.yaml",
                      [f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=3",
                       "train.batch_size=2"])
    rng = np.random.default_rng(0)
    ds = ray.data.from_items([{"image": rng.random((32, 32, 32), dtype=np.float32).astype(np.float16)}
                              for _ in range(rows)])
    if repeat > 1:
        ds = ds.union(*([ds] * (repeat - 1)))
    uri = f"sqlite:///{work / f'r{repeat}.db'}"
    run_id = mlflow.MlflowClient(uri).create_run(setup_experiment("epoch-stall", uri)).info.run_id
    TorchTrainer(train_loop_per_worker,
                 train_loop_config={"cfg": to_dict(cfg), "mlflow_uri": uri, "mlflow_run_id": run_id,
                                    "epochs_per_pass": repeat},
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=ray.train.RunConfig(name=f"r{repeat}", storage_path=str(work / "ray")),
                 datasets={"train": ds}).fit()
    hist = mlflow.MlflowClient(uri).get_metric_history(run_id, metric_name("data_wait_frac"))
    return [(m.step, round(m.value, 2)) for m in sorted(hist, key=lambda m: m.step)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", default="1,6")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    ray.init(num_cpus=4, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        for r in (int(x) for x in args.repeats.split(",")):
            t0 = time.time()
            waits = run(r, args.rows, args.steps, Path(tmp))
            print(f"R={r}: fit {time.time() - t0:.1f} s; data_wait_frac per window (step, frac): {waits}")


if __name__ == "__main__":
    main()
