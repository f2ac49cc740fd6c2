"""Where a training step's device time goes: a ``jax.profiler`` trace, summarised.

Builds one :mod:`benchmarks.train_step` variant, warms it up, traces ``--steps`` steps with
``jax.profiler`` and reads the trace back with ``jax.profiler.ProfileData`` (no TensorBoard
needed). Device events are grouped by XLA op (the "XLA Ops" line of each GPU plane) and by
category (large cuBLAS GEMMs, XLA/Triton GEMM fusions, copies, dynamic-update-slice, cuDNN
attention, other fusions), printed per step, and written as JSON together with the optimised
HLO text (to look up what a fusion computes).

    python benchmarks/profile_step.py --config tinyllama --variant lora_jax/all@default
    python benchmarks/profile_step.py --config cpu-small --variant lora_jax/all@default  # smoke
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, train_step  # noqa: E402

# (category, regex over "op name | kernel name"), first match wins.
CATEGORIES = (
    ("attention (cuDNN)", r"cudnn|fmha|flash|dot_product_attention|custom-call.*sdpa"),
    ("GEMM fusion (XLA/Triton)", r"gemm_fusion|triton_gemm|__triton_gemm|block_level_gemm"),
    ("GEMM (cuBLAS)", r"cublas|gemm|nvjet|sm90_xmma|cutlass|matmul|dot"),
    ("dynamic-update-slice", r"dynamic[-_]update[-_]slice"),
    ("copy / memcpy", r"copy|memcpy|transpose"),
    ("reduce / norm fusion", r"reduce|loop_reduce|input_reduce"),
    ("elementwise fusion", r"fusion|loop|convert|multiply|add|select"),
)


def category(name: str) -> str:
  low = name.lower()
  for cat, pattern in CATEGORIES:
    if re.search(pattern, low):
      return cat
  return "other"


def summarise(xspace_path: str, steps: int) -> dict[str, Any]:
  """Totals per XLA op, per kernel and per category, in ms per step, from an ``.xplane.pb``."""
  from jax.profiler import ProfileData

  data = ProfileData.from_file(xspace_path)
  ops: collections.Counter[str] = collections.Counter()
  kernels: collections.Counter[str] = collections.Counter()
  counts: collections.Counter[str] = collections.Counter()
  lines_seen: dict[str, float] = {}
  device_planes = [p for p in data.planes if p.name.startswith("/device:")]
  for plane in device_planes:
    for line in plane.lines:
      events = list(line.events)
      total = sum(e.duration_ns for e in events)
      lines_seen[f"{plane.name} | {line.name}"] = total / 1e6 / steps
      if line.name == "XLA Ops":
        for e in events:
          ops[e.name] += e.duration_ns
          counts[e.name] += 1
      elif line.name.startswith("Stream") or "stream" in line.name.lower():
        for e in events:
          kernels[e.name] += e.duration_ns
  if not device_planes:  # CPU: XLA's thunks run on the host's "tf_XLA..." threads
    for plane in data.planes:
      for line in plane.lines:
        if line.name.startswith("tf_XLA"):
          for e in line.events:
            if not e.name.startswith(("ThunkExecutor", "while", "call", "conditional")):
              ops[e.name] += e.duration_ns
              counts[e.name] += 1
  source = ops if ops else kernels
  by_cat: collections.Counter[str] = collections.Counter()
  for name, ns in source.items():
    by_cat[category(name)] += ns
  per_step = lambda c, n: [(k, round(v / 1e6 / steps, 3)) for k, v in c.most_common(n)]
  return dict(
      device_planes=[p.name for p in device_planes],
      lines_ms_per_step={k: round(v, 3) for k, v in lines_seen.items()},
      total_op_ms_per_step=round(sum(source.values()) / 1e6 / steps, 3),
      categories_ms_per_step=per_step(by_cat, 20),
      top_ops_ms_per_step=per_step(ops, 40),
      op_calls_per_step={k: counts[k] // steps for k, _ in ops.most_common(40)},
      top_kernels_ms_per_step=per_step(kernels, 40),
  )


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="cpu-small", choices=sorted(common.CONFIGS))
  p.add_argument("--variant", default="lora_jax/all@default", help="impl/targets@tune, as in train_step.py")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/profile_<variant>_<config>.json)")
  p.add_argument("--hlo", default=None, help="also write the optimised HLO text here")
  args = p.parse_args(argv)
  cfg = common.get_config(args.config)

  import jax

  impl, targets, tune_name = train_step._parse_key(args.variant)
  tune = train_step.tunes(cfg)[tune_name]
  step, frozen, state, _, _, tokens = train_step.build(impl, targets, tune, cfg)
  compiled = step.lower(*frozen, *state, tokens).compile()
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(compiled.as_text())
  box = [state]

  def one():
    *new, loss = compiled(*frozen, *box[0], tokens)
    box[0] = new
    return loss.block_until_ready()

  for _ in range(3):
    one()
  trace_dir = tempfile.mkdtemp(prefix="lora_jax_trace_")
  t0 = time.perf_counter()
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.steps):
    one()
  jax.profiler.stop_trace()
  wall = (time.perf_counter() - t0) / args.steps
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  summary = summarise(path, args.steps)
  safe = args.variant.replace("/", "_").replace("@", "_")
  out = args.out or os.path.join(common.RESULTS, f"profile_{safe}_{cfg.name}.json")
  payload = dict(benchmark="profile_step", env=common.env_info("jax"), variant=args.variant,
                 config=vars(cfg), steps=args.steps, traced_wall_ms_per_step=round(wall * 1e3, 2), **summary)
  common.write_json(out, payload)
  print(f"{args.variant}: {wall * 1e3:.1f} ms/step while tracing; device ops {summary['total_op_ms_per_step']:.1f} ms/step")
  print("by category (ms/step):")
  for k, v in summary["categories_ms_per_step"]:
    print(f"  {k:28s} {v:8.2f}")
  top = summary["top_ops_ms_per_step"] or summary["top_kernels_ms_per_step"]
  print("top XLA ops / kernels (ms/step):")
  for k, v in top[:25]:
    print(f"  {k[:60]:60s} {v:8.2f}  {category(k)}")
  print(f"wrote {out}")
  return payload


if __name__ == "__main__":
  main()
