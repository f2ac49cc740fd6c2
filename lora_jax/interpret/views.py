"""Kernel views: an adapted kernel as it travels through the jaxpr, and the structural rules.

A :class:`View` is ``view(W) (+) view(adapter)``: the base kernel with the view's structural
ops applied lazily, the adapter (any kind) with its leaves sliced along but never transposed,
and ``axes[v]``, the kernel-role label (``('l'|'i'|'o', j)``, see :mod:`lora_jax.kinds`) of
each axis of the view. A structural op (cast, transpose, slice, unit reshape, ``scan``'s
per-layer slice) changes the view; it applies to every adapter leaf that carries the label of
the axis it touches, whatever the kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax import tree_util as jtu

from lora_jax.bases import BaseLeaf, dense
from lora_jax.kinds import Adapter, kernel_labels, leaf_labels

Array = Any
Label = tuple


@dataclasses.dataclass(frozen=True)
class Frozen(Adapter):
  """The adapter of a base leaf no adapter targets (e.g. a quantized kernel left frozen): no
  leaves, no term. Its view still travels lazily, so the leaf is dequantized at each use."""

  layout: str

  def contribute(self, site: Any) -> Array:
    return site.base()

  def merge(self, w: Array) -> Array:
    return w

  unmerge = merge


jtu.register_dataclass(Frozen, data_fields=[], meta_fields=["layout"])


def frozen_layout(leaf: Any) -> str:
  """A layout for a base leaf's view: its own (a quantized kernel records one), else the
  default of a kernel of its rank."""
  layout = getattr(leaf, "layout", None)
  if isinstance(layout, str) and len(layout) == len(leaf.shape):
    return layout
  return "l" * max(len(leaf.shape) - 2, 0) + "io"[: len(leaf.shape)]


@jtu.register_pytree_node_class
@dataclasses.dataclass
class View:
  """A view of an adapted kernel (see the module docstring).

  ``base`` is the frozen kernel (an array or a :class:`lora_jax.bases.BaseLeaf`), ``ops`` the
  structural ops applied to its dense value so far, ``shape`` the view's shape and ``dtype``
  its dtype after casts. ``adapter`` is the adapter in the view's current labels.
  """

  base: Any
  adapter: Adapter
  axes: tuple[Label, ...]
  shape: tuple[int, ...]
  dtype: Any
  path: str
  ops: tuple[Callable[[Array], Array], ...] = ()

  def tree_flatten(self):
    return (self.base, self.adapter), (self.axes, self.shape, self.dtype, self.path, self.ops)

  @classmethod
  def tree_unflatten(cls, aux, children):
    axes, shape, dtype, path, ops = aux
    return cls(children[0], children[1], axes, shape, dtype, path, ops)

  @classmethod
  def of(cls, base: Any, adapter: Adapter, path: str) -> "View":
    return cls(base, adapter, kernel_labels(adapter.layout), tuple(base.shape), base.dtype, path)

  def replace(self, **kw) -> "View":
    return dataclasses.replace(self, **kw)

  @property
  def frozen(self) -> bool:
    """Whether this is a base leaf's view with no adapter (see :class:`Frozen`)."""
    return isinstance(self.adapter, Frozen)

  def then(self, op: Callable[[Array], Array], shape: Sequence[int], **kw) -> "View":
    """This view with one more structural op on the base."""
    return self.replace(ops=self.ops + (op,), shape=tuple(shape), **kw)

  def base_value(self) -> Array:
    """``view(W)`` in the base kernel's dtype."""
    w = dense(self.base)
    for op in self.ops:
      w = op(w)
    return w

  def view_value(self) -> Array:
    """``view(W)`` in the view's dtype (what the original op consumed)."""
    return self.base_value().astype(self.dtype)

  def with_base(self, fn: Callable[[Array, Array], Array], x: Array) -> Array:
    """``fn(x, view(W))`` for an ``fn`` linear in ``x`` (a matmul or a convolution with the
    kernel). A base leaf (a quantized kernel) is dequantized here, inside the checkpointed
    call, and again in the backward pass: the backward keeps the stored (packed) leaf, never
    the dense kernel, between the two passes."""
    if not isinstance(self.base, BaseLeaf):
      return fn(x, self.view_value())
    parts, tree = jtu.tree_flatten(self.base)

    def run(x, parts):
      return fn(x, self.replace(base=jtu.tree_unflatten(tree, parts)).view_value())

    return jax.checkpoint(run)(x, parts)

  def leaf_axis(self, name: str, label: Label) -> int | None:
    labels = self.adapter.labels(name)
    return labels.index(label) if label in labels else None

  def materialize(self) -> Array:
    """``view(W')`` with ``W'`` the adapted kernel (the kind's ``merge``), rounded as
    :func:`lora_jax.merge` rounds; the fallback when a use cannot be computed factored."""
    order = [self.axes.index(lab) for lab in kernel_labels(self.adapter.layout)]
    w = jnp.transpose(self.base_value(), order)
    merged = self.adapter.merge(w)
    return jnp.transpose(merged, np.argsort(order)).astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# Role-generic adapter edits
# ----------------------------------------------------------------------------------------------


def map_label(ad: Adapter, label: Label, fn: Callable[[Array, int], Array]) -> Adapter:
  """Applies ``fn(leaf, axis)`` to every leaf that carries ``label``."""
  changes = {}
  for name, x in ad.leaves().items():
    labels = ad.labels(name)
    if label in labels:
      changes[name] = fn(x, labels.index(label))
  return ad.replace(**changes)


def _drop_letter(layout: str, label: Label) -> str:
  pos = kernel_labels(layout).index(label)
  return layout[:pos] + layout[pos + 1 :]


def drop_label(ad: Adapter, label: Label, squeeze: bool = True) -> Adapter:
  """The adapter without the kernel axis ``label``: each leaf carrying it loses that axis
  (squeezed if ``squeeze``; else the caller has removed it already) and the layout loses
  the letter."""
  changes = {}
  for name, x in ad.leaves().items():
    labels = ad.labels(name)
    if squeeze and label in labels:
      changes[name] = jnp.squeeze(x, labels.index(label))
  return ad.replace(layout=_drop_letter(ad.layout, label), **changes)


def relabel_after_drop(axes: Sequence[Label], label: Label) -> tuple[Label, ...]:
  """View labels after the kernel axis ``label`` is dropped (later axes of its role shift)."""
  out = []
  for lab in axes:
    if lab == label:
      continue
    out.append((lab[0], lab[1] - 1) if lab[0] == label[0] and lab[1] > label[1] else lab)
  return tuple(out)


def add_unit_fan_in(ad: Adapter) -> tuple[Adapter, Label]:
  """The adapter with one more size-1 fan-in axis (placed in each leaf where its roles say)."""
  new = ("i", ad.layout.count("i"))
  layout = ad.layout + "i"
  changes = {}
  for name, x in ad.leaves().items():
    labels = leaf_labels(ad.ROLES[name], layout)
    if new in labels:
      changes[name] = jnp.expand_dims(x, labels.index(new))
  return ad.replace(layout=layout, **changes), new


# ----------------------------------------------------------------------------------------------
# Structural rules: each returns a new View, or None when the op mixes factor axes (the caller
# then materialises for that use).
# ----------------------------------------------------------------------------------------------


def drop_axes(t: View, views: Sequence[int]) -> View:
  """Removes size-1 view axes (and the adapter axes they stand for)."""
  ad, axes = t.adapter, t.axes
  for label in [t.axes[v] for v in sorted(set(views), reverse=True)]:
    ad = drop_label(ad, label)
    axes = relabel_after_drop(axes, label)
  keep = [d for v, d in enumerate(t.shape) if v not in set(views)]
  return t.replace(adapter=ad, axes=axes, shape=tuple(keep))


def _rule_convert(eqn, t):
  return t.replace(dtype=eqn.params["new_dtype"])


def _rule_transpose(eqn, t):
  perm = tuple(eqn.params["permutation"])
  return t.then(lambda w: jnp.transpose(w, perm), [t.shape[p] for p in perm], axes=tuple(t.axes[p] for p in perm))


def _rule_copy(eqn, t):
  return t


def _rule_squeeze(eqn, t):
  dims = tuple(sorted(d % len(t.axes) for d in eqn.params["dimensions"]))
  out = drop_axes(t, dims)
  return out.replace(ops=t.ops + ((lambda w: jnp.squeeze(w, dims)),))


def _rule_slice(eqn, t):
  start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
  strides = eqn.params["strides"] or (1,) * len(start)
  ad = t.adapter
  for v, (s, e, st) in enumerate(zip(start, limit, strides)):
    if (s, e, st) != (0, t.shape[v], 1):
      ad = map_label(ad, t.axes[v], lambda x, ax, s=s, e=e, st=st: lax.slice_in_dim(x, s, e, st, ax))
  out = t.then(lambda w: lax.slice(w, start, limit, strides), eqn.outvars[0].aval.shape)
  return out.replace(adapter=ad)


def rule_dynamic_slice(eqn, t, *starts):
  sizes = eqn.params["slice_sizes"]
  ad = t.adapter
  for v, (s, n) in enumerate(zip(starts, sizes)):
    if n != t.shape[v]:
      ad = map_label(ad, t.axes[v], lambda x, ax, s=s, n=n: lax.dynamic_slice_in_dim(x, s, n, ax))
  out = t.then(lambda w: lax.dynamic_slice(w, starts, sizes), sizes)
  return out.replace(adapter=ad)


def add_unit_axes(t: View, shape, bdims) -> View | None:
  """``broadcast_in_dim`` that only inserts size-1 axes; None for a real broadcast."""
  if any(shape[d] != t.shape[i] for i, d in enumerate(bdims)):
    return None  # a real broadcast of an existing axis
  new = [d for d in range(len(shape)) if d not in bdims]
  if any(shape[d] != 1 for d in new) or list(bdims) != sorted(bdims):
    return None
  ad = t.adapter
  axes: list[Any] = [None] * len(shape)
  for i, d in enumerate(bdims):
    axes[d] = t.axes[i]
  for d in new:  # each new unit axis becomes a unit fan-in axis
    ad, axes[d] = add_unit_fan_in(ad)
  shape, bdims = tuple(shape), tuple(bdims)
  return t.then(lambda w: lax.broadcast_in_dim(w, shape, bdims), shape, adapter=ad, axes=tuple(axes))


def _rule_broadcast(eqn, t):
  return add_unit_axes(t, eqn.params["shape"], eqn.params["broadcast_dimensions"])


def _rule_reshape(eqn, t):
  if eqn.params.get("dimensions") is not None:
    return None
  new_shape = tuple(eqn.params["new_sizes"])
  old_nz = [d for d in t.shape if d != 1]
  if old_nz != [d for d in new_shape if d != 1]:
    return None  # unit axes only (expand_dims / squeeze written as a reshape)
  ones_old = [v for v, d in enumerate(t.shape) if d == 1]
  t = drop_axes(t, ones_old)
  t = t.replace(ops=t.ops + ((lambda w, s=tuple(old_nz): jnp.reshape(w, s)),))
  keep = [d for d in range(len(new_shape)) if new_shape[d] != 1]
  return add_unit_axes(t, new_shape, tuple(keep))


STRUCTURAL = {
    "convert_element_type": _rule_convert,
    "transpose": _rule_transpose,
    "copy": _rule_copy,
    "copy_p": _rule_copy,
    "squeeze": _rule_squeeze,
    "slice": _rule_slice,
    "broadcast_in_dim": _rule_broadcast,
    "reshape": _rule_reshape,
}
