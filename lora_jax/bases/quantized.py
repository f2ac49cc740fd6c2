"""Quantized frozen kernels (QLoRA): NF4 and int8 base leaves.

:func:`quantize` turns targeted kernels of a params tree into :class:`QuantizedKernel` leaves;
:func:`lora_jax.wrap` computes with them where each kernel is used (dequantized at the use,
inside the jitted step, and again in the backward pass instead of being kept between them),
with the adapters' terms on top as for a dense kernel.

Formats (``format=``):

* ``"nf4"``: QLoRA's 4-bit NormalFloat (Dettmers et al., 2023). Blocks of ``block_size``
  consecutive entries along the kernel's fan-in axis (contiguous in PyTorch's ``(out, in)``
  weight, so the blocks are bitsandbytes' blocks) share one absmax scale; each entry is the
  index of the nearest of 16 code values to ``w / absmax``; two codes per byte, the first in
  the high nibble. With ``double_quant`` the float32 scales are themselves quantized as
  bitsandbytes does (``compress_statistics``): minus their mean, to 8 bits with its dynamic
  code in blocks of 256, per layer. Codes and round trip equal bitsandbytes'
  ``quantize_4bit`` / ``dequantize_4bit`` (``quant_type="nf4"``) on the same weights.
* ``"int8"``: symmetric absmax int8 (``round(127 * w / absmax)``), one scale per output
  channel (the whole fan-in axis is one block) unless a ``block_size`` is given.

Stacked (``nn.scan``) kernels quantize per layer: every stored array keeps the kernel's
leading axes, so the layer axis still slices under ``scan`` and the leaf shards along the
same axes as the kernel it replaces.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.bases import BaseLeaf

Array = Any
PyTree = Any

FORMATS = ("nf4", "int8")
DQ_BLOCK = 256  # bitsandbytes' block size for the second-level (double) quantization

# QLoRA's NF4 code (the paper's appendix E; bitsandbytes' get_4bit_type("nf4")): quantiles of
# N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps, dtype=float32)`` as ATen's CPU kernel computes it:
  a float32 step, each value one fused multiply-add from the nearer end, rounded once."""
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float64((end32 - start32) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  lo = np.float64(start32) + step * i
  hi = np.float64(end32) - step * (steps - 1 - i)
  return np.where(i < steps // 2, lo, hi).astype(np.float32)


@functools.lru_cache(maxsize=None)
def dynamic_code() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map()``: 7 exponent bits),
  sorted: the code double quantization stores the scales in."""
  data: list[float] = []
  max_exp, non_sign = 7, 7
  for i in range(max_exp):
    items = int(2 ** (i + non_sign - max_exp) + 1)
    bounds = _linspace32(0.1, 1.0, items)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    p = np.float32(10 ** (-(max_exp - 1) + i))
    data += (p * means).tolist()
    data += (-p * means).tolist()
  data += [0.0, 1.0]
  data += [0.0] * (256 - len(data))
  return np.sort(np.array(data, np.float32))


def _midpoints(code: np.ndarray) -> np.ndarray:
  return ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QuantizedKernel(BaseLeaf):
  """A frozen kernel stored quantized; one leaf for paths, targets and adapters.

  ``shape`` and ``dtype`` are those of the dense kernel it stands for; :meth:`materialize`
  gives that kernel (computed where it is called). Stored arrays (the pytree children):

  * ``codes``: ``uint8`` with two NF4 codes per byte along ``axis`` (``shape[axis] / 2``
    there), or ``int8`` of ``shape`` for int8;
  * ``absmax``: one scale per block: ``shape`` with ``shape[axis] / block_size`` along
    ``axis``; float32, or uint8 codes of the dynamic code when double-quantized, then
  * ``absmax2`` (float32, per layer and group of 256 scales) and ``offset`` (float32, per
    layer): the second level.

  Static: ``format``, ``shape``, ``dtype``, ``axis`` (the blocked axis, the kernel's
  fan-in), ``block_size``, ``lead`` (the layer axes the second level is kept per) and
  ``layout`` (the kernel's ``'l'``/``'i'``/``'o'`` axes).
  """

  codes: Array
  absmax: Array
  absmax2: Array | None
  offset: Array | None
  format: str
  shape: tuple[int, ...]
  dtype: Any
  axis: int
  block_size: int
  lead: tuple[int, ...]
  layout: str

  @property
  def double_quant(self) -> bool:
    return self.absmax2 is not None

  def materialize(self) -> Array:
    """The dense kernel: code value times its block's scale, in float32, cast to ``dtype``."""
    return dequantize_values(self).astype(self.dtype)

  def scales(self) -> Array:
    """The float32 scale of each block (double quantization undone)."""
    if self.absmax2 is None:
      return self.absmax
    code = jnp.asarray(dynamic_code())[self.absmax.astype(jnp.int32)]
    perm = _dq_order(self.absmax.ndim, self.axis, self.lead)
    t = jnp.transpose(code, perm)
    lead_shape = t.shape[: len(self.lead)]
    flat = t.reshape(*lead_shape, -1)
    m = flat.shape[-1]
    g = self.absmax2.shape[-1]
    flat = jnp.pad(flat, [(0, 0)] * len(lead_shape) + [(0, g * DQ_BLOCK - m)])
    flat = (flat.reshape(*lead_shape, g, DQ_BLOCK) * self.absmax2[..., None]).reshape(*lead_shape, g * DQ_BLOCK)
    flat = flat[..., :m] + self.offset[..., None]
    return jnp.transpose(flat.reshape(t.shape), np.argsort(perm))

  @property
  def sharding(self) -> Any:
    """The sharding of the stored codes: the kernel's, as :func:`lora_jax.adapter_shardings`
    reads it (codes keep every kernel axis)."""
    return getattr(self.codes, "sharding", None)

  def shardings(self, sharding: Any) -> "QuantizedKernel":
    """This leaf's structure with a ``NamedSharding`` per stored array, for a kernel sharded
    as ``sharding``: codes and block scales shard along the kernel's axes (an axis whose
    stored length the mesh axes do not divide is replicated), the second-level scales along
    the layer axes only. Use with ``jax.device_put`` or as a jit's ``in_shardings``.

    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(jax.devices()[:1], ("tp",))
    >>> q = quantize_kernel(jnp.ones((128, 8)))
    >>> q.shardings(NamedSharding(mesh, P(None, "tp"))).codes.spec == P(None, "tp")
    True
    """
    from jax.sharding import NamedSharding, PartitionSpec

    if not isinstance(sharding, NamedSharding):
      raise TypeError(f"QuantizedKernel.shardings({sharding!r}): expected a NamedSharding.")
    spec = list(sharding.spec) + [None] * (len(self.shape) - len(sharding.spec))
    sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.devices.shape))

    def fits(entry: Any, n: int) -> Any:
      names = entry if isinstance(entry, tuple) else (entry,)
      k = int(np.prod([sizes[a] for a in names if a is not None]))
      return entry if n % k == 0 else None

    def along(x: Any, axes: Sequence[Any]) -> Any:
      if x is None:
        return None
      return NamedSharding(sharding.mesh, PartitionSpec(*(fits(e, n) for e, n in zip(axes, np.shape(x)))))

    lead = [spec[d] for d in self.lead]
    return dataclasses.replace(
        self,
        codes=along(self.codes, spec),
        absmax=along(self.absmax, spec),
        absmax2=along(self.absmax2, lead + [None]),
        offset=along(self.offset, lead),
    )

  def scan_split(self, axis: int) -> tuple[tuple[Array, ...], Callable[[tuple[Array, ...]], "QuantizedKernel"]] | None:
    """For ``lax.scan`` over kernel axis ``axis``: the stored arrays with that axis first,
    and how to rebuild the per-slice leaf from their slices; None if the axis is the blocked
    one (or, double-quantized, not a layer axis)."""
    if axis == self.axis or (self.double_quant and axis not in self.lead):
      return None
    parts = [jnp.moveaxis(self.codes, axis, 0), jnp.moveaxis(self.absmax, axis, 0)]
    if self.double_quant:
      k = self.lead.index(axis)
      parts += [jnp.moveaxis(self.absmax2, k, 0), jnp.moveaxis(self.offset, k, 0)]
    shift = lambda a: a - 1 if a > axis else a  # noqa: E731

    def rebuild(sliced: tuple[Array, ...]) -> QuantizedKernel:
      codes, absmax, *rest = sliced
      absmax2, offset = rest if rest else (None, None)
      return dataclasses.replace(
          self,
          codes=codes,
          absmax=absmax,
          absmax2=absmax2,
          offset=offset,
          shape=self.shape[:axis] + self.shape[axis + 1 :],
          axis=shift(self.axis),
          lead=tuple(shift(a) for a in self.lead if a != axis),
          layout=self.layout[:axis] + self.layout[axis + 1 :],
      )

    return tuple(parts), rebuild

  def __repr__(self) -> str:
    dq = ", double_quant" if self.double_quant else ""
    return (
        f"QuantizedKernel({self.format}, shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
        f"axis={self.axis}, block_size={self.block_size}{dq}, {self.nbytes:,} bytes)"
    )


jax.tree_util.register_dataclass(
    QuantizedKernel,
    data_fields=["codes", "absmax", "absmax2", "offset"],
    meta_fields=["format", "shape", "dtype", "axis", "block_size", "lead", "layout"],
)


def _dq_order(ndim: int, axis: int, lead: Sequence[int]) -> list[int]:
  """Axis order in which the second level runs over the scales: layer axes first, the blocked
  axis last (for an ``(in, out)`` kernel: PyTorch's ``(out, in)`` order, bitsandbytes')."""
  return list(lead) + [d for d in range(ndim) if d not in lead and d != axis] + [axis]


def _blocked(x: Array, axis: int, block: int) -> Array:
  """``x`` with ``axis`` split into ``(n / block, block)``."""
  shape = x.shape
  return x.reshape(*shape[:axis], shape[axis] // block, block, *shape[axis + 1 :])


def dequantize_values(q: QuantizedKernel) -> Array:
  """The dense kernel of ``q`` in float32."""
  if q.format == "nf4":
    # Each byte repeated twice along the blocked axis, then its high nibble at even and its
    # low nibble at odd positions: elementwise, so the unpacking, the code lookup and the
    # scaling are one fusion (stacking the two nibbles made XLA write them out first).
    c = jnp.repeat(q.codes, 2, axis=q.axis)
    shift = (1 - jax.lax.broadcasted_iota(jnp.uint8, q.shape, q.axis) % 2) * 4
    vals = jnp.asarray(NF4_CODE)[((c >> shift) & 15).astype(jnp.int32)]
    scale = q.scales()
  else:
    vals = q.codes.astype(jnp.float32)
    scale = q.scales() * np.float32(1 / 127)
  out = _blocked(vals, q.axis, q.block_size) * jnp.expand_dims(scale, q.axis + 1)
  return out.reshape(q.shape)


# The smallest normal float32: a floor for a block's absmax (an all-zero block scales by its
# inverse to zeros, as bitsandbytes' 1e-38 does; 1e-38 itself is subnormal, which XLA on CPU
# flushes to zero, and 0 * inf made such blocks NaN).
_TINY = np.float32(np.finfo(np.float32).tiny)


def _absmax(w32: Array, axis: int, block: int) -> Array:
  return jnp.max(jnp.abs(_blocked(w32, axis, block)), axis=axis + 1)


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "block", "double_quant", "lead", "layout"))
def _quantize_array(w: Array, *, fmt: str, axis: int, block: int, double_quant: bool, lead: tuple[int, ...], layout: str):
  w32 = w.astype(jnp.float32)
  absmax = _absmax(w32, axis, block)
  inv = 1.0 / jnp.maximum(absmax, _TINY)
  scaled = _blocked(w32, axis, block) * jnp.expand_dims(inv, axis + 1)
  if fmt == "nf4":
    scaled = jnp.clip(scaled, -1.0, 1.0).reshape(w.shape)
    q = jnp.zeros(w.shape, jnp.uint8)
    for m in _midpoints(NF4_CODE):  # bucketize: the number of midpoints below the value
      q = q + (scaled > m).astype(jnp.uint8)
    pairs = _blocked(q, axis, 2)
    hi = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
    lo = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)
    codes = (hi << 4) | lo
  else:
    codes = jnp.clip(jnp.round(scaled * 127.0), -127, 127).astype(jnp.int8).reshape(w.shape)
  absmax2 = offset = None
  if double_quant:
    absmax, absmax2, offset = _double_quant(absmax, axis, lead)
  return codes, absmax, absmax2, offset


def _double_quant(absmax: Array, axis: int, lead: tuple[int, ...]):
  perm = _dq_order(absmax.ndim, axis, lead)
  t = jnp.transpose(absmax, perm)
  lead_shape = t.shape[: len(lead)]
  flat = t.reshape(*lead_shape, -1)
  offset = jnp.mean(flat, axis=-1)
  flat = flat - offset[..., None]
  m = flat.shape[-1]
  g = -(-m // DQ_BLOCK)
  padded = jnp.pad(flat, [(0, 0)] * len(lead_shape) + [(0, g * DQ_BLOCK - m)])
  groups = padded.reshape(*lead_shape, g, DQ_BLOCK)
  absmax2 = jnp.max(jnp.abs(groups), axis=-1)
  scaled = jnp.clip(groups * (1.0 / jnp.maximum(absmax2, _TINY))[..., None], -1.0, 1.0)
  idx = jnp.searchsorted(jnp.asarray(_midpoints(dynamic_code())), scaled, side="left").astype(jnp.uint8)
  idx = idx.reshape(*lead_shape, g * DQ_BLOCK)[..., :m].reshape(t.shape)
  return jnp.transpose(idx, np.argsort(perm)), absmax2, offset


def quantize_kernel(
    w: Array,
    *,
    format: str = "nf4",
    block_size: int | None = None,
    double_quant: bool | None = None,
    layout: str | None = None,
    path: str = "kernel",
) -> QuantizedKernel:
  """One kernel as a :class:`QuantizedKernel` (see :func:`quantize` for the options).

  ``layout`` (``'l'``/``'i'``/``'o'`` per axis; default ``'l' * (ndim - 2) + 'io'``) says which
  axis is blocked (the last fan-in axis) and which axes are layers.

  >>> q = quantize_kernel(jnp.linspace(-1, 1, 128).reshape(64, 2))
  >>> q.codes.shape, q.codes.dtype, q.absmax.shape
  ((32, 2), dtype('uint8'), (1, 2))
  >>> err = jnp.abs(q.materialize() - jnp.linspace(-1, 1, 128).reshape(64, 2)).max()
  >>> bool(err <= np.diff(NF4_CODE).max() / 2)  # half the widest gap between codes
  True
  """
  fmt, block, dq = check_options(format, block_size, double_quant)
  shape = tuple(int(d) for d in np.shape(w))
  if layout is None:
    layout = "l" * (len(shape) - 2) + "io" if len(shape) >= 2 else ""
  dtype = np.dtype(getattr(w, "dtype", np.float32))
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{path!r}: a {dtype.name} kernel cannot be quantized; only floating-point kernels can.")
  if len(layout) != len(shape) or "i" not in layout or set(layout) - set("lio"):
    raise ValueError(f"{path!r}: layout {layout!r} does not fit a kernel of shape {shape} (one 'l'/'i'/'o' per axis, with an 'i').")
  axis = max(d for d, c in enumerate(layout) if c == "i")
  n = shape[axis]
  block = n if block is None else block
  if n % block:
    raise ValueError(
        f"{path!r}: block_size={block} does not divide the kernel's fan-in axis {axis} of size {n} "
        f"(shape {shape}); choose a block size that divides {n}, e.g. {_divisor(n, block)}."
    )
  if fmt == "nf4" and block % 2:
    raise ValueError(f"{path!r}: NF4 packs two codes per byte, so block_size must be even (got {block}).")
  lead = tuple(d for d, c in enumerate(layout) if c == "l")
  codes, absmax, absmax2, offset = _quantize_array(
      jnp.asarray(w), fmt=fmt, axis=axis, block=block, double_quant=dq, lead=lead, layout=layout
  )
  q = QuantizedKernel(codes, absmax, absmax2, offset, fmt, shape, dtype, axis, block, lead, layout)
  sharding = getattr(w, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding) and not isinstance(w, jax.core.Tracer):
    q = jax.device_put(q, q.shardings(sharding))  # stored like the kernel it replaces
  return q


def _divisor(n: int, near: int) -> int:
  """A block size to suggest for an axis of ``n``: the largest power of two up to ``near``
  that divides it, else the even divisor nearest ``near``."""
  divs = [d for d in range(2, n + 1) if n % d == 0 and d % 2 == 0] or [n]
  pow2 = [d for d in divs if d & (d - 1) == 0 and d <= near]
  return max(pow2) if pow2 else min(divs, key=lambda d: (abs(d - near), d))


def check_options(format: Any, block_size: Any, double_quant: Any) -> tuple[str, int | None, bool]:
  """Validated ``(format, block_size, double_quant)`` with the format's defaults filled in."""
  if format not in FORMATS:
    raise ValueError(f"quantize(format={format!r}): expected one of {FORMATS}.")
  if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1):
    raise ValueError(f"quantize(block_size={block_size!r}): expected a positive integer or None.")
  if double_quant not in (None, True, False):
    raise ValueError(f"quantize(double_quant={double_quant!r}): expected True, False or None.")
  if format == "nf4":
    return format, 64 if block_size is None else int(block_size), True if double_quant is None else bool(double_quant)
  if double_quant:
    raise ValueError("quantize(format='int8', double_quant=True): double quantization is for NF4's block scales.")
  return format, None if block_size is None else int(block_size), False


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedKernel)


# ----------------------------------------------------------------------------------------------
# Trees
# ----------------------------------------------------------------------------------------------


def quantize(
    params: PyTree,
    targets: Any = "all-linear",
    apply_fn: Callable[..., Any] | None = None,
    *example_args: Any,
    format: str = "nf4",
    block_size: int | None = None,
    double_quant: bool | None = None,
    layout: Any = None,
    **example_kwargs: Any,
) -> PyTree:
  """``params`` with the targeted kernels stored quantized (:class:`QuantizedKernel` leaves).

  Train on the result exactly as on dense params: ``lora_jax.init``/``split`` adapters for
  it, ``lora_jax.wrap(apply_fn)(qparams, adapters, ...)`` dequantizes each kernel where the
  function uses it (never the whole model up front), ``merge`` gives dense kernels.

  Args:
    params: the params tree (dense floating-point kernels).
    targets: which kernels, as :class:`lora_jax.LoraSpec` targets (``"all-linear"``: matmul
      weights, not embeddings nor the output layer, as bitsandbytes' ``load_in_4bit`` keeps
      ``lm_head``); or a ``LoraSpec`` (its targets and layouts).
    apply_fn, *example_args, **example_kwargs: the function and an example input, as for
      :func:`lora_jax.init`: layouts (which axis is fan-in, which are layers) are read off
      the trace. Without it a 2-D kernel is ``(in, out)`` and a larger one needs ``layout``.
    format: ``"nf4"`` (QLoRA's 4-bit NormalFloat) or ``"int8"`` (absmax int8).
    block_size: entries per scale along the fan-in axis; must divide it (NF4: even).
      Default 64 for NF4 (QLoRA's), the whole axis (one scale per output channel) for int8.
    double_quant: quantize NF4's scales too (QLoRA's double quantization; default True).
    layout: as ``LoraSpec(layout=...)``.

  Raises:
    ValueError: an unknown format, a block size that does not divide a kernel's fan-in axis
      (naming the path and shape), an embedding among the targets, a kernel already
      quantized; see also :meth:`lora_jax.LoraSpec.resolve`.

  >>> params = {"dense": {"kernel": jnp.ones((128, 8)), "bias": jnp.zeros(8)}}
  >>> q = quantize(params, ["dense"])
  >>> q["dense"]["kernel"]
  QuantizedKernel(nf4, shape=(128, 8), dtype=float32, axis=0, block_size=64, double_quant, 536 bytes)
  >>> bool((dequantize(q)["dense"]["kernel"] == 1).all())
  True
  """
  from lora_jax.adapters import _trace
  from lora_jax.spec import LoraSpec
  from lora_jax._paths import align, tree_from_entries

  check_options(format, block_size, double_quant)
  if isinstance(targets, LoraSpec):
    spec = LoraSpec(targets.targets, rank=1, layout=targets.layout if layout is None else layout)
  else:
    spec = LoraSpec(targets, rank=1, layout=layout)
  trace = _trace(apply_fn, params, example_args, example_kwargs)
  found = {t.path: t for t in spec.resolve(params, trace)}
  out = []
  for path, leaf, _ in align(params, jax.tree.map(lambda _: None, params, is_leaf=lambda x: isinstance(x, BaseLeaf))):
    t = found.get(path)
    if t is None:
      out.append(leaf)
      continue
    if isinstance(leaf, BaseLeaf):
      raise ValueError(f"{path!r} is already a {type(leaf).__name__}; dequantize it first to quantize it again.")
    if t.is_embedding:
      raise ValueError(
          f"{path!r}: quantizing an embedding is not supported (a row lookup would dequantize the "
          "whole table at each call; bitsandbytes keeps embeddings dense too). Leave it out of the targets."
      )
    out.append(quantize_kernel(leaf, format=format, block_size=block_size, double_quant=double_quant, layout=t.layout, path=path))
  return tree_from_entries(params, out)


def dequantize(params: PyTree, dtype: Any = None) -> PyTree:
  """``params`` with every base leaf (e.g. a :class:`QuantizedKernel`) as its dense kernel, in
  its own dtype or ``dtype``; other leaves unchanged."""
  def one(x):
    if not isinstance(x, BaseLeaf):
      return x
    w = x.materialize()
    return w if dtype is None else w.astype(dtype)

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, BaseLeaf))
