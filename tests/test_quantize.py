"""Quantized frozen bases (QLoRA): NF4 (with double quantization) and int8 kernels.

Codes and round trips against a NumPy reference quantizer written here (nearest code, high
nibble first, bitsandbytes' double quantization of the scales in float64) and against
bitsandbytes itself; the NF4 table against QLoRA's published one; per-block error bounds;
``wrap`` on quantized params == the dequantized-and-merged reference (outputs and gradients)
on Dense, DenseGeneral, an nn.scan'd stack, Conv and NNX; the backward keeps packed codes,
not dense kernels; jit without retracing; errors that name the path or option."""

from __future__ import annotations

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.ad_checkpoint import print_saved_residuals

import lora_jax
from lora_jax import LoraFactors, LoraSpec, QuantizedKernel
from lora_jax.bases.quantized import NF4_CODE, dynamic_code, quantize_kernel
from lora_jax.kinds import is_adapter
from tests._util import assert_close, assert_far, assert_trees_close

# QLoRA (Dettmers et al., 2023), appendix E: the NF4 data type's 16 values, as published (and
# as bitsandbytes' get_4bit_type("nf4") holds them).
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# NumPy reference quantizer (float64; bitsandbytes' algorithm written out, not the library's)
# ----------------------------------------------------------------------------------------------


def _dynamic_map_f64():
  """bitsandbytes' ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`` in float64."""
  data = []
  for i in range(7):
    bounds = np.linspace(0.1, 1.0, 2**i + 1)
    means = (bounds[:-1] + bounds[1:]) / 2
    data += list(10.0 ** (i - 6) * means) + list(-(10.0 ** (i - 6)) * means)
  data += [0.0, 1.0]
  return np.sort(np.array(data + [0.0] * (256 - len(data))))


def _blocks(x, axis, block):
  """float64 ``x`` with ``axis`` moved last and split into ``(n / block, block)``."""
  t = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  return t.reshape(*t.shape[:-1], t.shape[-1] // block, block)


def _nearest(s, code, tie_eps):
  """Index of the nearest ``code`` value to each ``s``, and whether ``s`` lies within
  ``tie_eps`` of a midpoint between two distinct code values (where float32 rounding may
  legitimately pick either neighbour)."""
  idx = np.argmin(np.abs(s[..., None] - code), axis=-1)
  u = np.unique(code)
  mids = (u[1:] + u[:-1]) / 2
  near = np.min(np.abs(s[..., None] - mids), axis=-1) < tie_eps
  return idx, near


def _ref_blockwise(w, fmt, axis, block):
  """Per-entry code index and per-block absmax, in ``_blocks`` layout ``(..., nb, block)``."""
  b = _blocks(w, axis, block)
  absmax = np.abs(b).max(-1)
  s = b / np.where(absmax > 0, absmax, 1.0)[..., None]
  if fmt == "nf4":
    idx, near = _nearest(s, np.asarray(QLORA_NF4, np.float64), 1e-6)
  else:
    t = 127.0 * s
    idx = np.round(t).astype(np.int64)  # nearest, ties to even (as jnp.round)
    near = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-4
  return idx, near, absmax


def _ref_double_quant(absmax, axis, lead):
  """bitsandbytes' ``compress_statistics`` of the block scales (library layout, blocked axis
  ``axis``), per layer: minus their mean, blocks of 256 in PyTorch's ``(out, in)`` order (layers
  first, the blocked axis last), each to the nearest value of the dynamic code times its absmax.
  Returns (code index, near-tie mask) in the scales' layout, absmax2 ``(*L, groups)``, offset ``L``."""
  order = list(lead) + [d for d in range(absmax.ndim) if d not in lead and d != axis] + [axis]
  t = np.transpose(np.asarray(absmax, np.float64), order)
  lead_shape = t.shape[: len(lead)]
  flat = t.reshape(*lead_shape, -1)
  offset = flat.mean(-1)
  m = flat.shape[-1]
  g = -(-m // 256)
  padded = np.zeros((*lead_shape, g * 256))
  padded[..., :m] = flat - offset[..., None]
  groups = padded.reshape(*lead_shape, g, 256)
  absmax2 = np.abs(groups).max(-1)
  s = groups / np.where(absmax2 > 0, absmax2, 1.0)[..., None]
  idx, near = _nearest(s, _dynamic_map_f64(), 1e-5)
  back = lambda a: np.transpose(a.reshape(*lead_shape, g * 256)[..., :m].reshape(t.shape), np.argsort(order))  # noqa: E731
  return back(idx), back(near), absmax2, offset


# Jitted (one compile per kernel structure, not one per eager op), both in one program.
_dequantized = jax.jit(lambda q: (q.materialize(), q.scales()))


def _materialize(q):
  return _dequantized(q)[0]


def _scales(q):
  return _dequantized(q)[1]


def _unpack_nf4(codes, axis):
  """Packed bytes -> code indices along ``axis`` (high nibble first)."""
  c = np.asarray(codes)
  hi, lo = c >> 4, c & 15
  out = np.stack([hi, lo], axis=axis + 1)
  shape = list(c.shape)
  shape[axis] *= 2
  return out.reshape(shape).astype(np.int64)


def _pack_nf4(idx, axis):
  t = np.moveaxis(idx, axis, -1)
  return np.moveaxis(((t[..., 0::2] << 4) | t[..., 1::2]).astype(np.uint8), -1, axis)


def _from_blocks(b, axis):
  return np.moveaxis(b.reshape(*b.shape[:-2], -1), -1, axis)


def check_against_reference(q, w):
  """``q`` == the NumPy reference quantization of ``w``: codes bit for bit (an entry within
  float32 rounding of a midpoint may take either neighbour, never a farther code), scales,
  double-quant state, and the dequantized kernel. Returns the reference dense kernel (float64)."""
  w = np.asarray(w).astype(np.float32).astype(np.float64)
  axis, block = q.axis, q.block_size
  idx, near, absmax = _ref_blockwise(w, q.format, axis, block)
  got_codes = np.asarray(q.codes)
  assert q.shape == w.shape
  if q.format == "nf4":
    assert got_codes.dtype == np.uint8
    want_shape = list(w.shape)
    want_shape[axis] //= 2
    assert got_codes.shape == tuple(want_shape)
    got_idx = _blocks(_unpack_nf4(got_codes, axis), axis, block).astype(np.int64)
    code = np.asarray(QLORA_NF4, np.float64)
  else:
    assert got_codes.dtype == np.int8 and got_codes.shape == w.shape
    got_idx = _blocks(got_codes, axis, block).astype(np.int64)
  differ = got_idx != idx
  assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} codes differ from the reference away from any midpoint"
  assert np.all(np.abs(got_idx - idx)[differ] == 1), "a tie went to a code that is not a neighbour"
  assert near.sum() <= max(2, 0.02 * near.size), "too many near-ties for this check to mean anything"
  vals = code[got_idx] if q.format == "nf4" else got_idx / 127.0

  absmax_l = np.moveaxis(absmax, -1, axis)  # the library's layout: nb along the blocked axis
  if not q.double_quant:
    assert q.absmax2 is None and q.offset is None
    assert q.absmax.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(q.absmax, np.float64), absmax_l)  # a max is exact
    scales_l = absmax_l
  else:
    assert q.format == "nf4" and q.absmax.dtype == np.uint8 and q.absmax.shape == absmax_l.shape
    idx2, near2, absmax2, offset = _ref_double_quant(absmax_l, axis, q.lead)
    dyn = dynamic_code().astype(np.float64)
    got2 = np.asarray(q.absmax).astype(np.int64)
    # Compared by value: the dynamic code holds 0 more than once.
    differ2 = dyn[got2] != dyn[idx2]
    assert not (differ2 & ~near2).any(), f"{int((differ2 & ~near2).sum())} scale codes differ from the reference away from any midpoint"
    assert near2.sum() <= max(2, 0.02 * near2.size)
    assert q.absmax2.shape == absmax2.shape and q.offset.shape == offset.shape
    assert_close(q.offset, offset, 1e-6, err_msg="offset")
    assert_close(q.absmax2, absmax2, 1e-5, scale=float(np.max(absmax_l)), err_msg="absmax2")
    order = list(q.lead) + [d for d in range(absmax_l.ndim) if d not in q.lead and d != axis] + [axis]
    t_code = np.transpose(dyn[got2], order)
    lead_shape = t_code.shape[: len(q.lead)]
    flat = t_code.reshape(*lead_shape, -1)
    g = absmax2.shape[-1]
    per = np.repeat(absmax2, 256, axis=-1)[..., : flat.shape[-1]]
    scales_t = (flat * per + offset[..., None]).reshape(t_code.shape)
    scales_l = np.transpose(scales_t, np.argsort(order))
    assert g == -(-flat.shape[-1] // 256)
  assert_close(_scales(q), scales_l, 1e-6, err_msg="scales")
  ref = _from_blocks(vals * np.moveaxis(scales_l, axis, -1)[..., None], axis)
  rtol = 1e-6 if q.dtype == np.float32 else 2**-8
  dense = _materialize(q)
  assert dense.dtype == q.dtype and dense.shape == q.shape
  assert_close(dense, ref, rtol, err_msg="materialize")
  return ref


def check_error_bound(q, w):
  """Per block: |w - dequantized| <= half the code gap around w / absmax times absmax
  (NF4; plus the scale's own double-quantization error, at most half the dynamic code's
  widest gap times that layer's absmax2), or absmax / 254 (int8)."""
  w = np.asarray(w).astype(np.float32).astype(np.float64)
  axis, block = q.axis, q.block_size
  b = _blocks(w, axis, block)
  d = _blocks(np.asarray(_materialize(q), np.float64), axis, block)
  absmax = np.abs(b).max(-1, keepdims=True)
  scale = np.moveaxis(np.asarray(_scales(q), np.float64), axis, -1)[..., None]
  slack = 1e-6 * absmax + (0 if q.dtype == np.float32 else 2**-8 * np.abs(d))
  if q.format == "int8":
    np.testing.assert_array_equal(scale, absmax)
    bound = absmax / 254
  else:
    code = np.asarray(QLORA_NF4, np.float64)
    s = np.clip(b / np.where(absmax > 0, absmax, 1.0), -1, 1)
    k = np.clip(np.searchsorted(code, s, side="right") - 1, 0, 14)
    half_gap = (code[k + 1] - code[k]) / 2
    bound = half_gap * absmax + np.abs(scale - absmax)
    if q.double_quant:
      dyn = np.unique(dynamic_code().astype(np.float64))
      widest = float(np.max(np.diff(dyn)))
      a2 = np.asarray(q.absmax2, np.float64).max(-1)  # per layer (shape L)
      if q.lead == tuple(range(len(q.lead))):  # layer axes first: broadcast per layer
        a2 = a2.reshape(a2.shape + (1,) * (scale.ndim - a2.ndim))
      else:
        a2 = a2.max()
      assert np.all(np.abs(scale - absmax) <= widest / 2 * a2 + 1e-6 * absmax), "double-quantized scale error"
    else:
      np.testing.assert_array_equal(scale, absmax)
  err = np.abs(d - b)
  assert np.all(err <= bound + slack), f"max excess {float(np.max(err - bound - slack)):.3g}"


def _w(shape, seed=0, scale=1.0, dtype=np.float32):
  return jnp.asarray((np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32).astype(dtype))


# ----------------------------------------------------------------------------------------------
# The codes themselves
# ----------------------------------------------------------------------------------------------


def test_nf4_code_is_qloras_published_table():
  np.testing.assert_array_equal(NF4_CODE, np.asarray(QLORA_NF4, np.float32))
  assert NF4_CODE.dtype == np.float32 and NF4_CODE.shape == (16,)
  # ... which is QLoRA's construction: quantiles of N(0, 1), 8 positive and 7 negative with
  # offset 0.9677 (bitsandbytes' create_normal_map), plus an exact zero, normalised to [-1, 1].
  stats = pytest.importorskip("scipy.stats")
  off = 0.9677083
  pos = stats.norm.ppf(np.linspace(off, 0.5, 9)[:-1])
  neg = -stats.norm.ppf(np.linspace(off, 0.5, 8)[:-1])
  v = np.sort(np.concatenate([pos, [0.0], neg]))
  assert_close(NF4_CODE, v / v.max(), 1e-6)


def test_dynamic_code_is_bitsandbytes_dynamic_map():
  code = dynamic_code()
  assert code.dtype == np.float32 and code.shape == (256,) and np.all(np.diff(code) >= 0)
  assert code.max() == 1.0 and 0.0 in code
  assert_close(code, _dynamic_map_f64(), 1e-6)


def test_reference_quantizer_on_a_hand_case():
  """The NumPy reference itself, on values whose codes are known: NF4 index of w / absmax,
  high nibble first; int8 round(127 w / absmax)."""
  w = np.array([[1.0], [-1.0], [0.0], [0.5], [0.07], [-0.2], [0.8], [-0.65]], np.float32)  # (8, 1), one block
  idx, _, absmax = _ref_blockwise(w, "nf4", 0, 8)
  assert absmax.ravel().tolist() == [1.0]
  assert idx.ravel().tolist() == [15, 0, 7, 12, 8, 5, 14, 1]
  assert _pack_nf4(_from_blocks(idx, 0), 0).ravel().tolist() == [0xF0, 0x7C, 0x85, 0xE1]
  q = quantize_kernel(jnp.asarray(w), block_size=8, double_quant=False)
  assert np.asarray(q.codes).ravel().tolist() == [0xF0, 0x7C, 0x85, 0xE1]
  q8 = quantize_kernel(jnp.asarray(w), format="int8")
  assert np.asarray(q8.codes).ravel().tolist() == [127, -127, 0, 64, 9, -25, 102, -83]


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


# Most kernels here are (128, 3) with the default block size, so they share compiled quantizers.


@pytest.mark.parametrize("fmt, dq", [("nf4", True), ("nf4", False), ("int8", False)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_matches_reference_and_bound(fmt, dq, dtype):
  w = _w((128, 3), seed=1, scale=0.05, dtype=dtype)
  q = quantize_kernel(w, format=fmt, double_quant=dq if fmt == "nf4" else None)
  assert isinstance(q, QuantizedKernel) and q.format == fmt and q.double_quant == dq
  assert q.shape == (128, 3) and q.dtype == np.dtype(dtype) and q.axis == 0 and q.layout == "io" and q.lead == ()
  assert q.block_size == (64 if fmt == "nf4" else 128)  # defaults: QLoRA's 64; int8 per channel
  check_against_reference(q, w)
  check_error_bound(q, w)
  bias = _w((3,), dtype=dtype)
  back = jax.jit(lambda t: (lora_jax.dequantize(t), lora_jax.dequantize(t, jnp.float32)))({"k": q, "bias": bias, "none": None})
  assert back[0]["k"].dtype == dtype and back[1]["k"].dtype == jnp.float32
  np.testing.assert_array_equal(back[0]["k"], _materialize(q))
  # Other leaves are left as they are, in their own dtype.
  assert back[1]["bias"].dtype == dtype and back[1]["none"] is None
  np.testing.assert_array_equal(back[1]["bias"], bias)
  # Quantization is not the identity (so comparing with the dequantized kernel means something).
  if dtype == jnp.float32:
    assert_far(_materialize(q), w, 1e-6)


def test_storage_size():
  # Abstractly (eval_shape): only the stored shapes and dtypes matter here.
  kernel = jax.ShapeDtypeStruct((1024, 64), jnp.float32)
  q = jax.eval_shape(lambda w: quantize_kernel(w), kernel)
  n = 1024 * 64
  assert q.codes.shape == (512, 64) and q.absmax.shape == (16, 64) and q.absmax2.shape == (4,) and q.offset.shape == ()
  assert q.nbytes == n // 2 + n // 64 + 4 * 4 + 4  # ~4.13 bits per parameter
  assert jax.eval_shape(lambda w: quantize_kernel(w, double_quant=False), kernel).nbytes == n // 2 + 4 * n // 64
  assert jax.eval_shape(lambda w: quantize_kernel(w, format="int8"), kernel).nbytes == n + 4 * 64
  assert "nf4" in repr(q) and "double_quant" in repr(q) and f"{q.nbytes:,} bytes" in repr(q)


@pytest.mark.parametrize("fmt, dq", [("nf4", True), ("nf4", False), ("int8", False)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_constant_kernels_are_exact(fmt, dq, dtype):
  for c in (0.75, -3.0):
    q = quantize_kernel(jnp.asarray(np.full((128, 3), c, dtype)), format=fmt, double_quant=dq if fmt == "nf4" else None)
    got = np.asarray(_materialize(q)).astype(np.float32)
    if fmt == "nf4":
      assert np.all(np.asarray(q.codes) == (0xFF if c > 0 else 0x00))  # codes 15 (+1) / 0 (-1)
      np.testing.assert_array_equal(got, np.float32(c))
    else:
      assert np.all(np.asarray(q.codes) == (127 if c > 0 else -127))
      # 127 * (absmax * (1/127)) in float32: within an ulp of c.
      np.testing.assert_allclose(got, np.float32(c), rtol=2**-22 if dtype == jnp.float32 else 0)


@pytest.mark.parametrize("dq", [True, False])
def test_zero_kernel_gets_the_zero_code(dq):
  z = quantize_kernel(jnp.asarray(np.zeros((128, 3), np.float32)), double_quant=dq)
  assert np.all(np.asarray(_materialize(z)) == 0)
  assert np.all(np.asarray(z.codes) == 0x77)  # code 7 is NF4's exact zero


@pytest.mark.parametrize("dq", [True, False])
def test_a_zero_block_among_others_dequantizes_to_zero(dq):
  w = np.array(_w((128, 3), seed=3))
  w[:64, 0] = 0  # one all-zero block
  q = quantize_kernel(jnp.asarray(w), double_quant=dq)
  out = np.asarray(_materialize(q))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[:64, 0], 0)
  check_against_reference(q, w)


def test_int8_zero_kernel():
  z = quantize_kernel(jnp.asarray(np.zeros((128, 3), np.float32)), format="int8")
  assert np.all(np.asarray(z.codes) == 0) and np.all(np.asarray(_materialize(z)) == 0)


@pytest.mark.parametrize("dq", [True, False])
def test_stacked_kernels_quantize_per_layer(dq):
  # Layers at very different magnitudes: one double-quant state over all layers would differ.
  w = np.asarray(_w((3, 64, 8), seed=2)) * np.array([1.0, 30.0, 0.01], np.float32)[:, None, None]
  q = quantize_kernel(jnp.asarray(w), block_size=16, double_quant=dq)
  assert q.lead == (0,) and q.axis == 1 and q.layout == "lio"
  assert q.codes.shape == (3, 32, 8) and q.absmax.shape == (3, 4, 8)
  if dq:
    assert q.absmax2.shape == (3, 1) and q.offset.shape == (3,)
  check_against_reference(q, w)
  check_error_bound(q, w)
  dense = np.asarray(_materialize(q))
  for i in range(3):
    qi = quantize_kernel(jnp.asarray(w[i]), block_size=16, double_quant=dq)
    np.testing.assert_array_equal(np.asarray(q.codes)[i], np.asarray(qi.codes), err_msg=f"layer {i}")
    np.testing.assert_array_equal(np.asarray(q.absmax)[i], np.asarray(qi.absmax), err_msg=f"layer {i}")
    if dq:
      assert_close(np.asarray(q.absmax2)[i], qi.absmax2, 1e-6)
      assert_close(np.asarray(q.offset)[i], qi.offset, 1e-6)
    assert_close(dense[i], _materialize(qi), 1e-6, err_msg=f"layer {i}")


def test_double_quant_spans_several_groups_of_256():
  # 64 * 10 / 2 = 320 scales: two groups of 256 (the second one padded).
  w = np.asarray(_w((64, 10), seed=4)) * np.linspace(0.1, 3.0, 10, dtype=np.float32)
  q = quantize_kernel(jnp.asarray(w), block_size=2)
  assert q.absmax.shape == (32, 10) and q.absmax2.shape == (2,)
  check_against_reference(q, w)
  check_error_bound(q, w)


@pytest.mark.parametrize("block", [2, 16, 64, 128])
def test_nf4_block_sizes(block):
  w = _w((128, 3), seed=5)
  q = quantize_kernel(w, block_size=block, double_quant=False)
  assert q.block_size == block and q.codes.shape == (64, 3) and q.absmax.shape == (128 // block, 3)
  check_against_reference(q, w)
  check_error_bound(q, w)


def test_int8_is_per_channel_by_default_and_blocked_on_request():
  w = np.asarray(_w((96, 5), seed=6)) * np.arange(1.0, 6.0, dtype=np.float32)
  q = quantize_kernel(jnp.asarray(w), format="int8")
  assert q.block_size == 96 and q.absmax.shape == (1, 5) and q.codes.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(q.absmax)[0], np.abs(w).max(0))  # one scale per output column
  np.testing.assert_array_equal(np.abs(np.asarray(q.codes)).max(0), 127)
  check_against_reference(q, w)
  check_error_bound(q, w)
  qb = quantize_kernel(jnp.asarray(w), format="int8", block_size=32)
  assert qb.absmax.shape == (3, 5)
  check_against_reference(qb, w)
  check_error_bound(qb, w)


# ----------------------------------------------------------------------------------------------
# Against bitsandbytes (CPU backend)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bnb():
  pytest.importorskip("torch")
  pytest.importorskip("bitsandbytes")
  import bitsandbytes.functional as F  # noqa: PLC0415

  return F


def _torch_w(shape, seed, dtype):
  import torch  # noqa: PLC0415

  w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return torch.tensor(w).to(dtype)


def _np(t):
  import torch  # noqa: PLC0415

  return t.to(torch.float32).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_bnb_tables(bnb):
  np.testing.assert_array_equal(dynamic_code(), bnb.create_dynamic_map().numpy())
  np.testing.assert_array_equal(NF4_CODE, bnb.get_4bit_type("nf4", device="cpu").numpy())


@pytest.mark.parametrize("tdtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block", [64, 128])
def test_bnb_nf4_codes_and_round_trip_are_bit_exact(bnb, tdtype, block):
  import torch  # noqa: PLC0415

  out_f, in_f = 24, 256
  W = _torch_w((out_f, in_f), 7, getattr(torch, tdtype))  # PyTorch's (out, in)
  packed, state = bnb.quantize_4bit(W, blocksize=block, quant_type="nf4", compress_statistics=False)
  kernel = jnp.asarray(_np(W).T.astype(getattr(jnp, tdtype)))  # our (in, out): blocks along fan-in
  q = quantize_kernel(kernel, block_size=block, double_quant=False)
  np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(out_f, in_f // 2).T)
  np.testing.assert_array_equal(np.asarray(q.absmax).T.ravel(), state.absmax.numpy())
  back = bnb.dequantize_4bit(packed, state)
  assert str(back.dtype) == f"torch.{tdtype}"
  np.testing.assert_array_equal(np.asarray(_materialize(q)).astype(np.float32), _np(back).T)


@pytest.mark.parametrize("tdtype", ["float32", "bfloat16"])
def test_bnb_double_quant(bnb, tdtype):
  import torch  # noqa: PLC0415

  out_f, in_f = 40, 512  # 320 scales: two second-level blocks of 256
  W = _torch_w((out_f, in_f), 8, getattr(torch, tdtype)) * torch.linspace(0.2, 2.0, out_f)[:, None].to(getattr(torch, tdtype))
  packed, state = bnb.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
  kernel = jnp.asarray(_np(W).T.astype(getattr(jnp, tdtype)))
  q = quantize_kernel(kernel, block_size=64, double_quant=True)
  np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(out_f, in_f // 2).T)
  # The mean of 320 scales, summed in another order: within an ulp or two.
  assert_close(q.offset, state.offset.numpy(), 1e-6)
  assert_close(q.absmax2, state.state2.absmax.numpy(), 1e-6)
  # The scale codes: equal except where the scaled scale lies within 1e-5 of a midpoint of the
  # dynamic code (bnb's CPU quantizer is not exactly nearest there; ours is, as its CUDA one).
  raw = np.asarray(quantize_kernel(kernel, block_size=64, double_quant=False).absmax, np.float64).T.ravel()
  s = (raw - float(state.offset)) / np.repeat(state.state2.absmax.numpy().astype(np.float64), 256)[: raw.size]
  u = np.unique(dynamic_code().astype(np.float64))
  near = np.min(np.abs(s[:, None] - (u[1:] + u[:-1]) / 2), axis=1) < 1e-5
  ours, theirs = np.asarray(q.absmax).T.ravel(), state.absmax.numpy()
  assert near.mean() < 0.05
  np.testing.assert_array_equal(ours[~near], theirs[~near])
  # Dequantized: equal to float32 rounding in every block whose scale code is the same (a
  # differing one is a neighbouring code of the dynamic map: one step of it, a few percent).
  same = np.repeat((ours == theirs).reshape(out_f, in_f // 64), 64, axis=1).T
  assert same.mean() > 0.95
  back = _np(bnb.dequantize_4bit(packed, state)).T
  got = np.asarray(_materialize(q)).astype(np.float32)
  assert_close(got[same], back[same], 1e-6 if tdtype == "float32" else 2**-8)
  assert_close(got, back, 0.05)


# ----------------------------------------------------------------------------------------------
# wrap on quantized params == apply(merge(dequantize(params), adapters))
# ----------------------------------------------------------------------------------------------


# Params, inputs and factors are drawn with NumPy: on XLA's CPU backend, compiling jax.random for
# a 3-D or 4-D shape (a conv or stacked kernel) takes seconds each.


def _init(model, x, seed=0, dtype=None):
  """``model``'s variables (shapes from an abstract ``init``), kernels ~ N(0, 1/fan_in), biases
  non-zero; in ``dtype`` if given."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def draw(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 25
    return jnp.asarray((rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype).astype(dtype or s.dtype))

  return jax.tree.map(draw, shapes)


def _adapters(qparams, spec, apply_fn, *args, seed=0):
  """``lora_jax.init``'s adapters for quantized params (run abstractly: only the layouts and
  shapes are used), with non-zero a and b drawn here."""
  return _perturb(jax.eval_shape(lambda: lora_jax.init(jax.random.key(1), qparams, spec, apply_fn, *args)), seed=seed)


def _perturb(adapters, seed=0, std=0.3):
  """Non-zero a and b (init's b is zero, which would make gradients w.r.t. a vanish)."""
  flat, treedef = jax.tree.flatten(adapters, is_leaf=is_adapter)
  rng = np.random.default_rng(seed)
  r = lambda x: jnp.asarray((rng.standard_normal(x.shape) * std).astype(x.dtype))  # noqa: E731
  return jax.tree.unflatten(treedef, [f.replace(a=r(f.a), b=r(f.b)) if isinstance(f, LoraFactors) else f for f in flat])


def _probe(out):
  out = out.astype(jnp.float32)
  w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
  return jnp.sum(out * w) + 0.1 * jnp.sum(out**2)


def _reference(apply_fn, qparams, adapters, *args, dtype=None):
  """apply_fn on the dense params: dequantized (in ``dtype``), adapters merged."""
  return apply_fn(lora_jax.merge(lora_jax.dequantize(qparams, dtype), adapters), *args)


def _reference_jit(apply_fn, qparams, adapters, *args, dtype=None):
  return jax.jit(lambda q, a: _reference(apply_fn, q, a, *args, dtype=dtype))(qparams, adapters)


def _output_and_grad(fn, plain=None):
  """jit of ``(q, a) -> (fn(q, a), d probe(fn(q, a)) / d a[, plain(q)])``."""

  def go(q, a):
    (_, y), g = jax.value_and_grad(lambda a: (lambda y: (_probe(y), y))(fn(q, a)), has_aux=True)(a)
    return (y, g) if plain is None else (y, g, plain(q))

  return jax.jit(go)


def _check_factored(apply_fn, qparams, adapters, *args, rtol, grad_rtol, ref_dtype=None):
  """Outputs and adapter gradients of jit(wrap(apply_fn)) on quantized params == those of the
  dense reference ``apply_fn(merge(dequantize(qparams, ref_dtype), adapters))``."""
  wrapped = lora_jax.wrap(apply_fn, fallback="error")
  y, g = _output_and_grad(lambda q, a: wrapped(q, a, *args))(qparams, adapters)
  y_ref, g_ref, y_plain = _output_and_grad(
      lambda q, a: _reference(apply_fn, q, a, *args, dtype=ref_dtype), plain=lambda q: apply_fn(lora_jax.dequantize(q), *args)
  )(qparams, adapters)
  assert y.dtype == y_ref.dtype
  assert_close(y, y_ref, rtol)
  assert_trees_close(g, g_ref, grad_rtol)
  assert_far(y, y_plain, rtol, factor=10)  # the adapters matter, far above the tolerance
  return y


class Net(nn.Module):
  """Dense, DenseGeneral with two fan-out axes ('ioo') and with two fan-in axes ('iio'), and a
  quantized Dense left frozen ('out')."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(48, name="up")(x))
    h = nn.DenseGeneral((2, 16), name="heads")(h)
    h = jnp.tanh(nn.DenseGeneral(48, axis=(-2, -1), name="merge")(h))
    return nn.Dense(16, name="out")(h)


X = jnp.asarray(np.random.default_rng(5).standard_normal((4, 32)).astype(np.float32))
QUANTIZED = ["up", "heads", "merge", "out"]
ADAPTED = ["up", "heads", "merge"]


def _net_numpy(qparams, adapters, x):
  """Net in float64 NumPy, each adapted kernel written out as W + scale * a @ b."""
  p, a = jax.jit(lora_jax.dequantize)(qparams)["params"], adapters["params"]

  def kernel(name):
    w = np.asarray(p[name]["kernel"], np.float64)
    f = a[name]["kernel"]
    if f is None:
      return w
    fa, fb = np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)
    return w + f.scale * np.tensordot(fa, fb, axes=([-1], [0]))

  bias = lambda name: np.asarray(p[name]["bias"], np.float64)  # noqa: E731
  h = np.tanh(np.asarray(x, np.float64) @ kernel("up") + bias("up"))
  h = np.einsum("bi,ihd->bhd", h, kernel("heads")) + bias("heads")
  h = np.tanh(np.einsum("bhd,hdo->bo", h, kernel("merge")) + bias("merge"))
  return h @ kernel("out") + bias("out")


@pytest.mark.parametrize(
    "fmt, dq, dtype",
    [("nf4", True, jnp.float32), ("nf4", False, jnp.bfloat16)],  # int8: see test_nnx
)
def test_dense_and_dense_general(fmt, dq, dtype):
  model = Net()
  v = _init(model, X, seed=0, dtype=dtype)
  qp = lora_jax.quantize(v, QUANTIZED, model.apply, X, format=fmt, block_size=16, double_quant=dq if fmt == "nf4" else None)
  ks = {n: qp["params"][n]["kernel"] for n in QUANTIZED}
  assert all(isinstance(k, QuantizedKernel) and k.dtype == np.dtype(dtype) for k in ks.values())
  assert not isinstance(qp["params"]["out"]["bias"], QuantizedKernel)
  # Layouts came from the trace: 'ioo' blocks along axis 0, 'iio' along its last fan-in axis.
  assert ks["heads"].layout == "ioo" and ks["heads"].axis == 0 and ks["heads"].absmax.shape == (3, 2, 16)
  assert ks["merge"].layout == "iio" and ks["merge"].axis == 1 and ks["merge"].absmax.shape == (2, 1, 48)
  if fmt == "nf4" and dtype == jnp.float32:
    check_against_reference(ks["heads"], v["params"]["heads"]["kernel"])
    check_against_reference(ks["merge"], v["params"]["merge"]["kernel"])
  spec = LoraSpec(ADAPTED, rank=2, alpha=4)
  ad = _adapters(qp, spec, model.apply, X)
  assert ad["params"]["heads"]["kernel"].layout == "ioo" and ad["params"]["out"]["kernel"] is None
  f32 = dtype == jnp.float32
  # bfloat16: the reference merges in float32 (a bf16 merged kernel would round the update and
  # the kernel's cotangent to 8 bits, and its gradients would be the inaccurate ones).
  y = _check_factored(model.apply, qp, ad, X, rtol=2e-5 if f32 else 1e-2, grad_rtol=1e-4 if f32 else 1e-2, ref_dtype=None if f32 else jnp.float32)
  assert_close(y, _net_numpy(qp, ad, X), 2e-5 if f32 else 1e-2)
  if not f32:  # and the bf16 reference, to bf16 accuracy
    assert_close(y, _reference_jit(model.apply, qp, ad, X), 2e-2)
  report = lora_jax.explain(model.apply, qp, ad, X)
  assert not report.fallbacks and {u.path for u in report.uses if u.factored} == {f"params/{n}/kernel" for n in ADAPTED}


def test_merge_dequantizes_to_dense_in_the_requested_dtype():
  model = Net()
  v = _init(model, X, seed=0, dtype=jnp.bfloat16)
  qp = lora_jax.quantize(v, QUANTIZED, model.apply, X, block_size=16, double_quant=False)
  ad = _adapters(qp, LoraSpec(["up"], rank=2), model.apply, X)
  merged = jax.jit(lora_jax.merge)(qp, ad)
  assert not any(isinstance(x, QuantizedKernel) for x in jax.tree.leaves(merged, is_leaf=lambda x: isinstance(x, QuantizedKernel)))
  assert merged["params"]["up"]["kernel"].dtype == jnp.bfloat16 and merged["params"]["up"]["bias"].dtype == jnp.bfloat16
  m32 = jax.jit(lambda q, a: lora_jax.merge(q, a, dtype=jnp.float32))(qp, ad)
  assert m32["params"]["up"]["kernel"].dtype == jnp.float32 and m32["params"]["out"]["kernel"].dtype == jnp.float32
  assert m32["params"]["up"]["bias"].dtype == jnp.bfloat16  # only base leaves take the dtype
  np.testing.assert_array_equal(m32["params"]["out"]["kernel"], np.asarray(_materialize(qp["params"]["out"]["kernel"])).astype(np.float32))
  f = ad["params"]["up"]["kernel"]
  want = np.asarray(_materialize(qp["params"]["up"]["kernel"]), np.float64) + f.scale * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)
  assert_close(merged["params"]["up"]["kernel"], want, 2**-8)  # rounded to bfloat16


def test_merge_into_float32_keeps_float32_precision():
  w = _w((48, 48), seed=11, dtype=jnp.bfloat16)
  q = {"d": {"kernel": quantize_kernel(w, block_size=16, double_quant=False)}}
  f = LoraFactors(a=_w((48, 2), seed=12), b=_w((2, 48), seed=13), scale=0.5, layout="io")
  m32 = jax.jit(lambda q, a: lora_jax.merge(q, a, dtype=jnp.float32))(q, {"d": {"kernel": f}})["d"]["kernel"]
  assert m32.dtype == jnp.float32
  want = np.asarray(_materialize(q["d"]["kernel"]), np.float64) + 0.5 * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)
  assert_close(m32, want, 1e-6)


class Layer(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    u = jnp.tanh(nn.Dense(48, name="up")(h))
    return jnp.tanh(nn.Dense(32, name="down")(u)), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(32, name="inp")(x)
    layers = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = layers(name="layers")(h, None)
    return nn.Dense(8, name="head")(h)


XS = jnp.asarray(np.random.default_rng(6).standard_normal((4, 16)).astype(np.float32))


@pytest.fixture(scope="module")
def stack():
  model = Stack()
  v = _init(model, XS, seed=0)
  # Layers at different magnitudes, so per-layer and pooled double-quant states differ.
  up = jnp.asarray(np.asarray(v["params"]["layers"]["up"]["kernel"]) * np.array([1.0, 10.0, 0.1], np.float32)[:, None, None])
  v = jax.tree_util.tree_map_with_path(lambda p, x: up if jax.tree_util.keystr(p).endswith("['layers']['up']['kernel']") else x, v)
  qp = lora_jax.quantize(v, ["inp", "layers/up", "layers/down"], model.apply, XS, block_size=16)
  ad = _adapters(qp, LoraSpec(["inp", "layers/up", "head"], rank=2, alpha=4), model.apply, XS)
  return model, v, qp, ad


def test_scanned_stack_quantizes_per_layer_and_stays_factored(stack):
  model, v, qp, ad = stack
  q = qp["params"]["layers"]["up"]["kernel"]
  assert q.shape == (3, 32, 48) and q.layout == "lio" and q.lead == (0,) and q.axis == 1
  assert q.absmax2.shape == (3, 1) and q.offset.shape == (3,)
  w = v["params"]["layers"]["up"]["kernel"]
  check_against_reference(q, w)
  # (per layer: the reference's double quantization runs separately for each index along q.lead)
  assert ad["params"]["layers"]["up"]["kernel"].layout == "lio" and ad["params"]["layers"]["down"]["kernel"] is None
  _check_factored(model.apply, qp, ad, XS, rtol=2e-5, grad_rtol=1e-4)
  report = lora_jax.explain(model.apply, qp, ad, XS)
  factored = {u.path for u in report.uses if u.factored}
  assert not report.fallbacks and factored == {"params/inp/kernel", "params/layers/up/kernel", "params/head/kernel"}


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(16, (3, 3), name="conv")(x))
    return nn.Conv(8, (1, 1), name="pointwise")(h)  # quantized, frozen


def test_convolutions_block_along_input_channels():
  model = ConvNet()
  x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 6, 6, 8)).astype(np.float32))
  v = _init(model, x, seed=0)
  qp = lora_jax.quantize(v, ["conv", "pointwise"], model.apply, x, block_size=8)
  q = qp["params"]["conv"]["kernel"]
  assert q.shape == (3, 3, 8, 16) and q.layout == "iiio" and q.axis == 2  # blocks along cin
  assert q.codes.shape == (3, 3, 4, 16) and q.absmax.shape == (3, 3, 1, 16)
  assert qp["params"]["pointwise"]["kernel"].absmax.shape == (1, 1, 2, 8)
  check_against_reference(q, v["params"]["conv"]["kernel"])  # incl. the double quant's (h, w, out, in) order
  ad = _adapters(qp, LoraSpec(["conv"], rank=2, alpha=4), model.apply, x)
  _check_factored(model.apply, qp, ad, x, rtol=2e-5, grad_rtol=1e-4)
  report = lora_jax.explain(model.apply, qp, ad, x)
  assert not report.fallbacks and [u.factored for u in report.for_path("params/conv/kernel")] == [True]


def test_nnx_int8():
  from flax import nnx  # noqa: PLC0415

  class M(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(32, 48, rngs=rngs)
      self.l2 = nnx.Linear(48, 48, rngs=rngs)  # quantized, frozen
      self.l3 = nnx.Linear(48, 16, rngs=rngs)

    def __call__(self, x):
      return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))

  # Built abstractly and filled with NumPy draws (eager NNX init compiles each random op).
  apply_fn, params, _ = lora_jax.from_nnx(nnx.eval_shape(lambda: M(nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray((rng.standard_normal(s.shape) / np.sqrt(s.shape[0])).astype(s.dtype)), params)
  qp = lora_jax.quantize(params, ["l1", "l2", "l3"], apply_fn, X, format="int8", block_size=16)
  leaves = jax.tree.leaves(qp, is_leaf=lambda x: isinstance(x, QuantizedKernel))
  assert sum(isinstance(x, QuantizedKernel) for x in leaves) == 3
  ad = _adapters(qp, LoraSpec(["l1", "l3"], rank=2, alpha=4), apply_fn, X)
  _check_factored(apply_fn, qp, ad, X, rtol=2e-5, grad_rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# The backward keeps packed codes, not dense kernels
# ----------------------------------------------------------------------------------------------


def _residuals(f, *args):
  """(dtype, shape) of each residual the backward of ``f`` saves (``print_saved_residuals``)."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(f, *args)
  out = []
  for line in buf.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\]", line)
    assert m, line
    out.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)))
  return out


FLOATS = ("f16", "bf16", "f32", "f64")


def _dense_residuals(res, shapes):
  return [(d, s) for d, s in res if d in FLOATS and s in shapes]


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_backward_keeps_codes_not_dense_kernels(fmt):
  model = Net()
  v = _init(model, X, seed=0)
  qp = lora_jax.quantize(v, QUANTIZED, model.apply, X, format=fmt, block_size=16)
  ad = _adapters(qp, LoraSpec(ADAPTED, rank=2), model.apply, X)
  shapes = {tuple(x.shape) for x in jax.tree.leaves(qp, is_leaf=lambda x: isinstance(x, QuantizedKernel)) if isinstance(x, QuantizedKernel)}
  assert shapes == {(32, 48), (48, 2, 16), (2, 16, 48), (48, 16)}
  wrapped = lora_jax.wrap(model.apply)
  res = _residuals(lambda a, q: _probe(wrapped(q, a, X)), ad, qp)
  assert not _dense_residuals(res, shapes), _dense_residuals(res, shapes)
  assert any(d in ("u8", "i8") for d, _ in res)  # the codes are what it keeps
  # The check can fail: the reference (dense kernels) keeps some of them for its backward.
  ref = _residuals(lambda a, q: _probe(_reference(model.apply, q, a, X)), ad, qp)
  assert _dense_residuals(ref, shapes)


def test_backward_of_a_scanned_stack_keeps_no_stacked_dense_kernel(stack):
  model, _, qp, ad = stack
  wrapped = lora_jax.wrap(model.apply)
  shapes = {(3, 32, 48), (3, 48, 32), (32, 48), (48, 32)}
  res = _residuals(lambda a, q: _probe(wrapped(q, a, XS)), ad, qp)
  assert not _dense_residuals(res, shapes), _dense_residuals(res, shapes)
  ref = _residuals(lambda a, q: _probe(_reference(model.apply, q, a, XS)), ad, qp)
  assert _dense_residuals(ref, {(3, 32, 48), (3, 48, 32)})


# ----------------------------------------------------------------------------------------------
# jit
# ----------------------------------------------------------------------------------------------


def test_jit_takes_quantized_params_as_arguments_without_retracing():
  model = Net()
  traces = []

  def apply_fn(p, x):
    traces.append(1)
    return model.apply(p, x)

  v1 = _init(model, X, seed=0)
  v2 = _init(model, X, seed=9)
  q1 = lora_jax.quantize(v1, QUANTIZED, model.apply, X, block_size=16)
  q2 = lora_jax.quantize(v2, QUANTIZED, model.apply, X, block_size=16)
  assert jax.tree.structure(q1) == jax.tree.structure(q2)
  ad = _adapters(q1, LoraSpec(ADAPTED, rank=2), model.apply, X)
  step = jax.jit(lora_jax.wrap(apply_fn))
  y1 = step(q1, ad, X)
  n = len(traces)
  assert n >= 1
  y2 = step(q2, ad, X)
  assert len(traces) == n, "a second call with other quantized values of the same shapes retraced"
  ref = jax.jit(lambda q, a: _reference(model.apply, q, a, X))
  assert_close(y1, ref(q1, ad), 2e-5)
  assert_close(y2, ref(q2, ad), 2e-5)
  assert_far(y2, y1, 2e-5)  # the new values were used
  # Another format is another tree structure: that one does retrace.
  q3 = lora_jax.quantize(v2, QUANTIZED, model.apply, X, format="int8", block_size=16)
  step(q3, ad, X)
  assert len(traces) > n


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


class Emb(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Dense(16, name="out")(nn.Embed(10, 32, name="tok")(ids))


def test_errors_name_the_path_or_option():
  params = {"dense": {"kernel": _w((128, 3)), "bias": _w((3,))}}
  with pytest.raises(ValueError, match=r"quantize\(format='nf3'\): expected one of \('nf4', 'int8'\)"):
    lora_jax.quantize(params, ["dense"], format="nf3")
  with pytest.raises(ValueError, match=r"'dense/kernel': block_size=48 does not divide the kernel's fan-in axis 0 of size 128 \(shape \(128, 3\)\)"):
    lora_jax.quantize(params, ["dense"], block_size=48)
  with pytest.raises(ValueError, match=r"'dense/kernel': block_size=48 .* e\.g\. 32\."):
    lora_jax.quantize(params, ["dense"], block_size=48)
  odd = {"dense": {"kernel": _w((12, 8))}}
  with pytest.raises(ValueError, match=r"'dense/kernel': NF4 packs two codes per byte, so block_size must be even \(got 3\)"):
    lora_jax.quantize(odd, ["dense"], block_size=3)
  assert lora_jax.quantize(odd, ["dense"], format="int8", block_size=3)["dense"]["kernel"].absmax.shape == (4, 8)  # odd is fine for int8
  with pytest.raises(ValueError, match=r"quantize\(format='int8', double_quant=True\)"):
    lora_jax.quantize(params, ["dense"], format="int8", double_quant=True)
  for bad in (0, -64, 2.5, True):
    with pytest.raises(ValueError, match=re.escape(f"quantize(block_size={bad!r}): expected a positive integer")):
      lora_jax.quantize(params, ["dense"], block_size=bad)
  with pytest.raises(ValueError, match=r"quantize\(double_quant='yes'\)"):
    lora_jax.quantize(params, ["dense"], double_quant="yes")
  q = lora_jax.quantize(params, ["dense"], double_quant=False)
  with pytest.raises(ValueError, match=r"'dense/kernel' is already a QuantizedKernel; dequantize it first"):
    lora_jax.quantize(q, ["dense"])
  with pytest.raises(ValueError, match=r"'kernel': a int32 kernel cannot be quantized"):
    quantize_kernel(jnp.ones((16, 4), jnp.int32))


def test_embeddings_are_refused():
  ids = jnp.array([[1, 2, 3]])
  v = _init(Emb(), ids)
  with pytest.raises(ValueError, match=r"'params/tok/embedding': quantizing an embedding is not supported.*Leave it out of the targets"):
    lora_jax.quantize(v, ["tok", "out"], Emb().apply, ids, block_size=16, double_quant=False)
  q = lora_jax.quantize(v, ["out"], Emb().apply, ids, block_size=16, double_quant=False)
  assert isinstance(q["params"]["out"]["kernel"], QuantizedKernel) and not isinstance(q["params"]["tok"]["embedding"], QuantizedKernel)


def test_non_float_kernel_in_a_tree_is_refused():
  # Refused by target resolution, before quantize_kernel's own check.
  params = {"dense": {"kernel": jnp.ones((16, 4), jnp.int32)}}
  with pytest.raises(TypeError, match=r"'dense/kernel': targeted kernel has dtype int32; .* needs a floating-point kernel"):
    lora_jax.quantize(params, ["dense"], block_size=16)


# ----------------------------------------------------------------------------------------------
# Property test
# ----------------------------------------------------------------------------------------------


@st.composite
def kernels(draw):
  fmt = draw(st.sampled_from(["nf4", "int8"]))
  if fmt == "nf4":
    block = draw(st.sampled_from([2, 4, 8, 16, 32, 64]))
    dq = draw(st.booleans())
  else:
    block = draw(st.sampled_from([None, 1, 3, 8, 16]))
    dq = False
  n = (block or 1) * draw(st.integers(1, 4)) if block else draw(st.integers(1, 40))
  lead = (draw(st.integers(1, 3)),) if draw(st.booleans()) else ()
  shape = (*lead, n, draw(st.integers(1, 5)))
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  dist = draw(st.sampled_from(["normal", "uniform", "heavy"]))
  w = {"normal": rng.standard_normal, "uniform": lambda s: rng.uniform(-1, 1, s), "heavy": lambda s: rng.standard_t(2, s)}[dist](shape)
  w = w * 10.0 ** draw(st.integers(-4, 3))
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  return fmt, block, dq, jnp.asarray(w.astype(dtype))


# Derandomized: a tiny bf16 kernel on a coarse grid can put most entries exactly on code
# midpoints, which the near-tie guard of check_against_reference rejects as a vacuous check
# (a random run found one); the fixed examples keep the check meaningful on every machine.
@settings(max_examples=12, deadline=None, derandomize=True)
@given(kernels())
def test_property_round_trip_and_reference_codes(case):
  fmt, block, dq, w = case
  q = quantize_kernel(w, format=fmt, block_size=block, double_quant=dq)
  assert q.block_size == (block or w.shape[-2]) and q.double_quant == dq and q.lead == tuple(range(w.ndim - 2))
  check_against_reference(q, w)
  check_error_bound(q, w)
