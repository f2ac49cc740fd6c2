"""How the lora_jax training step scales: step time and memory as the rank grows (4 ... 256,
all layers) and as the layer count grows (r=16).

All points run in one process, so device memory is XLA's static plan of each compiled step
(arguments + outputs - donated aliases + temporaries; ``xla_mem_gib``), not the process peak
(which cannot be reset). ``train_step.py`` records both for the same step, as a calibration.

    python benchmarks/scaling.py --config cpu-small
    python benchmarks/scaling.py --config tinyllama --tune remat+chunk
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, train_step  # noqa: E402

# Most informative points first: the budget may cut the list short.
POINTS = {
    "tinyllama": [("rank", 4), ("rank", 256), ("layers", 4), ("rank", 64), ("layers", 11), ("rank", 128),
                  ("rank", 8), ("rank", 32), ("layers", 2), ("layers", 16), ("rank", 16)],
    "cpu-small": [("rank", 2), ("rank", 8), ("layers", 1), ("layers", 3)],
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="cpu-small", choices=sorted(common.CONFIGS))
  p.add_argument("--out", default=None)
  p.add_argument("--tune", default="remat+chunk", help="a train_step tune name (e.g. its best_tune)")
  p.add_argument("--targets", default="all", choices=sorted(train_step.TARGETS))
  p.add_argument("--points", default=None, help="comma-separated rank:N / layers:N (default: the plan)")
  p.add_argument("--budget-s", type=float, default=1e9)
  args = p.parse_args(argv)
  cfg = common.get_config(args.config)
  try:
    train_step.tune_settings(args.tune, cfg)
  except ValueError as e:
    raise SystemExit(f"--tune {args.tune!r}: {e}") from None
  if args.points:
    points = [(k, int(v)) for k, v in (x.split(":") for x in args.points.split(","))]
  else:
    points = POINTS.get(cfg.name, POINTS["cpu-small"])

  import jax  # noqa: F401

  t_start = time.perf_counter()
  env = common.env_info("jax")
  peak_tflops = common.jax_matmul_tflops(cfg.matmul_n)
  env["matmul_peak_tflops"] = round(peak_tflops, 3)
  rows: list[dict[str, Any]] = []
  payload = dict(benchmark="scaling", env=env, config=vars(cfg) | {"tune": args.tune, "targets": args.targets,
                 "base_rank": train_step.RANK, "base_layers": cfg.layers},
                 memory_note="xla_mem_gib: XLA's compiled memory plan (args + outputs - aliases + temps)", rows=rows)
  out = args.out or common.default_out("scaling", cfg)
  for axis, value in points:
    rank = value if axis == "rank" else train_step.RANK
    layers = value if axis == "layers" else cfg.layers
    if time.perf_counter() - t_start > args.budget_s:
      row = dict(axis=axis, rank=rank, layers=layers, skipped="time budget")
    else:
      c = dataclasses.replace(cfg, layers=layers)
      row = train_step.measure("lora_jax", args.targets, args.tune, c, peak_tflops, rank)
      row.pop("peak_gib", None)  # cumulative over the process: not this point's
      row.update(axis=axis, layers=layers)
    rows.append(row)
    common.write_json(out, payload)
    status = row.get("error") or row.get("skipped") or f"{row['step_ms']:.1f} ms  XLA plan {common.fmt(row.get('xla_mem_gib'), '.2f')} GiB"
    print(f"  {axis}={value:<4d} {status}", flush=True)
  rows.sort(key=lambda r: (r["axis"], r["rank"] if r["axis"] == "rank" else r["layers"]))
  return common.finish(
      payload, out, t_start, rows,
      [("axis", "axis", ""), ("rank", "rank", "d"), ("layers", "layers", "d"), ("step_ms", "step ms", ".1f"),
       ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"), ("xla_mem_gib", "XLA plan GiB", ".2f"),
       ("trainable_params", "trainable", ",d"), ("compile_s", "compile s", ".1f"), ("error", "error", "")],
  )


if __name__ == "__main__":
  main()
