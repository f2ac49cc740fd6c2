"""Adapters on disk: :func:`save`, :func:`load`, :func:`load_config`.

Format 2 (this version) is **one** safetensors file, so one save is one atomic act (a temp
file, fsync, one ``os.replace``): a kill at any moment leaves the old save or the new one.
Tensors are stored under ``<path>/<leaf>`` (``layers/q_proj/kernel/a``); the safetensors
``__metadata__`` holds

* ``format`` = ``lora_jax.adapters``, ``format_version`` = ``2``, ``lora_jax_version``;
* ``lora_jax``: the config, a JSON object: ``format``, ``format_version``,
  ``library_version``, ``rslora``, ``spec`` (or null), ``metadata`` (the user's),
  ``base_model.fingerprint``, and ``adapters``: per '/'-joined parameter path an entry
  ``{kind, static, tensors: {leaf: {dtype, shape}}, kernel: {shape, dtype}, rank, alpha,
  data_sha256, sha256}``. ``kind`` names the registered adapter kind (``"lora"``), ``static``
  its static fields (``scale``, ``layout``), ``tensors`` each of its leaves;
  ``data_sha256`` covers the leaves' bytes, ``sha256`` the entry's canonical JSON (so its
  meaning and its data);
* ``lora_jax_sha256``: the SHA-256 of the config text (every field, the entries' checksums).

Format 1 (lora_jax 0.1: ``adapters.safetensors`` + ``lora_jax.json``, LoRA only) still loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.bases import is_base_leaf
from lora_jax._multihost import multiprocess, once, tree_to_host
from lora_jax._paths import leaves_with_paths, nearby, path_str, tree_from_entries
from lora_jax.adapters import check_adapters
from lora_jax.files.atomic import atomic_write, check_target
from lora_jax.files.checks import (
    MAX_DEPTH,
    MAX_NAME,
    AdapterFileError,
    check_json,
    fail,
    names,
    parse_json_object,
    read_json,
    refuse_pickle,
    short,
    strict_json,
)
from lora_jax.files.safetensors import (
    DTYPES,
    MAX_DIM,
    MAX_NDIM,
    all_finite,
    encode_safetensors,
    is_float_dtype,
    is_int,
    read_header,
    read_safetensors,
    to_numpy,
)
from lora_jax.kinds import Adapter, is_adapter, kernel_labels, kind_named, leaf_labels
from lora_jax.kinds import registered_kinds
from lora_jax.kinds.inits import DIGEST_PENDING, base_digest
from lora_jax.kinds.lora import factor_shapes
from lora_jax.spec import LoraSpec

PyTree = Any

ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "lora_jax.json"  # format 1 only
FORMAT = "lora_jax.adapters"
FORMAT_VERSION = 2
CONFIG_KEY = "lora_jax"  # the __metadata__ entry holding the config
DIGEST_KEY = "lora_jax_sha256"  # the __metadata__ entry holding its checksum
MAX_CONFIG = 64 * 1024 * 1024
MAX_SHORT = 64  # a kind name, a version string, a dtype name, a fingerprint
_FLOAT_NAMES = sorted(d.name for d in DTYPES.values() if is_float_dtype(d))
_ENTRY_KEYS = {"kind", "static", "tensors", "kernel", "data_sha256", "sha256"}
_ENTRY_OPTIONAL = {"rank", "alpha"}
_TOP_KEYS = {"format", "format_version", "library_version", "rslora", "spec", "metadata", "base_model", "adapters"}
_SPEC_KEYS_V1 = {"targets", "rank", "alpha", "rank_pattern", "alpha_pattern", "rslora"}
_SPEC_KEYS = _SPEC_KEYS_V1 | {"kind"}


def _version() -> str:
  from lora_jax import __version__  # a late import: lora_jax/__init__ imports this module.

  return __version__


# ----------------------------------------------------------------------------------------------
# Trees and paths.
# ----------------------------------------------------------------------------------------------


def flatten_adapters(adapters: PyTree, *, only: type | None = None) -> dict[str, Adapter]:
  """``{path: adapter}`` for a tree of adapters (or an already-flat dict), in tree order.

  ``only``: refuse (TypeError) adapters of other kinds, for code that handles one kind.

  >>> from lora_jax.kinds import LoraFactors
  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=1.0, layout="io")
  >>> list(flatten_adapters({"dense": {"kernel": f, "bias": None}}))
  ['dense/kernel']
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: x is None or is_adapter(x))
  out: dict[str, Adapter] = {}
  for p, x in flat:
    if x is None:
      continue
    name = path_str(p)
    if not is_adapter(x):
      raise TypeError(
          f"adapters[{name!r}] is a {type(x).__name__}, expected an adapter (LoraFactors, or another "
          "lora_jax.kinds.Adapter) or None. Build adapters with lora_jax.init(rng, params, spec) or "
          "lora_jax.load(path)."
      )
    if only is not None and not isinstance(x, only):
      raise TypeError(
          f"adapters[{name!r}] is a {type(x).__name__} (kind {x.KIND!r}); only {only.__name__} adapters are "
          "handled here. Merge it into the base (lora_jax.merge) or save it with lora_jax.save."
      )
    if name in out:
      raise ValueError(f"two adapters share the path {name!r}; '/' inside a dict key makes paths ambiguous.")
    out[name] = x
  return out


def _files(path: str | os.PathLike) -> tuple[str, str]:
  """(tensor file, format-1 config file) for a directory, a ``.safetensors`` file or its ``.json``."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    return path, path[: -len(".safetensors")] + ".json"
  if path.endswith(".json") and not os.path.isdir(path):
    return path[: -len(".json")] + ".safetensors", path
  return os.path.join(path, ADAPTERS_FILE), os.path.join(path, CONFIG_FILE)


def _as_tree(adapters: PyTree, params: PyTree) -> PyTree:
  """Accepts a flat ``{path: adapter}`` dict where a tree mirroring ``params`` is expected."""
  if isinstance(adapters, Mapping) and adapters and all(is_adapter(v) for v in adapters.values()):
    try:
      check_adapters(params, adapters)
      return adapters
    except ValueError:
      return adapters_to_tree(adapters, params)
  return adapters


def adapters_to_tree(flat: Mapping[str, Adapter], params: PyTree) -> PyTree:
  """Puts a flat ``{path: adapter}`` dict into a tree mirroring ``params``, checking shapes.

  >>> from lora_jax.kinds import LoraFactors
  >>> params = {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=1.0, layout="io")
  >>> adapters_to_tree({"d/kernel": f}, params)["d"]["bias"] is None
  True
  """
  return _mirror(flat, params, None, False, source="adapters")


# ----------------------------------------------------------------------------------------------
# Shared pieces of the format.
# ----------------------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _entry_digest(entry: Mapping[str, Any]) -> str:
  return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "sha256"})).hexdigest()


def _data_digest(leaves: Mapping[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for name in sorted(leaves):
    x = leaves[name]
    h.update(name.encode() + b"\0")
    h.update(x.reshape(-1).view(np.uint8).data if x.size else b"")
  return h.hexdigest()


def _fingerprint(kernels: Mapping[str, Any]) -> str:
  canon = json.dumps({k: [v["shape"], v["dtype"]] for k, v in sorted(kernels.items())}, separators=(",", ":"))
  return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _alpha(scale: float, rank: int, rslora: bool) -> float:
  alpha = scale * (math.sqrt(rank) if rslora else rank)
  rounded = round(alpha)
  return float(rounded) if abs(alpha - rounded) <= 1e-9 * max(1.0, abs(alpha)) else alpha


def _layout_problem(layout: Any) -> str | None:
  if not isinstance(layout, str):
    return f"must be a string, found {short(layout)}"
  if not 2 <= len(layout) <= MAX_NDIM:
    return f"has {len(layout)} letters; a layout has one letter per kernel axis, 2 to {MAX_NDIM}"
  if set(layout) - set("lio") or "i" not in layout or "o" not in layout:
    return f"{short(layout)} must be letters from 'l', 'i', 'o' with at least one 'i' and one 'o'"
  return None


def _shape_problem(roles: Mapping[str, str], layout: str, kernel_shape: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]]):
  """``(problem or None, sizes of the kind's own axes)``: do leaves of these shapes fit a kernel
  of ``kernel_shape`` under the kind's roles? Generic over kinds (no a/b)."""
  kernel = dict(zip(kernel_labels(layout), kernel_shape))
  own: dict[tuple, int] = {}
  for leaf, pattern in roles.items():
    labels, shape = leaf_labels(pattern, layout), tuple(shapes[leaf])
    if len(shape) != len(labels):
      return f"leaf {leaf!r} has shape {shape}, but roles {pattern!r} on layout {layout!r} give it {len(labels)} axes", own
    for lab, n in zip(labels, shape):
      want = kernel[lab] if lab in kernel else own.setdefault(lab, n)
      if n != want:
        what = f"kernel axis {kernel_labels(layout).index(lab)}" if lab in kernel else f"its {lab[0]!r} axis"
        return f"leaf {leaf!r} has shape {shape}: size {n} for {what}, where {want} is expected (kernel {tuple(kernel_shape)})", own
  return None, own


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------


def _static_value(name: str, field: str, value: Any) -> Any:
  if hasattr(value, "dtype") and np.shape(value) == ():  # a 0-d array: its Python scalar
    value = np.asarray(value).item()
  if value is None or isinstance(value, (str, bool)):
    return value
  if isinstance(value, (int, np.integer)):
    return operator.index(value)
  if isinstance(value, (float, np.floating)):
    if not math.isfinite(float(value)):
      raise ValueError(f"{name!r}: static field {field} = {value} is not finite; refusing to save it.")
    return float(value)
  raise TypeError(
      f"{name!r}: static field {field} is a {type(value).__name__}; only str, int, float, bool and None "
      "static fields can be saved. Make it one of those in the adapter kind."
  )


def _spec_json(spec: LoraSpec) -> dict[str, Any]:
  def coerce(field: str, fn: Any, v: Any) -> Any:
    try:
      return fn(v)
    except (TypeError, ValueError, OverflowError):
      what = "an integer" if fn is operator.index else "a finite number"
      raise TypeError(f"save(spec=...): {field} = {v!r} cannot be saved; it must be {what}.") from None

  def number(v: Any) -> float:
    x = float(v)
    if not math.isfinite(x):
      raise ValueError(x)
    return x

  t = spec.targets
  targets = t if isinstance(t, str) else None if callable(t) else [str(x) for x in t]
  return {
      "targets": targets,
      "rank": coerce("rank", operator.index, spec.rank),
      "alpha": coerce("alpha", number, spec.alpha),
      "rank_pattern": {str(k): coerce(f"rank_pattern[{k!r}]", operator.index, v) for k, v in (spec.rank_pattern or {}).items()},
      "alpha_pattern": {str(k): coerce(f"alpha_pattern[{k!r}]", number, v) for k, v in (spec.alpha_pattern or {}).items()},
      "rslora": bool(spec.rslora),
      "kind": spec.kind.KIND,
  }


def _metadata_json(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
  if metadata is not None and not isinstance(metadata, Mapping):
    raise TypeError(f"save(metadata=...): expected a dict, found a {type(metadata).__name__}.")
  meta = dict(metadata or {})
  try:
    text = json.dumps(meta, allow_nan=False)
  except (TypeError, ValueError, RecursionError) as e:
    raise TypeError(f"save(metadata=...): must be JSON-serialisable, with finite numbers ({e}).") from None
  back = strict_json(text)  # what a reader will see; numbers and nesting must also pass its bounds
  try:
    check_json(back, "save(metadata=...)", MAX_DEPTH - 2)
  except AdapterFileError as e:
    raise TypeError(f"{e} Store such values as strings.") from None
  return back


def _entry(name: str, f: Adapter, kernel_dtype: Any, kernel_shape: tuple[int, ...] | None, spec: LoraSpec | None,
           rslora: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
    raise ValueError(f"adapter path {short(name)} must be a non-empty string of at most {MAX_NAME} characters.")
  leaves = {n: to_numpy(x) for n, x in f.leaves().items()}
  for n, x in leaves.items():
    if not is_float_dtype(x.dtype) or x.dtype.name not in _FLOAT_NAMES:
      raise TypeError(
          f"{name!r}: leaf {n} has dtype {x.dtype}; adapters must be floating point (float32, bfloat16, "
          f"float16, float64) to be saved and loaded. Cast it, e.g. with .astype(jnp.float32)."
      )
    if not all_finite(x):
      raise ValueError(
          f"{name!r}: factor {n} holds NaN or Inf; refusing to save a non-finite adapter "
          "(training diverged?). Save an earlier checkpoint, or lower the learning rate."
      )
  static = {k: _static_value(name, k, v) for k, v in f.static().items()}
  problem = _layout_problem(static.get("layout"))
  if problem:
    raise ValueError(f"{name!r}: layout {problem}.")
  layout = static["layout"]
  if kernel_shape is None:
    try:
      kernel_shape = tuple(int(d) for d in f.kernel_shape)
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f"{name!r}: the kernel shape cannot be read off the {type(f).__name__} leaves ({e}); pass params=.") from None
  shapes = {n: tuple(x.shape) for n, x in leaves.items()}
  problem, own = _shape_problem(f.ROLES, layout, kernel_shape, shapes)
  if problem:
    raise ValueError(f"{name!r}: {problem}.")
  entry: dict[str, Any] = {
      "kind": f.KIND,
      "static": static,
      "tensors": {n: {"dtype": x.dtype.name, "shape": list(x.shape)} for n, x in leaves.items()},
      "kernel": {"shape": list(kernel_shape), "dtype": None if kernel_dtype is None else np.dtype(kernel_dtype).name},
  }
  rank = own.get(("r",))
  if rank is not None:
    entry["rank"] = int(rank)
  scale = static.get("scale")
  if rank and _is_number(scale):
    alpha = _alpha(scale, rank, rslora)
    if spec is not None:
      alpha = float(spec.alpha_for(name))
      if not math.isclose(spec.scale_for(rank, alpha), scale, rel_tol=1e-9, abs_tol=0.0):
        raise ValueError(
            f"{name!r}: the spec gives scale {spec.scale_for(rank, alpha)} (rank {rank}, alpha "
            f"{alpha}, rslora={spec.rslora}) but the adapter has scale {scale}; pass the spec "
            "these adapters were made with, or spec=None."
        )
    entry["alpha"] = alpha
  entry["data_sha256"] = _data_digest(leaves)
  entry["sha256"] = _entry_digest(entry)
  return entry, leaves


def save(
    path: str | os.PathLike,
    adapters: PyTree,
    spec: LoraSpec | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    params: PyTree | None = None,
) -> str:
  """Saves adapters as one self-describing safetensors file, atomically; returns ``path``.

  ``path`` is a directory (created if needed; it receives ``adapters.safetensors``) or a
  ``NAME.safetensors`` file. Leaves are stored under flat key paths, ``<path>/<leaf>`` (e.g.
  ``layers/self_attn/q_proj/kernel/a``) in their own dtype, so a round trip is bit-exact. The
  file's metadata holds the config: per path the adapter kind, its static fields (scale,
  layout), leaf names, dtypes and shapes, rank, alpha, the kernel's shape (and, with
  ``params``, dtype); the spec when representable; your ``metadata``; checksums of all of it
  and of the tensors.

  Everything is serialised before the destination is touched; the file is written to a temp
  file beside it (0644 under umask 022), fsynced and moved into place with one
  ``os.replace``, so a crash or a kill at any moment leaves the previous save or this one.
  Temp files left by killed saves are removed; a format-1 ``lora_jax.json`` beside the
  file is removed after the new file is in place.

  Args:
    path: a directory, or a file name ending in ``.safetensors``.
    adapters: a tree from :func:`lora_jax.init` (``None`` at non-adapted leaves) or a flat
      ``{path: adapter}`` dict as returned by :func:`load`; any registered adapter kind.
    spec: the spec the adapters were made with; recorded, and used for the alphas (else
      ``alpha = scale * rank``).
    metadata: JSON-serialisable extra information (step, dataset, ...), stored verbatim.
    params: the base params; if given, the adapters are checked against them and the kernel
      dtypes are recorded. Adapters of a base-changing init (PiSSA, OLoRA) made under
      ``jax.jit`` record the digest of their base kernel only here (they cannot be saved
      without ``params``); ones made outside a jit are checked against it.

  Raises:
    ValueError: adapters that do not fit ``params``, hold NaN/Inf, or disagree with ``spec``;
      PiSSA/OLoRA adapters whose base is not the kernel in ``params`` (or made under jit and
      saved without ``params``); a destination that is a directory where the file should go.
    TypeError: integer factors, metadata or a spec field that cannot be saved.
    OSError: the file cannot be written; in a multi-process program, on the processes other
      than 0 when process 0 failed to write it.

  Multi-process (``jax.distributed.initialize``): call ``save`` from **every** process with
  the same adapters and path. Leaves sharded over other processes' devices are gathered to
  the host (``multihost_utils.process_allgather``; a fully replicated leaf is read from a
  local shard), every process checks and serialises them (so each raises the same errors),
  only process 0 writes, and every process returns once the file is in place: a
  :func:`load` from any process that sees the same file system reads this save.

  >>> import tempfile, lora_jax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> ad = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["dense"], rank=2))
  >>> d = lora_jax.save(tempfile.mkdtemp() + "/run", ad, params=params)
  >>> lora_jax.load(d, params)["dense"]["kernel"].a.shape
  (4, 2)
  """
  if multiprocess():
    adapters = tree_to_host(adapters)
  encoded = _encode(adapters, spec, metadata, params)
  once(f"save({os.fspath(path)!r})", lambda: _write_save(path, encoded))
  return os.fspath(path)


def _encode(adapters: PyTree, spec: LoraSpec | None, metadata: Mapping[str, Any] | None, params: PyTree | None) -> Any:
  """The checked, serialised save of ``adapters`` (:func:`save` less the write)."""
  kernels: dict[str, Any] = {}
  if params is not None:
    adapters = _as_tree(adapters, params)
    kernels = {p: leaf for p, leaf, f in check_adapters(params, adapters) if f is not None}
  flat = flatten_adapters(adapters)
  if not flat:
    raise ValueError("save: the adapters hold no adapters (only None); nothing to save.")
  flat = {name: _with_digest(name, f, kernels.get(name), params is not None) for name, f in flat.items()}
  # rsLoRA: from the spec, else from the adapters themselves (LoraFactors records it).
  rslora = bool(spec.rslora) if spec is not None else all(bool(getattr(f, "rslora", False)) for f in flat.values())
  tensors, entries = {}, {}
  for name, f in flat.items():
    leaf = kernels.get(name)
    entry, leaves = _entry(name, f, None if leaf is None else leaf.dtype,
                           None if leaf is None else tuple(leaf.shape), spec, rslora)
    entries[name] = entry
    tensors.update({f"{name}/{n}": x for n, x in leaves.items()})
  config = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "library_version": _version(),
      "rslora": rslora,
      "spec": None if spec is None else _spec_json(spec),
      "adapters": entries,
      "base_model": {"fingerprint": _fingerprint({k: e["kernel"] for k, e in entries.items()})},
      "metadata": _metadata_json(metadata),
  }
  text = json.dumps(config, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
  if len(text) > MAX_CONFIG:
    raise ValueError(f"save: the config would take {len(text)} bytes, over the {MAX_CONFIG}-byte limit; store less metadata.")
  encoded = encode_safetensors(tensors, {
      "format": FORMAT,
      "format_version": str(FORMAT_VERSION),
      "lora_jax_version": _version(),
      CONFIG_KEY: text,
      DIGEST_KEY: hashlib.sha256(text.encode("utf-8")).hexdigest(),
  })
  return encoded


def _write_save(path: str | os.PathLike, encoded: Any) -> None:
  """Writes what :func:`_encode` made to ``path`` (a directory or ``NAME.safetensors``)."""
  # Everything is serialised; only now is the destination touched.
  tensor_path, json_path = _files(path)
  p = os.fspath(path)
  one_file = p.endswith(".safetensors") or (p.endswith(".json") and not os.path.isdir(p))
  if not one_file and os.path.lexists(p) and not os.path.isdir(p):
    raise ValueError(f"save: {os.fspath(path)} exists and is not a directory; pass a directory, or a NAME.safetensors file.")
  check_target(tensor_path)
  atomic_write(tensor_path, encoded.write)
  _remove_format1_config(json_path)


def _remove_format1_config(json_path: str) -> None:
  """Removes a format-1 config left beside the new file (only if it is one lora_jax wrote)."""
  if not os.path.isfile(json_path):
    return
  try:
    if read_json(json_path, max_bytes=MAX_CONFIG).get("format") == FORMAT:
      os.unlink(json_path)
  except (OSError, ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# Reading and validating configs (both formats), bounded.
# ----------------------------------------------------------------------------------------------


class _Check:
  """Raises AdapterFileError naming the file (and the config field) when a condition fails."""

  def __init__(self, where: str):
    self.where = where

  def __call__(self, cond: bool, what: str) -> None:
    if not cond:
      if not any(w in what for w in ("upgrade", "save", "Save", "import_peft", "load_params")):
        what += " The file was edited or corrupted: save the adapters again from their source."
      raise fail(self.where, what)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_str(x: Any, n: int = MAX_NAME, empty: bool = False) -> bool:
  return isinstance(x, str) and (empty or bool(x)) and len(x) <= n


def _is_hex64(x: Any) -> bool:
  return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def _is_shape(x: Any) -> bool:
  return isinstance(x, list) and len(x) <= MAX_NDIM and all(is_int(d) and 0 <= d <= MAX_DIM for d in x)


def _check_spec(need: _Check, spec: Any, keys: set[str]) -> None:
  if spec is None:
    return
  need(isinstance(spec, dict) and set(spec) == keys, f"spec must be null or an object with {sorted(keys)}, found {short(spec)}.")
  t = spec["targets"]
  need(t is None or _is_str(t) or (isinstance(t, list) and len(t) <= 100_000 and all(_is_str(x) for x in t)),
       f"spec['targets'] must be null, a string or a list of strings, found {short(t)}.")
  need(is_int(spec["rank"]) and 1 <= spec["rank"] <= MAX_DIM, f"spec['rank'] must be a positive integer, found {short(spec['rank'])}.")
  need(_is_number(spec["alpha"]), f"spec['alpha'] must be a number, found {short(spec['alpha'])}.")
  need(isinstance(spec["rslora"], bool), "spec['rslora'] must be true or false.")
  for field, ok in (("rank_pattern", lambda v: is_int(v) and 1 <= v <= MAX_DIM), ("alpha_pattern", _is_number)):
    pat = spec[field]
    need(isinstance(pat, dict) and all(_is_str(k) and ok(v) for k, v in pat.items()),
         f"spec[{field!r}] must map pattern strings to {'ranks' if field == 'rank_pattern' else 'numbers'}, found {short(pat)}.")
  if "kind" in spec:
    need(_is_str(spec["kind"], MAX_SHORT), f"spec['kind'] must be a kind name, found {short(spec['kind'])}.")


def _check_common(need: _Check, cfg: dict[str, Any], version: int) -> None:
  need(cfg.get("format") == FORMAT, f"'format' is {short(cfg.get('format'))}, expected {FORMAT!r}; not a lora_jax adapter config.")
  missing = sorted(_TOP_KEYS - set(cfg))
  need(not missing, f"the config lacks the fields {missing}.")
  v = cfg.get("format_version")
  need(is_int(v), f"'format_version' must be an integer, found {short(v)}.")
  need(v <= FORMAT_VERSION, f"format_version {v} was written by a newer lora_jax than this one ({_version()}, reads <= {FORMAT_VERSION}); upgrade lora_jax.")
  need(v == version, f"format_version {v} does not match the layout of this save (format {version}); the file is corrupt.")
  need(_is_str(cfg.get("library_version"), MAX_SHORT), f"'library_version' must be a version string, found {short(cfg.get('library_version'))}.")
  need(isinstance(cfg.get("rslora"), bool), f"'rslora' must be true or false, found {short(cfg.get('rslora'))}.")
  need(isinstance(cfg.get("metadata"), dict), f"'metadata' must be an object, found {short(cfg.get('metadata'))}.")
  need(isinstance(cfg.get("base_model"), dict) and _is_str(cfg["base_model"].get("fingerprint"), MAX_SHORT),
       "'base_model.fingerprint' is missing.")
  entries = cfg.get("adapters")
  need(isinstance(entries, dict) and bool(entries), "'adapters' must be a non-empty object path -> entry.")
  for name in entries:
    need(_is_str(name), f"adapter path {short(name)} must be a non-empty string of at most {MAX_NAME} characters.")


def _check_alpha(need: _Check, w: str, rank: int, alpha: Any, scale: Any, rslora: bool) -> None:
  need(_is_number(alpha), f"{w}['alpha'] must be a number, found {short(alpha)}.")
  need(_is_number(scale), f"{w}: scale must be a number, found {short(scale)}.")
  want = alpha / (math.sqrt(rank) if rslora else rank)
  need(math.isclose(want, scale, rel_tol=1e-9, abs_tol=1e-12),
       f"{w}: scale {scale} does not equal alpha/{'sqrt(rank)' if rslora else 'rank'} = {want}; the config was edited inconsistently.")


def _check_entry(need: _Check, name: str, e: Any, rslora: bool) -> None:
  w = f"adapters[{short(name)}]"
  need(isinstance(e, dict), f"{w} must be an object, found {short(e)}.")
  keys = set(e)
  need(_ENTRY_KEYS <= keys <= _ENTRY_KEYS | _ENTRY_OPTIONAL,
       f"{w} must hold {sorted(_ENTRY_KEYS)} (and rank, alpha), found {names(sorted(keys), 12)}.")
  kind = e["kind"]
  need(_is_str(kind, MAX_SHORT), f"{w}['kind'] must be a kind name, found {short(kind)}.")
  cls = kind_named(kind)
  need(cls is not None,
       f"{w}: adapter kind {kind!r} is not registered in this lora_jax (known: {sorted(registered_kinds())}); it was saved "
       "by a newer lora_jax or with a kind from another package: upgrade lora_jax, or import the module that registers it.")
  # Fields with a default may be missing (a file from before the kind gained them).
  fields = [f for f in dataclasses.fields(cls) if f.name not in cls.ROLES]
  want_static = sorted(f.name for f in fields)
  required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
  static = e["static"]
  need(isinstance(static, dict) and required <= set(static) <= set(want_static),
       f"{w}['static'] must give {want_static} for kind {kind!r}, found {short(static)}.")
  layout = static["layout"]
  problem = _layout_problem(layout)
  need(problem is None, f"{w}['static']['layout'] {problem}.")
  for k, v in static.items():
    need(v is None or isinstance(v, (bool, int, float)) or _is_str(v, empty=True),
         f"{w}['static'][{k!r}] must be a string (at most {MAX_NAME} characters), number, bool or null, found {short(v)}.")
  tensors = e["tensors"]
  need(isinstance(tensors, dict) and sorted(tensors) == sorted(cls.ROLES),
       f"{w}['tensors'] must name the leaves {sorted(cls.ROLES)} of kind {kind!r}, found {short(tensors)}.")
  for leaf, t in tensors.items():
    need(isinstance(t, dict) and set(t) == {"dtype", "shape"} and t["dtype"] in _FLOAT_NAMES and _is_shape(t["shape"]),
         f"{w}['tensors'][{leaf!r}] must give a floating-point dtype (one of {_FLOAT_NAMES}) and a shape, found {short(t)}.")
  kernel = e["kernel"]
  need(isinstance(kernel, dict) and set(kernel) == {"shape", "dtype"} and _is_shape(kernel["shape"])
       and len(kernel["shape"]) == len(layout) and (kernel["dtype"] is None or _is_str(kernel["dtype"], MAX_SHORT)),
       f"{w}['kernel'] must give the kernel's shape ({len(layout)} sizes, one per layout letter) and dtype, found {short(kernel)}.")
  problem, own = _shape_problem(cls.ROLES, layout, tuple(kernel["shape"]), {n: tuple(t["shape"]) for n, t in tensors.items()})
  need(problem is None, f"{w}: {problem}; the config was edited or corrupted.")
  rank = own.get(("r",))
  if "rank" in e:
    need(is_int(e["rank"]) and e["rank"] == rank, f"{w}['rank'] is {short(e['rank'])}, but its tensors have rank {rank}.")
  if "alpha" in e:
    need(bool(rank), f"{w}['alpha'] is given for a kind without a rank.")
    _check_alpha(need, w, rank, e["alpha"], static.get("scale"), rslora)
  need(_is_hex64(e["data_sha256"]) and _is_hex64(e["sha256"]), f"{w}: its checksums are missing or malformed.")
  need(e["sha256"] == _entry_digest(e),
       f"{w}: its kind, static fields (scale, layout), rank, alpha, kernel or tensor shapes differ from what was "
       "saved (checksum mismatch): the file was edited or corrupted. Save the adapters again.")


def _config_v2(where: str, meta: Mapping[str, str]) -> dict[str, Any]:
  need = _Check(where)
  text = meta[CONFIG_KEY]
  need(len(text) <= MAX_CONFIG, f"the lora_jax config takes {len(text)} characters, over the {MAX_CONFIG} limit.")
  cfg = parse_json_object(text, where, "lora_jax config: ")
  extra = sorted(set(cfg) - _TOP_KEYS)
  need(not extra, f"lora_jax config: unexpected fields {names(extra)}; the file was edited or corrupted.")
  _check_common(need, cfg, 2)
  _check_spec(need, cfg.get("spec"), _SPEC_KEYS)
  for name, e in cfg["adapters"].items():
    _check_entry(need, name, e, cfg["rslora"])
  kernels = {k: e["kernel"] for k, e in cfg["adapters"].items()}
  need(cfg["base_model"]["fingerprint"] == _fingerprint(kernels), "'base_model.fingerprint' does not match the kernels; the file was edited or corrupted.")
  need(meta.get(DIGEST_KEY) == hashlib.sha256(text.encode("utf-8")).hexdigest(),
       "the lora_jax config (spec, metadata, versions or the list of adapters) differs from what was saved (checksum "
       "mismatch): the file was edited or corrupted. Save the adapters again.")
  return cfg


def _config_v1(config_path: str) -> dict[str, Any]:
  """A format-1 config (lora_jax 0.1), validated and brought into the format-2 shape."""
  cfg = read_json(config_path, max_bytes=MAX_CONFIG)
  need = _Check(config_path)
  _check_common(need, cfg, 1)
  need(cfg.get("variant") == "lora", f"variant {short(cfg.get('variant'))} is not supported; only 'lora'.")
  need(_is_hex64(cfg.get("tensors_sha256")), "'tensors_sha256' is missing.")
  _check_spec(need, cfg.get("spec"), _SPEC_KEYS_V1)
  kernels = cfg["base_model"].get("kernels")
  need(isinstance(kernels, dict), "'base_model.kernels' is missing.")
  need(set(kernels) == set(cfg["adapters"]), "base_model.kernels and adapters name different paths.")
  entries = {}
  for name, e in cfg["adapters"].items():
    w = f"adapters[{short(name)}]"
    need(isinstance(e, dict) and set(e) == {"rank", "alpha", "scale", "layout", "a_dtype", "b_dtype"},
         f"{w} must hold rank, alpha, scale, layout, a_dtype and b_dtype, found {short(e)}.")
    need(is_int(e["rank"]) and 1 <= e["rank"] <= MAX_DIM, f"{w}['rank'] must be a positive integer, found {short(e['rank'])}.")
    problem = _layout_problem(e["layout"])
    need(problem is None, f"{w}['layout'] {problem}.")
    _check_alpha(need, w, e["rank"], e["alpha"], e["scale"], cfg["rslora"])
    for which in ("a_dtype", "b_dtype"):
      need(e[which] in _FLOAT_NAMES, f"{w}[{which!r}] must be a floating-point dtype name, found {short(e[which])}.")
    k = kernels[name]
    need(isinstance(k, dict) and set(k) == {"shape", "dtype"} and _is_shape(k["shape"]) and len(k["shape"]) == len(e["layout"])
         and (k["dtype"] is None or _is_str(k["dtype"], MAX_SHORT)),
         f"base_model.kernels[{short(name)}] must give the kernel's shape ({len(e['layout'])} sizes) and dtype, found {short(k)}.")
    a_shape, b_shape = factor_shapes(tuple(k["shape"]), e["layout"], e["rank"])
    entries[name] = {
        "kind": "lora",
        "static": {"scale": float(e["scale"]), "layout": e["layout"]},
        "tensors": {"a": {"dtype": e["a_dtype"], "shape": list(a_shape)}, "b": {"dtype": e["b_dtype"], "shape": list(b_shape)}},
        "kernel": dict(k),
        "rank": e["rank"],
        "alpha": e["alpha"],
        "data_sha256": None,
        "sha256": None,
    }
  out = {k: cfg[k] for k in ("format", "format_version", "library_version", "rslora", "spec", "metadata")}
  out.update(adapters=entries, base_model={"fingerprint": cfg["base_model"]["fingerprint"]}, tensors_sha256=cfg["tensors_sha256"])
  return out


def _locate(path: str | os.PathLike) -> tuple[int, str, str]:
  """``(format_version, tensor file, format-1 config file)`` of the save at ``path``."""
  p = os.fspath(path)
  if os.path.isdir(p) and os.path.exists(os.path.join(p, "adapter_config.json")):
    raise AdapterFileError(
        f"{p} is a PEFT adapter directory (it has adapter_config.json); read it with "
        "lora_jax.import_peft(dir, params, name_map)."
    )
  refuse_pickle(p)
  tensor_path, json_path = _files(p)
  if os.path.lexists(tensor_path):
    _, meta = read_header(tensor_path)
    if CONFIG_KEY in meta:
      return 2, tensor_path, json_path
    if os.path.lexists(json_path):
      return 1, tensor_path, json_path
    raise AdapterFileError(
        f"{tensor_path}: a safetensors file without a lora_jax config (no {CONFIG_KEY!r} metadata entry, and no "
        f"{os.path.basename(json_path)} beside it): not written by lora_jax.save. Read params files with "
        "lora_jax.load_params, PEFT adapters with lora_jax.import_peft."
    )
  if os.path.lexists(json_path):
    raise FileNotFoundError(f"{tensor_path}: the tensor file named by {json_path} is missing.")
  raise FileNotFoundError(
      f"{tensor_path}: no lora_jax adapters here. lora_jax.save(path, ...) writes a directory with "
      f"{ADAPTERS_FILE}, or a NAME.safetensors file."
  )


def load_config(path: str | os.PathLike) -> dict[str, Any]:
  """The validated config of a saved adapter directory or file (format 2; a format-1 save's
  is brought into the same shape, with ``format_version`` 1). Reads the file's header only.

  Raises:
    FileNotFoundError: nothing saved at ``path``.
    AdapterFileError: a config that is malformed, edited (it does not match its checksum), or
      was not written by lora_jax; the message names the file and the field or path.

  >>> import tempfile, lora_jax
  >>> from lora_jax.kinds import LoraFactors
  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=4.0, layout="io")
  >>> d = lora_jax.save(tempfile.mkdtemp() + "/run", {"dense/kernel": f})
  >>> e = load_config(d)["adapters"]["dense/kernel"]
  >>> e["kind"], e["static"], e["rank"], e["alpha"], e["tensors"]["b"]
  ('lora', {'scale': 4.0, 'layout': 'io', 'rslora': False, 'dropout': 0.0, 'base_digest': None}, 1, 4.0, {'dtype': 'float32', 'shape': [1, 2]})
  """
  version, tensor_path, json_path = _locate(path)
  if version == 1:
    return _config_v1(json_path)
  _, meta = read_header(tensor_path)
  if CONFIG_KEY not in meta:
    raise fail(tensor_path, "the file changed while being read (a concurrent save?); read it again.")
  return _config_v2(tensor_path, meta)


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------


def load(
    path: str | os.PathLike, params: PyTree | None = None, *, check_dtype: bool = True
) -> PyTree:
  """Loads adapters written by :func:`save`, checking everything before returning anything.

  Args:
    path: the directory or ``.safetensors`` file given to :func:`save` (or the ``.json`` of a
      format-1 pair).
    params: the base params. If given, the result mirrors ``params`` (``None`` at non-adapted
      leaves, ready for :func:`lora_jax.merge` or :func:`lora_jax.wrap`), after checking that
      every saved path exists in ``params`` with the saved kernel shape (and dtype).
    check_dtype: with ``params``, refuse kernels whose dtype differs from the one recorded at
      save time (pass ``False`` to load, say, float32-trained adapters onto a bfloat16 base).

  Returns:
    With ``params``: a tree mirroring it. Without: a flat ``{path: adapter}`` dict in the
    saved order (it works with :func:`lora_jax.count` and :func:`save`; its keys are the
    '/'-joined paths of the params it was made for). Each adapter is rebuilt as the kind it
    was saved as. Leaves are placed on the default device; for a sharded base use
    ``lora_jax.shard_like(load(path, params), params)``.

  Multi-process: every process reads the file itself (a shared file system, or a copy on
  each host) and gets host-local leaves; ``shard_like`` then places them on the global mesh.
  Call it from every process: checking a PiSSA/OLoRA base digest against a kernel sharded
  over other processes' devices gathers that kernel (a collective).

  Raises:
    FileNotFoundError: nothing saved at ``path``.
    AdapterFileError: a malformed, edited, corrupted, pickled or non-finite file, or an
      adapter kind this lora_jax does not know; adapters of a base-changing init (PiSSA,
      OLoRA) whose recorded base digest differs from the kernel's in ``params`` (they fit only
      the residual base :func:`lora_jax.split` returned; quantized or abstract kernels are not
      checked); the message names the file and the path.
    ValueError: adapters that do not fit ``params`` (names the path, expected and found).

  >>> import tempfile, lora_jax
  >>> from lora_jax.kinds import LoraFactors
  >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=4.0, layout="io")
  >>> d = lora_jax.save(tempfile.mkdtemp() + "/run", {"dense": {"kernel": f, "bias": None}})
  >>> load(d)
  {'dense/kernel': LoraFactors(a=Array(...), b=Array(...), scale=4.0, layout='io')}
  >>> load(d, params)["dense"]["bias"] is None
  True
  """
  version, tensor_path, json_path = _locate(path)
  tensors, meta, digest = read_safetensors(tensor_path, digest=version == 1)
  if version == 2:
    if CONFIG_KEY not in meta:
      raise fail(tensor_path, "the file changed while being read (a concurrent save?); read it again.")
    cfg = _config_v2(tensor_path, meta)
  else:
    cfg = _config_v1(json_path)
    if digest != cfg["tensors_sha256"]:
      raise AdapterFileError(
          f"{tensor_path}: contents do not match the sha256 recorded in {json_path}: the file "
          "was modified, corrupted, or the pair comes from two different saves (an interrupted "
          "save?). Save again."
      )
  entries = cfg["adapters"]
  want = {f"{n}/{leaf}" for n, e in entries.items() for leaf in e["tensors"]}
  extra, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
  if extra or missing:
    raise fail(tensor_path, f"tensors do not match the config: missing {names(missing)}, unexpected {names(extra)}; "
                            "the file was edited or corrupted.")
  flat: dict[str, Adapter] = {}
  for name, e in entries.items():
    leaves = {}
    for leaf, t in e["tensors"].items():
      key = f"{name}/{leaf}"
      x = tensors[key]
      if x.dtype.name != t["dtype"] or list(x.shape) != t["shape"]:
        raise fail(tensor_path, f"tensor {short(key)} is {x.dtype.name}{list(x.shape)}, its config says "
                                f"{t['dtype']}{t['shape']}; the file was edited or corrupted.")
      leaves[leaf] = x
    if e["data_sha256"] is not None and _data_digest(leaves) != e["data_sha256"]:
      raise fail(tensor_path, f"adapters[{short(name)}]: the tensors differ from what was saved (checksum "
                              "mismatch): the file was corrupted. Save the adapters again.")
    for leaf, x in leaves.items():
      if not all_finite(x):
        raise fail(tensor_path, f"{name}/{leaf} holds NaN or Inf; refusing a non-finite adapter.")
    cls = kind_named(e["kind"])
    try:
      flat[name] = cls(**{k: jnp.asarray(v) for k, v in leaves.items()}, **e["static"])
    except (TypeError, ValueError) as err:
      raise fail(tensor_path, f"adapters[{short(name)}]: kind {e['kind']!r} refused its saved fields ({err}).") from None
  if params is None:
    return flat
  tree = _mirror(flat, params, {k: e["kernel"] for k, e in entries.items()}, check_dtype, source=os.fspath(path))
  _check_digests(tensor_path, flat, params)
  return tree


# ----------------------------------------------------------------------------------------------
# Base digests: adapters of a base-changing init (PiSSA, OLoRA) fit only the residual base.
# ----------------------------------------------------------------------------------------------

_FIX_BASE = (
    "Load them onto the residual base that lora_jax.split returned with them (keep it with "
    "lora_jax.save_params(path, base) and read it back with lora_jax.load_params), or convert "
    "them to plain LoRA on the original weights with lora_jax.to_original_base(adapters, "
    "initial_adapters)."
)


def _digest_of(leaf: Any) -> str | None:
  """The kernel's base digest (of a quantized leaf: of its dense values), or None where it
  cannot be told (no values)."""
  if multiprocess():  # a kernel sharded over other processes' devices: gathered (on every process)
    leaf = tree_to_host(leaf)
  if is_base_leaf(leaf):
    if any(isinstance(x, jax.core.Tracer) or not hasattr(x, "dtype") for x in jax.tree.leaves(leaf)):
      return None
    return base_digest(leaf)
  if not isinstance(leaf, (jax.Array, np.ndarray)) or isinstance(leaf, jax.core.Tracer):
    return None
  return base_digest(leaf)


def _with_digest(name: str, f: Adapter, leaf: Any, have_params: bool) -> Adapter:
  """``f`` with its base digest filled in (made under jit) or checked against ``leaf``."""
  digest = getattr(f, "base_digest", None)
  if digest is None:
    return f
  found = _digest_of(leaf) if have_params else None
  if digest == DIGEST_PENDING:
    if found is None:
      raise ValueError(
          f"{name!r}: these adapters were made under a trace (jax.jit(lora_jax.split)) by a "
          "base-changing init, so they do not yet record which base they belong to. Pass the "
          "base that split returned: lora_jax.save(path, adapters, params=base)."
      )
    return f.replace(base_digest=found)
  if found is not None and found != digest:
    raise ValueError(
        f"{name!r}: these adapters were made by a base-changing init (PiSSA/OLoRA/LoftQ) for a base "
        f"kernel with digest {digest!r}, but params hold one with digest {found!r} (the original "
        "weights rather than the residual?). Save them with params=the residual base that "
        "lora_jax.split returned with them, or convert them to plain LoRA on the original "
        "weights first with lora_jax.to_original_base(adapters, initial_adapters)."
    )
  return f


def _check_digests(tensor_path: str, flat: Mapping[str, Adapter], params: PyTree) -> None:
  by_path = dict(leaves_with_paths(params))
  for name, f in flat.items():
    digest = getattr(f, "base_digest", None)
    found = _digest_of(by_path[name]) if digest not in (None, DIGEST_PENDING) else None
    if found is not None and found != digest:
      raise fail(tensor_path, (
          f"adapters[{short(name)}] were made by a base-changing init (PiSSA/OLoRA/LoftQ) for a base kernel "
          f"with digest {digest!r}; these params hold one with digest {found!r} (the original weights "
          f"rather than the residual base?). {_FIX_BASE}"
      ))


def _mirror(
    flat: Mapping[str, Adapter],
    params: PyTree,
    kernels: Mapping[str, Any] | None,
    check_dtype: bool,
    source: str,
) -> PyTree:
  leaves = leaves_with_paths(params)
  by_path = dict(leaves)
  for name, f in flat.items():
    if name not in by_path:
      raise ValueError(
          f"{source}: adapter for {name!r}, which params lack. Params paths near it: "
          f"{nearby(name, list(by_path))}. These adapters were saved for a different model."
      )
    leaf = by_path[name]
    shape = tuple(getattr(leaf, "shape", ()))
    if len(shape) != len(f.layout):
      raise ValueError(f"{source}: {name!r}: params hold shape {shape}, the adapters were saved for a kernel of layout {f.layout!r}.")
    if f.expected_shapes(shape) != {n: tuple(x.shape) for n, x in f.leaves().items()}:
      saved = tuple((kernels or {}).get(name, {}).get("shape") or f.kernel_shape)
      raise ValueError(
          f"{source}: {name!r}: adapters were saved for a kernel of shape {saved}, params hold "
          f"{shape}. Load them onto the model they were trained for."
      )
    saved_dtype = (kernels or {}).get(name, {}).get("dtype")
    if check_dtype and saved_dtype is not None and np.dtype(leaf.dtype).name != saved_dtype:
      raise ValueError(
          f"{source}: {name!r}: adapters were saved for a {saved_dtype} kernel, params hold "
          f"{np.dtype(leaf.dtype).name}. Pass check_dtype=False if that is intended."
      )
  tree = tree_from_entries(params, [flat.get(p) for p, _ in leaves])
  try:
    check_adapters(params, tree)
  except (ValueError, TypeError) as e:
    raise type(e)(f"{source}: {e}") from None
  return tree


__all__ = [
    "ADAPTERS_FILE",
    "AdapterFileError",
    "adapters_to_tree",
    "CONFIG_FILE",
    "flatten_adapters",
    "FORMAT",
    "FORMAT_VERSION",
    "load",
    "load_config",
    "save",
]
