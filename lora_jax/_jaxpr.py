"""Small helpers over jaxprs, traced values and call arguments shared by the transform,
infer_layout and the adapter kinds."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu
from jax.extend import core as jex


def open_jaxpr(jaxpr) -> tuple[jex.Jaxpr, Sequence[Any]]:
  """(jaxpr, consts) of a ClosedJaxpr or an open Jaxpr (JAX >= 0.11 stores scan bodies open)."""
  if isinstance(jaxpr, jex.Jaxpr):
    return jaxpr, ()
  return jaxpr.jaxpr, jaxpr.consts


def scan_counts(params: dict) -> tuple[int, int]:
  """(number of consts, number of carries) of a scan equation, across JAX versions."""
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  # JAX >= 0.11: ``ft_in`` is a flat tree of (consts, carry, xs); iterating it yields leaves.
  ft = params["ft_in"]
  consts, carry, _ = ft.elts if hasattr(ft, "elts") else ft
  return len(consts), len(carry)


def varying_axes(x: Any) -> frozenset:
  """The manual mesh axes ``x`` varies over inside ``shard_map`` (JAX 0.6-0.9: ``aval.vma``;
  later: ``aval.manual_axis_type.varying``); empty outside it, and inside a body traced with
  ``check_vma=False`` (which records none).

  >>> varying_axes(np.ones(3))
  frozenset()
  """
  typeof = getattr(jax, "typeof", None)
  if typeof is None:  # pragma: no cover - JAX >= 0.6.2 has it
    return frozenset()
  t = typeof(x)
  v = getattr(t, "vma", None)
  if v is None:
    v = getattr(getattr(t, "manual_axis_type", None), "varying", None)
  return frozenset(v or ())


def untracked_manual_axes() -> tuple[str, ...]:
  """The manual mesh axes (of size > 1) of the ``shard_map`` body being traced, if that body
  does not track which of them each value varies over (``check_vma=False``; ``jax.pmap`` traces
  its function so on JAX >= 0.9). There every value reads as varying over none of them, so an
  array cannot tell whether it is one shard of a larger array split over them. Empty outside
  ``shard_map``, with ``check_vma=True``, and on a JAX that exposes neither the abstract mesh
  nor ``pcast`` / ``pvary`` (where the question cannot be asked).

  It asks by marking a scalar as varying over those axes: with ``check_vma=True`` the mark
  holds (leaving one dead ``pvary`` equation in the jaxpr, which XLA drops); without it, the
  mark is a no-op.

  >>> untracked_manual_axes()  # not inside shard_map
  ()
  """
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  if get_mesh is None:  # pragma: no cover - JAX < 0.6
    return ()
  mesh = get_mesh()
  have = frozenset(getattr(mesh, "manual_axes", ()) or ())
  manual = tuple(a for a in getattr(mesh, "axis_names", ()) if a in have and mesh.shape[a] > 1)
  if not manual:
    return ()
  zero = jnp.zeros((), jnp.int8)
  if hasattr(jax.lax, "pcast"):
    probe = jax.lax.pcast(zero, manual, to="varying")
  elif hasattr(jax.lax, "pvary"):  # pragma: no cover - JAX 0.6-0.9
    probe = jax.lax.pvary(zero, manual)
  else:  # pragma: no cover
    return ()
  return () if varying_axes(probe) else manual


def is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval")


@dataclasses.dataclass(frozen=True)
class _Static:
  treedef: Any
  values: tuple

  def __hash__(self):
    return hash((self.treedef, self.values))

  def __eq__(self, other):
    return isinstance(other, _Static) and self.treedef == other.treedef and _eq(self.values, other.values)


def _eq(x, y):
  try:
    return bool(x == y)
  except Exception:  # noqa: BLE001 - numpy-like values without a truth value
    return x is y


def split_static(tree):
  leaves, treedef = jtu.tree_flatten(tree)
  static = tuple(None if is_dynamic(x) else x for x in leaves)
  dyn = [x if is_dynamic(x) else None for x in leaves]
  return _Static(treedef, static), dyn


def join_static(static: _Static, dyn):
  leaves = [d if d is not None else s for s, d in zip(static.values, dyn)]
  return jtu.tree_unflatten(static.treedef, leaves)
