"""Plain LoRA (Hu et al., 2021): ``W + scale * a @ b``; the first adapter kind."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp  # noqa: F401 - used by the doctests

from lora_jax.kinds.base import Adapter, einsum_delta, kernel_labels, layout_counts, leaf_labels, register_kind
from lora_jax.kinds.inits import base_digest, initial_factors

Array = Any


@register_kind
@dataclasses.dataclass(frozen=True)
class LoraFactors(Adapter):
  """Factors of one adapted kernel ``W``; the kernel acts as ``W + scale * a @ b``.

  ``layout`` labels each axis of ``W``: ``'l'`` a leading/batch axis kept on both factors
  (the layer axis of an ``nn.scan``'d stack), ``'i'`` fan-in, ``'o'`` fan-out. With ``L``,
  ``I``, ``O`` the kernel's axes of each kind (in kernel order), ``a`` has shape
  ``(*L, *I, r)`` and ``b`` has shape ``(*L, r, *O)``. ``scale`` and ``layout`` are static
  (part of the tree structure), ``a`` and ``b`` are the trainable leaves.

  The scale is static: one float per adapted kernel, known at trace time, so it costs nothing
  and never trains. A kind whose scale varies inside one adapter (a bank of adapters with
  different alphas) carries it as a frozen leaf instead.

  >>> f = LoraFactors(a=jnp.ones((3, 2)), b=jnp.zeros((2, 4)), scale=2.0, layout="io")
  >>> f.rank, f.delta().shape
  (2, (3, 4))
  """

  KIND = "lora"
  ROLES = {"a": "lir", "b": "lro"}
  TRAINABLE = frozenset({"a", "b"})
  LORA_PLUS_FAST = frozenset({"b"})
  GROUP_LEAF = "a"

  a: Array
  b: Array
  scale: float
  layout: str
  # Made with scale = alpha / sqrt(r) (rsLoRA): export_peft then writes use_rslora. Static;
  # left out of the repr so that reprs of plain LoRA factors stay as they were.
  rslora: bool = dataclasses.field(default=False, repr=False)
  # PEFT's lora_dropout: the rate at which the adapter path's input is dropped when the wrapped
  # call gets lora_dropout_rng (see lora_jax.wrap).
  dropout: float = dataclasses.field(default=0.0, repr=False)
  # Set by an init that replaced the base kernel (PiSSA, OLoRA): a digest of the kernel these
  # factors belong to, which lora_jax.load checks (see lora_jax.kinds.inits.base_digest).
  base_digest: str | None = dataclasses.field(default=None, repr=False)

  def delta(self, dtype: Any = None) -> Array:
    """``scale * a @ b`` arranged like the kernel (materialises the full-size update)."""
    return kernel_delta(self.a, self.b, self.scale, self.layout, dtype)

  def contribute(self, site: Any) -> Array:
    x = site.dropped(self.dropout)
    return site.base() + site.low_rank(self.a, self.b, self.scale, x=x)

  @classmethod
  def init(cls, key: Array, target: Any, dtype: Any, w: Array | None = None):
    a, b, new_w = initial_factors(key, target, dtype, w)
    f = cls(a=a, b=b, **target_static(target, new_w))
    return f if new_w is None else (f, new_w)


def target_static(target: Any, new_kernel: Array | None = None) -> dict[str, Any]:
  """The static fields a LoRA-factored kind takes from its :class:`lora_jax.Target` (and, for
  an init that replaced the kernel, the new kernel's digest)."""
  return dict(
      scale=target.scale, layout=target.layout, rslora=getattr(target, "rslora", False),
      dropout=float(getattr(target, "dropout", 0.0)),
      base_digest=None if new_kernel is None else base_digest(new_kernel),
  )


def kernel_shape(a_shape: tuple[int, ...], b_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  """The kernel shape that factors of these shapes adapt (inverse of :func:`factor_shapes`)."""
  sizes = {}
  for shape, pat in ((a_shape, "lir"), (b_shape, "lro")):
    sizes.update(zip(leaf_labels(pat, layout), shape))
  return tuple(sizes[lab] for lab in kernel_labels(layout))


def factor_shapes(kernel_shape: tuple[int, ...], layout: str, rank: int):
  """Shapes of ``a`` and ``b`` for a kernel of ``kernel_shape`` with ``layout``."""
  sizes = dict(zip(kernel_labels(layout), kernel_shape))
  sizes[("r",)] = rank
  return tuple(sizes[lab] for lab in leaf_labels("lir", layout)), tuple(sizes[lab] for lab in leaf_labels("lro", layout))


def kernel_delta(a: Array, b: Array, scale: float, layout: str, dtype: Any = None) -> Array:
  """``scale * a @ b`` as an array shaped like the kernel, computed in float32 (or wider)."""
  d = einsum_delta(a, leaf_labels("lir", layout), b, leaf_labels("lro", layout), kernel_labels(layout), scale)
  return d if dtype is None else d.astype(dtype)


__all__ = ["LoraFactors", "factor_shapes", "kernel_delta", "kernel_shape", "layout_counts"]
