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


def _time(fn, *args, iters=20, repeat=5):
  """Seconds per call: ``iters`` calls dispatched back to back (so launch overhead overlaps
  the device work, as in a jitted model), the best of ``repeat`` rounds."""
  jax.block_until_ready(fn(*args))
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeat):
    t = time.perf_counter()
    outs = [fn(*args) for _ in range(iters)]
    jax.block_until_ready(outs)
    best = min(best, (time.perf_counter() - t) / iters)
  return best


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
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) (\w[\w\-]*)\(", line)
      if m and m.group(3) not in ("parameter", "get-tuple-element", "tuple", "constant", "bitcast"):
        extra = re.search(r'custom_call_target="([^"]+)"', line) or re.search(r"kind=(\w+)", line)
        lines.append(f"{m.group(3)} {m.group(2)} {extra.group(1) if extra else ''}".strip())
  return lines


def _nf4_by(q, how: str):
  """NF4 dequantization written other ways than the library's (to compare their fusions):
  ``interleave``: unpack both nibbles, stack and reshape (the first implementation);
  ``select``: the 16-entry lookup as a chain of selects instead of a gather."""
  from lora_jax.bases.quantized import NF4_CODE, _blocked

  c = q.codes
  if how == "interleave":
    idx = jnp.stack([c >> 4, c & 15], axis=q.axis + 1).reshape(q.shape)
    vals = jnp.asarray(NF4_CODE)[idx.astype(jnp.int32)]
  else:
    e = jnp.repeat(c, 2, axis=q.axis)
    shift = (1 - jax.lax.broadcasted_iota(jnp.uint8, q.shape, q.axis) % 2) * 4
    idx = (e >> shift) & 15
    vals = jnp.zeros(q.shape, jnp.float32)
    for k, v in enumerate(NF4_CODE):
      vals = jnp.where(idx == k, np.float32(v), vals)
  out = _blocked(vals, q.axis, q.block_size) * jnp.expand_dims(q.scales(), q.axis + 1)
  return out.reshape(q.shape).astype(q.dtype)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--fan-in", type=int, default=4096)
  p.add_argument("--fan-out", type=int, default=11008)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--rows", default="1,8,16,32,64,128,256,1024,4096", help="row counts of the fused-kernel sweep")
  p.add_argument("--interpret", action="store_true", help="run the fused kernel in Pallas' interpreter (CPU check)")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (args.tokens, args.fan_in), jnp.bfloat16)
  g = jax.random.normal(k3, (args.tokens, args.fan_out), jnp.bfloat16)
  w = (jax.random.normal(k2, (args.fan_in, args.fan_out), jnp.float32) * 0.02).astype(jnp.bfloat16)
  nf4 = quantize_kernel(w, format="nf4")
  kernels = {"bf16": w, "nf4": nf4, "nf4_no_dq": quantize_kernel(w, format="nf4", double_quant=False),
             "int8": quantize_kernel(w, format="int8"), "nf4_interleave": nf4, "nf4_select": nf4}
  for how in ("interleave", "select"):
    np.testing.assert_array_equal(np.asarray(_nf4_by(nf4, how)), np.asarray(nf4.materialize()))
  rows = []
  for name, k in kernels.items():
    if name == "bf16":
      dense = lambda k: k  # noqa: E731
    elif name.startswith("nf4_") and name != "nf4_no_dq":
      dense = lambda k, how=name[4:]: _nf4_by(k, how)  # noqa: E731
    else:
      dense = lambda k: k.materialize()  # noqa: E731
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
  # Few rows (decoding): XLA's dequantize-then-GEMM against the fused Pallas kernel.
  sweep = []
  if jax.default_backend() == "gpu" or args.interpret:
    from lora_jax.bases.nf4_matmul import _fused, nf4_dot

    fused = jax.jit(lambda x, k: nf4_dot(x, k, interpret=args.interpret))
    # Tile / split-K / warp configurations at a few row counts, to pick the defaults from.
    configs = []
    if not args.interpret:
      sc = nf4.scales()
      for rows in (1, 16, 64):
        xr = x[:rows]
        for bn in (32, 64, 128):
          for splits in (1, 4, 8, 16):
            for warps in (2, 4):
              try:
                f = jax.jit(lambda x, c, s, bn=bn, splits=splits, warps=warps: _fused(
                    x, c, s, block=64, out_dtype=jnp.bfloat16, bn=bn, splits=splits, num_warps=warps))
                configs.append(dict(rows=rows, bn=bn, splits=splits, warps=warps, ms=1e3 * _time(f, xr, nf4.codes, sc, iters=args.iters)))
              except Exception as e:  # a configuration Triton rejects
                configs.append(dict(rows=rows, bn=bn, splits=splits, warps=warps, error=str(e)[:200]))
      for rows in (1, 16, 64):
        ok = sorted((c for c in configs if c["rows"] == rows and "ms" in c), key=lambda c: c["ms"])
        print(f"rows {rows}: best configs", [(c["bn"], c["splits"], c["warps"], round(c["ms"], 4)) for c in ok[:4]])
    for rows in [int(r) for r in args.rows.split(",")]:
      xr = x[:rows] if rows <= x.shape[0] else jnp.tile(x, (-(-rows // x.shape[0]), 1))[:rows]
      t_d = _time(jax.jit(lambda x, w: x @ w), xr, w, iters=args.iters)
      t_x = _time(jax.jit(lambda x, k: x @ k.materialize()), xr, nf4, iters=args.iters)
      t_f = _time(fused, xr, nf4, iters=args.iters)
      err = float(jnp.abs(fused(xr, nf4).astype(jnp.float32) - (xr @ nf4.materialize()).astype(jnp.float32)).max())
      sweep.append(dict(rows=rows, bf16_ms=1e3 * t_d, nf4_xla_ms=1e3 * t_x, nf4_fused_ms=1e3 * t_f, fused_max_abs_err=err))
    print(f"{'rows':>6} {'bf16 ms':>9} {'nf4 XLA ms':>11} {'nf4 fused ms':>13} {'fused/XLA':>10} {'max |err|':>10}")
    for r in sweep:
      print(f"{r['rows']:>6} {r['bf16_ms']:>9.4f} {r['nf4_xla_ms']:>11.4f} {r['nf4_fused_ms']:>13.4f} "
            f"{r['nf4_fused_ms'] / r['nf4_xla_ms']:>10.2f} {r['fused_max_abs_err']:>10.2e}")
  out = args.out or os.path.join(os.path.dirname(__file__), "results", "dequant_matmul.json")
  with open(out, "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, lora_jax=lora_jax.__version__,
                   date=time.strftime("%Y-%m-%d"), shapes=vars(args), rows=rows, rows_sweep=sweep, fused_configs=configs), f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
