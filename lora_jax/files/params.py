"""Params files: any pytree of arrays as one safetensors file under '/'-joined paths
(:func:`save_params`, :func:`load_params`), and the merged export (:func:`save_merged`)."""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from lora_jax.bases import dense, is_base_leaf
from lora_jax._multihost import multiprocess, once, to_host, tree_to_host
from lora_jax._paths import leaves_with_paths, tree_from_entries
from lora_jax.adapters import check_adapters, merge
from lora_jax.files.adapters import _as_tree, _version
from lora_jax.files.checks import AdapterFileError, fail, names, short
from lora_jax.files.atomic import atomic_write
from lora_jax.files.safetensors import DATA_DIGEST_KEY, all_finite, encode_safetensors, is_float_dtype, read_safetensors

PyTree = Any
PARAMS_FORMAT = "lora_jax.params.v2"  # with a checksum of the tensors (DATA_DIGEST_KEY)
_UNCHECKED_FORMATS = ("lora_jax.params", "lora_jax.adapters")  # files of lora_jax 0.1, adapter files


def _flat_params(params: PyTree, base_leaves: bool = False) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name, leaf in leaves_with_paths(params):
    if is_base_leaf(leaf) and not base_leaves:
      raise TypeError(
          f"{name!r}: params leaf is a {type(leaf).__name__} (a quantized kernel); save_params "
          "writes dense arrays. Save the dense params and quantize again after loading "
          "(lora_jax.quantize is deterministic), or save lora_jax.dequantize(params)."
      )
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise TypeError(f"{name!r}: params leaf is a {type(leaf).__name__}, not an array; only arrays can be saved.")
    if name in out:
      raise ValueError(f"two params leaves share the path {name!r}; '/' inside a dict key makes paths ambiguous.")
    out[name] = leaf
  return out


def save_params(path: str | os.PathLike, params: PyTree, metadata: Mapping[str, str] | None = None) -> str:
  """Saves any pytree of arrays as one safetensors file under flat '/'-joined paths, atomically.

  The metadata records ``format`` = ``lora_jax.params.v2``, the library version, your
  ``metadata`` (str -> str) and a SHA-256 of the tensors and their table, which
  :func:`load_params` verifies. The file is written to a temp file (0644 under umask 022) and
  moved into place: a kill at any moment leaves the old file or the new one. Multi-process:
  call it from every process; leaves are gathered to every host and process 0 alone writes
  (as :func:`save_merged`).

  >>> import tempfile
  >>> p = save_params(tempfile.mkdtemp() + "/p.safetensors", {"w": {"kernel": jnp.ones((2, 2))}})
  >>> load_params(p)["w"]["kernel"].shape
  (2, 2)
  """
  flat = _flat_params(params)
  meta = {**dict(metadata or {}), "format": PARAMS_FORMAT, "lora_jax_version": _version()}
  _write("save_params", path, flat, meta)
  return os.fspath(path)


def _write(fn: str, path: str | os.PathLike, flat: Mapping[str, Any], meta: Mapping[str, str]) -> None:
  if multiprocess():  # leaves spanning other processes' devices: gathered (on every process)
    flat = tree_to_host(dict(flat))
  enc = encode_safetensors(flat, meta, data_digest=True)  # serialised before the file is touched
  once(f"{fn}({os.fspath(path)!r})", lambda: atomic_write(os.fspath(path), enc.write))  # process 0 writes


def _float_dtype(dtype: Any, where: str) -> np.dtype:
  try:
    d = np.dtype(dtype)
  except TypeError:
    raise TypeError(f"{where}: {dtype!r} is not a dtype; pass a floating-point one such as jnp.bfloat16 or 'float32'.") from None
  if not is_float_dtype(d):
    raise TypeError(
        f"{where}: {d.name} is not a floating-point dtype; casting weights to it would truncate them. "
        "Pass a floating-point dtype such as bfloat16, float16 or float32."
    )
  return d


def save_merged(
    path: str | os.PathLike,
    params: PyTree,
    adapters: PyTree,
    *,
    dtype: Any = None,
    safe: bool = True,
) -> str:
  """Merges adapters into the base params and saves the whole tree as one safetensors file.

  Each adapted kernel becomes ``W + scale * a @ b``, summed in float32 (or wider) and cast back
  to the kernel's dtype (:func:`lora_jax.merge`); the file holds every leaf of ``params``
  under its '/'-joined path, readable by :func:`load_params` or any safetensors reader, with a
  checksum of its tensors as :func:`save_params` writes.

  Args:
    path: output file (``.safetensors``), written atomically (nothing is written on error).
    params: the base params.
    adapters: adapters mirroring ``params`` (or a flat ``{path: adapter}`` dict).
    dtype: if given, floating-point leaves are saved in this floating-point dtype (e.g.
      ``jnp.bfloat16``); integer leaves keep theirs.
    safe: refuse to write when a merged kernel (or a leaf made non-finite by ``dtype``) holds
      NaN/Inf, like PEFT's ``safe_merge``.

  Raises:
    ValueError: adapters that do not fit ``params``; with ``safe``, a non-finite merged leaf
      (the message names its path); ``path`` is a directory.
    TypeError: ``dtype`` is not a floating-point dtype.
    OSError: the file cannot be written (multi-process: on processes other than 0 also when
      process 0 failed to write it).

  Multi-process (``jax.distributed.initialize``): call it from every process with the same
  arguments. The merge runs on the global arrays; each merged leaf is then gathered to the
  host of every process (``multihost_utils.process_allgather``; a fully replicated one is read
  from a local shard), so each host needs memory for the whole model; only process 0 writes,
  and every process returns once the file is in place.

  >>> import tempfile
  >>> from lora_jax.kinds import LoraFactors
  >>> params = {"w": {"kernel": jnp.zeros((2, 2))}}
  >>> f = LoraFactors(a=jnp.ones((2, 1)), b=jnp.ones((1, 2)), scale=0.5, layout="io")
  >>> p = save_merged(tempfile.mkdtemp() + "/m.safetensors", params, {"w": {"kernel": f}})
  >>> load_params(p)["w"]["kernel"]
  Array([[0.5, 0.5],
         [0.5, 0.5]], dtype=float32)
  """
  if dtype is not None:
    dtype = _float_dtype(dtype, "save_merged(dtype=...)")
  adapters = _as_tree(adapters, params)
  adapted = {p for p, _, f in check_adapters(params, adapters) if f is not None}
  merged = _flat_params(merge(params, adapters))
  base = _flat_params(params, base_leaves=True)
  out = {}
  for name, leaf in merged.items():
    if dtype is not None and is_float_dtype(leaf.dtype):
      leaf = jnp.asarray(leaf).astype(dtype)
    if safe and is_float_dtype(leaf.dtype):
      finite = bool(to_host(jnp.isfinite(leaf).all()))
      if not finite and (name in adapted or bool(to_host(jnp.isfinite(dense(base[name])).all()))):
        why = "merging its adapter" if name in adapted else f"casting it to {np.dtype(dtype).name}"
        raise ValueError(
            f"{name!r}: holds NaN or Inf after {why}; refusing to save (safe=True). Check the "
            "adapter for non-finite values or overflow, or pass safe=False to save anyway."
        )
    out[name] = leaf
  _write("save_merged", path, out, {"format": PARAMS_FORMAT, "lora_jax_version": _version(), "merged": "true"})
  return os.fspath(path)


def _nest(flat: Mapping[str, Any], source: str) -> dict[str, Any]:
  root: dict[str, Any] = {}
  for name, value in flat.items():
    parts = name.split("/")
    node = root
    for i, part in enumerate(parts[:-1]):
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise AdapterFileError(f"{source}: {short(name)} nests under {short('/'.join(parts[: i + 1]))}, which is itself a tensor.")
      node = child
    if parts[-1] in node:
      raise AdapterFileError(f"{source}: {short(name)} is both a tensor and a prefix of other tensors.")
    node[parts[-1]] = value
  return root


def load_params(
    path: str | os.PathLike, like: PyTree | None = None, *, check_dtype: bool = True, check_finite: bool = True
) -> PyTree:
  """Loads a params file written by :func:`save_merged` / :func:`save_params` (or any
  safetensors file with '/'-joined names), validating it first.

  Args:
    path: the ``.safetensors`` file.
    like: optional params tree to mirror: the result has its structure, after checking that
      the file holds exactly its paths with the same shapes (and dtypes).
    check_dtype: with ``like``, refuse a floating-point tensor whose dtype differs from
      ``like``'s; ``False`` casts it to ``like``'s dtype instead (e.g. a bfloat16 export onto
      float32 params). Integer/float mismatches are always refused.
    check_finite: refuse floating-point tensors that hold NaN or Inf (``False`` to load them).

  Returns:
    A nested dict of ``jax.Array`` (split on '/'), or a tree shaped like ``like``.

  Raises:
    AdapterFileError: a malformed, corrupted (its checksum does not match) or non-finite file,
      or one that does not match ``like`` (names the file and the path, expected vs found).
      Files of other tools (no lora_jax metadata) and of lora_jax 0.1 carry no checksum.

  >>> import tempfile
  >>> p = save_params(tempfile.mkdtemp() + "/p.safetensors", {"w": jnp.ones(2, jnp.bfloat16)})
  >>> load_params(p, like={"w": jnp.zeros(2)}, check_dtype=False)["w"].dtype
  dtype('float32')
  """
  source = os.fspath(path)
  tensors, meta, _ = read_safetensors(path)  # verifies the checksum a lora_jax params file records
  fmt = meta.get("format", "")
  if DATA_DIGEST_KEY not in meta and fmt not in _UNCHECKED_FORMATS and (
      "lora_jax" in fmt or any(k.startswith("lora_jax") for k in meta)):
    raise fail(source, f"a lora_jax params file without the checksum of its tensors ({DATA_DIGEST_KEY}): the "
                       "file was edited or corrupted. Write it again with lora_jax.save_params / save_merged.")
  if check_finite:
    for k, t in tensors.items():
      if not all_finite(t):
        raise fail(source, f"{short(k)} holds NaN or Inf; refusing non-finite weights. Pass check_finite=False to load them anyway.")
  if like is None:
    return _nest({k: jnp.asarray(v) for k, v in tensors.items()}, source)
  want = _flat_params(like)
  missing, extra = [k for k in want if k not in tensors], [k for k in tensors if k not in want]
  if missing or extra:
    raise AdapterFileError(
        f"{source}: file and `like` differ: missing {names(missing)}, unexpected {names(extra)}; it was saved "
        "for other params."
    )
  out = []
  for k, leaf in want.items():
    t, dt = tensors[k], np.dtype(leaf.dtype)
    if tuple(t.shape) != tuple(leaf.shape):
      raise fail(source, f"{k!r}: `like` has shape {tuple(leaf.shape)}, the file holds {tuple(t.shape)}; it was saved for other params.")
    if t.dtype != dt:
      castable = is_float_dtype(t.dtype) and is_float_dtype(dt)
      if check_dtype or not castable:
        fix = (" Pass check_dtype=False to cast to `like`'s dtypes." if castable
               else " Integer and floating-point tensors are never cast; it was saved for other params.")
        raise fail(source, f"{k!r}: `like` has dtype {dt.name}, the file holds {t.dtype.name}.{fix}")
      t = t.astype(dt)
    out.append(jnp.asarray(t))
  return tree_from_entries(like, out)


__all__ = ["load_params", "save_merged", "save_params"]
