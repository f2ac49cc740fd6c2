"""The LoraFactors pytree node: the low-rank factors of one adapted kernel."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraFactors:
  """Factors of one adapted kernel ``W``; the kernel acts as ``W + scale * a @ b``.

  ``layout`` labels each axis of ``W``: ``'l'`` a leading/batch axis kept on both factors
  (the layer axis of an ``nn.scan``'d stack), ``'i'`` fan-in, ``'o'`` fan-out. With ``L``,
  ``I``, ``O`` the kernel's axes of each kind (in kernel order), ``a`` has shape
  ``(*L, *I, r)`` and ``b`` has shape ``(*L, r, *O)``. ``scale`` and ``layout`` are static
  (part of the tree structure), ``a`` and ``b`` are the trainable leaves.

  >>> f = LoraFactors(a=jnp.ones((3, 2)), b=jnp.zeros((2, 4)), scale=2.0, layout="io")
  >>> f.rank, f.delta().shape
  (2, (3, 4))
  """

  a: Array
  b: Array
  scale: float = dataclasses.field(metadata=dict(static=True))
  layout: str = dataclasses.field(metadata=dict(static=True))

  @property
  def rank(self) -> int:
    return int(self.a.shape[-1])

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """Shape of the kernel these factors adapt."""
    return kernel_shape(tuple(self.a.shape), tuple(self.b.shape), self.layout)

  def delta(self, dtype: Any = None) -> Array:
    """``scale * a @ b`` arranged like the kernel (materialises the full-size update)."""
    return kernel_delta(self.a, self.b, self.scale, self.layout, dtype)


def layout_counts(layout: str) -> tuple[int, int, int]:
  return layout.count("l"), layout.count("i"), layout.count("o")


def kernel_shape(a_shape: tuple[int, ...], b_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  """The kernel shape that factors of these shapes adapt (inverse of :func:`factor_shapes`)."""
  nl, ni, no = layout_counts(layout)
  grouped = list(a_shape[: nl + ni]) + list(b_shape[nl + 1 : nl + 1 + no])
  order = [i for c in "lio" for i, x in enumerate(layout) if x == c]
  shape = [0] * len(layout)
  for dim, axis in zip(grouped, order):
    shape[axis] = dim
  return tuple(shape)


def factor_shapes(kernel_shape: tuple[int, ...], layout: str, rank: int):
  """Shapes of ``a`` and ``b`` for a kernel of ``kernel_shape`` with ``layout``."""
  ls = [d for d, c in zip(kernel_shape, layout) if c == "l"]
  ins = [d for d, c in zip(kernel_shape, layout) if c == "i"]
  outs = [d for d, c in zip(kernel_shape, layout) if c == "o"]
  return (*ls, *ins, rank), (*ls, rank, *outs)


def kernel_delta(a: Array, b: Array, scale: float, layout: str, dtype: Any = None) -> Array:
  """``scale * a @ b`` as an array shaped like the kernel, computed in float32 (or wider)."""
  nl, ni, no = layout_counts(layout)
  letters = "abcdefghjkmnpqstuvwxyz"
  lsym, isym, osym = letters[:nl], letters[nl : nl + ni], letters[nl + ni : nl + ni + no]
  acc = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
  d = jnp.einsum(
      f"{lsym}{isym}r,{lsym}r{osym}->{lsym}{isym}{osym}",
      a.astype(acc),
      b.astype(acc),
      precision=jax.lax.Precision.HIGHEST,
  )
  # Reorder from (L, I, O) into the kernel's own axis order.
  grouped = [i for c in "lio" for i, x in enumerate(layout) if x == c]
  d = jnp.transpose(d, np.argsort(grouped)) * jnp.asarray(scale, acc)
  return d if dtype is None else d.astype(dtype)
