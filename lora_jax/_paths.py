"""Key paths: the one way lora_jax names a parameter ('/'-joined, e.g. ``layers_0/attn/query/kernel``)."""

from __future__ import annotations

import difflib
from typing import Any, Iterable

import jax  # noqa: F401 - used by the doctests
from jax import tree_util as jtu

from lora_jax.bases import is_base_leaf
from lora_jax.kinds import Adapter, is_adapter, is_adapter_or_none

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


_CALL_ORDER = (
    "lora_jax takes the base params first and the adapters second: lora_apply(params, "
    "adapters, *args) for lora_apply = lora_jax.wrap(apply_fn), merge(params, adapters), "
    "unmerge(params, adapters), check_adapters(params, adapters); only count takes "
    "(adapters, params)."
)


def _entries(tree: Any) -> list[tuple[str, Any]]:
  """``(path, leaf)`` with adapters kept whole (not flattened into their arrays); no Nones."""
  flat, _ = jtu.tree_flatten_with_path(tree, is_leaf=is_adapter_or_none)
  return [(path_str(p), x) for p, x in flat if x is not None]


def _is_bare_leaf(x: Any) -> bool:
  """An array or number passed where a tree belongs (not a container, not an adapter)."""
  return x is not None and not is_adapter(x) and jtu.treedef_is_leaf(jtu.tree_structure(x))


def _describe(x: Any) -> str:
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is not None and dtype is not None:
    return f"an array of shape {tuple(shape)} ({dtype})"
  return f"a {type(x).__name__} ({x!r:.40})"


def _check_argument_roles(params: Any, adapters: Any) -> None:
  """Refuses swapped or missing arguments with a message that says so."""
  p_entries, a_entries = _entries(params), _entries(adapters)
  in_params = next(((p, x) for p, x in p_entries if is_adapter(x)), None)
  has_adapters = any(is_adapter(x) for _, x in a_entries)
  if in_params is not None:
    where = f"{type(in_params[1]).__name__} at {in_params[0]!r}"
    if _is_bare_leaf(adapters):
      raise ValueError(
          f"the params argument holds adapters ({where}) and the adapters argument is "
          f"{_describe(adapters)}: the base params look missing. {_CALL_ORDER}"
      )
    if not has_adapters:
      example = f" (e.g. {_describe(a_entries[0][1])} at {a_entries[0][0]!r})" if a_entries else ""
      raise ValueError(
          f"the arguments look swapped: the params argument holds adapters ({where}) and the "
          f"adapters argument holds none{example}. {_CALL_ORDER}"
      )
    raise ValueError(
        f"the params argument holds adapters ({where}): params must be the base parameters "
        f"(arrays only), with the adapters in their own tree. {_CALL_ORDER}"
    )
  if has_adapters:
    if _is_bare_leaf(params) and not is_adapter(adapters):
      raise ValueError(
          f"the params argument is {_describe(params)} and the adapters argument a tree of "
          f"adapters: the base params look missing. {_CALL_ORDER}"
      )
    return
  if _is_bare_leaf(adapters):
    raise ValueError(
        f"the adapters argument is {_describe(adapters)}, not a tree of adapters: the adapters "
        f"look missing (build them with lora_jax.init(rng, params, spec)). {_CALL_ORDER}"
    )
  if a_entries:
    path, x = a_entries[0]
    raise ValueError(
        f"the adapters argument holds no adapter, only plain values (e.g. {_describe(x)} at "
        f"{path!r}): it looks like a params tree, not adapters (build them with "
        f"lora_jax.init(rng, params, spec)). {_CALL_ORDER}"
    )


def align(params: Any, adapters: Any) -> list[tuple[str, Any, Adapter | None]]:
  """Pairs each leaf of ``params`` with its entry in ``adapters`` (an adapter or None);
  ``adapters=None`` means no adapters at all (e.g. serving a quantized base alone).

  Raises:
    ValueError: ``adapters`` does not mirror ``params``; the message names the first path
      at which they differ. Swapped or missing arguments (adapters in ``params``, an array
      or a params-like tree as ``adapters``) are named as such.
  """
  flat, treedef = jtu.tree_flatten_with_path(params, is_leaf=is_base_leaf)
  if adapters is None:
    return [(path_str(path), leaf, None) for path, leaf in flat]
  _check_argument_roles(params, adapters)
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
