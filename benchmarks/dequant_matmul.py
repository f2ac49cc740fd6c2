"""Does XLA fuse a quantized kernel's dequantization into the matmul, or write the dense kernel
to memory first? Times ``x @ W`` against ``x @ dequantize(Q)`` (NF4, int8; forward, and the
input gradient ``g @ W^T`` a frozen base needs in the backward pass) at one layer's shapes, and
lists what the compiled program's entry computation runs (fusions, GEMM custom calls) with
the shapes they write.

    python benchmarks/dequant_matmul.py --tokens 4096 --fan-in 4096 --fan-out 11008
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora_jax  # noqa: E402
from lora_jax.bases.quantized import quantize_kernel  # noqa: E402


def _time(fn, *args, iters=20):
  out = fn(*args)
  jax.block_until_ready(out)
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def _entry_ops(compiled_text: str) -> list[str]:
  """The instructions of the entry computation: ``name = shape op(...)`` lines, shortened."""
  lines, inside = [], False
  for line in compiled_text.splitlines():
    if line.startswith("ENTRY"):
      inside = True
      continue
    if inside:
      if line.startswith("}"):
        break
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(", line)
      if m and m.group(3) not in ("parameter", "get-tuple-element", "tuple", "constant", "bitcast"):
        extra = re.search(r'custom_call_target="([^"]+)"', line) or re.search(r"kind=(\w+)", line)
        lines.append(f"{m.group(3)} {m.group(2)} {extra.group(1) if extra else ''}".strip())
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--fan-in", type=int, default=4096)
  p.add_argument("--fan-out", type=int, default=11008)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (args.tokens, args.fan_in), jnp.bfloat16)
  g = jax.random.normal(k3, (args.tokens, args.fan_out), jnp.bfloat16)
  w = (jax.random.normal(k2, (args.fan_in, args.fan_out), jnp.float32) * 0.02).astype(jnp.bfloat16)
  kernels = {"bf16": w, "nf4": quantize_kernel(w, format="nf4"), "nf4_no_dq": quantize_kernel(w, format="nf4", double_quant=False),
             "int8": quantize_kernel(w, format="int8")}
  rows = []
  for name, k in kernels.items():
    dense = (lambda k: k) if name == "bf16" else (lambda k: k.materialize())
    fwd = jax.jit(lambda x, k, dense=dense: x @ dense(k))
    bwd = jax.jit(lambda g, k, dense=dense: g @ dense(k).T)
    t_f, t_b = _time(fwd, x, k, iters=args.iters), _time(bwd, g, k, iters=args.iters)
    ops = _entry_ops(fwd.lower(x, k).compile().as_text())
    stored = k.nbytes if name != "bf16" else w.size * 2
    rows.append(dict(kernel=name, fwd_ms=1e3 * t_f, bwd_dx_ms=1e3 * t_b, stored_bytes=int(stored), fwd_entry_ops=ops))
  base = rows[0]
  print(f"device: {jax.devices()[0].device_kind}; x ({args.tokens}, {args.fan_in}) @ W ({args.fan_in}, {args.fan_out}), bf16")
  print(f"{'kernel':<10} {'fwd ms':>8} {'x bf16':>7} {'dx ms':>8} {'x bf16':>7} {'MB stored':>10}  entry computation")
  for r in rows:
    print(f"{r['kernel']:<10} {r['fwd_ms']:>8.3f} {r['fwd_ms'] / base['fwd_ms']:>7.2f} {r['bwd_dx_ms']:>8.3f} "
          f"{r['bwd_dx_ms'] / base['bwd_dx_ms']:>7.2f} {r['stored_bytes'] / 1e6:>10.1f}  {' ; '.join(r['fwd_entry_ops'])}")
  out = args.out or os.path.join(os.path.dirname(__file__), "results", "dequant_matmul.json")
  with open(out, "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, lora_jax=lora_jax.__version__,
                   date=time.strftime("%Y-%m-%d"), shapes=vars(args), rows=rows), f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
