"""Operator and host-read counts of one training step per method, from torch.profiler on the CPU.

One step is what ``raymim.train.loop.train_loop_per_worker`` does per optimiser step: forward,
backward, gradient clipping, AdamW step, and the per-step metric bookkeeping of the loop (the
loop of this tree: metric tensors summed on the device by ``MetricWindow``; a tree whose methods
return Python floats gets the old per-step ``float(loss)`` / ``float(grad_norm)`` bookkeeping).
The script only uses the package's public API (``build_method``, ``config_from_dict``), so the
same file measures an older tree put first on ``PYTHONPATH``. Methods (``--methods``): MAE, SimMIM,
MiM (3 levels), MPS-AMS (online, 1 level), HSSL; tiny ViT (hidden 96, 2 layers, patch 8).

Counted per step (mean over ``--steps`` profiled steps, after one warm-up step):

* ``ops``: ``aten::`` operators dispatched from Python (profiler events without an ``aten::``
  parent), an upper bound on the kernels a GPU step would launch;
* ``aten_events``: every ``aten::`` event, nested ones included;
* ``scalar_reads``: ``aten::_local_scalar_dense`` events, i.e. ``.item()`` / ``float(t)`` /
  ``int(t)`` / ``bool(t)`` / a 0-d tensor used as an index. On a GPU each read of a *device* tensor
  is a host synchronisation. On the CPU the profiler cannot tell a device tensor from host-side
  bookkeeping (random box positions of MiM drawn on the host): those reads are counted too and are
  not synchronisations next to a GPU;
* ``data_dependent``: ops whose output shape depends on values (``nonzero``, ``masked_select``,
  ``bincount``, ``unique``, ``equal``...): each is a synchronisation on a GPU as well;
* ``ms``: median wall time of a step (CPU, ``--threads``).

Each count is split by phase (``forward``, ``backward``, ``clip+optimizer``, ``loop bookkeeping``)
and totalled. The optimiser's scalar reads are ``torch.optim.AdamW``'s per-parameter ``step``
counters, host tensors also next to a GPU (not synchronisations).

Which reads touch the accelerator is what ``tests/methods/test_contract.py::
test_step_reads_nothing_back_from_the_accelerator`` checks (on the ``meta`` device).

Run (from the repository root; ``--out`` writes the JSON lines too)::

    .venv/bin/python bench/bench_step_syncs.py --threads 1
    # the tree before the change (here: the last commit), for comparison:
    rm -rf /tmp/before && mkdir /tmp/before && git archive HEAD raymim | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before .venv/bin/python bench/bench_step_syncs.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import raymim
from raymim.config import RaymimConfig, config_from_dict
from raymim.methods import build_method

DATA_DEPENDENT = ("aten::nonzero", "aten::masked_select", "aten::bincount", "aten::unique", "aten::_unique",
                  "aten::_unique2", "aten::unique_consecutive", "aten::equal", "aten::unique_dim",
                  "aten::repeat_interleave", "aten::argwhere")


# Each method's own fields only (a tree with per-method config sections refuses the others), given
# as a dict: ``config_from_dict`` reads both the flat and the per-method config layouts.
METHODS: dict[str, dict[str, Any]] = {
    "mae": {"mask_ratio": 0.6},
    "simmim": {"mask_ratio": 0.6},
    "mim": {"mask_ratio": 0.6, "levels": 3, "level_sizes": [384, 96, 16], "gamma": 4},
    "mps_ams": {"mask_ratio": 0.75, "mps_mode": "online", "levels": 1},
    "hssl": {"mask_ratio": 0.75},
}
TINY_VIT = dict(patch_size=8, hidden_size=96, mlp_dim=192, num_layers=2, num_heads=4, decoder_hidden_size=96,
                decoder_layers=1, decoder_heads=4)


def config(name: str, img: int, **model: Any) -> RaymimConfig:
    """The tiny ViT at ``img``^3 with method ``name``'s settings; ``model``: more ``model.*`` fields."""
    return config_from_dict({"model": {"img_size": img, **TINY_VIT, **model},
                             "method": {"name": name, **METHODS[name]}})


def metric_window(device: torch.device) -> Any | None:
    """The loop's own ``MetricWindow`` when this tree has one (metrics stay tensors), else None."""
    try:
        from raymim.train.loop import MetricWindow
    except ImportError:
        return None
    return MetricWindow()


PHASES = ("forward", "backward", "clip+optimizer", "loop bookkeeping")


def step_fn(method: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Any], window: Any | None):
    def step() -> None:
        with record_function("forward"):
            out = method(batch)
        with record_function("backward"):
            out.loss.backward()
        with record_function("clip+optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        with record_function("loop bookkeeping"):
            if window is not None:  # this tree's loop: device sums, read once per log_every
                window.add("loss", out.loss.detach().float())
                for k, v in out.metrics.items():
                    if k != "loss":
                        window.add(k, v)
                window.add("grad_norm", grad_norm)
            else:  # the loop before: floats every step
                sums = {k: float(v) for k, v in out.metrics.items()}
                sums["loss"] = float(sum(float(o.loss.detach()) for o in [out]) / 1)
                sums["grad_norm"] = float(grad_norm)

    return step


def phase_of(event: Any) -> str:
    while event is not None:
        if event.name in PHASES:
            return event.name
        event = event.cpu_parent
    return "other"


def measure(name: str, img: int, batch_size: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    method = build_method(name, config(name, img))
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    batch = {"image": torch.rand(batch_size, 1, img, img, img)}
    window = metric_window(torch.device("cpu"))
    step = step_fn(method, opt, batch, window)
    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    row: dict[str, Any] = {"method": name, "img": img, "batch": batch_size,
                           "tree": raymim.__file__, "metrics_are_tensors": window is not None,
                           "ms": round(statistics.median(times), 1)}
    for phase in (*PHASES, "total"):
        mine = [e for e in events if phase == "total" or phase_of(e) == phase]
        names = Counter(e.name for e in mine)
        row[phase] = {
            "ops": sum(1 for e in top if phase == "total" or phase_of(e) == phase) / steps,
            "aten_events": len(mine) / steps,
            "scalar_reads": names["aten::_local_scalar_dense"] / steps,
            "data_dependent": {n: names[n] / steps for n in DATA_DEPENDENT if names[n]},
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--img", type=int, default=48)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ",".join(METHODS))
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args()
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"--methods should be among {','.join(METHODS)}, got {','.join(unknown)}")
    torch.set_num_threads(args.threads)
    for name in args.methods.split(","):
        row = measure(name, args.img, args.batch, args.steps)
        line = json.dumps(row)
        print(line)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
