"""Mixed-adapter batches: each example of one call runs with its own member of a bank.

A wrapped call given ``adapter_ids`` (:func:`lora_jax.wrap`) maps the function over the example
axis with ``jax.vmap``, each example computed as a batch of one (the size-1 axis kept where
the example axis was), with the bank as that example's :class:`lora_jax.kinds.bank.BankRow`.
JAX's batching then tracks which rows belong to which example through any model code
(reshapes, transposes, attention, ``scan``), so no layout is guessed: the base kernel is shared
by the batch, so its matmul stays one matmul over the whole batch; the thin products become
one masked matmul over the bank or a gather of each example's factors and a batched matmul.
Every pattern of ids runs the same compiled code.

By construction the result is what running each example alone with its adapter gives. A model
whose examples interact (batch norm computing batch statistics in training) therefore computes
per-example statistics here; a call that updates state (``mutable=``) is refused.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from lora_jax._jaxpr import is_dynamic, join_static, split_static
from lora_jax.kinds.bank import BANK_MODES, bank_ids, bank_names, is_bank, rows_of
from lora_jax.kinds.base import is_adapter_or_none

PyTree = Any
_UNMAPPED = object()


def check_axes(name: str, axes: Any) -> Any:
  """Validates an ``in_axes`` / ``out_axes`` prefix tree (ints >= 0 or None)."""
  bad = [x for x in jtu.tree_leaves(axes, is_leaf=lambda x: x is None) if x is not None and not (isinstance(x, int) and not isinstance(x, bool) and x >= 0)]
  if bad:
    raise ValueError(f"wrap({name}={axes!r}): expected a non-negative int, None, or a tuple/dict of those (as for jax.vmap).")
  return axes


def _broadcast(prefix: Any, tree: Any, where: str) -> list[Any]:
  """One axis (or ``_UNMAPPED``) per leaf of ``tree``, from a ``jax.vmap``-style prefix."""
  def expand(ax, sub):
    return jtu.tree_map(lambda _: _UNMAPPED if ax is None else ax, sub)

  try:
    full = jtu.tree_map(expand, prefix, tree, is_leaf=lambda x: x is None)
  except ValueError as e:
    raise ValueError(f"{where}: the axes {prefix!r} do not fit the structure of the values ({e}).") from None
  return jtu.tree_leaves(full, is_leaf=lambda x: x is _UNMAPPED)


def _bank_paths(adapters: PyTree) -> list[str]:
  flat, _ = jtu.tree_flatten_with_path(adapters, is_leaf=is_adapter_or_none)
  return [jtu.keystr(p, simple=True, separator="/") for p, x in flat if is_bank(x)]


def refuse_banks(adapters: PyTree) -> None:
  """Raises where a call without ``adapter_ids`` gets a bank."""
  paths = _bank_paths(adapters)
  if paths:
    raise ValueError(
        f"the adapters hold a bank of {len(bank_names(adapters))} adapters (at {paths[0]!r}, ...): pass "
        "adapter_ids= (one id per example, -1 for the base alone; lora_jax.bank_ids(bank, names)), or take one "
        "member with lora_jax.unstack(bank)[name]."
    )


def prepare_ids(adapters: PyTree, ids: Any, kwargs: dict) -> Any:
  """``adapter_ids`` as an int32 array ``(B,)``, checked against the bank when concrete."""
  if not _bank_paths(adapters):
    raise ValueError("adapter_ids= was given, but the adapters hold no bank: make one with lora_jax.stack({name: adapters}).")
  if kwargs.get("mutable"):
    raise ValueError(
        f"a mixed-adapter call runs each example on its own (a batch of one), so state updated across the batch "
        f"(mutable={kwargs['mutable']!r}, e.g. batch statistics) cannot be gathered; run such a model in "
        "inference mode, or train each adapter on its own batches."
    )
  if isinstance(ids, (list, tuple)):
    ids = bank_ids(adapters, ids)
  if not is_dynamic(ids):
    raise TypeError(f"adapter_ids: expected an int array (B,) or a list of member names, got {type(ids).__name__}.")
  if np.ndim(ids) != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"adapter_ids: expected a 1-D int array, one id per example, got {ids.dtype}{tuple(np.shape(ids))}.")
  if not isinstance(ids, jax.core.Tracer):
    n = len(bank_names(adapters))
    v = np.asarray(ids)
    bad = v[(v < -1) | (v >= n)]
    if bad.size:
      raise ValueError(f"adapter_ids holds {bad[:4].tolist()}, outside -1 (the base alone) .. {n - 1} (the bank's {n} members).")
  return jnp.asarray(ids, jnp.int32)


def call(
    inner: Callable[..., Any], params: PyTree, adapters: PyTree, args: tuple, kwargs: dict, ids: Any, rng: Any,
    in_axes: Any, out_axes: Any, mode: str,
) -> Any:
  """``inner(params, adapters_i, args_i, kwargs_i, rng_i)`` for each example ``i``, in one
  vmapped call (see the module docstring); ``ids`` from :func:`prepare_ids`."""
  assert mode in BANK_MODES
  batch = int(np.shape(ids)[0])
  static, dyn = split_static((args, kwargs))
  arg_axes = _broadcast(in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args),
                        tuple(args), "wrap(in_axes=...)") if args else []
  kw_axes = [0] * len(jtu.tree_leaves(kwargs))
  flat_axes = arg_axes + kw_axes
  leaves_with_path = jtu.tree_flatten_with_path((args, kwargs))[0]
  axes = []
  for (p, leaf), ax, d in zip(leaves_with_path, flat_axes, dyn):
    if d is None or ax is _UNMAPPED:
      axes.append(None)
      continue
    if np.ndim(d) <= ax or np.shape(d)[ax] != batch:
      where = "args" + jtu.keystr(p[1:]) if p[0].idx == 0 else "kwargs" + jtu.keystr(p[1:])
      raise ValueError(
          f"{where}: shape {tuple(np.shape(d))} has no axis {ax} of size {batch} (the number of adapter_ids); "
          "pass wrap(in_axes=...) saying where each argument's example axis is (None for shared ones)."
      )
    axes.append(ax)
  rngs = None if rng is None else jax.random.split(rng, batch)

  def one(i, rng_i, dyn_i):
    dyn_i = [x if ax is None else jnp.expand_dims(x, ax) for x, ax in zip(dyn_i, axes)]
    a_i, k_i = join_static(static, dyn_i)
    out = inner(params, rows_of(adapters, i, batch, mode), a_i, k_i, rng_i)
    oax = _broadcast(out_axes, out, "wrap(out_axes=...)")
    leaves, tree = jtu.tree_flatten(out)
    squeezed = []
    for y, ax in zip(leaves, oax):
      if ax is _UNMAPPED:
        squeezed.append(y)
      elif np.ndim(y) <= ax or np.shape(y)[ax] != 1:
        raise ValueError(
            f"wrap(out_axes={out_axes!r}): an output of shape {tuple(np.shape(y))} (for one example) has no "
            f"size-1 example axis {ax}; pass out_axes saying where each output's example axis is."
        )
      else:
        squeezed.append(jnp.squeeze(y, ax))
    return jtu.tree_unflatten(tree, squeezed)

  # vmap's out_axes must match the per-example output's structure: it is given as a prefix.
  return jax.vmap(one, in_axes=(0, None if rngs is None else 0, axes), out_axes=out_axes)(ids, rngs, dyn)
