"""Consumer sites: where a kernel view meets a matmul, a convolution or a row lookup.

A site offers what an adapter kind needs to compute its contribution there
(``Adapter.contribute(site)``), without forming the adapted kernel:

* ``base()``: the original op on the frozen kernel's view, ``op(x, view(W))``;
* ``low_rank(a, b, scale)``: ``scale * op(x, view(a @ b))`` for factors laid out like
  plain LoRA's (``a``: roles ``'lir'``, ``b``: ``'lro'``, in the view's current labels),
  computed as two thin products; when ``a`` is the adapter's ``GROUP_LEAF`` the first product
  may come from a grouped matmul shared with other adapters reading the same input;
  ``scale`` is a number or a vector over the rank (one weight per rank column: a bank row's
  member mask times its scale);
* ``rows()``: how many rows the op brings to the kernel (for a kind's cost model);
* ``dropped(rate)``: the input with PEFT's dropout applied (``x`` itself when the call has no
  ``lora_dropout_rng`` or ``rate`` is 0); ``base(x)`` and ``low_rank(..., x=x)`` take it;
* ``can_scale_out(labels)`` / ``scale_out(y, v, labels)``: multiply an op result by ``v``, an
  array over kernel axes (e.g. roles ``'lo'``), along the output axes those kernel axes became
  (DoRA's rescale);
* ``materialized(reason)``: the op with the adapted kernel formed for this use (a fallback);
* ``x``, ``t`` (the view), ``primitive``, ``path``.

A consumer rule builds its site, asks :meth:`plan` whether the use can be computed factored,
and otherwise materialises (through the kind's ``merge``) for that use only.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from lora_jax.interpret.views import View
from lora_jax.kinds import leaf_labels

Array = Any
THIN_PRODUCT_NAME = "lora_jax.x_a"  # checkpoint_name of each factored matmul's x @ a product


def acc_dtype(dtype: Any) -> Any:
  """Accumulation dtype of a thin product: float32, or wider for wider inputs (float64)."""
  return jnp.promote_types(dtype, jnp.float32)


def bind(eqn, invals):
  prim = eqn.primitive
  got = prim.get_bind_params(eqn.params)
  subfuns, params = got if isinstance(got, tuple) else ((), got)  # JAX < 0.7 returned a pair
  mgr = getattr(getattr(eqn, "ctx", None), "manager", None)
  if mgr is None:
    return prim.bind(*subfuns, *invals, **params)
  with mgr:
    return prim.bind(*subfuns, *invals, **params)


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


def dropout(key: Array, x: Array, rate: float) -> Array:
  """Inverted dropout of ``x`` at ``rate``, drawn with XLA's RngBitGenerator (Philox on GPU)
  seeded from ``key``: one 16-bit draw per element instead of threefry's hash per element
  (which cost a LoRA step 18% at 1B). ``rate`` resolves to a multiple of 1/65536; kept
  elements are scaled by the inverse of the keep probability actually used, so the
  expected value is ``x`` exactly."""
  drop = int(round(float(rate) * 65536))
  seed = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
  keep = jax.random.bits(seed, jnp.shape(x), jnp.uint16) >= drop
  return jnp.where(keep, x * jnp.asarray(65536.0 / (65536 - drop), x.dtype), jnp.zeros((), x.dtype))


def fused_base_dot(t: View, eqn, x: Array, t_is_lhs: bool, per_example: bool = False) -> Array | None:
  """``x @ view(W)`` through the fused NF4 kernel (:mod:`lora_jax.bases.nf4_matmul`) where it
  applies: a plain ``x @ W`` (x's last axis against the kernel's first, no batch axes, no
  view ops) of a few rows on a GPU, 16-bit operands. None elsewhere (XLA's path), and in a
  mixed-adapter call (``per_example``: ``x`` is one example of a vmapped batch, and the
  kernel mapped over the batch would read the weights once per example)."""
  from lora_jax.bases import nf4_matmul
  from lora_jax.bases.quantized import QuantizedKernel

  if per_example or t.ops or t_is_lhs or not isinstance(t.base, QuantizedKernel) or x.dtype != t.dtype:
    return None
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if lb or rb or tuple(lc) != (x.ndim - 1,) or tuple(rc) != (0,) or x.dtype not in (jnp.bfloat16, jnp.float16):
    return None
  if not nf4_matmul.use_fused(t.base, int(np.prod(x.shape[:-1]))):
    return None
  return nf4_matmul.nf4_dot(x, t.base, eqn.outvars[0].aval.dtype)


def base_product(t: View, eqn, x: Array, t_is_lhs: bool, per_example: bool = False) -> Array:
  """The original ``dot_general`` / ``conv_general_dilated`` ``eqn`` on ``x`` and ``view(W)``:
  the fused NF4 kernel where it applies, else :meth:`View.with_base` (a base leaf is
  dequantized at the use)."""
  if eqn.primitive.name == "dot_general":
    fused = fused_base_dot(t, eqn, x, t_is_lhs, per_example)
    if fused is not None:
      return fused
  return t.with_base(lambda x, w: bind(eqn, [w, x] if t_is_lhs else [x, w]), x)


class Site:
  """Common part of the consumer sites."""

  primitive = ""

  def __init__(self, ctx, eqn, t: View, x: Array):
    self.ctx, self.eqn, self.t, self.x = ctx, eqn, t, x
    self.path = t.path
    self.out_dtype = eqn.outvars[0].aval.dtype
    self.fell_back = False

  def dropped(self, rate: float) -> Array:
    """``x`` with PEFT's ``lora_dropout`` applied: each element zeroed with probability
    ``rate``, the rest scaled by ``1 / (1 - rate)``; ``x`` itself without an rng or rate.
    The mask's key depends on the call's rng, the kernel's path, the use and the iteration
    of every enclosing ``scan``: independent per layer and per adapter, and the same when
    ``jax.checkpoint`` recomputes it."""
    if not rate or self.ctx.rng is None:
      return self.x
    return dropout(self.ctx.site_key(self.path), self.x, rate)

  def out_labels(self) -> list[Any] | None:
    """The label of each output axis (kernel labels where a kernel axis lands), or None."""
    return None

  def _kernel_positions(self, labels) -> list[int] | None:
    out = self.out_labels()
    if out is None:
      return None
    pos = []
    for lab in labels:
      mapped = self.map_label(lab)
      if mapped not in out:
        return None
      pos.append(out.index(mapped))
    return pos

  def map_label(self, lab):
    return lab

  def can_scale_out(self, labels) -> bool:
    return self._kernel_positions(labels) is not None

  def scale_out(self, y: Array, v: Array, labels) -> Array:
    """``y * v`` with ``v``'s axes (kernel ``labels``) placed on the output axes they became."""
    pos = self._kernel_positions(labels)
    order = np.argsort(pos)
    v = jnp.transpose(v, order) if len(pos) > 1 else v
    shape = [1] * y.ndim
    for k, p in enumerate(sorted(pos)):
      shape[p] = v.shape[k]
    return y * jnp.reshape(v, shape).astype(y.dtype)

  def _bind_with(self, w: Array) -> Array:
    raise NotImplementedError

  def materialized(self, reason: str) -> Array:
    """The op with ``view(W')`` formed for this use (the kind's ``merge``), recorded as a fallback."""
    self.fell_back = True
    return self._bind_with(self.ctx.materialize(self.t, self.primitive, reason))

  def group_leaf(self) -> Array | None:
    name = self.t.adapter.GROUP_LEAF
    return None if name is None else getattr(self.t.adapter, name)

  def _factors(self, a: Array, b: Array) -> tuple[Array, Array]:
    return a.astype(self.t.dtype), b.astype(self.t.dtype)

  def _scaled(self, tmp: Array, scale: Any, r_axis: int = -1) -> Array:
    """The thin product times the scale, in the op's dtype (never the full-size one). ``scale``
    is a number or a vector over the rank (a weight per rank column, e.g. a bank row's), which
    lands on ``tmp``'s rank axis ``r_axis``."""
    if np.ndim(scale) == 1:
      shape = [1] * tmp.ndim
      shape[r_axis] = np.shape(scale)[0]
      scale = jnp.reshape(scale, shape)
    return (tmp * scale).astype(self.t.dtype)

  def rows(self) -> int:
    """How many rows the op brings to the kernel: the size of ``x`` over one fan-in."""
    return max(int(np.prod(np.shape(self.x))) // max(self._fan_in_size(), 1), 1)

  def _fan_in_size(self) -> int:
    return 1


class DotSite(Site):
  """A ``dot_general`` with the kernel view as one operand.

  The first product contracts ``x`` with the factor that carries the contracted kernel axes
  (``a`` when the matmul contracts fan-in, ``b`` when it contracts fan-out, as a tied
  embedding head does); the second contracts the thin result over the rank. Labels name
  axes: ``('x', k)`` is axis ``k`` of ``x`` (kernel axes that meet it share the label),
  ``('t', v)`` a free kernel-view axis, ``'r'`` the rank axis.
  """

  primitive = "dot_general"

  def __init__(self, ctx, eqn, lhs, rhs, first=None):
    self.t_is_lhs = isinstance(lhs, View)
    t, x = (lhs, rhs) if self.t_is_lhs else (rhs, lhs)
    super().__init__(ctx, eqn, t, x)
    self.first_given = first
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    tc, xc, tb, xb = (lc, rc, lb, rb) if self.t_is_lhs else (rc, lc, rb, lb)
    self.precision = eqn.params.get("precision")
    self.why = ""
    roles_c = {t.axes[v][0] for v in tc}
    if any(t.axes[v][0] != "l" for v in tb):
      self.why = "a batch dimension of the matmul is not a leading (layer) axis of the kernel"
    elif len(roles_c) > 1 or roles_c == {"l"}:
      self.why = "the matmul contracts fan-in and fan-out axes of the kernel together"
    self.first = "o" if roles_c == {"o"} else "i"
    if not self.why:
      free_same = [v for v, (k, _) in enumerate(t.axes) if k == self.first and v not in tc and t.shape[v] != 1]
      if tc and free_same:
        ctx.layout_note(
            t,
            f"a matmul contracts kernel-view axes {list(tc)} but leaves axes {free_same}, also "
            f"marked {self.first!r}, free",
        )
      ctx.contracts(t, self.first)
    self.xl = [("x", k) for k in range(x.ndim)]
    vlab: list[Any] = [("t", v) for v in range(len(t.axes))]
    for v, k in zip(tc, xc):
      vlab[v] = self.xl[k]
    for v, k in zip(tb, xb):
      vlab[v] = self.xl[k]
    self.vlab = vlab
    self.by_label = {lab: vlab[v] for v, lab in enumerate(t.axes)}
    self.contract = [self.xl[k] for k in xc]
    self.batch = [self.xl[k] for k in xb]

  @property
  def ok(self) -> bool:
    return not self.why

  def labels_of(self, pattern_labels: Sequence[Any]) -> list[Any]:
    return [self.by_label.get(lab, "r" if lab == ("r",) else lab) for lab in pattern_labels]

  def base(self, x: Array | None = None) -> Array:
    return base_product(self.t, self.eqn, self.x if x is None else x, self.t_is_lhs, self.ctx.per_example)

  def _bind_with(self, w: Array, x: Array | None = None) -> Array:
    x = self.x if x is None else x
    return bind(self.eqn, [w, x] if self.t_is_lhs else [x, w])

  def map_label(self, lab):
    return self.by_label.get(lab, lab)

  def _fan_in_size(self) -> int:
    return int(np.prod([self.x.shape[k] for _, k in self.contract]))

  def out_labels(self) -> list[Any]:
    """The original op's output order: batch, lhs free, rhs free."""
    skip = set(self.contract) | set(self.batch)
    xfree = [c for c in self.xl if c not in skip]
    tfree = [self.vlab[v] for v in range(len(self.t.axes)) if self.vlab[v] not in skip]
    return self.batch + (tfree + xfree if self.t_is_lhs else xfree + tfree)

  def first_operand(self, a: Array, b: Array) -> tuple[Array, list, Array, list]:
    """``(f1, labels, f2, labels)``: the factors in the order the two products use them."""
    la = self.labels_of(leaf_labels("lir", self.t.adapter.layout))
    lb = self.labels_of(leaf_labels("lro", self.t.adapter.layout))
    a, b = self._factors(a, b)
    return (a, la, b, lb) if self.first == "i" else (b, lb, a, la)

  def first_product(self, f1: Array, l1: list, x: Array | None = None) -> tuple[Array, list]:
    x = self.x if x is None else x
    tmp, tl = _dot_by_labels(x, self.xl, f1, l1, self.contract, self.batch, self.precision, acc_dtype(self.t.dtype))
    # Named so that a remat policy can keep this thin (..., r) product (see remat_policy).
    return checkpoint_name(tmp, THIN_PRODUCT_NAME), tl

  def low_rank(self, a: Array, b: Array, scale: Any, x: Array | None = None) -> Array:
    f1, l1, f2, l2 = self.first_operand(a, b)
    given = x is None or x is self.x
    if given and self.first_given is not None and self.first == "i" and a is self.group_leaf():
      tmp, tl = self.first_given
    else:
      tmp, tl = self.first_product(f1, l1, None if given else x)
    tmp = self._scaled(tmp, scale, tl.index("r"))
    # Leading axes left free ride along as batch axes of the second product.
    batch2 = [c for c in tl if c != "r" and c in l2]
    out, ol = _dot_by_labels(tmp, tl, f2, l2, ["r"], batch2, self.precision, self.out_dtype)
    return jnp.transpose(out, [ol.index(c) for c in self.out_labels()])

  def group_operand(self) -> tuple[Array, list]:
    """The kind's group leaf (roles ``'lir'``) in the op's dtype, with its labels."""
    return self.group_leaf().astype(self.t.dtype), self.labels_of(leaf_labels("lir", self.t.adapter.layout))

  def group_key(self) -> tuple | None:
    """What two sites must share for their first products to be one matmul, or None."""
    if not self.ok or self.first != "i" or self.group_leaf() is None:
      return None
    if self.t.adapter.dropout and self.ctx.rng is not None:
      return None  # each adapter drops its own input (as PEFT's per-layer dropout modules do)
    f1, l1 = self.group_operand()
    if not all(lab == "r" or lab[0] == "x" for lab in l1):
      return None
    return (tuple(l1), f1.dtype, self.precision, tuple(n for lab, n in zip(l1, f1.shape) if lab != "r"))


def grouped_first_products(sites: Sequence[DotSite]) -> list[tuple[Array, list]]:
  """The first products of ``sites`` (same ``x``, same :meth:`DotSite.group_key`) as one
  matmul over their group leaves concatenated along the rank axis, split back per site."""
  firsts = [s.group_operand() for s in sites]
  l1 = firsts[0][1]
  r_axis = l1.index("r")
  f1 = jnp.concatenate([f for f, _ in firsts], axis=r_axis)
  tmp, tl = sites[0].first_product(f1, l1)
  sizes = [f.shape[r_axis] for f, _ in firsts]
  parts = jnp.split(tmp, np.cumsum(sizes)[:-1].tolist(), axis=tl.index("r"))
  return [(part, tl) for part in parts]


def _rows_times_b(site: Site, rows: Array, b: Array, scale: Any) -> Array:
  """``scale * rows @ b`` for ``rows`` of shape (..., r) and ``b`` of shape (r, out)."""
  rows = site._scaled(rows, scale)
  return lax.dot_general(rows, b.astype(site.t.dtype), (([rows.ndim - 1], [0]), ([], [])), preferred_element_type=site.out_dtype)


def _kernel_like(t: View, a: Array, axis: int) -> Array:
  """``a`` (roles 'ir') arranged like the kernel view, with view axis ``axis`` (fan-out)
  replaced by the rank axis."""
  labels = leaf_labels("lir", t.adapter.layout)
  order = [labels.index(t.axes[v]) if v != axis else len(labels) - 1 for v in range(len(t.axes))]
  return jnp.transpose(a, order)


class ConvSite(Site):
  """A ``conv_general_dilated`` with the kernel view as its filter: the first product is the
  same convolution with ``a`` (the fan-out axis replaced by the rank), the second a 1x1 map
  from rank to fan-out. Grouped convolutions (``feature_group_count = G``) tile ``a`` over
  the groups, so the first product has ``G * r`` channels."""

  primitive = "conv_general_dilated"

  def __init__(self, ctx, eqn, x, t):
    super().__init__(ctx, eqn, t, x)
    p = eqn.params
    dn = p["dimension_numbers"]
    self.out_feat, self.feat = dn.rhs_spec[0], dn.out_spec[1]
    self.groups = p["feature_group_count"]
    roles = [k for k, _ in t.axes]
    self.why = ""
    if roles[self.out_feat] != "o" or roles.count("o") != 1 or "l" in roles:
      self.why = "the conv's output-feature axis is not the kernel's only fan-out axis"
    elif p["batch_group_count"] != 1:
      self.why = "batch_group_count > 1 (a convolution's weight-gradient form)"
    self.merge_cheaper = ""
    if not self.why and self.groups > 1:
      cout, r = t.shape[self.out_feat], t.adapter.rank
      if self.groups * r > cout:
        self.merge_cheaper = (
            f"a grouped conv with {self.groups} groups: its factored form needs {self.groups} x r = "
            f"{self.groups * r} channels, more than the {cout} output channels, while its kernel "
            f"{tuple(t.shape)} is small"
        )

  def base(self, x: Array | None = None) -> Array:
    return base_product(self.t, self.eqn, self.x if x is None else x, False, self.ctx.per_example)

  def _fan_in_size(self) -> int:
    return int(self.x.shape[self.eqn.params["dimension_numbers"].lhs_spec[1]])

  def _bind_with(self, w: Array, x: Array | None = None) -> Array:
    return bind(self.eqn, [self.x if x is None else x, w])

  def out_labels(self) -> list[Any]:
    out = [None] * len(self.eqn.outvars[0].aval.shape)
    out[self.feat] = self.t.axes[self.out_feat]  # the kernel's fan-out label
    return out

  def low_rank(self, a: Array, b: Array, scale: Any, x: Array | None = None) -> Array:
    x = self.x if x is None else x
    a, b = self._factors(a, b)
    a_k = _kernel_like(self.t, a, self.out_feat)
    g = self.groups
    if g > 1:  # output channel j*r + k of group j uses a[..., k]
      a_k = jnp.concatenate([a_k] * g, axis=self.out_feat)
    p = self.eqn.params
    tmp = lax.conv_general_dilated_p.bind(x, a_k, **dict(p, preferred_element_type=acc_dtype(self.t.dtype)))
    tmp = jnp.moveaxis(tmp, self.feat, -1)
    if g == 1:
      delta = _rows_times_b(self, tmp, b, scale)
    else:
      r, cout = b.shape
      tmp = self._scaled(tmp.reshape(*tmp.shape[:-1], g, r), scale)
      bg = jnp.transpose(b.reshape(r, g, cout // g), (1, 0, 2))  # (g, r, cout/g)
      delta = lax.dot_general(tmp, bg, (([tmp.ndim - 1], [1]), ([tmp.ndim - 2], [0])), preferred_element_type=self.out_dtype)
      delta = jnp.moveaxis(delta, 0, -2).reshape(*tmp.shape[:-2], cout)
    return jnp.moveaxis(delta, -1, self.feat)


class GatherSite(Site):
  """A ``gather`` that selects whole rows of the kernel view (an embedding lookup): the rows
  of ``a`` are gathered the same way, then mapped from rank to fan-out. A lookup that also
  indexes the fan-out axis with a full-width slice (``weight[i]`` under ``vmap``) is the same
  lookup: its start index on that axis is clamped to 0 for the kernel and for ``a`` alike."""

  primitive = "gather"

  def __init__(self, ctx, eqn, t, idx):
    super().__init__(ctx, eqn, t, idx)
    dn = eqn.params["dimension_numbers"]
    self.dn = dn
    roles = [k for k, _ in t.axes]
    o_axes = [v for v, k in enumerate(roles) if k == "o"]
    collapsed = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    self.why = ""
    if "l" in roles or len(o_axes) != 1:
      self.why = "the kernel view has a leading axis or more than one fan-out axis"
    elif o_axes[0] in collapsed or eqn.params["slice_sizes"][o_axes[0]] != t.shape[o_axes[0]]:
      self.why = "the lookup slices the fan-out axis"
    self.ov = o_axes[0] if o_axes else None
    if not self.why:
      ctx.gathers(t)

  def base(self, x: Array | None = None) -> Array:
    return self._bind_with(self.t.view_value())

  def _bind_with(self, w: Array) -> Array:
    return bind(self.eqn, [w, self.x])

  def dropped(self, rate: float) -> Array:
    return self.x  # ids: PEFT's LoRA embedding applies no dropout

  def low_rank(self, a: Array, b: Array, scale: Any, x: Array | None = None) -> Array:
    a_k = _kernel_like(self.t, a, self.ov)
    sizes = list(self.eqn.params["slice_sizes"])
    sizes[self.ov] = a_k.shape[self.ov]
    rows = lax.gather_p.bind(a_k, self.x, **dict(self.eqn.params, slice_sizes=tuple(sizes)))
    # The r axis lands where the fan-out axis would: the offset dim of the kernel's axis ``ov``.
    offset_axes = [v for v in range(len(self.t.axes)) if v not in self.dn.collapsed_slice_dims]
    pos = self.dn.offset_dims[offset_axes.index(self.ov)]
    delta = _rows_times_b(self, jnp.moveaxis(rows, pos, -1), b, scale)
    return jnp.moveaxis(delta, -1, pos)


# ----------------------------------------------------------------------------------------------
# Consumer rules
# ----------------------------------------------------------------------------------------------


def _contribute(ctx, site: Site) -> Array:
  out = site.t.adapter.contribute(site)
  if not site.fell_back:
    ctx.factored(site.t, site.primitive)
  return out


def rule_dot(ctx, eqn, lhs, rhs, first=None):
  if isinstance(lhs, View) and isinstance(rhs, View):
    lhs = ctx.materialize(lhs, "dot_general", "both operands are adapted kernels")
  site = DotSite(ctx, eqn, lhs, rhs, first)
  if not site.ok:
    w = ctx.materialize(site.t, "dot_general", site.why)
    return bind(eqn, [w if v is site.t else v for v in (lhs, rhs)])
  return _contribute(ctx, site)


def rule_conv(ctx, eqn, x, t):
  if not isinstance(t, View) or isinstance(x, View):
    what = x if isinstance(x, View) else t
    w = ctx.materialize(what, "conv_general_dilated", "the adapted kernel is the conv's input")
    return bind(eqn, [w if v is what else v for v in (x, t)])
  site = ConvSite(ctx, eqn, x, t)
  if site.why:
    return bind(eqn, [x, ctx.materialize(t, site.primitive, site.why)])
  if site.merge_cheaper:
    return bind(eqn, [x, ctx.merged(t, site.primitive, site.merge_cheaper)])
  return _contribute(ctx, site)


def rule_gather(ctx, eqn, t, idx):
  if isinstance(idx, View) or not isinstance(t, View):
    what = idx if isinstance(idx, View) else t
    w = ctx.materialize(what, "gather", "the adapted kernel is used as gather indices")
    return bind(eqn, [w if v is what else v for v in (t, idx)])
  site = GatherSite(ctx, eqn, t, idx)
  if site.why:
    return bind(eqn, [ctx.materialize(t, "gather", site.why), idx])
  return _contribute(ctx, site)


CONSUMERS = {
    "dot_general": rule_dot,
    "conv_general_dilated": rule_conv,
    "gather": rule_gather,
}
