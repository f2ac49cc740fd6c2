"""Pure functions over params and adapters: init / split / merge / unmerge / count."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._paths import align, path_str, tree_from_entries
from lora_jax.adapters_node import LoraFactors, factor_shapes, kernel_delta
from lora_jax.spec import LoraSpec, Target

Array = Any
PyTree = Any


def _init_factors(key: Array, t: Target, dtype: Any) -> LoraFactors:
  a_shape, b_shape = factor_shapes(t.shape, t.layout, t.rank)
  if t.is_embedding:
    # PEFT's embedding init: A (our a) zero, B (our b) standard normal.
    a = jnp.zeros(a_shape, dtype)
    b = jax.random.normal(key, b_shape, dtype)
  else:
    # PEFT's default: kaiming_uniform(a=sqrt(5)) on A, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(t.fan_in)
    a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    b = jnp.zeros(b_shape, dtype)
  return LoraFactors(a=a, b=b, scale=t.scale, layout=t.layout)


def init(rng: Array, params: PyTree, spec: LoraSpec) -> PyTree:
  """Fresh adapters for ``params``: a tree of the same structure holding a :class:`LoraFactors`
  at each targeted kernel and ``None`` elsewhere. ``b`` starts at zero (for embeddings ``a``
  does, as in PEFT), so the adapted model starts out equal to the base model.

  Args:
    rng: a PRNG key.
    params: any pytree of arrays (linen ``variables['params']``, an NNX ``State``, a dict).
    spec: which kernels to adapt and how.

  Returns:
    The adapters tree.

  Raises:
    ValueError / TypeError: see :meth:`LoraSpec.resolve`.

  >>> params = {"dense": {"kernel": jnp.ones((3, 5)), "bias": jnp.zeros(5)}}
  >>> ad = init(jax.random.key(0), params, LoraSpec(["dense"], rank=2))
  >>> ad["dense"]["kernel"].a.shape, ad["dense"]["kernel"].b.shape, ad["dense"]["bias"]
  ((3, 2), (2, 5), None)
  """
  targets = {t.path: t for t in spec.resolve(params)}
  keys = iter(jax.random.split(rng, max(len(targets), 1)))
  entries = []
  for path, leaf, _ in align(params, jax.tree.map(lambda _: None, params)):
    t = targets.get(path)
    entries.append(None if t is None else _init_factors(next(keys), t, spec.dtype or leaf.dtype))
  return tree_from_entries(params, entries)


def split(params: PyTree, spec: LoraSpec, rng: Array) -> tuple[PyTree, PyTree]:
  """``(frozen, adapters)``: the base params (unchanged, never trained) and fresh adapters.

  >>> frozen, ad = split({"w": {"kernel": jnp.ones((4, 4))}}, LoraSpec("w/kernel", rank=2), jax.random.key(0))
  >>> frozen["w"]["kernel"].shape, ad["w"]["kernel"].rank
  ((4, 4), 2)
  """
  return params, init(rng, params, spec)


def check_adapters(params: PyTree, adapters: PyTree) -> list[tuple[str, Any, LoraFactors | None]]:
  """Checks that ``adapters`` fit ``params`` (structure, factor shapes, dtypes).

  Returns:
    ``[(path, leaf, factors_or_None), ...]`` in tree order.

  Raises:
    ValueError: structure or shape mismatch, naming the path, expected and found shapes.
    TypeError: an adapted leaf that is not a floating-point array.
  """
  rows = align(params, adapters)
  for path, leaf, f in rows:
    if f is None:
      continue
    shape = getattr(leaf, "shape", None)
    if shape is None or not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
          f"{path!r}: adapters hold LoraFactors for a leaf of type "
          f"{getattr(leaf, 'dtype', type(leaf).__name__)}; only floating-point kernels can be adapted."
      )
    if len(f.layout) != len(shape):
      raise ValueError(
          f"{path!r}: adapter layout {f.layout!r} has {len(f.layout)} axes but the kernel has "
          f"shape {tuple(shape)}; these adapters were built for different params."
      )
    rank = f.a.shape[-1] if getattr(f.a, "ndim", 0) else -1
    want_a, want_b = factor_shapes(tuple(shape), f.layout, rank)
    if tuple(f.a.shape) != want_a or tuple(f.b.shape) != want_b:
      raise ValueError(
          f"{path!r}: kernel {tuple(shape)} (layout {f.layout!r}) expects factors a{want_a} and "
          f"b{want_b} for rank {rank}, found a{tuple(f.a.shape)} and b{tuple(f.b.shape)}; these "
          "adapters were built for different params."
      )
  return rows


def _apply_delta(params: PyTree, adapters: PyTree, sign: float) -> PyTree:
  entries = []
  for _, leaf, f in check_adapters(params, adapters):
    if f is None:
      entries.append(leaf)
    else:
      d = kernel_delta(f.a, f.b, sign * f.scale, f.layout)
      entries.append((leaf.astype(d.dtype) + d).astype(leaf.dtype))
  return tree_from_entries(params, entries)


def merge(params: PyTree, adapters: PyTree) -> PyTree:
  """Folds adapters into the kernels: ``W + scale * a @ b`` at every adapted leaf.

  The sum is formed in float32 (or wider) and cast back, so the result has exactly the
  structure, shapes and dtypes of ``params``: ready to save or to serve with the unchanged
  model code.

  >>> params = {"w": {"kernel": jnp.zeros((2, 2))}}
  >>> f = LoraFactors(a=jnp.ones((2, 1)), b=jnp.ones((1, 2)), scale=0.5, layout="io")
  >>> merge(params, {"w": {"kernel": f}})["w"]["kernel"]
  Array([[0.5, 0.5],
         [0.5, 0.5]], dtype=float32)
  """
  return _apply_delta(params, adapters, 1.0)


def unmerge(params: PyTree, adapters: PyTree) -> PyTree:
  """Inverse of :func:`merge`: subtracts ``scale * a @ b`` (exact up to rounding)."""
  return _apply_delta(params, adapters, -1.0)


@dataclasses.dataclass(frozen=True)
class LoraCount:
  """Parameter counts; ``print()`` it for a per-path table."""

  rows: tuple[tuple[str, tuple[int, ...], int, int], ...]  # path, kernel shape, rank, params
  trainable: int
  trainable_bytes: int
  base: int | None
  base_bytes: int | None

  @property
  def total(self) -> int | None:
    return None if self.base is None else self.base + self.trainable

  @property
  def fraction(self) -> float | None:
    return None if not self.total else self.trainable / self.total

  def __str__(self) -> str:
    width = max([len(r[0]) for r in self.rows] + [4])
    lines = [f"{'path':<{width}}  {'kernel':>18}  {'rank':>4}  {'lora params':>11}"]
    for path, shape, rank, n in self.rows:
      lines.append(f"{path:<{width}}  {str(shape):>18}  {rank:>4}  {n:>11,}")
    lines.append(f"trainable: {self.trainable:,} params ({_fmt_bytes(self.trainable_bytes)})")
    if self.base is not None:
      lines.append(
          f"base (frozen): {self.base:,} params ({_fmt_bytes(self.base_bytes)}); "
          f"trainable fraction: {100 * self.fraction:.4f}%"
      )
    return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024
  return f"{n} B"


def _nbytes(x: Any) -> int:
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def count(adapters: PyTree, params: PyTree | None = None) -> LoraCount:
  """Trainable (adapter) and frozen (base) parameter counts and bytes.

  >>> params = {"w": {"kernel": jnp.zeros((10, 10))}}
  >>> c = count(init(jax.random.key(0), params, LoraSpec("w/kernel", rank=2)), params)
  >>> c.trainable, c.base, round(c.fraction, 3)
  (40, 100, 0.286)
  """
  if params is not None:
    found = [(p, f) for p, _, f in check_adapters(params, adapters) if f is not None]
  else:
    flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: isinstance(x, LoraFactors))
    found = [(path_str(p), f) for p, f in flat if isinstance(f, LoraFactors)]
  rows = []
  for path, f in found:
    rows.append((path, f.kernel_shape, f.rank, int(np.prod(f.a.shape) + np.prod(f.b.shape))))
  trainable_bytes = sum(_nbytes(f.a) + _nbytes(f.b) for _, f in found)
  base = base_bytes = None
  if params is not None:
    leaves = [x for x in jax.tree.leaves(params) if hasattr(x, "shape")]
    base = sum(int(np.prod(x.shape)) for x in leaves)
    base_bytes = sum(_nbytes(x) for x in leaves)
  return LoraCount(tuple(rows), sum(r[3] for r in rows), trainable_bytes, base, base_bytes)
