"""DoRA (Liu et al., 2024): ``W' = m * (W + s*a@b) / ||W + s*a@b||``, factored.

The norm is taken per output feature over the fan-in axes (per layer for stacked kernels), as
PEFT defines it, and is treated as a constant in the backward pass (the paper's section 4.3,
as PEFT does), so gradients reach ``m`` through ``m / n`` and ``a``, ``b`` through the
low-rank path only.

Factored, nothing of size ``fan_in x fan_out`` is formed beyond what the base matmul reads:

* the norm comes from the factors and the frozen kernel,
  ``n^2 = ||W||^2 + 2s * <a^T W, b> + s^2 * b^T (a^T a) b`` per output feature -- one
  ``(r x fan_out)`` product ``a^T W`` and an ``r x r`` Gram matrix per kernel, computed once
  per call for the whole (stacked) kernel (:meth:`DoraFactors.prepare`);
* at each matmul / convolution the kind computes plain LoRA's ``op(x, W) + s*op(op(x, a), b)``
  and scales the result along the fan-out by ``g = m / n`` (``site.scale_out``).

With ``lora_dropout_rng`` and ``dropout > 0`` it follows PEFT's DoRA forward exactly:
``op(x, W) + (g - 1) * op(x_d, W) + g * s * op(op(x_d, a), b)`` with ``x_d = dropout(x)``.

Inside ``shard_map`` the fan-in of a kernel may be split across manual mesh axes; with
``check_vma=True`` (the default) the partial norms are summed over exactly those axes, read off
the values' varying-axes types. A body traced with ``check_vma=False`` (and ``jax.pmap``'s, on
JAX >= 0.9) records no such types, so a split cannot be told from a whole kernel: computing the
norm there raises :class:`ShardedNormError` whenever a manual axis of size > 1 exists, split or
not. ``wrap`` of a ``shard_map``'d function is unaffected (the norms are computed on the whole
kernels before the call).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._jaxpr import untracked_manual_axes, varying_axes
from lora_jax.bases import dense
from lora_jax.kinds.base import Adapter, kernel_labels, leaf_labels, register_kind
from lora_jax.kinds.inits import initial_factors
from lora_jax.kinds.lora import kernel_delta, target_static

Array = Any
_HI = jax.lax.Precision.HIGHEST


def _acc(*xs) -> Any:
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _as_matrices(w: Array, layout: str) -> tuple[Array, tuple[int, ...], tuple[int, ...]]:
  """The kernel as a stack of ``(fan_in, fan_out)`` matrices (one per layer), with the
  layer and fan-out shapes. A no-op reshape for kernels whose axes run layers, fan-in,
  fan-out (every Flax layout); others are transposed first."""
  order = [k for r in "lio" for k, c in enumerate(layout) if c == r]
  if order != list(range(len(layout))):
    w = jnp.transpose(w, order)
  nl, ni = layout.count("l"), layout.count("i")
  L, I, O = w.shape[:nl], w.shape[nl : nl + ni], w.shape[nl + ni :]
  return w.reshape(int(np.prod(L)), int(np.prod(I)), int(np.prod(O))), tuple(L), tuple(O)


class ShardedNormError(ValueError):
  """DoRA's column norm was asked for where a split fan-in cannot be seen: inside a
  ``shard_map`` body traced with ``check_vma=False`` (or ``jax.pmap``'s, on JAX >= 0.9) with a
  manual mesh axis of size > 1. Raised whether or not the kernel is in fact split there (see
  :func:`lora_jax._jaxpr.untracked_manual_axes`)."""


def _blind(axes: tuple[str, ...], path: str | None = None, shape: tuple[int, ...] | None = None) -> ShardedNormError:
  where = f"{path!r}: " if path is not None else ""
  what = f" (here of a kernel shard of shape {shape})" if shape is not None else ""
  over = f"manual mesh axes {axes}" if axes else "manual mesh axes"
  return ShardedNormError(
      f"{where}DoRA's column norm ||W + s*a@b||{what} sums over the kernel's fan-in, and here it is computed "
      f"inside a shard_map body traced with check_vma=False ({over}; jax.pmap traces its function so too), "
      "where a kernel shard cannot tell whether its fan-in is split over those axes: the norm could silently "
      "miss the other shards. Keep check_vma=True (shard_map's default: the partial norms are then summed "
      "over exactly the axes that split the fan-in), or wrap the shard_map'd (or pmap'd) function instead, "
      "e.g. lora_jax.wrap(jax.shard_map(f, ...)), which computes the norms on the whole kernels. For data "
      "parallelism, jax.jit with the batch sharded over a mesh (lora_jax.adapter_shardings) is exact and needs "
      "neither."
  )


def _sum_over_split_fan_in(sq: Array, w: Array, ref: Array) -> Array:
  """Inside ``shard_map`` a kernel's fan-in may be split over manual mesh axes: then each
  shard holds a partial sum over the fan-in, summed here over the axes ``w`` varies over and
  the fan-out-roled ``ref`` (``b`` or the magnitude) does not. Outside ``shard_map`` nothing is
  summed.

  Raises:
    ShardedNormError: inside a body that records no varying axes (``check_vma=False``) with a
      manual axis of size > 1, which could split the fan-in unseen.
  """
  vw = varying_axes(w)
  if not vw:  # not split, or split where it cannot be seen
    blind = untracked_manual_axes()
    if blind:
      raise _blind(blind, shape=tuple(w.shape))
    return sq
  axes = tuple(sorted(vw - varying_axes(ref)))
  return jax.lax.psum(sq, axes) if axes else sq


def column_norm(w: Array, a: Array, b: Array, scale: float, layout: str) -> Array:
  """``||W + scale*a@b||`` per output feature (roles ``'lo'``), over the fan-in axes, from the
  factors: ``||W||^2 + 2s<a^T W, b> + s^2 b^T (a^T a) b``, so no ``fan_in x fan_out`` update
  is formed. Float32 (or wider) accumulation; a low-precision kernel is read as it is."""
  w3, L, O = _as_matrices(w, layout)
  acc = _acc(a, b, w)
  a3 = a.reshape(w3.shape[0], w3.shape[1], -1)
  b3 = b.reshape(w3.shape[0], -1, w3.shape[2])
  wsq = jnp.sum(jnp.square(w3.astype(acc)), axis=1)  # one fused pass over the kernel
  a_lo = a3.astype(w3.dtype) if jnp.dtype(w3.dtype).itemsize < 4 else a3  # a bf16 kernel is not upcast whole
  aw = jnp.einsum("lir,lio->lro", a_lo, w3, precision=_HI, preferred_element_type=acc)
  cross = jnp.sum(aw * b3.astype(acc), axis=1)
  a3, b3 = a3.astype(acc), b3.astype(acc)
  gram = jnp.einsum("lir,lis->lrs", a3, a3, precision=_HI)
  quad = jnp.einsum("lro,lrs,lso->lo", b3, gram, b3, precision=_HI)
  sq = _sum_over_split_fan_in(wsq + 2 * scale * cross + scale * scale * quad, w, b)
  return jnp.sqrt(jnp.maximum(sq, 0)).reshape(L + O)


def _column_dot(x: Array, y: Array, layout: str) -> Array:
  """``sum over fan-in of x * y`` per output feature (roles ``'lo'``) of two kernel-shaped
  arrays, float32 or wider."""
  acc = _acc(x, y)
  x3, L, O = _as_matrices(x.astype(acc), layout)
  y3, _, _ = _as_matrices(y.astype(acc), layout)
  return jnp.sum(x3 * y3, axis=1).reshape(L + O)


def dense_column_norm(v: Array, layout: str, ref: Array | None = None) -> Array:
  """``||v||`` per output feature (roles ``'lo'``) of a kernel-shaped ``v``, float32 or wider
  (summed over split fan-in shards inside ``shard_map``, with ``ref`` a fan-out-roled leaf)."""
  sq = _column_dot(v, v, layout)
  return jnp.sqrt(sq if ref is None else _sum_over_split_fan_in(sq, v, ref))


def along_kernel(v: Array, layout: str) -> Array:
  """A ``'lo'``-roled array broadcast against a kernel of ``layout`` (unit fan-in axes)."""
  kl, lo = kernel_labels(layout), leaf_labels("lo", layout)
  present = [lab for lab in kl if lab in lo]
  v = jnp.transpose(v, [lo.index(lab) for lab in present])
  shape = [v.shape[present.index(lab)] if lab in lo else 1 for lab in kl]
  return jnp.reshape(v, shape)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _init_norms(w: Array, a: Array, b: Array, scale: float, layout: str) -> tuple[Array, Array]:
  """``(||W + s*a@b||, ||W||)`` per output feature, factored."""
  return column_norm(w, a, b, scale, layout), dense_column_norm(w, layout)


@register_kind
@dataclasses.dataclass(frozen=True)
class DoraFactors(Adapter):
  """DoRA factors of one kernel ``W``: the kernel acts as ``m * (W + s*a@b) / ||W + s*a@b||``.

  ``a`` (roles ``'lir'``) and ``b`` (``'lro'``) are plain LoRA's factors; ``m`` (``'lo'``:
  one value per output feature, per layer) is the trainable magnitude, initialised to the
  column norm of the kernel it was made for. ``base_norm`` (``'lo'``, frozen) is that base
  kernel's own column norm ``||W||``: it makes :meth:`unmerge` exact from the merged kernel and
  the adapters alone (the merged kernel has lost ``||W + s*a@b||``).

  >>> w = jnp.eye(3)
  >>> f = DoraFactors(a=jnp.ones((3, 1)), b=jnp.zeros((1, 3)), m=jnp.full((3,), 2.0),
  ...                 base_norm=jnp.ones(3), scale=1.0, layout="io")
  >>> f.merge(w)  # b = 0: each column rescaled to norm m
  Array([[2., 0., 0.],
         [0., 2., 0.],
         [0., 0., 2.]], dtype=float32)
  """

  KIND = "dora"
  ROLES = {"a": "lir", "b": "lro", "m": "lo", "base_norm": "lo"}
  TRAINABLE = frozenset({"a", "b", "m"})
  LORA_PLUS_FAST = frozenset({"b"})
  GROUP_LEAF = "a"

  a: Array
  b: Array
  m: Array
  base_norm: Array
  scale: float
  layout: str
  rslora: bool = dataclasses.field(default=False, repr=False)
  dropout: float = dataclasses.field(default=0.0, repr=False)
  base_digest: str | None = dataclasses.field(default=None, repr=False)
  # Set by prepare(): ``m`` then holds the rescale m / ||W + s*a@b|| of this call.
  prepared: bool = dataclasses.field(default=False, repr=False)

  # --- dense forms --------------------------------------------------------------------------------

  def delta(self, dtype: Any = None) -> Array:
    """The low-rank part ``scale * a @ b`` only (DoRA's update is not additive: see :meth:`merge`)."""
    return kernel_delta(self.a, self.b, self.scale, self.layout, dtype)

  def rescale(self, w: Array) -> Array:
    """``m / ||W + s*a@b||`` per output feature for base kernel ``w`` (the norm detached)."""
    if self.prepared:
      return self.m
    n = jax.lax.stop_gradient(column_norm(w, self.a, self.b, self.scale, self.layout))
    return self.m.astype(n.dtype) / n

  def merge(self, w: Array) -> Array:
    d = self.delta()
    v = w.astype(d.dtype) + d
    if self.prepared:
      g = self.m
    else:
      g = self.m.astype(d.dtype) / jax.lax.stop_gradient(dense_column_norm(v, self.layout, self.m))
    return (v * along_kernel(g.astype(v.dtype), self.layout)).astype(w.dtype)

  def unmerge(self, w: Array) -> Array:
    """The base kernel from a merged one: ``W = c * W' - s*a@b`` per output feature, with
    ``c = ||W + s*a@b|| / m`` the root of ``||c W' - s*a@b|| = base_norm`` whose sign is
    ``m``'s. Unique when ``||s*a@b|| < ||W||`` in every column (raises otherwise; NaN there
    under a trace)."""
    d = self.delta()
    v = w.astype(d.dtype)
    vv, p, q = (_sum_over_split_fan_in(_column_dot(x, y, self.layout), v, self.m) for x, y in ((v, v), (v, d), (d, d)))
    bn2 = jnp.square(self.base_norm.astype(d.dtype))
    disc = p * p - vv * (q - bn2)
    unique = q < bn2
    sign = jnp.where(self.m >= 0, 1.0, -1.0).astype(d.dtype)
    c = jnp.where(unique, (p + sign * jnp.sqrt(jnp.maximum(disc, 0))) / vv, jnp.nan)
    if not isinstance(c, jax.core.Tracer) and not bool(jnp.all(unique)):
      bad = np.argwhere(~np.asarray(unique))[:5].tolist()
      raise ValueError(
          f"DoRA unmerge is ambiguous at output features {bad} (of shape {tuple(unique.shape)}): "
          "there ||scale * a @ b|| >= ||W||, so two base kernels merge to the same result. "
          "Keep the base params instead of unmerging."
      )
    return (v * along_kernel(c, self.layout) - d).astype(w.dtype)

  # --- the transform ------------------------------------------------------------------------------

  def prepare(self, base: Any) -> "DoraFactors":
    """Computes the rescale ``m / ||W + s*a@b||`` of this call, once for the whole kernel.
    Inside a ``shard_map`` body that does not track varying axes (``check_vma=False``) the
    norm cannot be computed safely (see :class:`ShardedNormError`): the adapter is returned
    unprepared, and the first site that reads it raises, naming the kernel's path (which
    ``prepare`` is not told)."""
    if self.prepared:
      return self
    if untracked_manual_axes():
      return self
    return self.replace(m=self.rescale(dense(base)), prepared=True)

  def shard_map_safe(self, split: frozenset[str], tracked: bool) -> bool:
    # Prepared, the rescale is one value per output feature and shards with the fan-out;
    # unprepared, its norm needs the whole fan-in, summed over split shards only where the
    # body tracks varying axes.
    return self.prepared or "i" not in split or tracked

  def contribute(self, site: Any) -> Array:
    if not self.prepared:  # prepare() declined: a shard_map body with check_vma=False
      raise _blind(untracked_manual_axes(), path=site.path)
    g = self.m
    if not site.can_scale_out(self.labels("m")):
      return site.materialized(
          "DoRA rescales the kernel's fan-out, which this use contracts or gathers"
          + (" (computed without dropout)" if self.dropout and site.ctx.rng is not None else "")
      )
    x = site.dropped(self.dropout)
    if x is site.x:
      y = site.base() + site.low_rank(self.a, self.b, self.scale)
      return site.scale_out(y, g, self.labels("m"))
    # PEFT's DoRA with dropout: the base term of the rescale sees the dropped input too.
    yd = site.scale_out(site.base(x), g - 1, self.labels("m"))
    low = site.scale_out(site.low_rank(self.a, self.b, self.scale, x=x), g, self.labels("m"))
    return site.base() + yd + low

  # --- creation -----------------------------------------------------------------------------------

  @classmethod
  def check_target(cls, target: Any) -> None:
    if target.is_embedding:
      raise ValueError(
          f"{target.path!r}: DoRA adapts matmul and convolution kernels, not embeddings "
          "(lora_jax has no embedding DoRA yet); leave the embedding out of the targets, or use "
          "plain LoRA (kind='lora') for it."
      )

  @classmethod
  def init(cls, key: Array, target: Any, dtype: Any, w: Array | None = None):
    cls.check_target(target)
    if w is None:
      raise ValueError(
          f"{target.path!r}: DoRA's magnitude starts at the kernel's column norm, so its init "
          "needs the kernel's values (got only its shape)."
      )
    a, b, new_w = initial_factors(key, target, dtype, w)
    base = dense(w if new_w is None else new_w)  # LoftQ's new base is quantized
    # Factored and jitted: no float32 copy of the kernel nor a kernel-sized update is formed
    # (a stacked 1B-model kernel is a gigabyte in float32).
    m, base_norm = _init_norms(base, a, b, float(target.scale), target.layout)
    f = cls(a=a, b=b, m=m.astype(dtype), base_norm=base_norm.astype(dtype), **target_static(target, new_w))
    return f if new_w is None else (f, new_w)


__all__ = ["DoraFactors", "ShardedNormError", "along_kernel", "column_norm", "dense_column_norm"]
