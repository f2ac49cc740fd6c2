"""A bank of LoRA adapters on one base: many adapters, and one of them per example of a batch.

:func:`stack` turns named adapter trees (each from :func:`lora_jax.init`, mirroring the same
params) into one tree of :class:`LoraBank` nodes: at each adapted kernel, the members' factors
stacked along a bank axis ``n`` (ranks zero-padded to the largest, which changes no member's
update), with each member's scale as a frozen leaf. A wrapped call given ``adapter_ids``
(:func:`lora_jax.wrap`) runs each example with its own member; see :mod:`lora_jax.mixed`.

Inside that call each example sees a :class:`BankRow`: the bank plus its own id. Where the
kernel meets a matmul, the row computes its term one of two ways, both exact:

* **dense**: one low-rank product over every member at once -- the bank's factors as one
  rank-``n*r`` pair ``[a_1 | ... | a_n]``, ``[b_1; ...; b_n]`` -- with the thin ``(..., n*r)``
  result weighted per rank column by ``scale_k`` for the example's member ``k`` and 0 for the
  others. The factors are shared by the whole batch, so under ``vmap`` both products stay one
  matmul over the batch, with no gather and no copy of any factor.
* **gather**: the example's member's factors (a gather of ``(a_k, b_k)``) and a batched
  matmul: the BGMV form of S-LoRA and Punica.

Dense reads the whole bank once and does ``n`` times the thin products' work; gather copies
one member per example. ``mode="auto"`` picks per use from the bank size, the batch and the
rows each example brings (decoding: dense unless the bank is much larger than the batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from lora_jax.kinds.base import Adapter, einsum_delta, is_adapter, is_adapter_or_none, kernel_labels, leaf_labels, register_kind
from lora_jax.kinds.lora import LoraFactors

Array = Any
PyTree = Any

BANK_MODES = ("auto", "dense", "gather")
MAX_NAME = 256


def _no_single(what: str) -> ValueError:
  return ValueError(
      f"a LoraBank holds several adapters, so it has no single {what}: take one member with "
      "lora_jax.unstack(bank)[name], or run a batch with adapter_ids= (lora_jax.wrap)."
  )


@register_kind
@dataclasses.dataclass(frozen=True)
class LoraBank(Adapter):
  """``n`` plain-LoRA adapters of one kernel, stacked along a bank axis.

  ``a`` has shape ``(*L, *I, n, r)`` and ``b`` ``(*L, n, r, *O)`` (roles ``'linr'`` and
  ``'lnro'``: the bank axis next to the rank, so ``[a_1 | ... | a_n]`` is a free reshape);
  ``scale`` ``(n,)`` is each member's scale, a frozen leaf (so a member can be replaced by one
  of another alpha without retracing). Static: ``names`` and each member's ``ranks`` (0 where
  a member does not adapt this kernel: its factors are zero) and ``rslora``. Ranks are padded
  with zeros to ``r``; the padded rows and columns get zero gradients, so they stay zero.

  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=2.0, layout="io")
  >>> bank = stack({"x": {"k": f}, "y": {"k": None}})["k"]
  >>> bank.names, bank.ranks, bank.a.shape, bank.b.shape
  (('x', 'y'), (1, 0), (3, 2, 1), (2, 1, 2))
  """

  KIND = "lora_bank"
  ROLES = {"a": "linr", "b": "lnro", "scale": "n"}
  TRAINABLE = frozenset({"a", "b"})
  LORA_PLUS_FAST = frozenset({"b"})
  GROUP_LEAF = None

  a: Array
  b: Array
  scale: Array
  layout: str
  names: tuple[str, ...]
  ranks: tuple[int, ...]
  rslora: tuple[bool, ...] = ()
  dropout: float = 0.0
  # Each member's scale as given (a Python float), so that unstack gives it back exactly
  # while the leaf still holds it (rounded to float32); a hot swap changes only the leaf.
  scales: tuple[float, ...] = dataclasses.field(default=(), repr=False)

  @property
  def size(self) -> int:
    return len(self.names)

  def delta(self, dtype: Any = None) -> Array:
    raise _no_single("update")

  def merge(self, w: Array) -> Array:
    raise _no_single("merge")

  unmerge = merge

  def contribute(self, site: Any) -> Array:
    raise ValueError(
        f"{site.path!r} is adapted by a bank of {self.size} adapters {list(self.names)[:4]}: "
        "pass adapter_ids= (one id per example, -1 for the base alone) to the wrapped call."
    )

  @classmethod
  def init(cls, key: Array, target: Any, dtype: Any, w: Array | None = None):
    raise ValueError(f"{target.path!r}: a bank is not initialised; make one with lora_jax.stack({{name: adapters}}).")

  def member(self, k: int) -> LoraFactors | None:
    """Member ``k`` as plain LoRA factors at its own rank (None where it has none); needs a
    concrete ``scale``."""
    if not self.ranks[k]:
      return None
    try:
      s = float(np.asarray(self.scale[k]))
    except jax.errors.ConcretizationTypeError:
      raise ValueError("lora_jax.unstack needs a concrete bank (call it outside jit).") from None
    if self.scales and np.float32(self.scales[k]) == np.float32(s):
      s = self.scales[k]
    nl = self.layout.count("l")
    r = self.ranks[k]
    a = jnp.take(self.a, k, axis=self.a.ndim - 2)[..., :r]
    b = jax.lax.slice_in_dim(jnp.take(self.b, k, axis=nl), 0, r, axis=nl)
    rs = self.rslora[k] if self.rslora else False
    return LoraFactors(a=a, b=b, scale=s, layout=self.layout, rslora=rs, dropout=self.dropout)

  def row(self, i: Array, batch: int, mode: str) -> "BankRow":
    """The bank as example ``i`` of a batch of ``batch`` examples sees it (inside ``vmap``)."""
    return BankRow(a=self.a, b=self.b, scale=self.scale, id=jnp.asarray(i, jnp.int32), layout=self.layout,
                   batch=batch, mode=mode, dropout=self.dropout)


@register_kind
@dataclasses.dataclass(frozen=True)
class BankRow(Adapter):
  """One example's view of a :class:`LoraBank` (made by :meth:`LoraBank.row` inside a mixed
  call): the bank's leaves, shared by the batch, and the example's member id (a scalar leaf;
  ``-1`` = no adapter; an id out of range gives NaN, never another member's result)."""

  KIND = "lora_bank_row"
  ROLES = {"a": "linr", "b": "lnro", "scale": "n", "id": ""}
  TRAINABLE = frozenset({"a", "b"})
  LORA_PLUS_FAST = frozenset({"b"})
  GROUP_LEAF = None

  a: Array
  b: Array
  scale: Array
  id: Array
  layout: str
  batch: int = 1
  mode: str = "auto"
  dropout: float = 0.0

  @property
  def rank(self) -> int:
    return int(np.shape(self.a)[-1])

  def _member_scale(self) -> Array:
    """``scale[id]``, 0 for ``id == -1``, NaN for an id out of range."""
    n = np.shape(self.scale)[0]
    s = jnp.take(self.scale, jnp.clip(self.id, 0, n - 1)).astype(jnp.float32)
    s = jnp.where(self.id >= 0, s, 0.0)
    return jnp.where((self.id >= -1) & (self.id < n), s, jnp.nan)

  def dense_factors(self) -> tuple[Array, Array, Array]:
    """``(a, b, w)``: the whole bank as one rank-``n*r`` pair and the per-column weights
    (``scale_k`` on member ``k``'s columns, 0 elsewhere)."""
    n, r = np.shape(self.a)[-2:]
    nl = self.layout.count("l")
    a = jnp.reshape(self.a, (*np.shape(self.a)[:-2], n * r))
    bs = np.shape(self.b)
    b = jnp.reshape(self.b, (*bs[:nl], n * r, *bs[nl + 2 :]))
    s = self._member_scale()
    w = jnp.where(jnp.isnan(s), jnp.nan, jnp.where(jnp.arange(n) == self.id, s, 0.0))
    return a, b, jnp.repeat(w, r)

  def gathered_factors(self) -> tuple[Array, Array, Array]:
    """``(a_k, b_k, w)`` of the example's member ``k`` (a gather) and its scale per column."""
    n, r = np.shape(self.a)[-2:]
    nl = self.layout.count("l")
    k = jnp.clip(self.id, 0, n - 1)
    a = jnp.take(self.a, k, axis=self.a.ndim - 2)
    b = jnp.take(self.b, k, axis=nl)
    return a, b, jnp.full((r,), self._member_scale())

  def use_dense(self, rows: int) -> bool:
    """Whether the dense form is cheaper for a use where each example brings ``rows`` rows:
    dense reads the bank once (``n`` members) and does ``n`` times the thin products' flops;
    gather writes and reads one member per example. A GPU does about 200 flops in the time it
    reads one parameter."""
    if self.mode != "auto":
      return self.mode == "dense"
    n, batch = np.shape(self.scale)[0], max(self.batch, 1)
    work = batch * max(rows, 1) / 200.0  # flop time of one member's thin products, in reads
    return n * max(1.0, work) <= max(3.0 * batch, work)

  def delta(self, dtype: Any = None) -> Array:
    a, b, w = self.gathered_factors()
    d = einsum_delta(a * w.astype(a.dtype), leaf_labels("lir", self.layout), b, leaf_labels("lro", self.layout),
                     kernel_labels(self.layout), 1.0)
    return d if dtype is None else d.astype(dtype)

  def contribute(self, site: Any) -> Array:
    x = site.dropped(self.dropout)
    a, b, w = self.dense_factors() if self.use_dense(site.rows()) else self.gathered_factors()
    return site.base() + site.low_rank(a, b, w, x=x)

  @classmethod
  def init(cls, key: Array, target: Any, dtype: Any, w: Array | None = None):
    raise ValueError(f"{target.path!r}: a bank row is made by a mixed call, not initialised.")


# ----------------------------------------------------------------------------------------------
# Building, reading and editing banks
# ----------------------------------------------------------------------------------------------


def is_bank(x: Any) -> bool:
  return isinstance(x, LoraBank)


def _check_name(name: Any) -> str:
  if not isinstance(name, str) or not name or len(name) > MAX_NAME or not name.isprintable():
    raise ValueError(f"lora_jax.stack: adapter name {name!r} must be a non-empty printable string of at most {MAX_NAME} characters.")
  return name


def _members(adapters: Mapping[str, PyTree] | Sequence[PyTree]) -> tuple[tuple[str, ...], list[PyTree]]:
  if isinstance(adapters, Mapping):
    names = tuple(_check_name(k) for k in adapters)
    trees = list(adapters.values())
  elif isinstance(adapters, Sequence) and not isinstance(adapters, (str, bytes)):
    trees = list(adapters)
    names = tuple(str(k) for k in range(len(trees)))
  else:
    raise TypeError(f"lora_jax.stack: expected a mapping {{name: adapters}} or a list of adapter trees, got {type(adapters).__name__}.")
  if not trees:
    raise ValueError("lora_jax.stack: no adapters given.")
  return names, trees


def _path(p) -> str:
  return jtu.keystr(p, simple=True, separator="/")


def _flat(tree: PyTree, name: str):
  flat, treedef = jtu.tree_flatten_with_path(tree, is_leaf=is_adapter_or_none)
  for p, x in flat:
    if x is not None and not is_adapter(x):
      raise TypeError(f"lora_jax.stack: adapters {name!r} at {_path(p)!r} holds a {type(x).__name__}, not an adapter or None.")
  return flat, treedef


def _stack_one(path: str, names: Sequence[str], fs: Sequence[Adapter | None], dtype: Any = None) -> LoraBank | None:
  present = [(n, f) for n, f in zip(names, fs) if f is not None]
  if not present:
    return None
  for n, f in present:
    if type(f) is not LoraFactors:
      raise ValueError(
          f"lora_jax.stack: {path!r} of adapter {n!r} is a {type(f).__name__}; a bank holds plain LoRA "
          "factors (PEFT also refuses DoRA and other variants in mixed batches)."
      )
  n0, f0 = present[0]
  for n, f in present[1:]:
    if (f.layout, f.kernel_shape) != (f0.layout, f0.kernel_shape):
      raise ValueError(
          f"lora_jax.stack: {path!r} is a kernel {f0.kernel_shape} with layout {f0.layout!r} in adapter {n0!r} "
          f"but {f.kernel_shape} with layout {f.layout!r} in {n!r}: the adapters are for different params."
      )
    if f.dropout != f0.dropout:
      raise ValueError(f"lora_jax.stack: {path!r} has dropout {f0.dropout} in {n0!r} but {f.dropout} in {n!r}; a bank has one rate.")
    if f.base_digest != f0.base_digest:
      raise ValueError(
          f"lora_jax.stack: {path!r}: adapters {n0!r} and {n!r} belong to different base kernels (a PiSSA/OLoRA "
          "init changed the base of one): a bank shares one base."
      )
  r = max(f.rank for _, f in present)
  if dtype is None:
    dtype = jnp.result_type(*[f.a.dtype for _, f in present], *[f.b.dtype for _, f in present])
  a_shape, b_shape = f0.expected_shapes(f0.kernel_shape)["a"], f0.expected_shapes(f0.kernel_shape)["b"]
  nl = f0.layout.count("l")
  aa, bb, scales, ranks, rs = [], [], [], [], []
  for f in fs:
    if f is None:
      aa.append(jnp.zeros((*a_shape[:-1], r), dtype))
      bb.append(jnp.zeros((*b_shape[:nl], r, *b_shape[nl + 1 :]), dtype))
      scales.append(0.0)
      ranks.append(0)
      rs.append(False)
      continue
    pad = r - f.rank
    aa.append(jnp.pad(f.a.astype(dtype), [(0, 0)] * (f.a.ndim - 1) + [(0, pad)]))
    bw = [(0, 0)] * f.b.ndim
    bw[nl] = (0, pad)
    bb.append(jnp.pad(f.b.astype(dtype), bw))
    scales.append(f.scale)
    ranks.append(f.rank)
    rs.append(bool(f.rslora))
  return LoraBank(
      a=jnp.stack(aa, axis=-2), b=jnp.stack(bb, axis=nl), scale=jnp.asarray(scales, jnp.float32),
      layout=f0.layout, names=tuple(names), ranks=tuple(ranks), rslora=tuple(rs), dropout=f0.dropout,
      scales=tuple(float(s) for s in scales),
  )


def stack(adapters: Mapping[str, PyTree] | Sequence[PyTree], dtype: Any = None) -> PyTree:
  """Stacks several adapter trees on one base into a bank, for batches that mix them.

  Args:
    adapters: ``{name: adapters}`` (or a list; names are then ``"0"``, ``"1"``, ...), each a
      tree from :func:`lora_jax.init` mirroring the same params, of plain LoRA factors. They
      may adapt different kernels and have different ranks and scales.
    dtype: the bank's factor dtype (e.g. ``jnp.bfloat16`` to serve a bf16 model: a mixed call
      reads the bank at every step); default: the members' common dtype.

  Returns:
    The same tree with a :class:`LoraBank` at every kernel some member adapts. Pass it to a
    wrapped function with ``adapter_ids=`` (:func:`lora_jax.wrap`); member ``k`` of the ids is
    ``names.index(name)`` (:func:`bank_ids`).

  Raises:
    ValueError: the trees mirror different params (the first differing path is named), a
      kernel's layouts or shapes differ, a member is not plain LoRA (DoRA), or dropout rates
      or base digests differ at a kernel.

  >>> f = lambda s: LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=s, layout="io")
  >>> bank = stack({"x": {"k": f(1.0)}, "y": {"k": f(3.0)}})
  >>> bank["k"].scale
  Array([1., 3.], dtype=float32)
  """
  names, trees = _members(adapters)
  flats = [_flat(t, n) for n, t in zip(names, trees)]
  paths0 = [_path(p) for p, _ in flats[0][0]]
  for n, (flat, treedef) in zip(names[1:], flats[1:]):
    paths = [_path(p) for p, _ in flat]
    if treedef != flats[0][1] or paths != paths0:
      diff = sorted(set(paths) ^ set(paths0)) or [a for a, b in zip(paths0, paths) if a != b] or ["(the tree structure)"]
      raise ValueError(
          f"lora_jax.stack: adapters {n!r} and {names[0]!r} mirror different params (first difference at "
          f"{diff[0]!r}); members of a bank are adapters of one base."
      )
  banks = [
      _stack_one(path, names, [flat[j][1] for flat, _ in flats], dtype) for j, path in enumerate(paths0)
  ]
  if all(b is None for b in banks):
    raise ValueError(f"lora_jax.stack: none of the adapters {list(names)[:4]} adapts any kernel.")
  return jtu.tree_unflatten(flats[0][1], banks)


def _banks(bank: PyTree) -> list[tuple[str, LoraBank]]:
  flat, _ = jtu.tree_flatten_with_path(bank, is_leaf=is_adapter_or_none)
  return [(_path(p), x) for p, x in flat if is_bank(x)]


def bank_names(bank: PyTree) -> tuple[str, ...]:
  """The member names of a bank tree (from :func:`stack`), in id order.

  Raises:
    ValueError: the tree holds no bank, or banks with different members.
  """
  found = _banks(bank)
  if not found:
    raise ValueError("lora_jax.bank_names: the tree holds no LoraBank (make one with lora_jax.stack).")
  path0, b0 = found[0]
  for path, b in found[1:]:
    if b.names != b0.names:
      raise ValueError(f"bank at {path!r} has members {list(b.names)[:4]}, but the one at {path0!r} has {list(b0.names)[:4]}.")
  return b0.names


def bank_ids(bank: PyTree, names: Sequence[str | None]) -> np.ndarray:
  """Member ids for a batch, one per example: ``None`` (or ``-1``) is the base alone.

  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=1.0, layout="io")
  >>> bank_ids(stack({"x": {"k": f}, "y": {"k": f}}), ["y", None, "x"])
  array([ 1, -1,  0], dtype=int32)
  """
  members = bank_names(bank)
  out = []
  for j, nm in enumerate(names):
    if nm is None or (isinstance(nm, (int, np.integer)) and not isinstance(nm, bool) and nm == -1):
      out.append(-1)
    elif isinstance(nm, str) and nm in members:
      out.append(members.index(nm))
    elif isinstance(nm, (int, np.integer)) and not isinstance(nm, bool) and 0 <= nm < len(members):
      out.append(int(nm))
    else:
      raise ValueError(f"adapter_ids[{j}] = {nm!r} is not a member of the bank {list(members)[:8]} (or None / -1 for the base alone).")
  return np.asarray(out, np.int32)


def unstack(bank: PyTree) -> dict[str, PyTree]:
  """The members of a bank as ``{name: adapters}``, each at its own rank and scale: the
  inverse of :func:`stack` (exact). Call outside ``jit``.

  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=2.0, layout="io")
  >>> unstack(stack({"x": {"k": f}}))["x"]["k"].scale
  2.0
  """
  names = bank_names(bank)
  out = {}
  for k, nm in enumerate(names):
    out[nm] = jax.tree.map(lambda x, k=k: x.member(k) if is_bank(x) else x, bank, is_leaf=is_adapter_or_none)
  return out


def replace_adapter(bank: PyTree, name: str, adapters: PyTree) -> PyTree:
  """The bank with member ``name`` replaced by ``adapters`` of the same ranks and layouts (a
  hot swap): the result has the bank's tree structure, so a jitted call that took the old
  bank runs the new one without recompiling. The scale may differ (it is a leaf).

  Raises:
    ValueError: ``name`` is not a member, or ``adapters`` adapts other kernels or other ranks
      than the member it replaces (restack with :func:`stack` to change those).
  """
  names = bank_names(bank)
  if name not in names:
    raise ValueError(f"lora_jax.replace_adapter: {name!r} is not a member of the bank {list(names)[:8]}.")
  k = names.index(name)
  flat_b, treedef = jtu.tree_flatten_with_path(bank, is_leaf=is_adapter_or_none)
  flat_a, _ = _flat(adapters, name)
  pa = {_path(p): x for p, x in flat_a}
  if sorted(pa) != sorted(_path(p) for p, _ in flat_b):
    raise ValueError(f"lora_jax.replace_adapter: the adapters for {name!r} mirror other params than the bank.")
  out = []
  for p, bk in flat_b:
    path, f = _path(p), pa[_path(p)]
    if not is_bank(bk):
      if f is not None:
        raise ValueError(f"lora_jax.replace_adapter: {path!r} has no bank, but {name!r} now adapts it; restack with lora_jax.stack.")
      out.append(bk)
      continue
    want = bk.ranks[k]
    got = 0 if f is None else f.rank
    if got != want or (f is not None and (type(f) is not LoraFactors or f.layout != bk.layout or f.kernel_shape != bk.kernel_shape)):
      raise ValueError(
          f"lora_jax.replace_adapter: {path!r} of {name!r} has rank {want} (layout {bk.layout!r}, kernel "
          f"{bk.kernel_shape}) in the bank but the new adapters give {got if f is None else (type(f).__name__, got, f.layout, f.kernel_shape)}; "
          "restack with lora_jax.stack to change ranks."
      )
    if f is None:
      out.append(bk)
      continue
    new = _stack_one(path, (name,), [f])
    r, nl = bk.rank, bk.layout.count("l")
    a_k = jnp.pad(new.a[..., 0, :], [(0, 0)] * (new.a.ndim - 2) + [(0, r - want)]).astype(bk.a.dtype)
    b_k = jnp.take(new.b, 0, axis=nl)
    bw = [(0, 0)] * b_k.ndim
    bw[nl] = (0, r - want)
    b_k = jnp.pad(b_k, bw).astype(bk.b.dtype)
    out.append(bk.replace(
        a=bk.a.at[..., k, :].set(a_k),
        b=jnp.moveaxis(jnp.moveaxis(bk.b, nl, 0).at[k].set(b_k), 0, nl),
        scale=bk.scale.at[k].set(jnp.float32(f.scale)),
    ))
  return jtu.tree_unflatten(treedef, out)


def rows_of(adapters: PyTree, i: Array, batch: int, mode: str) -> PyTree:
  """The adapters as example ``i`` sees them: each bank becomes its :class:`BankRow`."""
  return jax.tree.map(lambda x: x.row(i, batch, mode) if is_bank(x) else x, adapters, is_leaf=is_adapter_or_none)


__all__ = [
    "BANK_MODES", "BankRow", "LoraBank", "bank_ids", "bank_names", "is_bank", "replace_adapter", "rows_of", "stack", "unstack",
]
