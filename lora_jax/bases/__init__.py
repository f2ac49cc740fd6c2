"""Base leaves: the frozen kernel as one leaf with a shape and a dtype.

A frozen kernel is usually a dense array. It may also be a :class:`BaseLeaf`: a registered
pytree node (e.g. a quantized kernel: packed integers plus scales) that path handling, target
selection and checks treat as *one* leaf with ``shape`` and ``dtype``, and that the transform
turns into a dense array only where a use needs one (``materialize``, inside the jit).
"""

from __future__ import annotations

from typing import Any

Array = Any


class BaseLeaf:
  """Base class of non-array frozen kernels. Subclasses are registered pytree nodes with
  ``shape``, ``dtype`` (of the dense kernel they stand for) and :meth:`materialize`."""

  shape: tuple[int, ...]
  dtype: Any

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def materialize(self) -> Array:
    """The dense kernel (e.g. dequantized), computed where it is called (inside a jit)."""
    raise NotImplementedError(f"{type(self).__name__}.materialize")

  @property
  def nbytes(self) -> int:
    """Bytes the leaf stores (what :func:`lora_jax.count` reports as the base's)."""
    import jax
    import numpy as np

    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

  def scan_split(self, axis: int) -> Any:
    """For ``lax.scan`` over kernel axis ``axis``: ``(arrays with that axis first, rebuild)``
    where ``rebuild`` makes the per-slice leaf from their slices, or None (the leaf is then
    materialized whole before the scan)."""
    return None


def is_base_leaf(x: Any) -> bool:
  return isinstance(x, BaseLeaf)


def dense(w: Any) -> Array:
  """``w`` as a dense array (a :class:`BaseLeaf` materialized, an array as it is)."""
  return w.materialize() if isinstance(w, BaseLeaf) else w


__all__ = ["BaseLeaf", "dense", "is_base_leaf"]
