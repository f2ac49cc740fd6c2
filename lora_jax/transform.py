"""wrap(): make targeted kernels act as ``W + scale * a @ b`` inside any apply function.

The transform traces ``apply_fn`` to a jaxpr (``jax.make_jaxpr``) with every adapted kernel as
an input, then evaluates that jaxpr equation by equation. An adapted kernel travels through the
evaluation as a :class:`_Tracked` value: the base kernel plus its factors and a map from each
axis of the current *view* of the kernel (after casts, transposes, slices, ...) to the factor
axis it came from. Where a view meets a matmul, a convolution or an embedding lookup, the
equation is rewritten into its factored form, ``op(x, W) + scale * op(op(x, a), b)``, so the
``(fan_in x fan_out)`` update is never formed, in the forward pass or the backward pass. Any
other use of the kernel materialises ``W + scale * a @ b`` for that use only (and says so).

Higher-order primitives are re-expressed through public APIs with the interpreter running
inside: ``lax.scan``, ``lax.switch``, ``jax.checkpoint`` (same policy); nested ``jit`` is
inlined. No private ``Trace`` class is subclassed.
"""

from __future__ import annotations

import dataclasses
import functools
import string
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax import tree_util as jtu
from jax.extend import core as jex

from lora_jax.adapters import check_adapters, merge
from lora_jax._jaxpr import is_dynamic, join_static, open_jaxpr, scan_counts, split_static

PyTree = Any
Array = Any

_FALLBACK_MODES = ("warn", "error", "allow")
THIN_PRODUCT_NAME = "lora_jax.x_a"  # checkpoint_name of each factored matmul's x @ a product


class LoraFallbackWarning(UserWarning):
  """An adapted kernel had to be materialised (``W + scale * a @ b``) for one of its uses."""


class LoraLayoutWarning(UserWarning):
  """An adapted kernel is used in a way that suggests its layout ('l'/'i'/'o' axes) is wrong."""


class LoraFallbackError(ValueError):
  """Raised instead of materialising when ``wrap(..., fallback="error")``."""


# ----------------------------------------------------------------------------------------------
# Tracked kernels
# ----------------------------------------------------------------------------------------------


@jtu.register_pytree_node_class
@dataclasses.dataclass
class _Tracked:
  """A view of an adapted kernel: ``view(W) + scale * view(a @ b)`` with the view applied lazily.

  ``w`` is the base kernel with the view's structural ops applied (still in the kernel's own
  dtype; ``dtype`` is the view's dtype after casts). ``a`` is ``(*L, *I, r)`` and ``b`` is
  ``(*L, r, *O)``; ``axes[v] = (kind, j)`` says that view axis ``v`` is the ``j``-th axis of
  kind ``kind`` ('l', 'i' or 'o') of the factors. Every factor axis but ``r`` has exactly
  one view axis.
  """

  w: Array
  a: Array
  b: Array
  axes: tuple[tuple[str, int], ...]
  scale: float
  dtype: Any
  path: str

  def tree_flatten(self):
    return (self.w, self.a, self.b), (self.axes, self.scale, self.dtype, self.path)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def nl(self) -> int:
    return sum(1 for k, _ in self.axes if k == "l")

  def a_axis(self, v: int) -> int:
    kind, j = self.axes[v]
    return j if kind == "l" else self.nl + j

  def b_axis(self, v: int) -> int:
    kind, j = self.axes[v]
    return j if kind == "l" else self.nl + 1 + j

  def replace(self, **kw) -> "_Tracked":
    return dataclasses.replace(self, **kw)

  def view_value(self) -> Array:
    return self.w.astype(self.dtype)


def _letters():
  return iter(string.ascii_letters)


def _delta(t: _Tracked, dtype: Any = None) -> Array:
  """``scale * a @ b`` laid out like the view (materialises; used by fallbacks only)."""
  names = _letters()
  view = [next(names) for _ in t.axes]
  r = next(names)
  a_sub = [""] * t.a.ndim
  b_sub = [""] * t.b.ndim
  a_sub[-1] = r
  b_sub[t.nl] = r
  for v, (kind, _) in enumerate(t.axes):
    if kind in "li":
      a_sub[t.a_axis(v)] = view[v]
    if kind in "lo":
      b_sub[t.b_axis(v)] = view[v]
  acc = jnp.promote_types(jnp.promote_types(t.a.dtype, t.b.dtype), jnp.float32)
  d = jnp.einsum(
      f"{''.join(a_sub)},{''.join(b_sub)}->{''.join(view)}",
      t.a.astype(acc),
      t.b.astype(acc),
      precision=lax.Precision.HIGHEST,
  )
  d = d * jnp.asarray(t.scale, acc)
  return d if dtype is None else d.astype(dtype)


def _materialize(t: _Tracked) -> Array:
  """``view(W + scale * a @ b)``, rounded as :func:`lora_jax.merge` rounds."""
  d = _delta(t)
  return (t.w.astype(d.dtype) + d).astype(t.w.dtype).astype(t.dtype)


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Use:
  """One use of an adapted kernel found while rewriting."""

  path: str
  primitive: str
  factored: bool
  reason: str = ""


@dataclasses.dataclass
class Report:
  """What :func:`explain` found: per adapted path, how each use of the kernel was computed."""

  paths: list[str]
  uses: list[Use]
  layout_notes: dict[str, str] = dataclasses.field(default_factory=dict)
  grouped: list[list[str]] = dataclasses.field(default_factory=list)

  def for_path(self, path: str) -> list[Use]:
    return [u for u in self.uses if u.path == path]

  @property
  def unused(self) -> list[str]:
    seen = {u.path for u in self.uses}
    return [p for p in self.paths if p not in seen]

  @property
  def fallbacks(self) -> list[Use]:
    return [u for u in self.uses if not u.factored]

  def __str__(self) -> str:
    width = max([len(p) for p in self.paths] + [4])
    lines = [f"{'path':<{width}}  use"]
    for p in self.paths:
      uses = self.for_path(p)
      if not uses:
        lines.append(f"{p:<{width}}  UNUSED: the function never reads this kernel")
      for u in uses:
        how = "factored" if u.factored else f"MATERIALISED ({u.reason})"
        lines.append(f"{p:<{width}}  {u.primitive}: {how}")
    for p, note in self.layout_notes.items():
      lines.append(f"{p:<{width}}  LAYOUT? {note}")
    for paths in self.grouped:
      lines.append(f"one x @ [a...] matmul: {' + '.join(paths)}")
    n_fb = len(self.fallbacks)
    lines.append(f"{len(self.uses) - n_fb} factored use(s), {n_fb} materialised, {len(self.unused)} unused")
    return "\n".join(lines)


def _unique(groups: list[list[str]]) -> list[list[str]]:
  """Groups in first-seen order without repeats (a scan body or remat traces them again)."""
  seen, out = set(), []
  for g in groups:
    if tuple(g) not in seen:
      seen.add(tuple(g))
      out.append(g)
  return out


class _Ctx:
  """Per-trace state: the uses seen and what to do on a fallback."""

  def __init__(self, fallback: str, group: bool = True):
    self.fallback = fallback
    self.group = group
    self.uses: list[Use] = []
    self.layout_notes: dict[str, str] = {}
    self.grouped: list[list[str]] = []  # paths whose x @ a products ran as one matmul

  def layout_note(self, t: _Tracked, why: str) -> None:
    self.layout_notes.setdefault(t.path, why)

  def factored(self, t: _Tracked, prim: str) -> None:
    self.uses.append(Use(t.path, prim, True))

  def materialize(self, t: _Tracked, prim: str, reason: str) -> Array:
    self.uses.append(Use(t.path, prim, False, reason))
    if self.fallback == "error":
      raise LoraFallbackError(
          f"{t.path!r}: the kernel meets `{prim}` ({reason}), which lora_jax cannot factor, "
          "and wrap(..., fallback='error') forbids materialising W + scale*a@b. Use "
          "fallback='warn' or 'allow' to materialise it for this use only."
      )
    return _materialize(t)


# ----------------------------------------------------------------------------------------------
# Rules: structural ops (return a new view) and consumers (return factored results)
# ----------------------------------------------------------------------------------------------


def _drop_axes(t: _Tracked, views: Sequence[int]) -> _Tracked:
  """Removes size-1 view axes (and their factor axes)."""
  views = sorted(set(views))
  a_drop = sorted({t.a_axis(v) for v in views if t.axes[v][0] in "li"})
  b_drop = sorted({t.b_axis(v) for v in views if t.axes[v][0] in "lo"})
  a = jnp.squeeze(t.a, a_drop) if a_drop else t.a
  b = jnp.squeeze(t.b, b_drop) if b_drop else t.b
  axes = []
  for v, (kind, j) in enumerate(t.axes):
    if v in views:
      continue
    shift = sum(1 for u in views if t.axes[u][0] == kind and t.axes[u][1] < j)
    axes.append((kind, j - shift))
  return t.replace(a=a, b=b, axes=tuple(axes))


def _slice_factors(t: _Tracked, v: int, fn: Callable[[Array, int], Array]) -> _Tracked:
  """Applies ``fn(factor, factor_axis)`` to whichever factors carry view axis ``v``."""
  kind = t.axes[v][0]
  a = fn(t.a, t.a_axis(v)) if kind in "li" else t.a
  b = fn(t.b, t.b_axis(v)) if kind in "lo" else t.b
  return t.replace(a=a, b=b)


def _rule_convert(ctx, eqn, t):
  return t.replace(dtype=eqn.params["new_dtype"])


def _rule_transpose(ctx, eqn, t):
  perm = eqn.params["permutation"]
  return t.replace(w=jnp.transpose(t.w, perm), axes=tuple(t.axes[p] for p in perm))


def _rule_copy(ctx, eqn, t):
  return t


def _rule_squeeze(ctx, eqn, t):
  dims = [d % len(t.axes) for d in eqn.params["dimensions"]]
  out = _drop_axes(t, dims)
  return out.replace(w=jnp.squeeze(t.w, dims))


def _rule_slice(ctx, eqn, t):
  start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
  strides = eqn.params["strides"] or (1,) * len(start)
  w = lax.slice(t.w, start, limit, strides)
  for v, (s, e, st) in enumerate(zip(start, limit, strides)):
    if (s, e, st) != (0, t.w.shape[v], 1):
      t = _slice_factors(t, v, lambda x, ax, s=s, e=e, st=st: lax.slice_in_dim(x, s, e, st, ax))
  return t.replace(w=w)


def _rule_dynamic_slice(ctx, eqn, t, *starts):
  sizes = eqn.params["slice_sizes"]
  w = lax.dynamic_slice(t.w, starts, sizes)
  for v, (s, n) in enumerate(zip(starts, sizes)):
    if n != t.w.shape[v]:
      t = _slice_factors(t, v, lambda x, ax, s=s, n=n: lax.dynamic_slice_in_dim(x, s, n, ax))
  return t.replace(w=w)


def _rule_broadcast(ctx, eqn, t):
  return _add_unit_axes(t, eqn.params["shape"], eqn.params["broadcast_dimensions"])


def _add_unit_axes(t: _Tracked, shape, bdims) -> _Tracked | None:
  """``broadcast_in_dim`` that only inserts size-1 axes; None for a real broadcast."""
  if any(shape[d] != t.w.shape[i] for i, d in enumerate(bdims)):
    return None  # a real broadcast of an existing axis
  new = [d for d in range(len(shape)) if d not in bdims]
  if any(shape[d] != 1 for d in new) or list(bdims) != sorted(bdims):
    return None
  # Only size-1 axes are added: give each a unit fan-in axis on ``a``.
  ni = sum(1 for k, _ in t.axes if k == "i")
  a = t.a
  axes = [None] * len(shape)
  for i, d in enumerate(bdims):
    axes[d] = t.axes[i]
  for d in new:
    a = jnp.expand_dims(a, t.nl + ni)  # new fan-in axis just before r
    axes[d] = ("i", ni)
    ni += 1
  return t.replace(w=lax.broadcast_in_dim(t.w, shape, bdims), a=a, axes=tuple(axes))


def _rule_reshape(ctx, eqn, t):
  if eqn.params.get("dimensions") is not None:
    return None
  new_shape = tuple(eqn.params["new_sizes"])
  old_shape = tuple(t.w.shape)
  # Unit axes only (expand_dims / squeeze written as a reshape).
  old_nz = [(v, d) for v, d in enumerate(old_shape) if d != 1]
  new_nz = [d for d in new_shape if d != 1]
  if [d for _, d in old_nz] != new_nz:
    return None
  ones_old = [v for v, d in enumerate(old_shape) if d == 1]
  t = _drop_axes(t, ones_old).replace(w=jnp.reshape(t.w, [d for _, d in old_nz]))
  keep = [d for d in range(len(new_shape)) if new_shape[d] != 1]

  return _add_unit_axes(t, new_shape, tuple(keep))


_STRUCTURAL = {
    "convert_element_type": _rule_convert,
    "transpose": _rule_transpose,
    "copy": _rule_copy,
    "copy_p": _rule_copy,
    "squeeze": _rule_squeeze,
    "slice": _rule_slice,
    "broadcast_in_dim": _rule_broadcast,
    "reshape": _rule_reshape,
}


def _dot_by_labels(x, xl, y, yl, contract, batch, precision, pref):
  """dot_general of two labelled arrays; returns the result and its labels."""
  xc = [xl.index(c) for c in contract]
  yc = [yl.index(c) for c in contract]
  xb = [xl.index(c) for c in batch]
  yb = [yl.index(c) for c in batch]
  out = lax.dot_general(x, y, ((xc, yc), (xb, yb)), precision=precision, preferred_element_type=pref)
  skip = set(contract) | set(batch)
  labels = list(batch) + [c for c in xl if c not in skip] + [c for c in yl if c not in skip]
  return out, labels


@dataclasses.dataclass
class _DotPlan:
  """How one ``dot_general`` with an adapted operand ``t`` is factored.

  The first product contracts ``x`` with ``f1`` (``a`` when the matmul contracts fan-in axes,
  ``b`` when it contracts fan-out axes); the second contracts the thin result with ``f2``.
  Labels name axes: ``('x', k)`` is axis ``k`` of ``x`` (kernel axes that meet it share the
  label), ``('t', v)`` a free kernel-view axis, ``'r'`` the rank axis.
  """

  t: _Tracked
  x: Array
  t_is_lhs: bool
  first: str
  xl: list
  vlab: list
  contract: list
  batch: list
  f1: Array
  l1: list
  f2: Array
  l2: list
  precision: Any
  out_dtype: Any

  def first_product(self) -> tuple[Array, list]:
    tmp, tl = _dot_by_labels(self.x, self.xl, self.f1, self.l1, self.contract, self.batch, self.precision, jnp.float32)
    # Named so that a remat policy can keep this thin (..., r) product (see remat_policy).
    return checkpoint_name(tmp, THIN_PRODUCT_NAME), tl

  def finish(self, tmp: Array, tl: list) -> Array:
    """``scale * tmp @ f2`` in the original op's output order (``tmp`` from the first product)."""
    # Scale the thin (..., r) product, not the full-size one; the second product writes the
    # original op's dtype directly (accumulation inside the matmul is float32 either way).
    tmp = (tmp * self.t.scale).astype(self.t.dtype)
    # Leading axes left free ride along as batch axes of the second product.
    batch2 = [c for c in tl if c != "r" and c in self.l2]
    out, ol = _dot_by_labels(tmp, tl, self.f2, self.l2, ["r"], batch2, self.precision, self.out_dtype)
    # The original op's output order: batch, lhs free, rhs free.
    skip = set(self.contract) | set(self.batch)
    xfree = [c for c in self.xl if c not in skip]
    tfree = [self.vlab[v] for v in range(len(self.t.axes)) if self.vlab[v] not in skip]
    want = self.batch + (tfree + xfree if self.t_is_lhs else xfree + tfree)
    return jnp.transpose(out, [ol.index(c) for c in want])

  def groupable_with(self, other: "_DotPlan") -> bool:
    """Whether the first products of both can be one matmul over ``concat([f1, f1'], r)``."""
    return (
        self.first == other.first == "i"
        and self.l1 == other.l1
        and all(lab == "r" or lab[0] == "x" for lab in self.l1)
        and self.f1.dtype == other.f1.dtype
        and self.precision == other.precision
        and all(n == m for lab, n, m in zip(self.l1, self.f1.shape, other.f1.shape) if lab != "r")
    )


def _plan_dot(ctx, eqn, lhs, rhs) -> tuple[_DotPlan | None, str]:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  t_is_lhs = isinstance(lhs, _Tracked)
  t, x = (lhs, rhs) if t_is_lhs else (rhs, lhs)
  tc, xc, tb, xb = (lc, rc, lb, rb) if t_is_lhs else (rc, lc, rb, lb)
  kinds_c = {t.axes[v][0] for v in tc}
  if any(t.axes[v][0] != "l" for v in tb):
    return None, "a batch dimension of the matmul is not a leading (layer) axis of the kernel"
  if len(kinds_c) > 1 or kinds_c == {"l"}:
    return None, "the matmul contracts fan-in and fan-out axes of the kernel together"
  first = "o" if kinds_c == {"o"} else "i"
  free_same = [v for v, (k, _) in enumerate(t.axes) if k == first and v not in tc and t.w.shape[v] != 1]
  if tc and free_same:
    ctx.layout_note(
        t,
        f"a matmul contracts kernel-view axes {list(tc)} but leaves axes {free_same}, also "
        f"marked {first!r}, free",
    )
  # Labels: x axes are ('x', k); a kernel axis shares its label with the x axis it meets.
  xl = [("x", k) for k in range(x.ndim)]
  vlab = [("t", v) for v in range(len(t.axes))]
  for v, k in zip(tc, xc):
    vlab[v] = xl[k]
  for v, k in zip(tb, xb):
    vlab[v] = xl[k]
  al, bl = [None] * t.a.ndim, [None] * t.b.ndim
  al[-1] = bl[t.nl] = "r"
  for v, (kind, _) in enumerate(t.axes):
    if kind in "li":
      al[t.a_axis(v)] = vlab[v]
    if kind in "lo":
      bl[t.b_axis(v)] = vlab[v]
  dt = t.dtype
  a, b = t.a.astype(dt), t.b.astype(dt)
  f1, l1, f2, l2 = (a, al, b, bl) if first == "i" else (b, bl, a, al)
  plan = _DotPlan(
      t, x, t_is_lhs, first, xl, vlab, [xl[k] for k in xc], [xl[k] for k in xb], f1, l1, f2, l2,
      eqn.params.get("precision"), eqn.outvars[0].aval.dtype,
  )
  return plan, ""


def _grouped_first_products(plans: Sequence[_DotPlan]) -> list[tuple[Array, list]]:
  """The first products of ``plans`` (same ``x``, :meth:`_DotPlan.groupable_with`) as one
  matmul over the factors concatenated along the rank axis, split back per plan."""
  head = plans[0]
  r_axis = head.l1.index("r")
  f1 = jnp.concatenate([p.f1 for p in plans], axis=r_axis)
  grouped = dataclasses.replace(head, f1=f1)
  tmp, tl = grouped.first_product()
  sizes = [p.f1.shape[r_axis] for p in plans]
  parts = jnp.split(tmp, np.cumsum(sizes)[:-1].tolist(), axis=tl.index("r"))
  return [(part, tl) for part in parts]


def _rule_dot(ctx, eqn, lhs, rhs, first=None):
  if isinstance(lhs, _Tracked) and isinstance(rhs, _Tracked):
    lhs = ctx.materialize(lhs, "dot_general", "both operands are adapted kernels")
  t = lhs if isinstance(lhs, _Tracked) else rhs
  plan, why = _plan_dot(ctx, eqn, lhs, rhs)
  if plan is None:
    w = ctx.materialize(t, "dot_general", why)
    return _bind(eqn, [w if x is t else x for x in (lhs, rhs)])
  base = _bind(eqn, [x.view_value() if isinstance(x, _Tracked) else x for x in (lhs, rhs)])
  ctx.factored(t, "dot_general")
  return base + plan.finish(*(first if first is not None else plan.first_product()))


def _times_b(rows: Array, t: _Tracked, eqn) -> Array:
  """``scale * rows @ b`` for ``rows`` of shape (..., r) and a kernel with one fan-out axis."""
  rows = (rows.astype(jnp.float32) * t.scale).astype(t.dtype)
  return lax.dot_general(
      rows, t.b.astype(t.dtype), (([rows.ndim - 1], [0]), ([], [])),
      preferred_element_type=eqn.outvars[0].aval.dtype,
  )


def _rule_conv(ctx, eqn, x, t):
  p = eqn.params
  if not isinstance(t, _Tracked) or isinstance(x, _Tracked):
    what = x if isinstance(x, _Tracked) else t
    w = ctx.materialize(what, "conv_general_dilated", "the adapted kernel is the conv's input")
    return _bind(eqn, [w if v is what else v for v in (x, t)])
  dn = p["dimension_numbers"]
  out_feat, out_spec = dn.rhs_spec[0], dn.out_spec
  kinds = [k for k, _ in t.axes]
  if (
      kinds[out_feat] != "o"
      or kinds.count("o") != 1
      or "l" in kinds
      or p["feature_group_count"] != 1
      or p["batch_group_count"] != 1
  ):
    w = ctx.materialize(
        t, "conv_general_dilated", "grouped conv, or fan-out is not the conv's output-feature axis"
    )
    return _bind(eqn, [x, w])
  dt = t.dtype
  # ``a`` laid out like the kernel view with the output-feature axis replaced by r.
  order = [t.a_axis(v) if v != out_feat else t.a.ndim - 1 for v in range(len(t.axes))]
  a_k = jnp.transpose(t.a.astype(dt), order)
  tmp = lax.conv_general_dilated_p.bind(x, a_k, **dict(p, preferred_element_type=jnp.float32))
  feat = out_spec[1]
  delta = _times_b(jnp.moveaxis(tmp, feat, -1), t, eqn)
  base = _bind(eqn, [x, t.view_value()])
  ctx.factored(t, "conv_general_dilated")
  return base + jnp.moveaxis(delta, -1, feat)


def _rule_gather(ctx, eqn, t, idx):
  p = eqn.params
  if isinstance(idx, _Tracked) or not isinstance(t, _Tracked):
    what = idx if isinstance(idx, _Tracked) else t
    w = ctx.materialize(what, "gather", "the adapted kernel is used as gather indices")
    return _bind(eqn, [w if v is what else v for v in (t, idx)])
  dn = p["dimension_numbers"]
  kinds = [k for k, _ in t.axes]
  touched = set(dn.collapsed_slice_dims) | set(dn.start_index_map) | set(getattr(dn, "operand_batching_dims", ()))
  o_axes = [v for v, k in enumerate(kinds) if k == "o"]
  if (
      "l" in kinds
      or len(o_axes) != 1
      or o_axes[0] in touched
      or p["slice_sizes"][o_axes[0]] != t.w.shape[o_axes[0]]
  ):
    w = ctx.materialize(t, "gather", "the lookup slices the fan-out axis or a leading axis")
    return _bind(eqn, [w, idx])
  ov = o_axes[0]
  order = [t.a_axis(v) if v != ov else t.a.ndim - 1 for v in range(len(t.axes))]
  a_k = jnp.transpose(t.a, order)
  sizes = list(p["slice_sizes"])
  sizes[ov] = t.a.shape[-1]
  params = dict(p, slice_sizes=tuple(sizes))
  rows = lax.gather_p.bind(a_k, idx, **params)
  # The r axis lands where the fan-out axis would: the offset dim of the kernel's axis ``ov``.
  offset_axes = [v for v in range(len(t.axes)) if v not in dn.collapsed_slice_dims]
  pos = dn.offset_dims[offset_axes.index(ov)]
  delta = _times_b(jnp.moveaxis(rows, pos, -1), t, eqn)
  base = _bind(eqn, [t.view_value(), idx])
  ctx.factored(t, "gather")
  return base + jnp.moveaxis(delta, -1, pos)


# ----------------------------------------------------------------------------------------------
# Higher-order primitives
# ----------------------------------------------------------------------------------------------


def _rule_inline(ctx, eqn, *invals):
  """Nested jit / closed_call / pjit: evaluate the inner jaxpr in place."""
  jaxpr, consts = open_jaxpr(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))
  return _eval(ctx, jaxpr, consts, invals)


def _rule_checkpoint(ctx, eqn, *invals):
  p = eqn.params
  jaxpr, consts = open_jaxpr(p["jaxpr"])

  def body(*args):
    return _finalize(ctx, _eval(ctx, jaxpr, consts, args))

  fn = jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))
  return fn(*invals)


def _rule_cond(ctx, eqn, index, *ops):
  branches = eqn.params["branches"]

  def make(br):
    jaxpr, consts = open_jaxpr(br)
    return lambda *args: _finalize(ctx, _eval(ctx, jaxpr, consts, args))

  return lax.switch(index, [make(br) for br in branches], *ops)


def _rule_scan(ctx, eqn, *invals):
  p = eqn.params
  nc, ncar = scan_counts(p)
  body_jaxpr, body_consts = open_jaxpr(p["jaxpr"])
  consts, init, xs = list(invals[:nc]), list(invals[nc : nc + ncar]), list(invals[nc + ncar :])
  init = [ctx.materialize(v, "scan", "the kernel is a scan carry") if isinstance(v, _Tracked) else v for v in init]
  # A tracked kernel scanned over its axis 0: the factor(s) holding that axis are scanned,
  # the other factor rides along as a constant.
  xs_plain, xs_meta = [], []
  for v in xs:
    if not isinstance(v, _Tracked):
      xs_plain.append(v)
      xs_meta.append(None)
      continue
    kind, j = v.axes[0]
    if kind != "l":
      ctx.layout_note(v, f"scan slices the kernel along an axis marked {kind!r}, not 'l' (a layer axis)")
    a = jnp.moveaxis(v.a, v.a_axis(0), 0) if kind in "li" else v.a
    b = jnp.moveaxis(v.b, v.b_axis(0), 0) if kind in "lo" else v.b
    xs_plain.append((v.w, a if kind in "li" else None, b if kind in "lo" else None))
    xs_meta.append((v, a if kind not in "li" else None, b if kind not in "lo" else None))

  def body(carry, x_slices):
    rebuilt = []
    for meta, xv in zip(xs_meta, x_slices):
      if meta is None:
        rebuilt.append(xv)
        continue
      v, a_const, b_const = meta
      w, a, b = xv
      sliced = _drop_axes(
          v.replace(
              a=jnp.expand_dims(a, v.a_axis(0)) if a is not None else a_const,
              b=jnp.expand_dims(b, v.b_axis(0)) if b is not None else b_const,
          ),
          [0],
      )
      # _drop_axes squeezed the scanned axis; the constant factor keeps its full axis only
      # when the scanned axis is not one of its own, which is the case by construction.
      rebuilt.append(sliced.replace(w=w))
    outs = _eval(ctx, body_jaxpr, body_consts, [*consts, *carry, *rebuilt])
    outs = _finalize(ctx, outs)
    return outs[:ncar], outs[ncar:]

  carry, ys = lax.scan(
      body, init, xs_plain, length=p["length"], reverse=p["reverse"], unroll=p.get("unroll", 1)
  )
  return [*carry, *ys]


def _rule_custom(ctx, eqn, *invals):
  reason = "the kernel enters a function with a custom derivative rule"
  invals = [ctx.materialize(v, eqn.primitive.name, reason) if isinstance(v, _Tracked) else v for v in invals]
  return _bind(eqn, invals)


_HIGHER = {
    "pjit": _rule_inline,
    "jit": _rule_inline,
    "closed_call": _rule_inline,
    "core_call": _rule_inline,
    "remat2": _rule_checkpoint,
    "checkpoint": _rule_checkpoint,
    "remat": _rule_checkpoint,
    "cond": _rule_cond,
    "scan": _rule_scan,
}

_CONSUMERS = {
    "dot_general": _rule_dot,
    "conv_general_dilated": _rule_conv,
    "gather": _rule_gather,
}


# ----------------------------------------------------------------------------------------------
# Interpreter
# ----------------------------------------------------------------------------------------------


def _bind(eqn, invals):
  prim = eqn.primitive
  got = prim.get_bind_params(eqn.params)
  subfuns, params = got if isinstance(got, tuple) else ((), got)  # JAX < 0.7 returned a pair
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  if ctx is None:
    return prim.bind(*subfuns, *invals, **params)
  with ctx:
    return prim.bind(*subfuns, *invals, **params)


def _finalize(ctx, outs):
  return [ctx.materialize(v, "output", "the kernel itself is returned") if isinstance(v, _Tracked) else v for v in outs]


# Ops that may run ahead of their place in the jaxpr to expose a kernel view to a grouped
# matmul: pure, cheap, and they never consume a non-kernel value that is not yet computed.
_AHEAD = frozenset(_STRUCTURAL) | {"dynamic_slice"}


def _dot_groups(jaxpr: jex.Jaxpr) -> dict[int, list[tuple[int, int]]]:
  """For each ``dot_general`` (by eqn index): the later ones that read the same ``x`` var at the
  same position with the same ``x``-side dimension numbers, as ``(eqn index, x position)``."""
  by_key: dict[Any, list[tuple[int, int]]] = {}
  for k, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive.name != "dot_general":
      continue
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for pos, (c, b) in enumerate(((lc, lb), (rc, rb))):
      x = eqn.invars[pos]
      if isinstance(x, jex.Literal):
        continue
      key = (x, pos, tuple(c), tuple(b), eqn.params.get("precision"))
      by_key.setdefault(key, []).append((k, pos))
  groups: dict[int, list[tuple[int, int]]] = {}
  for members in by_key.values():
    if len(members) > 1:
      for k, _ in members:
        groups.setdefault(k, []).extend(m for m in members if m[0] != k)
  return groups


def _eval(ctx: _Ctx, jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  env: dict[Any, Any] = {}
  producer = {v: k for k, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}
  groups = _dot_groups(jaxpr) if ctx.group else {}
  done: set[int] = set()  # eqns evaluated ahead of their place
  firsts: dict[int, tuple[Array, list]] = {}  # precomputed first products of grouped matmuls

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  def run(k: int) -> None:
    eqn = jaxpr.eqns[k]
    invals = [read(v) for v in eqn.invars]
    if not any(isinstance(x, _Tracked) for x in invals):
      out = _bind(eqn, invals)
    elif k in firsts:
      out = _rule_dot(ctx, eqn, *invals, first=firsts.pop(k))
    else:
      out = _apply_rule(ctx, eqn, eqn.primitive.name, invals)
    outs = out if eqn.primitive.multiple_results else [out]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x  # a DropVar entry is written and never read

  def ahead(v, depth: int = 0) -> bool:
    """Makes ``v`` available now if it is an input or comes from a chain of view ops on one."""
    if isinstance(v, jex.Literal) or v in env:
      return True
    k = producer.get(v)
    if k is None or k in done or depth > 8 or jaxpr.eqns[k].primitive.name not in _AHEAD:
      return False
    if not all(ahead(u, depth + 1) for u in jaxpr.eqns[k].invars):
      return False
    run(k)
    done.add(k)
    return True

  def group_first_products(k: int) -> None:
    eqn = jaxpr.eqns[k]
    invals = [read(v) for v in eqn.invars]
    tracked = [isinstance(x, _Tracked) for x in invals]
    if tracked.count(True) != 1:
      return
    pos_x = tracked.index(False)
    head, _ = _plan_dot(ctx, eqn, *invals)
    if head is None:
      return
    members, plans = [k], [head]
    for j, pos in groups[k]:
      if j <= k or j in done or pos != pos_x or not ahead(jaxpr.eqns[j].invars[1 - pos]):
        continue
      kernel = read(jaxpr.eqns[j].invars[1 - pos])
      if not isinstance(kernel, _Tracked):
        continue
      vals = [read(jaxpr.eqns[j].invars[0]), kernel] if pos == 0 else [kernel, read(jaxpr.eqns[j].invars[1])]
      plan, _ = _plan_dot(ctx, jaxpr.eqns[j], *vals)
      if plan is not None and head.groupable_with(plan):
        members.append(j)
        plans.append(plan)
    if len(members) > 1:
      ctx.grouped.append([p.t.path for p in plans])
      firsts.update(zip(members, _grouped_first_products(plans)))

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for k, eqn in enumerate(jaxpr.eqns):
    if k in done:
      continue
    if k in groups and k not in firsts:
      group_first_products(k)
    run(k)
  return [read(v) for v in jaxpr.outvars]


def _apply_rule(ctx, eqn, name, invals):
  if name in _STRUCTURAL and isinstance(invals[0], _Tracked) and len(invals) == 1:
    out = _STRUCTURAL[name](ctx, eqn, invals[0])
    if out is not None:
      return out
    return _bind(eqn, [ctx.materialize(invals[0], name, f"`{name}` reshapes the kernel across factor axes")])
  if name == "dynamic_slice" and isinstance(invals[0], _Tracked) and not any(
      isinstance(x, _Tracked) for x in invals[1:]
  ):
    return _rule_dynamic_slice(ctx, eqn, invals[0], *invals[1:])
  if name in _CONSUMERS:
    return _CONSUMERS[name](ctx, eqn, *invals)
  if name in _HIGHER:
    return _HIGHER[name](ctx, eqn, *invals)
  if name.startswith("custom_jvp") or name.startswith("custom_vjp"):
    return _rule_custom(ctx, eqn, *invals)
  reason = f"no factored rule for `{name}`"
  return _bind(eqn, [ctx.materialize(x, name, reason) if isinstance(x, _Tracked) else x for x in invals])


# ----------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------


def _trace_and_run(apply_fn, fallback, params, adapters, static, dyn, group=True):
  """Traces ``apply_fn`` at these shapes and evaluates it with the factored rules."""
  rows = check_adapters(params, adapters)
  ptree = jtu.tree_structure(params)
  leaves = [leaf for _, leaf, _ in rows]

  def flat_fn(leaves, dyn):
    args, kwargs = join_static(static, dyn)
    return apply_fn(jtu.tree_unflatten(ptree, leaves), *args, **kwargs)

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(leaves, dyn)
  ctx = _Ctx(fallback, group)
  inputs = list(leaves) + list(jax.tree.leaves(dyn))
  for i, (path, leaf, f) in enumerate(rows):
    if f is not None:
      counters = {"l": 0, "i": 0, "o": 0}
      axes = []
      for c in f.layout:
        axes.append((c, counters[c]))
        counters[c] += 1
      inputs[i] = _Tracked(leaf, f.a, f.b, tuple(axes), f.scale, leaf.dtype, path)
  outs = _finalize(ctx, _eval(ctx, closed.jaxpr, closed.consts, inputs))
  report = Report([p for p, _, f in rows if f is not None], ctx.uses, ctx.layout_notes, _unique(ctx.grouped))
  return jtu.tree_unflatten(jtu.tree_structure(out_shape), outs), report


def _warn(report: Report) -> None:
  for p, note in report.layout_notes.items():
    warnings.warn(
        f"{p!r}: its layout looks wrong for how the function uses it: {note}. Results are "
        "exact, but the low-rank update is not the usual per-layer in x out one. State the "
        f"layout, e.g. LoraSpec(layout={{{p!r}: 'lio'}}) for a stacked (layers, in, out) kernel "
        "or 'ioo' for a DenseGeneral (in, heads, dim) kernel, or pass "
        "layout=lora_jax.infer_layout(apply_fn, params, *args).",
        LoraLayoutWarning,
        stacklevel=4,
    )
  for p in report.unused:
    warnings.warn(
        f"{p!r} has adapters but the wrapped function never reads this kernel; its factors "
        "get no gradient. Check the spec's targets.",
        LoraFallbackWarning,
        stacklevel=4,
    )
  for u in report.fallbacks:
    warnings.warn(
        f"{u.path!r}: materialised W + scale*a@b for a `{u.primitive}` ({u.reason}). Results are "
        "exact; only the memory/speed benefit is lost for this use. lora_jax.explain() lists all uses.",
        LoraFallbackWarning,
        stacklevel=4,
    )


def wrap(
    apply_fn: Callable[..., Any], *, mode: str = "factored", fallback: str = "warn", group: bool = True
) -> Callable[..., Any]:
  """Makes the targeted kernels of ``apply_fn`` act as ``W + scale * a @ b``.

  Returns ``lora_apply(params, adapters, *args, **kwargs)``, equal to
  ``apply_fn(lora_jax.merge(params, adapters), *args, **kwargs)``. ``params`` is the first
  argument of ``apply_fn`` (linen: ``{'params': ...}`` variables; NNX: see :func:`from_nnx`)
  and ``adapters`` mirrors it (from :func:`lora_jax.init`). ``lora_apply`` is jitted (array
  arguments are traced, all other arguments are static) and composes with ``jax.grad``,
  ``jax.vmap``, ``jax.checkpoint`` and an outer ``jax.jit``.

  Args:
    apply_fn: any function whose first argument is a params pytree.
    mode: ``"factored"`` rewrites each matmul / conv / embedding lookup that consumes an
      adapted kernel into ``op(x, W) + scale * op(op(x, a), b)``: the full-size update is
      never formed, forward or backward. ``"merged"`` computes
      ``apply_fn(merge(params, adapters), ...)``: the reference.
    fallback: what to do when a use of an adapted kernel cannot be factored (an unknown op,
      a kernel returned as an output, ...): ``"warn"`` materialises ``W + scale*a@b`` for
      that use only and warns (:class:`LoraFallbackWarning`), ``"allow"`` does so silently,
      ``"error"`` raises :class:`LoraFallbackError`. Results are exact in every case.
    group: adapted matmuls that read the same input with the same dimension numbers (q/k/v
      projections, a SwiGLU's gate and up) compute their thin ``x @ a`` products as one
      matmul over ``[a_1 | a_2 | ...]``, split afterwards: one pass over ``x`` instead of
      one per adapter, forward and backward. The result is the same up to float rounding of
      a different matmul shape. ``explain`` lists the groups.

  >>> import flax.linen as nn
  >>> model = nn.Dense(3)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> from lora_jax import LoraSpec, init
  >>> adapters = init(jax.random.key(1), variables, LoraSpec("params/kernel", rank=2))
  >>> y = wrap(model.apply)(variables, adapters, jnp.ones((2, 4)))
  >>> bool(jnp.allclose(y, model.apply(variables, jnp.ones((2, 4)))))  # b = 0 at init
  True
  """
  if mode not in ("factored", "merged"):
    raise ValueError(f"wrap(mode={mode!r}): expected 'factored' or 'merged'.")
  if fallback not in _FALLBACK_MODES:
    raise ValueError(f"wrap(fallback={fallback!r}): expected one of {_FALLBACK_MODES}.")
  if not isinstance(group, bool):
    raise TypeError(f"wrap(group={group!r}): expected True or False.")

  def run(static, params, adapters, dyn):
    if mode == "merged":
      args, kwargs = join_static(static, dyn)
      return apply_fn(merge(params, adapters), *args, **kwargs)
    out, report = _trace_and_run(apply_fn, fallback, params, adapters, static, dyn, group)
    if fallback == "warn":
      _warn(report)
    return out

  jitted = jax.jit(run, static_argnums=0)

  @functools.wraps(apply_fn)
  def lora_apply(params: PyTree, adapters: PyTree, *args: Any, **kwargs: Any) -> Any:
    for path, leaf, _ in check_adapters(params, adapters):
      if not (is_dynamic(leaf) or isinstance(leaf, (bool, int, float, complex))):
        raise TypeError(
            f"params[{path!r}] is a {type(leaf).__name__}, not an array: the params passed to "
            "a wrapped function are traced, so every leaf must be an array or a number. Move "
            "configuration out of the params tree (e.g. into a static argument)."
        )
    static, dyn = split_static((args, kwargs))
    try:
      hash(static)
    except TypeError:
      return run(static, params, adapters, dyn)
    return jitted(static, params, adapters, dyn)

  return lora_apply


def explain(apply_fn: Callable[..., Any], params: PyTree, adapters: PyTree, *args: Any, **kwargs: Any) -> Report:
  """Traces ``wrap(apply_fn)(params, adapters, *args, **kwargs)`` and reports, per adapted path,
  each use of the kernel: factored, or materialised and why; and adapted kernels never used.

  >>> import flax.linen as nn
  >>> from lora_jax import LoraSpec, init
  >>> model = nn.Dense(3)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> adapters = init(jax.random.key(1), variables, LoraSpec("params/kernel", rank=2))
  >>> print(explain(model.apply, variables, adapters, jnp.ones((2, 4))))
  path           use
  params/kernel  dot_general: factored
  1 factored use(s), 0 materialised, 0 unused
  """
  static, dyn = split_static((args, kwargs))
  dyn_abs = [None if d is None else jax.ShapeDtypeStruct(np.shape(d), d.dtype) for d in dyn]
  box = {}

  def go(params, adapters, dyn):
    out, box["report"] = _trace_and_run(apply_fn, "allow", params, adapters, static, dyn)
    return out

  jax.eval_shape(go, params, adapters, dyn_abs)
  return box["report"]


def remat_policy(base: Callable[..., Any] | None = None) -> Callable[..., Any]:
  """A ``jax.checkpoint`` policy that keeps each adapter's thin ``x @ a`` product.

  Under ``jax.checkpoint`` / ``nn.remat`` the backward pass recomputes what the policy does
  not save, including the first product of every factored matmul, which reads the whole
  input ``x`` again. This policy saves those products (``(..., r)``: tiny, in float32) on
  top of what ``base`` saves (``None``: nothing, i.e. ``nothing_saveable``). ``wrap`` names
  them ``THIN_PRODUCT_NAME`` with ``jax.ad_checkpoint.checkpoint_name``; without remat the
  name changes nothing.

  Args:
    base: another policy (e.g. ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``).

  Returns:
    The combined policy.

  >>> import flax.linen as nn
  >>> from lora_jax import LoraSpec, init
  >>> model = nn.remat(nn.Dense, policy=remat_policy())(3)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> adapters = init(jax.random.key(1), variables, LoraSpec("params/kernel", rank=2))
  >>> loss = lambda ad: wrap(model.apply)(variables, ad, jnp.ones((2, 4))).sum()
  >>> jax.grad(loss)(adapters)["params"]["kernel"].a.shape
  (4, 2)
  """
  if base is not None and not callable(base):
    raise TypeError(f"remat_policy(base={base!r}): expected a jax.checkpoint policy (a callable) or None.")
  keep = jax.checkpoint_policies.save_only_these_names(THIN_PRODUCT_NAME)
  return keep if base is None else jax.checkpoint_policies.save_from_both_policies(base, keep)


def from_nnx(module: Any, *filters: Any, method: str | Callable[..., Any] = "__call__"):
  """Turns an NNX module into ``(apply_fn, params, rest)`` for :func:`wrap`.

  ``params`` is the ``nnx.Param`` state (or the state selected by ``filters``); ``rest`` is
  everything else (batch stats, RNG state, ...). ``apply_fn(params, *args)`` rebuilds the
  module with ``nnx.merge`` and calls ``method``; it is pure (state updates inside are
  dropped). ``to_nnx(apply_fn, params)`` gives a module back, e.g. with merged params.

  >>> from flax import nnx
  >>> from lora_jax import LoraSpec, init, merge
  >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  >>> apply_fn, params, rest = from_nnx(layer)
  >>> adapters = init(jax.random.key(1), params, LoraSpec("kernel", rank=2))
  >>> wrap(apply_fn)(params, adapters, jnp.ones((2, 4))).shape
  (2, 3)
  """
  from flax import nnx

  graphdef, params, rest = nnx.split(module, *(filters or (nnx.Param,)), ...)

  def apply_fn(params, *args, **kwargs):
    m = nnx.merge(graphdef, params, rest)
    fn = getattr(m, method) if isinstance(method, str) else functools.partial(method, m)
    return fn(*args, **kwargs)

  apply_fn.graphdef = graphdef  # type: ignore[attr-defined]
  apply_fn.rest = rest  # type: ignore[attr-defined]
  return apply_fn, params, rest


def to_nnx(apply_fn: Callable[..., Any], params: PyTree) -> Any:
  """The NNX module for ``params`` (e.g. ``merge(params, adapters)``), from :func:`from_nnx`'s
  ``apply_fn``."""
  from flax import nnx

  return nnx.merge(apply_fn.graphdef, params, apply_fn.rest)
