"""``x @ dequantize(Q)`` for an NF4 kernel in one Pallas (Triton) kernel on GPU.

XLA computes a quantized kernel's use as two programs: a fusion that writes the dequantized
bf16 kernel to memory, then a cuBLAS GEMM that reads it back. When the GEMM is compute-bound
(training: thousands of rows) that pass costs a few percent and XLA's path is the right one;
when it is memory-bound (decoding: a few rows) the dense write and read cost several times
the 4-bit read. This kernel reads the packed codes and the block scales, unpacks and scales
them in registers, and multiplies: each output tile ``(bm, bn)`` walks the fan-in axis one
block of ``block_size`` entries at a time, the even rows of the block (high nibbles) and the
odd rows (low nibbles) as two dots against the even and odd columns of ``x``.

:func:`nf4_dot` is differentiable in ``x`` (the input gradient ``g @ W^T`` goes through XLA's
dequantization, the codes are what the backward pass keeps) and falls back to XLA's path off
the GPU. :func:`use_fused` says which path a use takes: rows at most :data:`MAX_ROWS`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

# Rows (product of x's non-contracted axes) up to which the fused kernel is used. Measured on
# an H200 at 7B MLP shapes (4096 x 11008; benchmarks/results/dequant_matmul_7b.json): fused /
# XLA time 0.78 at 1 row, 0.87 at 32, 1.03 at 64, 1.8 at 128, 8.5 at 4096 rows.
MAX_ROWS = 32
_BM_MIN = 16  # Triton's dot needs at least 16 rows


def _lookup(idx: Array) -> Array:
  """NF4 code values of 4-bit indices (uint8 tensor), as a select tree on the index bits:
  elementwise, so it runs in registers inside the kernel."""
  from lora_jax.bases.quantized import NF4_CODE

  vals = [jnp.full(idx.shape, np.float32(v)) for v in NF4_CODE]
  for bit in range(4):
    on = ((idx >> bit) & 1) == 1
    vals = [jnp.where(on, vals[2 * k + 1], vals[2 * k]) for k in range(len(vals) // 2)]
  return vals[0]


def _kernel(x_ref, c_ref, s_ref, o_ref, *, block: int, steps: int):
  from jax.experimental import pallas as pl

  half = block // 2
  bm, bn = o_ref.shape[-2:]
  k0 = pl.program_id(2) * steps  # this program's first block of the fan-in axis (split-K)

  def body(k, acc):
    kb = k0 + k
    xe = x_ref[:, pl.ds(kb * block, half, stride=2)]
    xo = x_ref[:, pl.ds(kb * block + 1, half, stride=2)]
    c = c_ref[pl.ds(kb * half, half), :]
    s = s_ref[pl.ds(kb, 1), :]
    hi = (_lookup(c >> 4) * s).astype(xe.dtype)
    lo = (_lookup(c & 15) * s).astype(xe.dtype)
    acc += jnp.dot(xe, hi, preferred_element_type=jnp.float32)
    acc += jnp.dot(xo, lo, preferred_element_type=jnp.float32)
    return acc

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.reshape(o_ref.shape).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block", "out_dtype", "interpret", "bn", "splits", "num_warps"))
def _fused(x: Array, codes: Array, scales: Array, *, block: int, out_dtype: Any, interpret: bool = False,
           bn: int = 64, splits: int = 0, num_warps: int = 4):  # defaults: the fastest measured at 1..32 rows
  """``splits`` programs share the fan-in axis (split-K; their float32 partial sums are added
  after); 0 picks enough for every SM to get work when the rows are few."""
  from jax.experimental import pallas as pl

  m, k = x.shape
  n = codes.shape[1]
  nblocks = k // block
  bm = min(64, max(_BM_MIN, 1 << max(m - 1, 0).bit_length()))  # a power of two, 16..64
  rows = -(-m // bm) * bm
  if rows != m:
    x = jnp.pad(x, ((0, rows - m), (0, 0)))
  cols = -(-n // bn) * bn
  if cols != n:
    codes = jnp.pad(codes, ((0, 0), (0, cols - n)))
    scales = jnp.pad(scales, ((0, 0), (0, cols - n)))
  tiles = (rows // bm) * (cols // bn)
  if splits <= 0:
    splits = 1
    while tiles * splits < 2048 and nblocks % (2 * splits) == 0 and nblocks // (2 * splits) >= 4:
      splits *= 2
  if nblocks % splits:
    raise ValueError(f"nf4 fused matmul: splits={splits} does not divide the {nblocks} blocks of the fan-in axis.")
  kw = {}
  if not interpret:
    from jax.experimental.pallas import triton as plt

    kw["compiler_params"] = plt.CompilerParams(num_warps=num_warps, num_stages=3)
  part_dtype = jnp.float32 if splits > 1 else out_dtype
  out = pl.pallas_call(
      functools.partial(_kernel, block=block, steps=nblocks // splits),
      out_shape=jax.ShapeDtypeStruct((splits, rows, cols), part_dtype),
      grid=(rows // bm, cols // bn, splits),
      in_specs=[
          pl.BlockSpec((bm, k), lambda i, j, s: (i, 0)),
          pl.BlockSpec((k // 2, bn), lambda i, j, s: (0, j)),
          pl.BlockSpec((nblocks, bn), lambda i, j, s: (0, j)),
      ],
      out_specs=pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, i, j)),
      interpret=interpret,
      **kw,
  )(x, codes, scales.astype(jnp.float32))
  out = out[0] if splits == 1 else out.sum(0).astype(out_dtype)
  return out[:m, :n]


def use_fused(q: Any, rows: int) -> bool:
  """Whether ``x @ q`` with ``rows`` rows of ``x`` runs the fused kernel: an NF4 kernel of
  2 axes blocked along its first (fan-in) axis in blocks of a multiple of 32, a few rows,
  on a GPU."""
  return (
      q.format == "nf4" and len(q.shape) == 2 and q.axis == 0 and q.block_size % 32 == 0
      and rows <= MAX_ROWS and jax.default_backend() == "gpu"
  )


def nf4_dot(x: Array, q: Any, out_dtype: Any = None, *, interpret: bool = False) -> Array:
  """``x @ dequantize(q)`` for ``x`` of shape ``(..., fan_in)`` and an NF4 :class:`QuantizedKernel`
  ``q`` of shape ``(fan_in, fan_out)`` blocked along fan-in; the fused kernel (``interpret``:
  Pallas' interpreter, for tests off the GPU). Differentiable in ``x``."""
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  lead = x.shape[:-1]

  @jax.custom_vjp
  def f(x, parts):
    qq = jax.tree_util.tree_unflatten(tree, parts)
    y = _fused(x.reshape(-1, x.shape[-1]), qq.codes, qq.scales(), block=qq.block_size, out_dtype=out_dtype, interpret=interpret)
    return y.reshape(*lead, q.shape[1])

  def fwd(x, parts):
    return f(x, parts), parts

  def bwd(parts, g):
    w = jax.tree_util.tree_unflatten(tree, parts).materialize()
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), None

  f.defvjp(fwd, bwd)
  parts, tree = jax.tree_util.tree_flatten(q)
  return f(x, parts)
