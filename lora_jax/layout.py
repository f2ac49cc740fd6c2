"""infer_layout(): read each kernel's ('l', 'i', 'o') axis layout off how a function uses it."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import tree_util as jtu
from jax.extend import core as jex

from lora_jax._jaxpr import join_static, open_jaxpr, scan_counts, split_static
from lora_jax._paths import leaves_with_paths

PyTree = Any

_SAME = {"convert_element_type", "copy", "copy_p", "slice", "dynamic_slice", "reduce_precision"}
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint", "remat"}


def infer_layout(apply_fn: Callable[..., Any], params: PyTree, *args: Any, **kwargs: Any) -> dict[str, str]:
  """Layouts of the kernels of ``params`` as ``apply_fn(params, *args, **kwargs)`` uses them.

  Traces the function (nothing is computed) and follows each floating-point leaf with at
  least two axes to the matmul, convolution or lookup that consumes it: axes the matmul
  contracts are fan-in (``'i'``), its output axes fan-out (``'o'``), axes it batches over or
  that ``nn.scan`` slices are leading axes (``'l'``); a convolution's output-feature axis is
  fan-out and the rest fan-in; an embedding lookup's row axis is fan-in. The result plugs
  into ``LoraSpec(layout=...)``. Leaves whose use it cannot read are left out (they get the
  default layout, or the one you give).

  >>> import flax.linen as nn
  >>> model = nn.DenseGeneral((2, 3))
  >>> v = model.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> infer_layout(model.apply, v, jnp.ones((1, 4)))
  {'params/kernel': 'ioo'}
  """

  named = leaves_with_paths(params)
  static, dyn = split_static((args, kwargs))
  ptree = jtu.tree_structure(params)

  def flat_fn(leaves, dyn):
    a, kw = join_static(static, dyn)
    return apply_fn(jtu.tree_unflatten(ptree, leaves), *a, **kw)

  closed = jax.make_jaxpr(flat_fn)(jax.tree.leaves(params), dyn)
  labels: dict[int, list[str | None]] = {}
  lookups: dict[int, list[str | None]] = {}
  env = {}
  for i, ((path, leaf), var) in enumerate(zip(named, closed.jaxpr.invars)):
    if getattr(leaf, "ndim", 0) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating):
      env[var] = (i, tuple(range(leaf.ndim)))
  _walk(closed.jaxpr, env, labels, lookups)
  out = {}
  for i, (path, leaf) in enumerate(named):
    lab = lookups.get(i) or labels.get(i)
    if lab and all(lab) and "i" in lab and "o" in lab:
      out[path] = "".join(lab)
  return out


def _set(store, i, ndim, axis, label):
  lab = store.setdefault(i, [None] * ndim)
  if lab[axis] is None:
    lab[axis] = label


def _walk(jaxpr: jex.Jaxpr, env: dict, labels: dict, lookups: dict, ndims: dict | None = None) -> None:
  ndims = ndims if ndims is not None else {}
  for var, (i, axes) in env.items():
    ndims.setdefault(i, len(axes))
  for eqn in jaxpr.eqns:
    ins = [env.get(v) if not isinstance(v, jex.Literal) else None for v in eqn.invars]
    if not any(ins):
      continue
    name, p = eqn.primitive.name, eqn.params
    first = ins[0]
    if name in _SAME and first is not None:
      env[eqn.outvars[0]] = first
    elif name == "transpose" and first is not None:
      env[eqn.outvars[0]] = (first[0], tuple(first[1][k] for k in p["permutation"]))
    elif name == "squeeze" and first is not None:
      dims = {d % len(first[1]) for d in p["dimensions"]}
      env[eqn.outvars[0]] = (first[0], tuple(a for k, a in enumerate(first[1]) if k not in dims))
    elif name == "broadcast_in_dim" and first is not None:
      axes = [None] * len(p["shape"])
      for k, d in enumerate(p["broadcast_dimensions"]):
        axes[d] = first[1][k]
      env[eqn.outvars[0]] = (first[0], tuple(axes))
    elif name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      for info, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
        if info is None:
          continue
        i, axes = info
        for k, a in enumerate(axes):
          if a is not None:
            _set(labels, i, ndims[i], a, "i" if k in c else "l" if k in b else "o")
    elif name == "conv_general_dilated" and ins[1] is not None:
      i, axes = ins[1]
      out_feat = p["dimension_numbers"].rhs_spec[0]
      for k, a in enumerate(axes):
        if a is not None:
          _set(labels, i, ndims[i], a, "o" if k == out_feat else "i")
    elif name == "gather" and first is not None:
      i, axes = first
      dn = p["dimension_numbers"]
      for k, a in enumerate(axes):
        if a is not None:
          _set(lookups, i, ndims[i], a, "i" if k in dn.collapsed_slice_dims else "o")
    elif name == "scan":
      nc, ncar = scan_counts(p)
      body, _ = open_jaxpr(p["jaxpr"])
      inner = {}
      for k, (v, info) in enumerate(zip(body.invars, ins)):
        if info is None:
          continue
        i, axes = info
        if k >= nc + ncar:  # scanned over axis 0
          if axes[0] is not None:
            _set(labels, i, ndims[i], axes[0], "l")
          axes = axes[1:]
        inner[v] = (i, axes)
      _walk(body, inner, labels, lookups, ndims)
    elif name in _CALLS or name == "cond" or name.startswith("custom_"):
      for sub in _subjaxprs(p):
        sub_ins = ins[1:] if name == "cond" else ins
        inner = {v: info for v, info in zip(sub.invars[-len(sub_ins):] if sub_ins else [], sub_ins) if info}
        _walk(sub, inner, labels, lookups, ndims)


def _subjaxprs(params: dict):
  for value in params.values():
    for j in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(j, "jaxpr", j)
      if isinstance(inner, jex.Jaxpr):
        yield inner
