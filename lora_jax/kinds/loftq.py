"""LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization"): ``LoraSpec(init="loftq")``.

The base becomes a :class:`lora_jax.QuantizedKernel` ``Q`` and the factors start where
``dequant(Q) + scale * a @ b`` is close to the full-precision ``W``, by alternating (PEFT's
``loftq_init``)::

    low = 0
    repeat K times:
      Q = quantize(W - low)                       # the same quantizer as the stored base
      a, b = top-r SVD of (W - dequant(Q)) / scale
      low = scale * a @ b

per layer of the kernel's ``(layers, fan_in, fan_out)`` view (the view PiSSA uses), for any
layout. Plain QLoRA (``quantize`` then zero-``b`` factors) starts at error
``||W - dequant(quantize(W))||``; LoftQ at ``||R - R_r||`` with ``R = W - dequant(Q)``.

Names: ``"loftq"`` (NF4, blocks of 64 along the fan-in, double quantization, one
iteration), ``"loftq_iter_K"`` (``K`` iterations, 1 to 64), ``"loftq_int8"`` and
``"loftq_int8_iter_K"`` (symmetric int8, one scale per output channel).

>>> import lora_jax
>>> w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 8)), jnp.float32)
>>> base, ad = lora_jax.split(jax.random.key(0), {"w": w}, lora_jax.LoraSpec("w", rank=2, init="loftq_int8"))
>>> base["w"]
QuantizedKernel(int8, shape=(64, 8), dtype=float32, axis=0, block_size=64, 544 bytes)
>>> qlora = jnp.linalg.norm(w - lora_jax.bases.dense(lora_jax.bases.quantized.quantize_kernel(w, format="int8")))
>>> bool(jnp.linalg.norm(w - (lora_jax.merge(base, ad)["w"])) < qlora)
True

Differences from PEFT (0.21), where ours is deliberately not the same:

* PEFT stores ``lora_A, lora_B`` with ``lora_B @ lora_A = R_r`` and ignores ``scaling =
  alpha / r``, so its init reproduces ``W`` only when ``alpha == r`` (huggingface/peft#1982).
  Ours divides by the scale: ``dequant(Q) + scale * a @ b = dequant(Q) + R_r`` for any alpha.
* PEFT's NF4 quantizes inside the loop without double quantization (``compress_statistics=
  False``) and hands back ``dequant(Q)`` as a dense weight, which a later 4-bit load
  quantizes again. Ours quantizes with exactly the format it stores (double quantization
  included), so the residual the SVD sees is the one the model computes with.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.bases.quantized import QuantizedKernel, quantize_kernel
from lora_jax.kinds.base import einsum_delta, kernel_labels, leaf_labels
from lora_jax.kinds.inits import _matrices

Array = Any

NAMES = ("loftq", "loftq_iter_K", "loftq_int8", "loftq_int8_iter_K")
MAX_ITER = 64
NF4_BLOCK = 64
_NAME = re.compile(r"loftq(_int8)?(?:_iter_([0-9]+))?")


def parse(name: str) -> tuple[str, int]:
  """``(format, iterations)`` of a LoftQ init name (raises ValueError for a bad one)."""
  m = _NAME.fullmatch(name)
  if m is None:
    raise ValueError(
        f"no such LoftQ init; expected one of {list(NAMES)} with K the number of alternating "
        f"iterations, 1 to {MAX_ITER} (e.g. 'loftq_iter_5', 'loftq_int8_iter_2')."
    )
  iters = 1 if m.group(2) is None else int(m.group(2))
  if not 1 <= iters <= MAX_ITER:
    raise ValueError(
        f"LoftQ needs 1 to {MAX_ITER} alternating iterations, got K = {m.group(2)}; "
        f"e.g. '{name[: m.start(2)]}1' (one iteration, PEFT's default loftq_iter=1)."
    )
  return ("int8" if m.group(1) else "nf4"), iters


def check_target(target: Any) -> None:
  """Raises naming the path when the kernel cannot be quantized as the init ``target.init`` says."""
  fmt, _ = parse(target.init)
  if target.is_embedding:
    raise ValueError(
        f"{target.path!r}: init={target.init!r} quantizes the base kernel, which lora_jax.quantize "
        "does not do for embeddings (a row lookup would dequantize the whole table); exclude "
        "the embedding from the targets or use init='peft'."
    )
  axis = max(j for j, c in enumerate(target.layout) if c == "i")
  n = target.shape[axis]
  if fmt == "nf4" and n % NF4_BLOCK:
    raise ValueError(
        f"{target.path!r}: init={target.init!r} quantizes to NF4 in blocks of {NF4_BLOCK} along the "
        f"kernel's fan-in axis {axis}, of size {n} (shape {tuple(target.shape)}, layout "
        f"{target.layout!r}), which {NF4_BLOCK} does not divide; use init='loftq_int8' (one scale "
        "per output channel) or leave this kernel out of the targets."
    )


def loftq_factors(target: Any, w: Array, dtype: Any, a_shape, b_shape) -> tuple[Array, Array, QuantizedKernel]:
  """``(a, b, Q)`` for ``target`` (a :class:`lora_jax.Target` with a LoftQ init) and its
  dense kernel ``w``; see the module docstring."""
  check_target(target)
  if not target.scale:
    raise ValueError(
        f"{target.path!r}: init={target.init!r} divides the low-rank part by the scale alpha/r = "
        f"{target.scale}, which must not be zero; use alpha != 0."
    )
  fmt, iters = parse(target.init)
  # PEFT's NF4 (blocks of 64) with QLoRA's double quantization; int8 as bitsandbytes'
  # Int8Params (one absmax per output channel).
  return _loftq(jnp.asarray(w), float(target.scale), iters, fmt=fmt, double_quant=fmt == "nf4", layout=target.layout,
                rank=target.rank, dtype=jnp.dtype(dtype), a_shape=a_shape, b_shape=b_shape)


@functools.partial(jax.jit, static_argnames=("fmt", "double_quant", "layout", "rank", "dtype", "a_shape", "b_shape"))
def _loftq(w, scale, iters, *, fmt, double_quant, layout, rank, dtype, a_shape, b_shape):
  """One compiled function per kernel shape and format, for any scale and number of
  iterations (inlined under an outer jit)."""
  acc = jnp.promote_types(w.dtype, jnp.float32)
  w_acc = w.astype(acc)
  scale = jnp.asarray(scale, acc)
  root_scale, sign = jnp.abs(scale), jnp.sign(scale)

  def quantized(low):
    block = NF4_BLOCK if fmt == "nf4" else None
    q = quantize_kernel(w_acc - low, format=fmt, block_size=block, double_quant=double_quant, layout=layout)
    return dataclasses.replace(q, dtype=np.dtype(w.dtype))  # it stands for a kernel of w's dtype

  def factors(q):
    # The residual against the base as the model will see it (materialized in w's dtype).
    res = _matrices(w_acc - q.materialize().astype(acc), layout)
    u, s, vh = jnp.linalg.svd(res, full_matrices=False)
    # PEFT: L = U sqrt(S), R = sqrt(S) Vh (lora_B = L, lora_A = R, no scaling). Ours keeps
    # scale * a @ b = U_r S_r Vh_r: a = sign * U sqrt(S/|s|), b = sqrt(S/|s|) Vh.
    root = jnp.sqrt(s[..., :rank] / root_scale)
    a = sign * u[..., :rank] * root[..., None, :]
    b = root[..., :, None] * vh[..., :rank, :]
    return jnp.reshape(a, a_shape), jnp.reshape(b, b_shape)

  def low_rank(a, b):
    return einsum_delta(a, leaf_labels("lir", layout), b, leaf_labels("lro", layout), kernel_labels(layout), scale).astype(acc)

  def step(_, low):
    return low_rank(*factors(quantized(low)))

  # PEFT's loop: the first quantization is of W itself; the last SVD is of W - dequant(Q).
  low = jax.lax.fori_loop(0, iters - 1, step, jnp.zeros_like(w_acc))
  q = quantized(low)
  a, b = factors(q)
  return a.astype(dtype), b.astype(dtype), q


__all__ = ["NAMES", "check_target", "loftq_factors", "parse"]
