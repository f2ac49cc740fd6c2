"""Key paths: the one way lora_jax names a parameter ('/'-joined, e.g. ``layers_0/attn/query/kernel``)."""

from __future__ import annotations

import difflib
from typing import Any, Iterable

import jax  # noqa: F401 - used by the doctests
from jax import tree_util as jtu

from lora_jax.bases import is_base_leaf
from lora_jax.kinds import Adapter, is_adapter_or_none

KeyPath = tuple[Any, ...]


def _key_str(key: Any) -> str:
  if isinstance(key, jtu.DictKey):
    return str(key.key)
  if isinstance(key, jtu.GetAttrKey):
    return str(key.name)
  if isinstance(key, jtu.SequenceKey):
    return str(key.idx)
  if isinstance(key, jtu.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(path: KeyPath) -> str:
  """'/'-joined name of a key path; NNX's trailing ``.value`` is dropped.

  >>> path_str((jax.tree_util.DictKey('dense'), jax.tree_util.DictKey('kernel')))
  'dense/kernel'
  """
  keys = list(path)
  if len(keys) > 1 and isinstance(keys[-1], jtu.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_str(k) for k in keys)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
  """All leaves of ``tree`` with their '/'-joined paths, in flattening order; a
  :class:`lora_jax.bases.BaseLeaf` (e.g. a quantized kernel) is one leaf."""
  flat, _ = jtu.tree_flatten_with_path(tree, is_leaf=is_base_leaf)
  return [(path_str(p), leaf) for p, leaf in flat]


def nearby(name: str, candidates: Iterable[str], n: int = 5) -> str:
  """A short human list of candidate paths close to ``name`` (for error messages)."""
  candidates = list(candidates)
  close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.3)
  if not close:
    close = candidates[:n]
  more = "" if len(candidates) <= len(close) else f" (of {len(candidates)})"
  return ", ".join(repr(c) for c in close) + more


def align(params: Any, adapters: Any) -> list[tuple[str, Any, Adapter | None]]:
  """Pairs each leaf of ``params`` with its entry in ``adapters`` (an adapter or None).

  Raises:
    ValueError: ``adapters`` does not mirror ``params``; the message names the first path
      at which they differ.
  """
  flat, treedef = jtu.tree_flatten_with_path(params, is_leaf=is_base_leaf)
  try:
    entries = treedef.flatten_up_to(adapters)
  except (ValueError, TypeError) as e:
    raise ValueError(_structure_mismatch(params, adapters) + f"\n(jax said: {e})") from None
  out = []
  for (path, leaf), entry in zip(flat, entries):
    name = path_str(path)
    if entry is not None and not isinstance(entry, Adapter):
      raise ValueError(
          f"adapters[{name!r}] is a {type(entry).__name__}, expected an adapter (LoraFactors, "
          "or another lora_jax.kinds.Adapter) or None. "
          "Build adapters with lora_jax.init(rng, params, spec)."
      )
    out.append((name, leaf, entry))
  return out


def _structure_mismatch(params: Any, adapters: Any) -> str:
  """Names the first path where ``adapters`` does not mirror ``params``."""
  p_paths = [n for n, _ in leaves_with_paths(params)]
  a_flat, _ = jtu.tree_flatten_with_path(adapters, is_leaf=is_adapter_or_none)
  a_paths = [path_str(p) for p, x in a_flat if x is not None]
  missing = [p for p in a_paths if p not in set(p_paths)]
  if missing:
    return (
        f"adapters do not mirror params: adapters have {missing[0]!r}, which params lack. "
        f"Params paths near it: {nearby(missing[0], p_paths)}. Adapters must be built from the "
        "same params with lora_jax.init(rng, params, spec)."
    )
  return (
      "adapters do not mirror params: their tree structures differ "
      f"(params has {len(p_paths)} leaves). Adapters must be built from the same params with "
      "lora_jax.init(rng, params, spec)."
  )


def tree_from_entries(params: Any, entries: list[Any]) -> Any:
  """A tree shaped like ``params`` holding ``entries`` (one per params leaf)."""
  return jtu.tree_unflatten(jtu.tree_structure(params, is_leaf=is_base_leaf), entries)


__all__ = ["path_str", "leaves_with_paths", "align", "nearby", "tree_from_entries"]
