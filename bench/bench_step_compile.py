"""Graph breaks of ``torch.compile`` per method, and step-time ratios of fused vs einsum attention and
of compiled vs eager steps, on the CPU.

Same tiny ViT and method settings as ``bench/bench_step_syncs.py`` (hidden 96, 2 layers, patch 8,
48^3, batch 4; MAE, SimMIM, MiM 3 levels, MPS-AMS online, HSSL), through the package's public API
only, so an older tree put first on ``PYTHONPATH`` is measured by the same file.

* ``graphs`` / ``breaks``: ``torch._dynamo.explain(method)(batch)`` on one training forward, with
  static shapes as ``train.compile`` (a break splits the forward into separately compiled graphs
  with eager Python between them), with each distinct break reason and the ``raymim`` line of it;
* ``--timing``: median wall time of a step (forward + backward + AdamW, ``--steps`` steps after
  one warm-up) with ``model.fused_attention`` on and off, in the same process (the fused / einsum
  ratio; a tree without that field is skipped);
* ``--compile METHODS``: the same step through ``torch.compile(method)`` (Inductor) vs eager:
  the first compiled step's seconds (the compile) and the median of the next ``--steps``.

Run (repository root)::

    .venv/bin/python bench/bench_step_compile.py --threads 1 --timing --compile mae
    PYTHONPATH=/tmp/before .venv/bin/python bench/bench_step_compile.py --threads 1   # breaks before
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch._dynamo
from bench_step_syncs import METHODS, config

import raymim
from raymim.config import ModelConfig
from raymim.methods import build_method


def batch_of(n: int, img: int) -> dict[str, Any]:
    return {"image": torch.rand(n, 1, img, img, img, generator=torch.Generator().manual_seed(0))}


def graph_breaks(name: str, img: int, n: int) -> dict[str, Any]:
    torch.manual_seed(0)
    method = build_method(name, config(name, img))
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # static, as train.compile
            ex = torch._dynamo.explain(method)(batch_of(n, img))
    except Exception as exc:  # noqa: BLE001 - a forward Dynamo cannot trace at all is a result too
        return {"explain_error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"}
    reasons: dict[str, int] = {}
    for br in ex.break_reasons:
        frames = [f for f in br.user_stack if "/raymim/" in f.filename]
        where = f"{frames[-1].filename.split('/raymim/')[-1]}:{frames[-1].lineno}" if frames else "?"
        key = f"{where} {br.reason.strip().splitlines()[0][:90]}"
        reasons[key] = reasons.get(key, 0) + 1
    return {"graphs": ex.graph_count, "breaks": ex.graph_break_count, "reasons": reasons}


def step_ms(method: torch.nn.Module, batch: dict[str, Any], steps: int, compiled: bool = False) -> dict[str, float]:
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    fwd = torch.compile(method, dynamic=False) if compiled else method

    def step() -> None:
        out = fwd(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # warm-up (the compile, when compiled)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t0))
    return {"ms": statistics.median(times), "first_s": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--img", type=int, default=48)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-breaks", action="store_true", help="skip torch._dynamo.explain")
    parser.add_argument("--timing", action="store_true", help="fused vs einsum attention step times")
    parser.add_argument("--compile", default="", help="methods to time compiled vs eager (Inductor; minutes each)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args()
    names = args.methods.split(",")
    for name in {*names, *filter(None, args.compile.split(","))} - set(METHODS):
        parser.error(f"methods should be among {','.join(METHODS)}, got {name}")
    torch.set_num_threads(args.threads)
    has_fused = "fused_attention" in ModelConfig.__dataclass_fields__
    for name in names:
        row: dict[str, Any] = {"method": name, "img": args.img, "batch": args.batch, "tree": raymim.__file__}
        if not args.no_breaks:
            row.update(graph_breaks(name, args.img, args.batch))
        batch = batch_of(args.batch, args.img)
        if args.timing and has_fused:
            for fused in (True, False, True, False):  # interleaved: a load change hits both alike
                torch.manual_seed(0)
                method = build_method(name, config(name, args.img, fused_attention=fused))
                key = "fused_ms" if fused else "einsum_ms"
                row.setdefault(key, []).append(step_ms(method, batch, args.steps)["ms"])
            row["fused_over_einsum"] = statistics.median(row["fused_ms"]) / statistics.median(row["einsum_ms"])
        if name in args.compile.split(","):
            kw = {"fused_attention": True} if has_fused else {}
            torch.manual_seed(0)
            eager = step_ms(build_method(name, config(name, args.img, **kw)), batch, args.steps)
            torch._dynamo.reset()
            torch.manual_seed(0)
            comp = step_ms(build_method(name, config(name, args.img, **kw)), batch, args.steps, compiled=True)
            row.update(eager_ms=eager["ms"], compiled_ms=comp["ms"], compile_s=comp["first_s"],
                       compiled_over_eager=comp["ms"] / eager["ms"])
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
