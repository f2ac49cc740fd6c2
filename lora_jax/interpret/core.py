"""The interpreter: evaluates a jaxpr equation by equation, with adapted kernels as views.

Kind-agnostic: structural ops go to :mod:`lora_jax.interpret.views`, consumers to
:mod:`lora_jax.interpret.sites` (which ask the adapter's kind for its contribution), and
higher-order primitives are re-expressed through public APIs with the interpreter inside:
``lax.scan``, ``lax.switch``, ``jax.checkpoint`` (same policy); nested ``jit`` is inlined. No
private ``Trace`` class is subclassed. Adapted matmuls that read one input share one thin
matmul (for kinds that declare a ``GROUP_LEAF``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex

from lora_jax._jaxpr import open_jaxpr, scan_counts, varying_axes
from lora_jax.bases import BaseLeaf
from lora_jax.interpret.report import Ctx
from lora_jax.interpret.sites import CONSUMERS, DotSite, base_product, bind, grouped_first_products, rule_dot
from lora_jax.interpret.views import STRUCTURAL, View, drop_label, relabel_after_drop, rule_dynamic_slice

Array = Any

# Primitives that change only a kernel's view (shared with lora_jax.layout's walker):
VIEW_PRIMITIVES = frozenset(STRUCTURAL) | {"dynamic_slice"}
# Calls whose body is evaluated in place / re-expressed with the interpreter inside:
CALL_PRIMITIVES = frozenset({"pjit", "jit", "closed_call", "core_call"})
REMAT_PRIMITIVES = frozenset({"remat2", "checkpoint", "remat"})
# Ops that may run ahead of their place in the jaxpr to expose a kernel view to a grouped
# matmul: pure, cheap, and they never consume a non-kernel value that is not yet computed.
_AHEAD = VIEW_PRIMITIVES


def finalize(ctx: Ctx, outs):
  return [ctx.materialize(v, "output", "the kernel itself is returned") if isinstance(v, View) else v for v in outs]


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


def evaluate(ctx: Ctx, jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
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
    if not any(isinstance(x, View) for x in invals):
      out = bind(eqn, invals)
    elif k in firsts:
      out = rule_dot(ctx, eqn, *invals, first=firsts.pop(k))
    else:
      out = apply_rule(ctx, eqn, invals)
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

  def site_at(k: int, invals) -> DotSite | None:
    if [isinstance(x, View) for x in invals].count(True) != 1:
      return None
    site = DotSite(ctx, jaxpr.eqns[k], *invals)
    return site if site.group_key() is not None else None

  def group_first_products(k: int) -> None:
    eqn = jaxpr.eqns[k]
    invals = [read(v) for v in eqn.invars]
    head = site_at(k, invals)
    if head is None:
      return
    pos_x = [isinstance(x, View) for x in invals].index(False)
    members, sites = [k], [head]
    for j, pos in groups[k]:
      if j <= k or j in done or pos != pos_x or not ahead(jaxpr.eqns[j].invars[1 - pos]):
        continue
      kernel = read(jaxpr.eqns[j].invars[1 - pos])
      if not isinstance(kernel, View):
        continue
      x = read(jaxpr.eqns[j].invars[pos])
      site = site_at(j, [x, kernel] if pos == 0 else [kernel, x])
      if site is not None and site.group_key() == head.group_key():
        members.append(j)
        sites.append(site)
    if len(members) > 1:
      ctx.grouped.append([s.path for s in sites])
      firsts.update(zip(members, grouped_first_products(sites)))

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


def _frozen_use(ctx: Ctx, eqn, invals):
  """A use of frozen base-leaf views (no adapter) by a non-structural op: a matmul or
  convolution with one such operand computes through :func:`base_product`; otherwise the
  views become their (dequantized) values. Returns the op's result, or the new invals when
  an adapted view remains for the usual rules."""
  views = [x for x in invals if isinstance(x, View)]
  name = eqn.primitive.name
  if len(views) == 1 and name in ("dot_general", "conv_general_dilated"):
    pos = [isinstance(x, View) for x in invals].index(True)
    return base_product(views[0], eqn, invals[1 - pos], pos == 0, ctx.per_example), None
  invals = [x.view_value() if isinstance(x, View) and x.frozen else x for x in invals]
  if any(isinstance(x, View) for x in invals):
    return None, invals
  return bind(eqn, invals), None


def apply_rule(ctx: Ctx, eqn, invals):
  name = eqn.primitive.name
  first = invals[0]
  if name not in _HIGHER and any(isinstance(x, View) and x.frozen for x in invals):
    if not (name in VIEW_PRIMITIVES and isinstance(first, View) and not any(isinstance(x, View) for x in invals[1:])):
      out, invals = _frozen_use(ctx, eqn, invals)
      if invals is None:
        return out
      first = invals[0]
  if name in STRUCTURAL and isinstance(first, View) and len(invals) == 1:
    out = STRUCTURAL[name](eqn, first)
    if out is not None:
      return out
    return bind(eqn, [ctx.materialize(first, name, f"`{name}` reshapes the kernel across factor axes")])
  if name in ("pvary", "pcast") and any(isinstance(x, View) for x in invals):
    return _rule_pvary(eqn, invals)
  if name == "dynamic_slice" and isinstance(first, View) and not any(isinstance(x, View) for x in invals[1:]):
    return rule_dynamic_slice(eqn, first, *invals[1:])
  if name in CONSUMERS:
    return CONSUMERS[name](ctx, eqn, *invals)
  if name in _HIGHER:
    return _HIGHER[name](ctx, eqn, *invals)
  if name.startswith("custom_jvp") or name.startswith("custom_vjp"):
    reason = "the kernel enters a function with a custom derivative rule"
  else:
    reason = f"no factored rule for `{name}`"
  return bind(eqn, [ctx.materialize(x, name, reason) if isinstance(x, View) else x for x in invals])


def _rule_pvary(eqn, invals):
  """Inside ``shard_map``, ``pvary`` (``pcast`` to varying) marks a value as varying over more
  manual axes, a type change with no data movement: applied to a view it marks the base and
  every adapter leaf, each over the axes it does not vary over yet."""
  axes_key = "axes" if "axes" in eqn.params else None

  def mark(x):
    if axes_key is None:
      return eqn.primitive.bind(x, **eqn.params)
    have = varying_axes(x)
    axes = tuple(a for a in eqn.params[axes_key] if a not in have)
    if not axes:
      return x
    out = eqn.primitive.bind(x, **{**eqn.params, axes_key: axes})
    return out[0] if isinstance(out, (list, tuple)) else out

  outs = []
  for x in invals:
    if isinstance(x, View):
      outs.append(x.replace(base=jax.tree.map(mark, x.base), adapter=jax.tree.map(mark, x.adapter)))
    else:
      outs.append(mark(x))
  return outs if eqn.primitive.multiple_results else outs[0]


# ----------------------------------------------------------------------------------------------
# Higher-order primitives
# ----------------------------------------------------------------------------------------------


def _rule_inline(ctx, eqn, *invals):
  """Nested jit / closed_call / pjit: evaluate the inner jaxpr in place."""
  jaxpr, consts = open_jaxpr(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))
  return evaluate(ctx, jaxpr, consts, invals)


def _rule_checkpoint(ctx, eqn, *invals):
  p = eqn.params
  jaxpr, consts = open_jaxpr(p["jaxpr"])

  def body(*args):
    return finalize(ctx, evaluate(ctx, jaxpr, consts, args))

  fn = jax.checkpoint(body, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))
  return fn(*invals)


def _rule_cond(ctx, eqn, index, *ops):
  def make(br):
    jaxpr, consts = open_jaxpr(br)
    return lambda *args: finalize(ctx, evaluate(ctx, jaxpr, consts, args))

  return lax.switch(index, [make(br) for br in eqn.params["branches"]], *ops)


def _scanned(ctx, v: View):
  """How a view scanned over its axis 0 enters ``lax.scan``: the base view and the adapter
  leaves that carry axis 0's label are scanned (that axis moved first), the other leaves ride
  along as constants."""
  label = v.axes[0]
  if label[0] != "l" and not v.frozen:
    ctx.layout_note(v, f"scan slices the kernel along an axis marked {label[0]!r}, not 'l' (a layer axis)")
  scanned, const = {}, {}
  for name, x in v.adapter.leaves().items():
    k = v.leaf_axis(name, label)
    if k is None:
      const[name] = x
    else:
      scanned[name] = jnp.moveaxis(x, k, 0)
  # A base leaf (a quantized kernel) is scanned as its stored arrays, sliced per iteration,
  # so each layer is dequantized where it is used; with view ops before the scan (rare) it
  # is dequantized whole first.
  split = v.base.scan_split(0) if isinstance(v.base, BaseLeaf) and not v.ops else None
  if split is not None:
    parts, rebuild = split
    return (parts, scanned), (v, label, const, rebuild)
  return (v.base_value(), scanned), (v, label, const, None)


def _unscanned(meta, xs) -> View:
  v, label, const, rebuild = meta
  w, scanned = xs
  if rebuild is not None:
    w = rebuild(w)
  adapter = drop_label(v.adapter.replace(**scanned, **const), label, squeeze=False)
  return View(w, adapter, relabel_after_drop(v.axes, label), tuple(v.shape[1:]), v.dtype, v.path)


def _rule_scan(ctx, eqn, *invals):
  p = eqn.params
  nc, ncar = scan_counts(p)
  body_jaxpr, body_consts = open_jaxpr(p["jaxpr"])
  consts, init, xs = list(invals[:nc]), list(invals[nc : nc + ncar]), list(invals[nc + ncar :])
  init = [ctx.materialize(v, "scan", "the kernel is a scan carry") if isinstance(v, View) else v for v in init]
  xs_plain, xs_meta = [], []
  for v in xs:
    plain, meta = _scanned(ctx, v) if isinstance(v, View) else (v, None)
    xs_plain.append(plain)
    xs_meta.append(meta)

  counted = ctx.rng is not None  # dropout masks differ per iteration: the index rides along
  if counted:
    xs_plain.append(jnp.arange(p["length"], dtype=jnp.uint32))

  def body(carry, x_slices):
    if counted:
      *x_slices, index = x_slices
      ctx.scan_index.append(index)
    rebuilt = [xv if meta is None else _unscanned(meta, xv) for meta, xv in zip(xs_meta, x_slices)]
    try:
      outs = finalize(ctx, evaluate(ctx, body_jaxpr, body_consts, [*consts, *carry, *rebuilt]))
    finally:
      if counted:
        ctx.scan_index.pop()
    return outs[:ncar], outs[ncar:]

  carry, ys = lax.scan(body, init, xs_plain, length=p["length"], reverse=p["reverse"], unroll=p.get("unroll", 1))
  return [*carry, *ys]


def _spec_entries(spec: Any, ndim: int) -> list[Any]:
  return (list(spec) + [None] * ndim)[:ndim]


def _rule_shard_map(ctx, eqn, *invals):
  """``shard_map``: re-expressed through the public API. A kernel view enters as its shard of
  the base plus its adapter leaves as extra inputs, each leaf axis that carries a kernel axis's
  label sharded as that kernel axis (the rank and bank axes replicated), so each shard of
  ``a @ b`` is exactly that shard of the update; the body is evaluated with the interpreter.
  A view this cannot express (lazy view ops, a quantized base, an adapter whose kind declines
  these shards: :meth:`lora_jax.kinds.Adapter.shard_map_safe`) is materialised for the call,
  exactly."""
  p = eqn.params
  jaxpr, consts = open_jaxpr(p["jaxpr"])
  in_specs = p.get("in_specs")
  if in_specs is None or "out_specs" not in p:  # an older shard_map: in_names / out_names
    return bind(eqn, [ctx.materialize(x, "shard_map", "an older shard_map signature") if isinstance(x, View) else x for x in invals])
  tracked = bool(p.get("check_vma", p.get("check_rep", False)))
  args, specs, metas = [], [], []
  for x, spec in zip(invals, in_specs):
    meta = None
    if isinstance(x, View):
      entries = _spec_entries(spec, len(x.shape))
      split = frozenset(lab[0] for lab, e in zip(x.axes, entries) if e is not None)
      if x.ops or isinstance(x.base, BaseLeaf) or not x.adapter.shard_map_safe(split, tracked):
        x = ctx.materialize(x, "shard_map", "the kernel enters shard_map in a form whose shards cannot be derived")
      else:
        leaves = x.adapter.leaves()
        leaf_specs = {}
        for name, leaf in leaves.items():
          e = [None] * leaf.ndim
          for k, lab in enumerate(x.axes):
            j = x.leaf_axis(name, lab)
            if j is not None:
              e[j] = entries[k]
          leaf_specs[name] = jax.sharding.PartitionSpec(*e)
        meta = (x, list(leaves))
        args.append(x.base)
        specs.append(spec)
        for name in leaves:
          args.append(leaves[name])
          specs.append(leaf_specs[name])
        metas.append(meta)
        continue
    args.append(x)
    specs.append(spec)
    metas.append(None)

  def body(*flat):
    flat = list(flat)
    rebuilt = []
    for meta in metas:
      if meta is None:
        rebuilt.append(flat.pop(0))
        continue
      v, names = meta
      base = flat.pop(0)
      shards = {n: flat.pop(0) for n in names}
      rebuilt.append(View(base, v.adapter.replace(**shards), v.axes, tuple(base.shape), v.dtype, v.path))
    return tuple(finalize(ctx, evaluate(ctx, jaxpr, consts, rebuilt)))

  kw = {"check_vma": p["check_vma"]} if "check_vma" in p else {}
  manual = p.get("manual_axes", p.get("newly_manual_axes"))
  if manual is not None and frozenset(manual) != frozenset(p["mesh"].axis_names):
    kw["axis_names"] = set(manual)
  fn = jax.shard_map(body, mesh=p["mesh"], in_specs=tuple(specs), out_specs=tuple(p["out_specs"]), **kw)
  return list(fn(*args))


_HIGHER = {
    **{name: _rule_inline for name in CALL_PRIMITIVES},
    **{name: _rule_checkpoint for name in REMAT_PRIMITIVES},
    "cond": _rule_cond,
    "scan": _rule_scan,
    **({"shard_map": _rule_shard_map} if hasattr(jax, "shard_map") else {}),
}
