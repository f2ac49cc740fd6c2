"""Small helpers over jaxprs, traced values and call arguments shared by the transform,
infer_layout and the adapter kinds."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
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
