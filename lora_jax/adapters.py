"""Pure functions over params and adapters: init / split / merge / unmerge / count."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.bases import dense, is_base_leaf
from lora_jax._paths import align, path_str, tree_from_entries
from lora_jax.kinds import Adapter, LoraFactors, is_adapter, is_adapter_or_none
from lora_jax.kinds.inits import changes_base
from lora_jax.layout import KernelUses, trace_uses
from lora_jax.spec import LoraSpec, Target

Array = Any
PyTree = Any


def init(
    rng: Array, params: PyTree, spec: LoraSpec, apply_fn: Callable[..., Any] | None = None,
    *example_args: Any, **example_kwargs: Any,
) -> PyTree:
  """Fresh adapters for ``params``: a tree of the same structure holding an adapter (a
  :class:`LoraFactors` by default) at each targeted kernel and ``None`` elsewhere. ``b``
  starts at zero (for embeddings ``a`` does, as in PEFT), so the adapted model starts out
  equal to the base model.

  Pass the function and an example input, as to ``model.init(rng, x)``: it is traced once
  (nothing is computed) and each targeted kernel's layout -- which axes are layers, fan-in
  and fan-out -- is read off how the function uses it, so ``nn.scan``/``vmap`` stacks get one
  adapter per layer, DenseGeneral/Einsum and ``(out, in)`` kernels get fan-in x fan-out
  factors, convolutions in any dimension order work; ``"all-linear"`` is decided from the
  trace (matmul weights, not embeddings, not the output layer).

  Args:
    rng: a PRNG key (``jax.random.key(0)``).
    params: any pytree of arrays (linen variables, an NNX ``State``, a dict, an equinox
      module, ...), the first argument of ``apply_fn``.
    spec: which kernels to adapt and how.
    apply_fn: the function that uses ``params``: ``apply_fn(params, *example_args,
      **example_kwargs)``. Without it, layouts come from ``spec.layout`` (a 2-D kernel
      defaults to ``'io'``; a kernel of more axes must be stated).
    *example_args, **example_kwargs: an example input (arrays or ``jax.ShapeDtypeStruct``;
      only shapes and dtypes matter).

  Returns:
    The adapters tree.

  Raises:
    TypeError: the arguments are in another order, or ``apply_fn`` is not callable.
    ValueError / TypeError: see :meth:`LoraSpec.resolve`.

  >>> import flax.linen as nn
  >>> model = nn.DenseGeneral((2, 3))
  >>> x = jnp.ones((1, 4))
  >>> variables = model.init(jax.random.key(0), x)
  >>> ad = init(jax.random.key(1), variables, LoraSpec(["params"], rank=2), model.apply, x)
  >>> f = ad["params"]["kernel"]
  >>> f.layout, f.a.shape, f.b.shape
  ('ioo', (4, 2), (2, 2, 3))
  >>> params = {"dense": {"kernel": jnp.ones((3, 5)), "bias": jnp.zeros(5)}}
  >>> ad = init(jax.random.key(0), params, LoraSpec(["dense"], rank=2))  # 2-D: 'io'
  >>> ad["dense"]["kernel"].a.shape, ad["dense"]["kernel"].b.shape, ad["dense"]["bias"]
  ((3, 2), (2, 5), None)
  """
  _check_arguments("init", rng, params, spec, apply_fn)
  if changes_base(spec.init):
    raise ValueError(
        f"lora_jax.init: LoraSpec(init={spec.init!r}) replaces each adapted kernel (by its "
        "residual W - scale * a @ b, or LoftQ's quantized kernel), so the adapters only fit the new base. Call "
        "base, adapters = lora_jax.split(rng, params, spec, ...) and train on that base."
    )
  return _init(rng, params, spec, _trace(apply_fn, params, example_args, example_kwargs))[1]


def split(
    rng: Array, params: PyTree, spec: LoraSpec, apply_fn: Callable[..., Any] | None = None,
    *example_args: Any, **example_kwargs: Any,
) -> tuple[PyTree, PyTree]:
  """``(frozen, adapters)``: the base params (unchanged, never trained) and
  ``init(rng, params, spec, apply_fn, *example_args, **example_kwargs)``.

  ``split(params, spec, rng)``, the order before 0.2, still works and warns
  (``DeprecationWarning``).

  >>> frozen, ad = split(jax.random.key(0), {"w": {"kernel": jnp.ones((4, 4))}}, LoraSpec("w/kernel", rank=2))
  >>> frozen["w"]["kernel"].shape, ad["w"]["kernel"].rank
  ((4, 4), 2)
  """
  if isinstance(params, LoraSpec) and _is_key(spec) and apply_fn is None and not example_args and not example_kwargs:
    warnings.warn(
        "lora_jax.split(params, spec, rng) is deprecated: call lora_jax.split(rng, params, spec) "
        "(the order of lora_jax.init and model.init), optionally followed by apply_fn and an "
        "example input.",
        DeprecationWarning,
        stacklevel=2,
    )
    rng, params, spec = spec, rng, params
  _check_arguments("split", rng, params, spec, apply_fn)
  return _init(rng, params, spec, _trace(apply_fn, params, example_args, example_kwargs))


def _init(rng: Array, params: PyTree, spec: LoraSpec, trace: KernelUses | None) -> tuple[PyTree, PyTree]:
  """``(base, adapters)``: the base is ``params`` with the kernels a base-changing init replaced."""
  targets = {t.path: t for t in spec.resolve(params, trace)}
  keys = iter(jax.random.split(rng, max(len(targets), 1)))
  entries, base, changed = [], [], False
  for path, leaf, _ in align(params, jax.tree.map(lambda _: None, params, is_leaf=is_base_leaf)):
    t = targets.get(path)
    if t is None:
      entries.append(None)
      base.append(leaf)
      continue
    if is_base_leaf(leaf) and t.init.startswith("loftq"):
      raise ValueError(
          f"{path!r}: init={t.init!r} quantizes the full-precision kernel itself, but this one is "
          f"already a {type(leaf).__name__}, whose quantization error LoftQ can no longer see; pass "
          "the dense params (before lora_jax.quantize) to lora_jax.split."
      )
    if changes_base(t.init) and is_base_leaf(leaf):  # before an SVD of the dequantized kernel
      raise ValueError(
          f"{path!r}: init={t.init!r} replaces the base kernel, which here is a "
          f"{type(leaf).__name__}; start from a dense kernel (quantize after split)."
      )
    # The leaf as it is (a base leaf is dequantized only by a kind that needs its values).
    w = leaf if _has_values(leaf) else None
    made = _kind_init(spec.kind, next(keys), t, spec.dtype or leaf.dtype, w)
    f, new_w = made if isinstance(made, tuple) else (made, None)
    entries.append(f)
    changed |= new_w is not None
    base.append(leaf if new_w is None else _like(new_w, leaf))
  return (tree_from_entries(params, base) if changed else params), tree_from_entries(params, entries)


def _kind_init(kind: type[Adapter], key: Array, target: Target, dtype: Any, w: Array | None):
  import inspect

  try:
    takes_w = "w" in inspect.signature(kind.init).parameters
  except (TypeError, ValueError):  # pragma: no cover - a builtin
    takes_w = True
  if takes_w:
    return kind.init(key, target, dtype, w=w)
  if target.init != "peft":  # a kind written before 0.3 starts its factors its own way
    raise ValueError(f"{target.path!r}: LoraSpec(init={target.init!r}) needs a kind whose init takes the kernel (w=); {kind.__name__}.init does not.")
  return kind.init(key, target, dtype)


def _has_values(leaf: Any) -> bool:
  return is_base_leaf(leaf) or isinstance(leaf, (jax.Array, np.ndarray))


def _like(new_w: Array, leaf: Any) -> Array:
  """``new_w`` in ``leaf``'s dtype, on ``leaf``'s devices (sharding kept) when it has them; a
  base leaf (LoftQ's quantized kernel, which records the kernel's dtype) as it is."""
  if is_base_leaf(new_w):
    return new_w
  new_w = jnp.asarray(new_w, leaf.dtype)
  sharding = getattr(leaf, "sharding", None)
  if sharding is not None and not isinstance(new_w, jax.core.Tracer):
    new_w = jax.device_put(new_w, sharding)
  return new_w


def _trace(apply_fn, params, args, kwargs) -> KernelUses | None:
  return None if apply_fn is None else trace_uses(apply_fn, params, *args, **kwargs)


def _is_key(x: Any) -> bool:
  """A typed PRNG key (``jax.random.key``) or a raw ``uint32`` one (``jax.random.PRNGKey``)."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not hasattr(x, "shape"):
    return False
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return True
  return dtype == np.uint32 and tuple(x.shape[-1:]) in ((2,), (4,))


def _describe(x: Any) -> str:
  if isinstance(x, LoraSpec):
    return "spec"
  if _is_key(x):
    return "rng"
  return "params"


def _check_arguments(fn: str, rng: Any, params: Any, spec: Any, apply_fn: Any) -> None:
  call = f"lora_jax.{fn}(rng, params, spec, apply_fn=None, *example_args)"
  got = (rng, params, spec)
  if not (_is_key(rng) and isinstance(spec, LoraSpec)):
    if any(isinstance(x, LoraSpec) for x in got) and any(_is_key(x) for x in got):
      raise TypeError(
          f"{call}: the arguments are in another order: got ({', '.join(_describe(x) for x in got)}). "
          f"Pass the PRNG key first, then the params pytree, then the LoraSpec: "
          f"lora_jax.{fn}(jax.random.key(0), params, spec)."
      )
    if not isinstance(spec, LoraSpec):
      raise TypeError(f"{call}: expected a LoraSpec as the third argument, got a {type(spec).__name__}.")
    raise TypeError(
        f"{call}: expected a PRNG key as the first argument, e.g. jax.random.key(0), got a "
        f"{type(rng).__name__}."
    )
  if apply_fn is not None and not callable(apply_fn):
    raise TypeError(
        f"{call}: apply_fn must be the function that uses params, got a {type(apply_fn).__name__}. "
        f"Pass the function before the example input, e.g. lora_jax.{fn}(rng, variables, spec, "
        "model.apply, x)."
    )


def check_adapters(params: PyTree, adapters: PyTree) -> list[tuple[str, Any, Adapter | None]]:
  """Checks that ``adapters`` fit ``params`` (structure, leaf shapes from each kind's roles, dtypes).

  Returns:
    ``[(path, leaf, adapter_or_None), ...]`` in tree order.

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
          f"{path!r}: adapters hold a {type(f).__name__} for a leaf of type "
          f"{getattr(leaf, 'dtype', type(leaf).__name__)}; only floating-point kernels can be adapted."
      )
    if len(f.layout) != len(shape):
      raise ValueError(
          f"{path!r}: adapter layout {f.layout!r} has {len(f.layout)} axes but the kernel has "
          f"shape {tuple(shape)}; these adapters were built for different params."
      )
    want = f.expected_shapes(tuple(shape))
    got = {n: tuple(getattr(x, "shape", ())) for n, x in f.leaves().items()}
    if want != got:
      show = lambda d: " and ".join(f"{n}{s}" for n, s in d.items())  # noqa: E731
      raise ValueError(
          f"{path!r}: kernel {tuple(shape)} (layout {f.layout!r}) expects {type(f).__name__} "
          f"leaves {show(want)} for rank {f.sizes().get(('r',))}, found {show(got)}; these adapters were built for different params."
      )
  return rows


def _apply(params: PyTree, adapters: PyTree, how: str, dtype: Any = None) -> PyTree:
  rows = check_adapters(params, adapters)
  out = []
  for path, leaf, f in rows:
    if f is None and not is_base_leaf(leaf):
      out.append(leaf)
      continue
    try:
      w = dense(leaf)  # a base leaf (a quantized kernel) becomes a dense kernel of its dtype
      if dtype is not None and is_base_leaf(leaf):
        w = w.astype(dtype)  # before the update, which is then rounded to dtype only
      out.append(_keep_sharding(leaf, w if f is None else getattr(f, how)(w)))
    except ValueError as e:
      raise ValueError(f"{path!r}: {e}") from None
  return tree_from_entries(params, out)


def _keep_sharding(leaf: Any, w: Any) -> Any:
  """``w`` placed like ``leaf`` where ``leaf`` is a concrete array with a ``NamedSharding`` (an
  eager merge of a sharded kernel stays sharded as the kernel); under a trace the compiler's
  propagation (or the caller's ``out_shardings``) decides."""
  if isinstance(leaf, jax.core.Tracer) or isinstance(w, jax.core.Tracer):
    return w
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding) and getattr(w, "sharding", None) != sharding:
    return jax.device_put(w, sharding)
  return w


def merge(params: PyTree, adapters: PyTree, dtype: Any = None) -> PyTree:
  """Folds adapters into the kernels: ``W + scale * a @ b`` at every adapted leaf (each
  adapter kind's own :meth:`~lora_jax.kinds.Adapter.merge`).

  The sum is formed in float32 (or wider) and cast back, so the result has exactly the
  structure, shapes and dtypes of ``params``: ready to save or to serve with the unchanged
  model code. A base leaf (a :class:`lora_jax.QuantizedKernel`), adapted or not, becomes a
  dense kernel: dequantized (plus the update), in the dtype it was quantized from or in
  ``dtype``.

  >>> params = {"w": {"kernel": jnp.zeros((2, 2))}}
  >>> f = LoraFactors(a=jnp.ones((2, 1)), b=jnp.ones((1, 2)), scale=0.5, layout="io")
  >>> merge(params, {"w": {"kernel": f}})["w"]["kernel"]
  Array([[0.5, 0.5],
         [0.5, 0.5]], dtype=float32)
  """
  return _apply(params, adapters, "merge", dtype)


def unmerge(params: PyTree, adapters: PyTree) -> PyTree:
  """Inverse of :func:`merge`: subtracts ``scale * a @ b`` (exact up to rounding)."""
  return _apply(params, adapters, "unmerge")


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

  What trains is what each adapter kind declares (``TRAINABLE``); frozen adapter leaves
  count with the base.

  >>> params = {"w": {"kernel": jnp.zeros((10, 10))}}
  >>> c = count(init(jax.random.key(0), params, LoraSpec("w/kernel", rank=2)), params)
  >>> c.trainable, c.base, round(c.fraction, 3)
  (40, 100, 0.286)
  """
  if params is not None:
    found = [(p, f) for p, _, f in check_adapters(params, adapters) if f is not None]
  else:
    flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=is_adapter_or_none)
    found = [(path_str(p), f) for p, f in flat if is_adapter(f)]
  rows = tuple((path, f.kernel_shape, f.rank, f.num_params(trainable=True)) for path, f in found)
  trainable_bytes = sum(_nbytes(x) for _, f in found for n, x in f.leaves().items() if n in f.TRAINABLE)
  frozen = [x for _, f in found for n, x in f.leaves().items() if n not in f.TRAINABLE]
  base = base_bytes = None
  if params is not None:
    # A base leaf (a quantized kernel) counts the parameters of the kernel it stands for and
    # the bytes it stores (packed codes and scales).
    leaves = [x for x in jax.tree.leaves(params, is_leaf=is_base_leaf) if hasattr(x, "shape")] + frozen
    base = sum(int(np.prod(x.shape)) for x in leaves)
    base_bytes = sum(x.nbytes if is_base_leaf(x) else _nbytes(x) for x in leaves)
  return LoraCount(rows, sum(r[3] for r in rows), trainable_bytes, base, base_bytes)
