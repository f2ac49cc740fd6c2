"""Reading kernels off a traced function: each kernel's ('l', 'i', 'o') layout and what it is used as.

:func:`trace_uses` traces ``apply_fn(params, *args, **kwargs)`` once (``jax.make_jaxpr``; nothing
is computed) and follows every floating-point params leaf with at least two axes through
*views* (casts, transposes, slices, unit reshapes, ``nn.scan``'s per-layer slicing, nested
``jit``/``remat``/custom-derivative calls, ``cond``, ``scan`` and ``while`` bodies) to the op
that consumes it:

* ``dot_general`` (Dense, DenseGeneral, Einsum, ``x @ W.T``, a tied ``Embed.attend``):
  contracted axes are fan-in ``'i'``, batch axes (a ``vmap``'d stack) leading ``'l'``,
  free axes fan-out ``'o'``;
* ``conv_general_dilated``: the output-feature axis is ``'o'``, every other axis ``'i'``,
  whatever the dimension order (linen HWIO, equinox/torch OIHW);
* ``gather`` of rows (an embedding lookup): the row axis is ``'i'``, the rest ``'o'``;
* an axis that ``scan`` slices is a leading axis ``'l'`` (a stacked layer axis).

It also finds the **output layer**: for each output of the function, the last kernel matmul
(or convolution) that every path from the function's inputs to that output passes through --
a vocabulary or classifier head whatever it is called, the tied ``attend`` of an embedding;
none when a residual connection bypasses the last matmul. Integer inputs (token ids, labels)
and scalars do not count as such paths where they meet real activations, so a loss over
``labels`` still has the head as its output layer.

The primitive-name tables are module-level frozensets so that the transform can share them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import tree_util as jtu
from jax.extend import core as jex

from lora_jax._jaxpr import join_static, open_jaxpr, scan_counts, split_static
from lora_jax.bases import is_base_leaf
from lora_jax._paths import leaves_with_paths
from lora_jax.interpret.core import CALL_PRIMITIVES as _WRAP_CALLS
from lora_jax.interpret.core import REMAT_PRIMITIVES as _WRAP_REMATS
from lora_jax.interpret.core import VIEW_PRIMITIVES as _WRAP_VIEWS
from lora_jax.interpret.sites import CONSUMERS as _WRAP_CONSUMERS

PyTree = Any

# One table of primitives with the transform (lora_jax.interpret). The trace follows a kernel
# through a few ops more than wrap factors through, because it only reads axes: a
# reduce_precision keeps the kernel's axes (wrap materialises there: rounding W + dW is not
# rounding W plus dW), and the body of a custom-derivative function or a shard_map shows how
# the kernel is used (wrap materialises there to keep the custom rule).
# Ops that give a view of a kernel (the same numbers, rearranged).
SAME_AXES_PRIMITIVES = frozenset({"convert_element_type", "copy", "copy_p", "slice", "dynamic_slice", "reduce_precision"})
VIEW_PRIMITIVES = _WRAP_VIEWS | {"reduce_precision"}
assert SAME_AXES_PRIMITIVES <= VIEW_PRIMITIVES
# Ops where a kernel is consumed as a weight / table, and what each reads it as.
CONSUMER_PRIMITIVES = frozenset(_WRAP_CONSUMERS)
MATMUL_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})
# Higher-order primitives whose one sub-jaxpr takes the equation's inputs and gives its outputs.
CALL_PRIMITIVES = _WRAP_CALLS | _WRAP_REMATS | {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "shard_map"}
BRANCH_PRIMITIVES = frozenset({"cond"})
LOOP_PRIMITIVES = frozenset({"scan", "while"})

# Where a value's data comes from (see the module docstring). ``None``: only params/constants.
_INDEX = "index"  # integer or scalar inputs (token ids, labels, masks, a temperature)
_INPUT = "input"  # activations not (only) produced by one kernel matmul
_MIXED = "mixed"  # several kernel matmuls, or a matmul and a bypass (a residual)


def _combine(doms: Sequence[Any], born: bool = False) -> Any:
  """The source of a value computed from values with sources ``doms``.

  ``born``: the op also reads a params-only value, so an index-only input becomes an
  activation (an embedding lookup, ``mask * W``).
  """
  ds = [d for d in doms if d is not None]
  if not ds:
    return None
  real = [d for d in ds if d != _INDEX]
  if not real:
    return _INPUT if born else _INDEX
  return real[0] if all(d == real[0] for d in real) else _MIXED


@dataclasses.dataclass(frozen=True)
class KernelUses:
  """What :func:`trace_uses` read off a function, by '/'-joined params path.

  Attributes:
    layouts: each kernel's layout (``'l'``/``'i'``/``'o'`` per axis) where every axis was read.
    uses: for each kernel, the consumer ops that read it as a weight (``dot_general``,
      ``conv_general_dilated`` with an activation on the other side) or as a lookup table
      (``gather``).
    reads: for each kernel, every other op that read a view of it (``mul``, ``while``, ...).
    output_layers: the kernels whose matmul (or convolution) produces an output of the
      function (see the module docstring).
    paths: every params path, in tree order.
  """

  layouts: Mapping[str, str]
  uses: Mapping[str, frozenset]
  reads: Mapping[str, frozenset]
  output_layers: frozenset
  paths: tuple

  @property
  def embeddings(self) -> frozenset:
    """Kernels read by a row lookup (``gather``)."""
    return frozenset(p for p, u in self.uses.items() if "gather" in u)

  def linear(self) -> list[str]:
    """The ``"all-linear"`` kernels: consumed by a ``dot_general`` as a weight, not
    embeddings, not an output layer; in tree order."""
    emb = self.embeddings
    return [
        p for p in self.paths
        if "dot_general" in self.uses.get(p, ()) and p not in emb and p not in self.output_layers
    ]

  def why_no_layout(self, path: str) -> str:
    """Why ``path`` has no inferred layout, for error messages."""
    uses, reads = sorted(self.uses.get(path, ())), sorted(self.reads.get(path, ()))
    if not uses and not reads:
      return "the function never reads this leaf"
    if not uses:
      return f"the function reads it only through {', '.join(f'`{r}`' for r in reads)}, not as a matmul, convolution or lookup operand"
    return f"its uses ({', '.join(f'`{u}`' for u in uses)}) do not say what every axis is"


def trace_uses(apply_fn: Callable[..., Any], params: PyTree, *args: Any, **kwargs: Any) -> KernelUses:
  """Traces ``apply_fn(params, *args, **kwargs)`` and reads how it uses each params leaf.

  ``params`` may be concrete or abstract (``jax.ShapeDtypeStruct`` leaves); so may the
  example arguments. Nothing is computed.

  >>> import flax.linen as nn
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, ids):
  ...     h = nn.Embed(10, 8, name="embed")(ids)
  ...     h = h + nn.DenseGeneral((2, 4), name="mix")(h).reshape(h.shape)
  ...     return nn.Dense(3, name="head")(h)
  >>> ids = jnp.zeros((1, 5), jnp.int32)
  >>> v = Net().init(jax.random.key(0), ids)
  >>> t = trace_uses(Net().apply, v, ids)
  >>> t.layouts["params/mix/kernel"], sorted(t.output_layers), t.linear()
  ('ioo', ['params/head/kernel'], ['params/mix/kernel'])
  """
  named = leaves_with_paths(params)
  static, dyn = split_static((args, kwargs))
  ptree = jtu.tree_structure(params, is_leaf=is_base_leaf)

  def flat_fn(leaves, dyn):
    a, kw = join_static(static, dyn)
    return apply_fn(jtu.tree_unflatten(ptree, leaves), *a, **kw)

  # A base leaf (a quantized kernel) is traced as the dense kernel it stands for.
  leaves = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if is_base_leaf(leaf) else leaf for _, leaf in named]
  closed = jax.make_jaxpr(flat_fn)(leaves, dyn)
  walker = _Walker([getattr(leaf, "ndim", 0) for leaf in leaves])
  views, doms = {}, {}
  invars = closed.jaxpr.invars
  for i, ((path, leaf), var) in enumerate(zip(named, invars)):
    if getattr(leaf, "ndim", 0) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating):
      views[var] = (i, tuple(range(leaf.ndim)))
  for var in invars[len(named):]:
    doms[var] = _input_source(var.aval)
  _, out_doms = walker.walk(closed.jaxpr, views, doms)

  paths = tuple(p for p, _ in named)
  layouts = {}
  for i, path in enumerate(paths):
    lab = walker.lookups.get(i) or walker.labels.get(i)
    if lab:
      # A unit axis that a view dropped before the consumer is fan-in (as the transform adds them).
      lab = [c or ("i" if leaves[i].shape[k] == 1 else None) for k, c in enumerate(lab)]
    if lab and all(lab) and "i" in lab and "o" in lab:
      layouts[path] = "".join(lab)
  heads = frozenset(paths[d[1]] for d in out_doms if isinstance(d, tuple))
  return KernelUses(
      layouts=layouts,
      uses={paths[i]: frozenset(u) for i, u in walker.uses.items()},
      reads={paths[i]: frozenset(r) for i, r in walker.reads.items()},
      output_layers=heads,
      paths=paths,
  )


def infer_layout(apply_fn: Callable[..., Any], params: PyTree, *args: Any, **kwargs: Any) -> dict[str, str]:
  """Layouts of the kernels of ``params`` as ``apply_fn(params, *args, **kwargs)`` uses them.

  Traces the function (nothing is computed) and follows each floating-point leaf with at
  least two axes to the matmul, convolution or lookup that consumes it: axes the matmul
  contracts are fan-in (``'i'``), its output axes fan-out (``'o'``), axes it batches over or
  that ``nn.scan`` slices are leading axes (``'l'``); a convolution's output-feature axis is
  fan-out and the rest fan-in; an embedding lookup's row axis is fan-in. Leaves whose use it
  cannot read are left out. ``lora_jax.init(rng, params, spec, apply_fn, *args)`` does this
  itself; the result also plugs into ``LoraSpec(layout=...)``.

  >>> import flax.linen as nn
  >>> model = nn.DenseGeneral((2, 3))
  >>> v = model.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> infer_layout(model.apply, v, jnp.ones((1, 4)))
  {'params/kernel': 'ioo'}
  """
  return dict(trace_uses(apply_fn, params, *args, **kwargs).layouts)


def _input_source(aval: Any) -> Any:
  dtype = getattr(aval, "dtype", None)
  if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return None  # an RNG key: random masks are not a data path
  if not jnp.issubdtype(dtype, jnp.inexact) or getattr(aval, "ndim", 0) == 0:
    return _INDEX
  return _INPUT


class _Walker:
  """Walks a jaxpr with, per variable, the kernel view it holds (``(leaf, axes)``: view axis
  ``k`` is kernel axis ``axes[k]``, ``None`` for an added axis) and its data source."""

  def __init__(self, ndims: list[int]):
    self.ndims = ndims
    self.labels: dict[int, list[str | None]] = {}
    self.lookups: dict[int, list[str | None]] = {}
    self.uses: dict[int, set[str]] = {}
    self.reads: dict[int, set[str]] = {}

  def _label(self, store, i, axis, label):
    lab = store.setdefault(i, [None] * self.ndims[i])
    if lab[axis] is None:
      lab[axis] = label

  def walk(self, jaxpr: jex.Jaxpr, views: dict, doms: dict) -> tuple[list, list]:
    """Walks ``jaxpr`` whose inputs hold ``views`` / ``doms``; returns both for its outputs."""
    views, doms = dict(views), dict(doms)
    for eqn in jaxpr.eqns:
      ins_v = [None if isinstance(v, jex.Literal) else views.get(v) for v in eqn.invars]
      ins_d = [None if isinstance(v, jex.Literal) else doms.get(v) for v in eqn.invars]
      out_v, out_d = self._eqn(eqn, ins_v, ins_d)
      for var, v, d in zip(eqn.outvars, out_v, out_d):
        if v is not None:
          views[var] = v
        if d is not None:
          doms[var] = d
    outs = jaxpr.outvars
    return (
        [None if isinstance(v, jex.Literal) else views.get(v) for v in outs],
        [None if isinstance(v, jex.Literal) else doms.get(v) for v in outs],
    )

  def _eqn(self, eqn, ins_v, ins_d) -> tuple[list, list]:
    name, p = eqn.primitive.name, eqn.params
    n_out = len(eqn.outvars)
    first = ins_v[0] if ins_v else None
    if name in VIEW_PRIMITIVES and first is not None:
      view = _view(name, p, first, eqn)
      if view is not None:
        return [view], [None]
    if name in CONSUMER_PRIMITIVES:
      return self._consumer(eqn, ins_v, ins_d)
    if name in LOOP_PRIMITIVES:
      return self._loop(name, p, ins_v, ins_d, n_out)
    if name in BRANCH_PRIMITIVES:
      outs = [self.walk(*_bind_sub(br, ins_v[1:], ins_d[1:])) for br in p["branches"]]
      return [None] * n_out, [_combine([o[1][k] for o in outs]) for k in range(n_out)]
    sub = _call_jaxpr(eqn)
    if sub is not None:
      return self.walk(*_bind_sub(sub, ins_v, ins_d))
    for info in ins_v:
      if info is not None:
        self.reads.setdefault(info[0], set()).add(name)
    return [None] * n_out, [_combine(ins_d, _born(eqn, ins_d))] * n_out

  def _consumer(self, eqn, ins_v, ins_d):
    name, p = eqn.primitive.name, eqn.params
    if name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      for info, c, b in ((ins_v[0], lc, lb), (ins_v[1], rc, rb)):
        if info is not None:
          i, axes = info
          for k, a in enumerate(axes):
            if a is not None:
              self._label(self.labels, i, a, "i" if k in c else "l" if k in b else "o")
      weight = [k for k in (0, 1) if ins_v[k] is not None and ins_d[1 - k] is not None]
      if len(weight) == 1 and ins_v[1 - weight[0]] is None:
        i = ins_v[weight[0]][0]
        self.uses.setdefault(i, set()).add(name)
        return [None], [("kernel", i)]
      return [None], [_combine(ins_d)]
    if name == "conv_general_dilated":
      info = ins_v[1]
      if info is not None:
        i, axes = info
        out_feat = p["dimension_numbers"].rhs_spec[0]
        for k, a in enumerate(axes):
          if a is not None:
            self._label(self.labels, i, a, "o" if k == out_feat else "i")
        if ins_v[0] is None and ins_d[0] is not None:
          self.uses.setdefault(i, set()).add(name)
          return [None], [("kernel", i)]
      return [None], [_combine(ins_d)]
    # gather: a row lookup in a table (an embedding), or a slice of a stacked kernel.
    info = ins_v[0]
    if info is not None:
      i, axes = info
      dn = p["dimension_numbers"]
      for k, a in enumerate(axes):
        if a is not None:
          self._label(self.lookups, i, a, "i" if k in dn.collapsed_slice_dims else "o")
      self.uses.setdefault(i, set()).add(name)
      return [None], [_INPUT if ins_d[1] is not None else None]
    return [None], [_combine(ins_d, _born(eqn, ins_d))]

  def _loop(self, name, p, ins_v, ins_d, n_out):
    """``scan`` (body inputs: consts, carry, xs) and ``while`` (cond consts, body consts, carry)."""
    if name == "scan":
      nc, ncar = scan_counts(p)
      body = p["jaxpr"]
      views, doms = list(ins_v), list(ins_d)
      for k in range(nc + ncar, len(views)):  # scanned over axis 0: a layer axis
        if views[k] is not None:
          i, axes = views[k]
          if axes[0] is not None:
            self._label(self.labels, i, axes[0], "l")
          views[k] = (i, axes[1:]) if len(axes) > 1 else None
    else:
      cn, nc = p["cond_nconsts"], p["body_nconsts"]
      body = p["body_jaxpr"]
      views, doms = list(ins_v[cn:]), list(ins_d[cn:])
      ncar = len(views) - nc
    for k in range(nc, nc + ncar):
      if views[k] is not None:  # a kernel carried through a loop is no longer a view of it
        self.reads.setdefault(views[k][0], set()).add(name)
        views[k] = None
    for _ in range(4):  # the carry's data source: iterate the body to a fixed point
      _, out_d = self.walk(*_bind_sub(body, views, doms))
      carry = [_combine([d, o]) for d, o in zip(doms[nc : nc + ncar], out_d[:ncar])]
      if carry == doms[nc : nc + ncar]:
        break
      doms[nc : nc + ncar] = carry
    return [None] * n_out, list(out_d)


def _is_float(v: Any) -> bool:
  dtype = getattr(getattr(v, "aval", None), "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _born(eqn, ins_d: Sequence[Any]) -> bool:
  """Whether an op turns index-only data into activations: a float result that also reads a
  float params-only value (``mask * W``, ``one_hot(ids) @ E``)."""
  return bool(eqn.outvars) and _is_float(eqn.outvars[0]) and any(
      d is None and not isinstance(v, jex.Literal) and _is_float(v) for v, d in zip(eqn.invars, ins_d)
  )


def _view(name: str, p: dict, info: tuple, eqn) -> tuple | None:
  i, axes = info
  if name in SAME_AXES_PRIMITIVES:
    return info
  if name == "transpose":
    return (i, tuple(axes[k] for k in p["permutation"]))
  if name == "squeeze":
    dims = {d % len(axes) for d in p["dimensions"]}
    return (i, tuple(a for k, a in enumerate(axes) if k not in dims))
  if name == "broadcast_in_dim":
    out = [None] * len(p["shape"])
    for k, d in enumerate(p["broadcast_dimensions"]):
      out[d] = axes[k]
    return (i, tuple(out))
  # reshape: only when it adds or removes unit axes (expand_dims / squeeze written as a reshape)
  if p.get("dimensions") is not None:
    return None
  old = tuple(eqn.invars[0].aval.shape)
  new = tuple(p["new_sizes"])
  kept = [a for a, n in zip(axes, old) if n != 1]
  if [n for n in old if n != 1] != [n for n in new if n != 1]:
    return None
  it = iter(kept)
  return (i, tuple(next(it) if n != 1 else None for n in new))


def _jaxprs(params: dict) -> Iterator[Any]:
  for value in params.values():
    for j in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(j, (jex.Jaxpr, jex.ClosedJaxpr)):
        yield j


def _call_jaxpr(eqn) -> Any:
  """The one sub-jaxpr of a call-like equation (inputs and outputs one to one), or None."""
  if eqn.primitive.name not in CALL_PRIMITIVES and not eqn.primitive.name.startswith("custom_"):
    return None
  for j in _jaxprs(eqn.params):
    inner, _ = open_jaxpr(j)
    if len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(eqn.outvars):
      return j
  return None


def _bind_sub(j: Any, ins_v: Sequence[Any], ins_d: Sequence[Any]) -> tuple[jex.Jaxpr, dict, dict]:
  inner, _ = open_jaxpr(j)
  vs = inner.invars[len(inner.invars) - len(ins_v):] if ins_v else []
  views = {v: info for v, info in zip(vs, ins_v) if info is not None}
  doms = {v: d for v, d in zip(vs, ins_d) if d is not None}
  return inner, views, doms


__all__ = [
    "BRANCH_PRIMITIVES",
    "CALL_PRIMITIVES",
    "CONSUMER_PRIMITIVES",
    "KernelUses",
    "LOOP_PRIMITIVES",
    "MATMUL_PRIMITIVES",
    "SAME_AXES_PRIMITIVES",
    "VIEW_PRIMITIVES",
    "infer_layout",
    "trace_uses",
]
