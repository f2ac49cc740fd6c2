"""Adapter kinds: the one interface every LoRA variant implements.

An adapter *kind* is a frozen dataclass registered as a pytree node (:func:`register_kind`).
It declares

* ``ROLES``: its array leaves and each leaf's axis roles, as a pattern over role letters.
  ``'l'``, ``'i'`` and ``'o'`` expand to *every* axis of the kernel with that role (leading
  / layer axes, fan-in, fan-out, in kernel order); any other letter is one axis of its own
  (``'r'`` the rank, ``'n'`` an adapter-bank axis, ...). Plain LoRA is
  ``{"a": "lir", "b": "lro"}``: ``a`` is ``(*L, *I, r)``, ``b`` is ``(*L, r, *O)``.
* ``TRAINABLE``: which leaves train (the others are frozen parts of the adapter);
* ``LORA_PLUS_FAST``: which trainable leaves LoRA+ gives the larger learning rate;
* ``GROUP_LEAF``: the leaf whose fan-in product ``x @ leaf`` may be shared with other adapters
  that read the same input (one matmul over ``[a_1 | a_2 | ...]``), or ``None``;

and implements ``delta`` / ``merge`` / ``unmerge`` (in the kernel's layout), ``contribute(site)``
(its term where the kernel meets a matmul, a convolution or a row lookup; see
:mod:`lora_jax.interpret.sites`) and ``init``. Everything generic -- shape checks, ``count``,
views in the transform (a transpose, a slice, a ``scan`` slice applies to each leaf that
carries the sliced role), shardings, trainable masks, file entries -- works from the roles,
so a new kind needs no change anywhere else.

Every kind has a static ``layout`` (one letter ``'l'``/``'i'``/``'o'`` per kernel axis).
Static metadata (``scale``, ``layout``, ...) is part of the tree structure; a value that must
vary per example or per bank entry is a frozen leaf instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = Any
Label = tuple  # ('l' | 'i' | 'o', j) for a kernel axis, (letter,) for an adapter-only axis

KERNEL_ROLES = "lio"
_REGISTRY: dict[str, type["Adapter"]] = {}


def layout_counts(layout: str) -> tuple[int, int, int]:
  return layout.count("l"), layout.count("i"), layout.count("o")


def leaf_labels(pattern: str, layout: str) -> tuple[Label, ...]:
  """Per-axis labels of a leaf with role ``pattern`` on a kernel of ``layout``.

  >>> leaf_labels("lir", "lio")
  (('l', 0), ('i', 0), ('r',))
  >>> leaf_labels("lro", "iio")
  (('r',), ('o', 0))
  """
  counts = dict(zip(KERNEL_ROLES, layout_counts(layout)))
  out: list[Label] = []
  for c in pattern:
    if c in KERNEL_ROLES:
      out.extend((c, j) for j in range(counts[c]))
    else:
      out.append((c,))
  return tuple(out)


def kernel_labels(layout: str) -> tuple[Label, ...]:
  """The label of each kernel axis: ``'lio'`` -> ``(('l', 0), ('i', 0), ('o', 0))``."""
  seen = {c: 0 for c in KERNEL_ROLES}
  out = []
  for c in layout:
    out.append((c, seen[c]))
    seen[c] += 1
  return tuple(out)


def check_layout(layout: Any) -> bool:
  return isinstance(layout, str) and bool(layout) and not set(layout) - set(KERNEL_ROLES) and "i" in layout and "o" in layout


class Adapter:
  """Base class of adapter kinds (see the module docstring). Subclasses are frozen dataclasses
  decorated with :func:`register_kind`."""

  KIND: ClassVar[str] = ""
  ROLES: ClassVar[Mapping[str, str]] = {}
  TRAINABLE: ClassVar[frozenset[str]] = frozenset()
  LORA_PLUS_FAST: ClassVar[frozenset[str]] = frozenset()
  GROUP_LEAF: ClassVar[str | None] = None
  layout: str
  # The probability of dropping an input element of the adapter path (PEFT's lora_dropout);
  # kinds that support dropout declare it as a static field.
  dropout: float = 0.0

  # --- generic, from the roles -----------------------------------------------------------------

  def leaves(self) -> dict[str, Array]:
    """The array leaves by name, in ``ROLES`` order."""
    return {name: getattr(self, name) for name in self.ROLES}

  def labels(self, name: str) -> tuple[Label, ...]:
    return leaf_labels(self.ROLES[name], self.layout)

  def replace(self, **changes: Any) -> "Adapter":
    return dataclasses.replace(self, **changes)

  def static(self) -> dict[str, Any]:
    """The static (non-leaf) fields: configuration that is part of the tree structure."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.ROLES}

  def sizes(self) -> dict[Label, int]:
    """The size of every labelled axis, read off the leaves (kernel roles and adapter-only ones)."""
    out: dict[Label, int] = {}
    for name, x in self.leaves().items():
      for lab, n in zip(self.labels(name), np.shape(x)):
        out.setdefault(lab, int(n))
    return out

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """Shape of the kernel this adapter fits."""
    sizes = self.sizes()
    return tuple(sizes[lab] for lab in kernel_labels(self.layout))

  @property
  def rank(self) -> int:
    return int(self.sizes()[("r",)])

  def expected_shapes(self, kernel_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Leaf shapes for a kernel of ``kernel_shape``, with this adapter's own axes' sizes."""
    sizes = dict(zip(kernel_labels(self.layout), kernel_shape))
    own = {lab: n for lab, n in self.sizes().items() if lab[0] not in KERNEL_ROLES or len(lab) == 1}
    sizes.update(own)
    return {name: tuple(sizes.get(lab, -1) for lab in self.labels(name)) for name in self.ROLES}

  def num_params(self, trainable: bool | None = None) -> int:
    return sum(
        int(np.prod(np.shape(x)))
        for n, x in self.leaves().items()
        if trainable is None or (n in self.TRAINABLE) == trainable
    )

  # --- what each kind supplies ------------------------------------------------------------------

  def delta(self, dtype: Any = None) -> Array:
    """The additive update shaped like the kernel (materialises it); kinds that are not an
    additive update (DoRA) override :meth:`merge` instead."""
    raise NotImplementedError(f"{type(self).__name__}.delta")

  def merge(self, w: Array) -> Array:
    """The adapted kernel ``W'`` for base kernel ``w``, computed in float32 (or wider) and
    cast back to ``w``'s dtype."""
    d = self.delta()
    return (w.astype(d.dtype) + d).astype(w.dtype)

  def unmerge(self, w: Array) -> Array:
    """The base kernel back from a merged one (exact up to rounding)."""
    d = self.delta()
    return (w.astype(d.dtype) - d).astype(w.dtype)

  def contribute(self, site: Any) -> Array:
    """The result of the consumer op with the adapted kernel, computed at ``site``."""
    raise NotImplementedError(f"{type(self).__name__}.contribute")

  def prepare(self, base: Any) -> "Adapter":
    """The adapter as the sites of one wrapped call see it, given the frozen kernel ``base``
    (an array or a :class:`lora_jax.bases.BaseLeaf`, in the kernel's layout). Called once per
    adapted kernel per call, before any view (slice, transpose, ``scan`` slice) of it, so a
    kind can compute what needs the whole kernel once (DoRA: its per-output-feature rescale).
    The default returns the adapter unchanged."""
    return self

  def shard_map_safe(self, split: frozenset[str], tracked: bool) -> bool:
    """Whether a ``shard_map`` body may compute with this adapter's shards, its leaves split
    as their kernel axes are (the other axes replicated) -- else the interpreter materialises
    the kernel for the call. ``split``: the kernel roles (``'l'``, ``'i'``, ``'o'``) with an
    axis split over the body's manual mesh axes; ``tracked``: whether the body records which
    manual axes each value varies over (``check_vma=True``), so a kind can sum partial
    results over the axes that split the kernel. The default, True, holds for every kind whose
    term is a product of its leaves: each shard of it is that shard of the whole."""
    return True

  @classmethod
  def check_target(cls, target: Any) -> None:
    """Raises ``ValueError`` naming ``target.path`` if this kind cannot adapt ``target``
    (e.g. DoRA on an embedding); called when a spec is resolved."""

  @classmethod
  def init(cls, key: Array, target: Any, dtype: Any, w: Array | None = None) -> "Adapter | tuple[Adapter, Array]":
    """A fresh adapter for ``target`` (a :class:`lora_jax.Target`), whose kernel is ``w``: an
    array or a :class:`lora_jax.bases.BaseLeaf` (``lora_jax.bases.dense(w)`` gives its
    values), in the kernel's layout; None when only its shape is known. An init that changes
    the base (PiSSA) returns ``(adapter, new_kernel)``."""
    raise NotImplementedError(f"{cls.__name__}.init")


def register_kind(cls: type[Adapter]) -> type[Adapter]:
  """Registers an adapter kind: a pytree node whose children are the ``ROLES`` leaves and
  whose static fields are the rest; and a name (``KIND``) that saved files refer to.

  Raises:
    TypeError: ``cls`` is not a frozen dataclass subclass of :class:`Adapter`, or its
      declarations do not fit together.
  """
  if not (isinstance(cls, type) and issubclass(cls, Adapter) and dataclasses.is_dataclass(cls)):
    raise TypeError(f"register_kind({cls!r}): expected a dataclass subclass of lora_jax.kinds.Adapter.")
  if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
    raise TypeError(f"register_kind({cls.__name__}): the dataclass must be frozen=True.")
  fields = [f.name for f in dataclasses.fields(cls)]
  if not cls.KIND or not isinstance(cls.KIND, str):
    raise TypeError(f"register_kind({cls.__name__}): KIND must be a non-empty name.")
  if cls.KIND in _REGISTRY and _REGISTRY[cls.KIND].__qualname__ != cls.__qualname__:
    raise ValueError(f"register_kind({cls.__name__}): KIND {cls.KIND!r} is taken by {_REGISTRY[cls.KIND].__name__}.")
  missing = [n for n in cls.ROLES if n not in fields]
  bad = [n for n in cls.TRAINABLE | cls.LORA_PLUS_FAST if n not in cls.ROLES]
  if missing or bad or "layout" not in fields or not cls.ROLES:
    raise TypeError(
        f"register_kind({cls.__name__}): ROLES must name dataclass fields (missing {missing}), "
        f"TRAINABLE/LORA_PLUS_FAST must name ROLES leaves (bad {bad}), and a 'layout' field is required."
    )
  for n, pat in cls.ROLES.items():
    own = [c for c in pat if c not in KERNEL_ROLES]
    if len(set(pat)) != len(pat) or len(own) != len(set(own)):
      raise TypeError(f"register_kind({cls.__name__}): ROLES[{n!r}] = {pat!r} repeats a role letter.")
  if cls.GROUP_LEAF is not None and cls.GROUP_LEAF not in cls.ROLES:
    raise TypeError(f"register_kind({cls.__name__}): GROUP_LEAF {cls.GROUP_LEAF!r} is not a leaf.")
  jax.tree_util.register_dataclass(
      cls, data_fields=list(cls.ROLES), meta_fields=[f for f in fields if f not in cls.ROLES]
  )
  _REGISTRY[cls.KIND] = cls
  return cls


def kind_named(name: str) -> type[Adapter] | None:
  """The registered kind called ``name`` (as saved in files), or None."""
  return _REGISTRY.get(name)


def registered_kinds() -> dict[str, type[Adapter]]:
  """Every registered kind by name (``{"lora": LoraFactors, ...}``)."""
  return dict(_REGISTRY)


def is_adapter(x: Any) -> bool:
  return isinstance(x, Adapter)


def is_adapter_or_none(x: Any) -> bool:
  return x is None or isinstance(x, Adapter)


def einsum_delta(a: Array, a_labels, b: Array, b_labels, out_labels, scale: Any) -> Array:
  """``scale * a @ b`` contracted over every label the two share that the output lacks, in
  float32 (or wider) at highest precision; labels are hashable, one per axis."""
  names: dict[Any, str] = {}
  letters = iter("abcdefghjkmnpqstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

  def sub(labels):
    return "".join(names.setdefault(lab, next(letters)) for lab in labels)

  acc = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
  d = jnp.einsum(
      f"{sub(a_labels)},{sub(b_labels)}->{sub(out_labels)}",
      a.astype(acc),
      b.astype(acc),
      precision=jax.lax.Precision.HIGHEST,
  )
  return d * jnp.asarray(scale, acc)
