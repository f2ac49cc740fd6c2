"""Files: adapters (safetensors + JSON config), merged params, and a safetensors reader that
trusts nothing it reads.

Every file lora_jax writes goes to a temporary file in the target directory and is moved into
place with ``os.replace``: a failed or interrupted save never leaves a half-written file and
never clobbers a good one. Every file it reads is validated (header length, JSON, dtypes,
offsets, sizes) before anything large is allocated; pickles are never opened. All problems with
a file's contents raise :class:`AdapterFileError` (a ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from typing import Any, BinaryIO, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._paths import leaves_with_paths, nearby, path_str, tree_from_entries
from lora_jax.adapters import check_adapters, merge
from lora_jax.kinds import LoraFactors, factor_shapes, kernel_shape, layout_counts
from lora_jax.spec import LoraSpec

PyTree = Any

ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "lora_jax.json"
FORMAT = "lora_jax.adapters"
PARAMS_FORMAT = "lora_jax.params"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class AdapterFileError(ValueError):
  """A file that lora_jax refuses to read: malformed, inconsistent, unsafe or not finite.

  >>> issubclass(AdapterFileError, ValueError)
  True
  """


def _version() -> str:
  from lora_jax import __version__  # a late import: lora_jax/__init__ imports this module.

  return __version__


# ----------------------------------------------------------------------------------------------
# safetensors, read and written by hand so that every byte is checked before it is trusted.
# Format: u64 little-endian header length N, N bytes of JSON (padded with spaces), then the
# data buffer; each tensor's data_offsets are relative to the buffer; the tensors tile it.
# ----------------------------------------------------------------------------------------------

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn),
    "F8_E5M2": np.dtype(jnp.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit
_MAX_NDIM = 32
_MAX_DIM = 2**48


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One entry of a safetensors header (validated)."""

  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int
  end: int


def _fail(path: Any, what: str) -> AdapterFileError:
  return AdapterFileError(f"{os.fspath(path)}: {what}")


def _refuse_pickle(path: str) -> None:
  if str(path).lower().endswith(PICKLE_SUFFIXES):
    raise AdapterFileError(
        f"{path}: refusing to read a pickle-based file (.bin/.pt/.pth/.ckpt): unpickling runs "
        "arbitrary code. Convert it once, in an environment you trust, to safetensors, e.g.\n"
        "  python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{os.path.basename(path)}', weights_only=True), "
        "'adapter_model.safetensors', metadata={'format': 'pt'})\"\n"
        "and read the .safetensors file instead."
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out = {}
  for k, v in pairs:
    if k in out:
      raise ValueError(f"duplicate key {k!r}")
    out[k] = v
  return out


def _reject_constant(name: str) -> Any:
  raise ValueError(f"non-standard JSON constant {name}")


def _strict_json(text: str | bytes) -> Any:
  return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(path: Any, header: bytes, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  try:
    text = header.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _fail(path, f"safetensors header is not UTF-8 ({e}); the file is corrupt.") from None
  if not text.startswith("{"):
    raise _fail(path, "safetensors header does not start with '{'; not a safetensors file, or corrupt.")
  try:
    obj = _strict_json(text)
  except (ValueError, RecursionError) as e:
    raise _fail(path, f"safetensors header is not valid JSON ({e}); the file is corrupt.") from None
  if not isinstance(obj, dict):
    raise _fail(path, "safetensors header is not a JSON object; the file is corrupt.")
  metadata = obj.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
  ):
    raise _fail(path, "safetensors __metadata__ must map strings to strings; the file is corrupt.")
  infos = {}
  for name, entry in obj.items():
    where = f"tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
      raise _fail(path, f"{where}: header entry must hold exactly dtype, shape and data_offsets, found {entry!r}.")
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
      raise _fail(path, f"{where}: unsupported dtype {entry['dtype']!r}; expected one of {sorted(_DTYPES)}.")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape)
    ):
      raise _fail(path, f"{where}: shape {shape!r} is not a list of at most {_MAX_NDIM} sizes in [0, 2**48].")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
      raise _fail(path, f"{where}: data_offsets {offsets!r} is not a pair of integers.")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
      raise _fail(path, f"{where}: data_offsets {offsets} fall outside the {data_len}-byte data buffer; the file is truncated or corrupt.")
    want = math.prod(shape) * dtype.itemsize
    if end - begin != want:
      raise _fail(path, f"{where}: holds {end - begin} bytes but shape {tuple(shape)} of {entry['dtype']} needs {want}; the file is corrupt.")
    infos[name] = TensorInfo(name, dtype, tuple(shape), begin, end)
  pos = 0
  for info in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
    if info.begin != pos:
      raise _fail(path, f"tensor {info.name!r}: data starts at byte {info.begin}, expected {pos}: tensors overlap or leave gaps; the file is corrupt.")
    pos = info.end
  if pos != data_len:
    raise _fail(path, f"tensors cover {pos} bytes of a {data_len}-byte data buffer; the file is corrupt or has trailing bytes.")
  return infos, metadata


def _sniff(path: Any, head: bytes) -> str:
  if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
    return " It looks like a PyTorch/pickle file: see the note on converting .bin files to safetensors."
  return ""


def _open_checked(path: Any, f: BinaryIO) -> tuple[dict[str, TensorInfo], dict[str, str], int, bytes]:
  size = os.fstat(f.fileno()).st_size
  prefix = f.read(8)
  if len(prefix) < 8:
    raise _fail(path, f"file has {size} bytes, too short for a safetensors header; truncated or not safetensors.")
  n = int.from_bytes(prefix, "little")
  if n < 2 or n > _MAX_HEADER or n > size - 8:
    raise _fail(
        path,
        f"safetensors header length {n} does not fit a {size}-byte file (limit {_MAX_HEADER}); "
        "the file is truncated or not safetensors." + _sniff(path, prefix),
    )
  header = f.read(n)
  if len(header) != n:
    raise _fail(path, "file ended inside the safetensors header; truncated.")
  infos, metadata = _parse_header(path, header, size - 8 - n)
  return infos, metadata, 8 + n, prefix + header


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Validated tensor entries and metadata of a safetensors file, without reading its data.

  Raises:
    AdapterFileError: the header is malformed or inconsistent with the file size, or the file
      is a pickle.

  >>> import tempfile, os
  >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
  >>> _ = write_safetensors(p, {"w": np.zeros((2, 3), np.float16)}, {"format": "pt"})
  >>> infos, meta = read_header(p)
  >>> infos["w"].shape, infos["w"].dtype, meta
  ((2, 3), dtype('float16'), {'format': 'pt'})
  """
  _refuse_pickle(os.fspath(path))
  with open(path, "rb") as f:
    infos, metadata, _, _ = _open_checked(path, f)
  return infos, metadata


def read_safetensors(
    path: str | os.PathLike, *, digest: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str], str | None]:
  """Reads a safetensors file after validating it; ``(tensors, metadata, sha256-or-None)``.

  Tensors come back in file-name order as writable numpy arrays, one allocation each, only
  after the whole header has been checked against the file size.

  Raises:
    AdapterFileError: see :func:`read_header`; also a file that changed while being read.

  >>> import tempfile, os
  >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
  >>> _ = write_safetensors(p, {"x": np.arange(3, dtype=np.float32)})
  >>> read_safetensors(p)[0]["x"]
  array([0., 1., 2.], dtype=float32)
  """
  _refuse_pickle(os.fspath(path))
  h = hashlib.sha256() if digest else None
  with open(path, "rb") as f:
    infos, metadata, start, head = _open_checked(path, f)
    if h is not None:
      h.update(head)
    out = {}
    for info in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
      buf = bytearray(info.end - info.begin)
      f.seek(start + info.begin)
      if f.readinto(buf) != len(buf):
        raise _fail(path, f"tensor {info.name!r}: file ended early (it changed while being read?).")
      if h is not None:
        h.update(buf)
      out[info.name] = np.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
  return {k: out[k] for k in sorted(out)}, metadata, None if h is None else h.hexdigest()


def _to_numpy(x: Any) -> np.ndarray:
  arr = np.asarray(jax.device_get(x))
  if arr.dtype.byteorder == ">":
    arr = arr.astype(arr.dtype.newbyteorder("<"))
  return arr if arr.flags.c_contiguous else np.array(arr, order="C")  # keeps 0-d arrays 0-d


def _atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> Any:
  """Runs ``write`` on a temp file beside ``path`` and moves it into place; all or nothing."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      result = write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  try:  # make the rename itself durable
    dfd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(dfd)
    finally:
      os.close(dfd)
  except OSError:
    pass
  return result


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> str:
  """Writes ``tensors`` (name -> array) as safetensors, atomically; returns the file's sha256.

  Tensors are laid out in name order, the header is padded to 8 bytes; any safetensors
  reader (``safetensors.torch.load_file``, ...) reads the result.

  Raises:
    TypeError: a tensor of a dtype safetensors cannot hold, or metadata that is not str -> str.

  >>> import tempfile, os
  >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
  >>> len(write_safetensors(p, {"w": jnp.ones((2, 2), jnp.bfloat16)}))  # sha256 hex digest
  64
  """
  arrays = {}
  for name in sorted(tensors):
    if not isinstance(name, str) or not name or name == "__metadata__":
      raise TypeError(f"write_safetensors: tensor name {name!r} must be a non-empty string other than '__metadata__'.")
    arr = _to_numpy(tensors[name])
    if arr.dtype not in _NAMES:
      raise TypeError(
          f"{name!r}: dtype {arr.dtype} cannot be stored in safetensors; cast it to one of "
          "float32, bfloat16, float16, float64 or an integer type first."
      )
    arrays[name] = arr
  header: dict[str, Any] = {}
  if metadata:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
      raise TypeError("write_safetensors: metadata must map str to str.")
    header["__metadata__"] = dict(metadata)
  pos = 0
  for name, arr in arrays.items():
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
    pos += arr.nbytes
  blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
  blob += b" " * (-len(blob) % 8)

  def write(f: BinaryIO) -> str:
    h = hashlib.sha256()
    for chunk in [len(blob).to_bytes(8, "little"), blob] + [a.reshape(-1).view(np.uint8).data for a in arrays.values()]:
      h.update(chunk)
      f.write(chunk)
    return h.hexdigest()

  return _atomic_write(os.fspath(path), write)


def _write_json(path: str, obj: Any) -> None:
  text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
  _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a JSON object strictly (no duplicate keys, no NaN/Infinity); AdapterFileError if not.

  >>> import tempfile, pathlib
  >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.json"
  >>> _ = p.write_text('{"r": 1, "r": 2}')
  >>> read_json(p)
  Traceback (most recent call last):
  ...
  lora_jax.io.AdapterFileError: ...c.json: not valid JSON (duplicate key 'r').
  """
  with open(path, "rb") as f:
    raw = f.read(_MAX_HEADER + 1)
  if len(raw) > _MAX_HEADER:
    raise _fail(path, f"JSON file larger than {_MAX_HEADER} bytes; refusing to parse it.")
  try:
    obj = _strict_json(raw.decode("utf-8"))
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
    raise _fail(path, f"not valid JSON ({e}).") from None
  if not isinstance(obj, dict):
    raise _fail(path, "expected a JSON object at the top level.")
  return obj


# ----------------------------------------------------------------------------------------------
# Adapters: save / load.
# ----------------------------------------------------------------------------------------------


def flatten_adapters(adapters: PyTree) -> dict[str, LoraFactors]:
  """``{path: LoraFactors}`` for a tree of adapters (or an already-flat dict), in tree order.

  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=1.0, layout="io")
  >>> list(flatten_adapters({"dense": {"kernel": f, "bias": None}}))
  ['dense/kernel']
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: x is None or isinstance(x, LoraFactors))
  out: dict[str, LoraFactors] = {}
  for p, x in flat:
    if x is None:
      continue
    name = path_str(p)
    if not isinstance(x, LoraFactors):
      raise TypeError(
          f"adapters[{name!r}] is a {type(x).__name__}, expected a LoraFactors or None. Build "
          "adapters with lora_jax.init(rng, params, spec) or lora_jax.load(path)."
      )
    if name in out:
      raise ValueError(f"two adapters share the path {name!r}; '/' inside a dict key makes paths ambiguous.")
    out[name] = x
  return out


def _files(path: str | os.PathLike) -> tuple[str, str]:
  """(tensors file, config file) for a directory, a ``.safetensors`` file or its ``.json``."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    return path, path[: -len(".safetensors")] + ".json"
  if path.endswith(".json") and not os.path.isdir(path):
    return path[: -len(".json")] + ".safetensors", path
  return os.path.join(path, ADAPTERS_FILE), os.path.join(path, CONFIG_FILE)


def _dtype_name(dtype: Any) -> str:
  return np.dtype(dtype).name


def _alpha(scale: float, rank: int, rslora: bool) -> float:
  alpha = scale * (math.sqrt(rank) if rslora else rank)
  rounded = round(alpha)
  return float(rounded) if abs(alpha - rounded) <= 1e-9 * max(1.0, abs(alpha)) else alpha


def _spec_targets(spec: LoraSpec) -> Any:
  t = spec.targets
  if isinstance(t, str):
    return t
  if callable(t):
    return None
  return list(t)


def save(
    path: str | os.PathLike,
    adapters: PyTree,
    spec: LoraSpec | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    params: PyTree | None = None,
) -> str:
  """Saves adapters as safetensors plus a JSON config, atomically; returns the directory/file.

  ``path`` is a directory (created if needed; it receives ``adapters.safetensors`` and
  ``lora_jax.json``) or a ``NAME.safetensors`` file (a pair with ``NAME.json`` beside it).
  Tensors are stored under flat key paths, ``<path>/a`` and ``<path>/b`` (e.g.
  ``layers/self_attn/q_proj/kernel/a``) in their own dtype, so a round trip is bit-exact.
  The config records per path the rank, alpha, scale and layout, the spec's targets when they
  are representable, the library version, a SHA-256 of the tensor file (a pair left
  inconsistent by an interrupted save is detected on load), and a fingerprint of the base
  model: the shape (and, with ``params``, the dtype) of each adapted kernel.

  Args:
    path: a directory, or a file name ending in ``.safetensors``.
    adapters: a tree from :func:`lora_jax.init` (``None`` at non-adapted leaves) or a flat
      ``{path: LoraFactors}`` dict as returned by :func:`load`.
    spec: the spec the adapters were made with; recorded, and used for the alphas (else
      ``alpha = scale * rank``).
    metadata: JSON-serialisable extra information (step, dataset, ...), stored verbatim.
    params: the base params; if given, the adapters are checked against them and the kernel
      dtypes are recorded.

  Raises:
    ValueError: adapters that do not fit ``params``, hold NaN/Inf, or disagree with ``spec``.
    TypeError: metadata that is not JSON-serialisable.

  >>> import tempfile, lora_jax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> ad = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["dense"], rank=2))
  >>> d = lora_jax.save(tempfile.mkdtemp() + "/run", ad, params=params)
  >>> lora_jax.load(d, params)["dense"]["kernel"].a.shape
  (4, 2)
  """
  if params is not None:
    adapters = _as_tree(adapters, params)
    check_adapters(params, adapters)
    kernels = {p: leaf for p, leaf in leaves_with_paths(params)}
  else:
    kernels = {}
  flat = flatten_adapters(adapters)
  if not flat:
    raise ValueError("save: the adapters hold no LoraFactors; nothing to save.")
  rslora = bool(spec.rslora) if spec is not None else False
  tensors, entries, base = {}, {}, {}
  for name, f in flat.items():
    a, b = _to_numpy(f.a), _to_numpy(f.b)
    _check_factors(name, a, b, f.layout, err=ValueError)
    for which, x in (("a", a), ("b", b)):
      if _is_float(x.dtype) and not np.isfinite(x.astype(np.float32)).all():
        raise ValueError(
            f"{name!r}: factor {which} holds NaN or Inf; refusing to save a non-finite adapter "
            "(training diverged?). Save an earlier checkpoint, or lower the learning rate."
        )
      tensors[f"{name}/{which}"] = x
    rank = f.rank
    alpha = _alpha(f.scale, rank, rslora)
    if spec is not None:
      alpha = float(spec.alpha_for(name))
      if not math.isclose(spec.scale_for(rank, alpha), f.scale, rel_tol=1e-9, abs_tol=0.0):
        raise ValueError(
            f"{name!r}: the spec gives scale {spec.scale_for(rank, alpha)} (rank {rank}, alpha "
            f"{alpha}, rslora={spec.rslora}) but the adapter has scale {f.scale}; pass the spec "
            "these adapters were made with, or spec=None."
        )
    entries[name] = {
        "rank": rank,
        "alpha": alpha,
        "scale": float(f.scale),
        "layout": f.layout,
        "a_dtype": _dtype_name(a.dtype),
        "b_dtype": _dtype_name(b.dtype),
    }
    leaf = kernels.get(name)
    base[name] = {
        "shape": list(kernel_shape(a.shape, b.shape, f.layout)),
        "dtype": None if leaf is None else _dtype_name(leaf.dtype),
    }
  meta = dict(metadata or {})
  try:
    json.dumps(meta, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(f"save(metadata=...): must be JSON-serialisable ({e}).") from None
  tensor_path, config_path = _files(path)
  if os.path.isdir(tensor_path) or os.path.isdir(config_path):
    raise ValueError(f"save: {tensor_path} or {config_path} is a directory; choose another path.")
  digest = write_safetensors(tensor_path, tensors, {"format": FORMAT, "lora_jax_version": _version()})
  config = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "library_version": _version(),
      "variant": "lora",
      "tensors": os.path.basename(tensor_path),
      "tensors_sha256": digest,
      "rslora": rslora,
      "spec": None
      if spec is None
      else {
          "targets": _spec_targets(spec),
          "rank": int(spec.rank),
          "alpha": float(spec.alpha),
          "rank_pattern": dict(spec.rank_pattern or {}),
          "alpha_pattern": {k: float(v) for k, v in (spec.alpha_pattern or {}).items()},
          "rslora": bool(spec.rslora),
      },
      "adapters": entries,
      "base_model": {"fingerprint": _fingerprint(base), "kernels": base},
      "metadata": meta,
  }
  _write_json(config_path, config)  # last: a pair interrupted before this fails the sha256 check
  return os.fspath(path)


def _fingerprint(base: Mapping[str, Any]) -> str:
  canon = json.dumps({k: [v["shape"], v["dtype"]] for k, v in sorted(base.items())}, separators=(",", ":"))
  return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _check_factors(name: str, a: Any, b: Any, layout: str, *, err: type = AdapterFileError, where: str = "") -> None:
  if not isinstance(layout, str) or not layout or set(layout) - set("lio") or "i" not in layout or "o" not in layout:
    raise err(f"{where}{name!r}: layout {layout!r} must be letters from 'l', 'i', 'o' with at least one 'i' and one 'o'.")
  nl, ni, no = layout_counts(layout)
  if len(a.shape) != nl + ni + 1 or len(b.shape) != nl + no + 1:
    raise err(
        f"{where}{name!r}: layout {layout!r} needs a with {nl + ni + 1} axes and b with "
        f"{nl + no + 1}, found a{tuple(a.shape)} and b{tuple(b.shape)}."
    )
  if tuple(a.shape[:nl]) != tuple(b.shape[:nl]) or a.shape[-1] != b.shape[nl]:
    raise err(
        f"{where}{name!r}: factors a{tuple(a.shape)} and b{tuple(b.shape)} disagree on the "
        f"leading axes or the rank (layout {layout!r})."
    )


def _need(cond: bool, path: str, what: str) -> None:
  if not cond:
    raise _fail(path, what)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
  """The validated JSON config of a saved adapter directory (or file pair).

  Raises:
    FileNotFoundError: no config file where one is expected.
    AdapterFileError: a config that is malformed or was not written by lora_jax.

  >>> import tempfile, lora_jax
  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=4.0, layout="io")
  >>> d = lora_jax.save(tempfile.mkdtemp() + "/run", {"dense/kernel": f})
  >>> load_config(d)["adapters"]["dense/kernel"]
  {'rank': 1, 'alpha': 4.0, 'scale': 4.0, 'layout': 'io', 'a_dtype': 'float32', 'b_dtype': 'float32'}
  """
  tensor_path, config_path = _files(path)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json")):
    raise AdapterFileError(
        f"{os.fspath(path)} is a PEFT adapter directory (it has adapter_config.json); read it with "
        "lora_jax.import_peft(dir, params, name_map)."
    )
  _refuse_pickle(os.fspath(path))
  if not os.path.exists(config_path):
    raise FileNotFoundError(
        f"{config_path}: no lora_jax config here. lora_jax.save(path, ...) writes a directory "
        f"with {ADAPTERS_FILE} and {CONFIG_FILE}, or NAME.safetensors with NAME.json."
    )
  cfg = read_json(config_path)
  p = config_path
  _need(cfg.get("format") == FORMAT, p, f"'format' is {cfg.get('format')!r}, expected {FORMAT!r}; not a lora_jax adapter config.")
  _need(_is_int(cfg.get("format_version")) and cfg["format_version"] <= FORMAT_VERSION, p,
        f"format_version {cfg.get('format_version')!r} is not one this lora_jax ({_version()}) reads (<= {FORMAT_VERSION}); upgrade lora_jax.")
  _need(cfg.get("variant") == "lora", p, f"variant {cfg.get('variant')!r} is not supported; only 'lora'.")
  _need(isinstance(cfg.get("tensors_sha256"), str), p, "'tensors_sha256' is missing.")
  _need(isinstance(cfg.get("rslora"), bool), p, "'rslora' must be true or false.")
  entries = cfg.get("adapters")
  _need(isinstance(entries, dict) and bool(entries), p, "'adapters' must be a non-empty object path -> entry.")
  base = cfg.get("base_model")
  _need(isinstance(base, dict) and isinstance(base.get("kernels"), dict), p, "'base_model.kernels' is missing.")
  for name, e in entries.items():
    w = f"adapters[{name!r}]"
    _need(isinstance(e, dict), p, f"{w} must be an object.")
    _need(_is_int(e.get("rank")) and e["rank"] >= 1, p, f"{w}.rank must be a positive integer, found {e.get('rank')!r}.")
    for k in ("alpha", "scale"):
      _need(isinstance(e.get(k), (int, float)) and not isinstance(e.get(k), bool) and math.isfinite(e[k]), p,
            f"{w}.{k} must be a finite number, found {e.get(k)!r}.")
    _need(isinstance(e.get("layout"), str) and bool(re.fullmatch(r"[lio]*i[lio]*", e["layout"])) and "o" in e["layout"], p,
          f"{w}.layout must be a string of 'l'/'i'/'o' with an 'i' and an 'o', found {e.get('layout')!r}.")
    want = e["alpha"] / (math.sqrt(e["rank"]) if cfg["rslora"] else e["rank"])
    _need(math.isclose(want, e["scale"], rel_tol=1e-9, abs_tol=1e-12), p,
          f"{w}: scale {e['scale']} does not equal alpha/{'sqrt(rank)' if cfg['rslora'] else 'rank'} = {want}; the config was edited inconsistently.")
    k = base["kernels"].get(name)
    _need(isinstance(k, dict) and isinstance(k.get("shape"), list) and all(_is_int(d) and d >= 0 for d in k["shape"])
          and len(k["shape"]) == len(e["layout"]) and (k.get("dtype") is None or isinstance(k["dtype"], str)), p,
          f"base_model.kernels[{name!r}] must give the kernel's shape ({len(e['layout'])} sizes) and dtype.")
  _need(set(base["kernels"]) == set(entries), p, "base_model.kernels and adapters name different paths.")
  return cfg


def load(
    path: str | os.PathLike, params: PyTree | None = None, *, check_dtype: bool = True
) -> PyTree:
  """Loads adapters written by :func:`save`, checking everything before returning anything.

  Args:
    path: the directory (or ``.safetensors`` / ``.json`` file of a pair) given to :func:`save`.
    params: the base params. If given, the result mirrors ``params`` (``None`` at non-adapted
      leaves, ready for :func:`lora_jax.merge` or :func:`lora_jax.wrap`), after checking that
      every saved path exists in ``params`` with the saved kernel shape (and dtype).
    check_dtype: with ``params``, refuse kernels whose dtype differs from the one recorded at
      save time (pass ``False`` to load, say, float32-trained adapters onto a bfloat16 base).

  Returns:
    With ``params``: a tree mirroring it. Without: a flat ``{path: LoraFactors}`` dict in the
    saved order (it works with :func:`lora_jax.count` and :func:`save`; its keys are the
    '/'-joined paths of the params it was made for). Factors are placed on the default
    device; for a sharded base use ``lora_jax.shard_like(load(path, params), params)``.

  Raises:
    FileNotFoundError: nothing saved at ``path``.
    AdapterFileError: a malformed, inconsistent, pickled or non-finite file.
    ValueError: adapters that do not fit ``params`` (names the path, expected and found).

  >>> import tempfile, lora_jax
  >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=4.0, layout="io")
  >>> d = lora_jax.save(tempfile.mkdtemp() + "/run", {"dense": {"kernel": f, "bias": None}})
  >>> load(d)
  {'dense/kernel': LoraFactors(a=Array(...), b=Array(...), scale=4.0, layout='io')}
  >>> load(d, params)["dense"]["bias"] is None
  True
  """
  cfg = load_config(path)
  tensor_path, config_path = _files(path)
  if not os.path.exists(tensor_path):
    raise FileNotFoundError(f"{tensor_path}: the tensor file named by {config_path} is missing.")
  tensors, _, digest = read_safetensors(tensor_path, digest=True)
  if digest != cfg["tensors_sha256"]:
    raise AdapterFileError(
        f"{tensor_path}: contents do not match the sha256 recorded in {config_path}: the file "
        "was modified, corrupted, or the pair comes from two different saves (an interrupted "
        "save?). Save again."
    )
  entries = cfg["adapters"]
  want = {f"{n}/{w}" for n in entries for w in "ab"}
  extra, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
  if extra or missing:
    raise AdapterFileError(
        f"{tensor_path}: tensors do not match the config: missing {missing[:5]}, unexpected {extra[:5]}."
    )
  flat: dict[str, LoraFactors] = {}
  kernels = cfg["base_model"]["kernels"]
  for name, e in entries.items():
    a, b = tensors[f"{name}/a"], tensors[f"{name}/b"]
    _check_factors(name, a, b, e["layout"], where=f"{tensor_path}: ")
    shape = kernel_shape(a.shape, b.shape, e["layout"])
    if a.shape[-1] != e["rank"] or list(shape) != kernels[name]["shape"]:
      raise AdapterFileError(
          f"{tensor_path}: {name!r}: factors a{a.shape}, b{b.shape} do not match the config "
          f"(rank {e['rank']}, kernel {tuple(kernels[name]['shape'])})."
      )
    for which, x in (("a", a), ("b", b)):
      if not _is_float(x.dtype) or x.dtype.name != e.get(f"{which}_dtype"):
        raise AdapterFileError(
            f"{tensor_path}: {name}/{which} has dtype {x.dtype}, the config says "
            f"{e.get(f'{which}_dtype')!r}; adapters must be floating point and match their config."
        )
      if not np.isfinite(x.astype(np.float32)).all():
        raise AdapterFileError(f"{tensor_path}: {name}/{which} holds NaN or Inf; refusing a non-finite adapter.")
    flat[name] = LoraFactors(a=jnp.asarray(a), b=jnp.asarray(b), scale=float(e["scale"]), layout=e["layout"])
  if params is None:
    return flat
  return _mirror(flat, params, kernels, check_dtype, source=os.fspath(path))


def _mirror(
    flat: Mapping[str, LoraFactors],
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
    want_a, want_b = factor_shapes(shape, f.layout, f.rank)
    if (tuple(f.a.shape), tuple(f.b.shape)) != (want_a, want_b):
      saved = kernel_shape(f.a.shape, f.b.shape, f.layout)
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
  entries = [flat.get(p) for p, _ in leaves]
  tree = tree_from_entries(params, entries)
  check_adapters(params, tree)
  return tree


def _as_tree(adapters: PyTree, params: PyTree) -> PyTree:
  """Accepts a flat ``{path: LoraFactors}`` dict where a tree mirroring ``params`` is expected."""
  if isinstance(adapters, Mapping) and adapters and all(isinstance(v, LoraFactors) for v in adapters.values()):
    try:
      check_adapters(params, adapters)
      return adapters
    except ValueError:
      return adapters_to_tree(adapters, params)
  return adapters


def adapters_to_tree(flat: Mapping[str, LoraFactors], params: PyTree) -> PyTree:
  """Puts a flat ``{path: LoraFactors}`` dict into a tree mirroring ``params``, checking shapes.

  >>> params = {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=1.0, layout="io")
  >>> adapters_to_tree({"d/kernel": f}, params)["d"]["bias"] is None
  True
  """
  return _mirror(flat, params, None, False, source="adapters")


# ----------------------------------------------------------------------------------------------
# Merged export.
# ----------------------------------------------------------------------------------------------


def _flat_params(params: PyTree) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name, leaf in leaves_with_paths(params):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise TypeError(f"{name!r}: params leaf is a {type(leaf).__name__}, not an array; only arrays can be saved.")
    if name in out:
      raise ValueError(f"two params leaves share the path {name!r}; '/' inside a dict key makes paths ambiguous.")
    out[name] = leaf
  return out


def _is_float(dtype: Any) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.floating))


def save_params(path: str | os.PathLike, params: PyTree, metadata: Mapping[str, str] | None = None) -> str:
  """Saves any pytree of arrays as one safetensors file under flat '/'-joined paths, atomically.

  >>> import tempfile
  >>> p = save_params(tempfile.mkdtemp() + "/p.safetensors", {"w": {"kernel": jnp.ones((2, 2))}})
  >>> load_params(p)["w"]["kernel"].shape
  (2, 2)
  """
  flat = _flat_params(params)
  meta = {"format": PARAMS_FORMAT, "lora_jax_version": _version(), **dict(metadata or {})}
  write_safetensors(path, flat, meta)
  return os.fspath(path)


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
  under its '/'-joined path, readable by :func:`load_params` or any safetensors reader.

  Args:
    path: output file (``.safetensors``), written atomically.
    params: the base params.
    adapters: adapters mirroring ``params`` (or a flat ``{path: LoraFactors}`` dict).
    dtype: if given, floating-point leaves are saved in this dtype (e.g. ``jnp.bfloat16``).
    safe: refuse to write when a merged kernel (or a leaf made non-finite by ``dtype``) holds
      NaN/Inf, like PEFT's ``safe_merge``.

  Raises:
    ValueError: adapters that do not fit ``params``; with ``safe``, a non-finite merged leaf
      (the message names its path). Nothing is written then.

  >>> import tempfile
  >>> params = {"w": {"kernel": jnp.zeros((2, 2))}}
  >>> f = LoraFactors(a=jnp.ones((2, 1)), b=jnp.ones((1, 2)), scale=0.5, layout="io")
  >>> p = save_merged(tempfile.mkdtemp() + "/m.safetensors", params, {"w": {"kernel": f}})
  >>> load_params(p)["w"]["kernel"]
  Array([[0.5, 0.5],
         [0.5, 0.5]], dtype=float32)
  """
  adapters = _as_tree(adapters, params)
  adapted = {p for p, _, f in check_adapters(params, adapters) if f is not None}
  merged = _flat_params(merge(params, adapters))
  base = _flat_params(params)
  out = {}
  for name, leaf in merged.items():
    if dtype is not None and _is_float(leaf.dtype):
      leaf = jnp.asarray(leaf).astype(dtype)
    if safe and _is_float(leaf.dtype):
      finite = bool(jnp.isfinite(leaf).all())
      if not finite and (name in adapted or bool(jnp.isfinite(base[name]).all())):
        why = "merging its adapter" if name in adapted else f"casting it to {np.dtype(dtype).name}"
        raise ValueError(
            f"{name!r}: holds NaN or Inf after {why}; refusing to save (safe=True). Check the "
            "adapter for non-finite values or overflow, or pass safe=False to save anyway."
        )
    out[name] = leaf
  write_safetensors(path, out, {"format": PARAMS_FORMAT, "lora_jax_version": _version(), "merged": "true"})
  return os.fspath(path)


def _nest(flat: Mapping[str, Any], source: str) -> dict[str, Any]:
  root: dict[str, Any] = {}
  for name, value in flat.items():
    parts = name.split("/")
    node = root
    for i, part in enumerate(parts[:-1]):
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise AdapterFileError(f"{source}: {name!r} nests under {'/'.join(parts[: i + 1])!r}, which is itself a tensor.")
      node = child
    if parts[-1] in node:
      raise AdapterFileError(f"{source}: {name!r} is both a tensor and a prefix of other tensors.")
    node[parts[-1]] = value
  return root


def load_params(path: str | os.PathLike, like: PyTree | None = None) -> PyTree:
  """Loads a params file written by :func:`save_merged` / :func:`save_params` (or any
  safetensors file with '/'-joined names), validating it first.

  Args:
    path: the ``.safetensors`` file.
    like: optional params tree to mirror: the result has its structure, after checking that
      the file holds exactly its paths with the same shapes and dtypes.

  Returns:
    A nested dict of ``jax.Array`` (split on '/'), or a tree shaped like ``like``.

  Raises:
    AdapterFileError: a malformed file, or one that does not match ``like`` (names the path,
      expected vs found).
  """
  tensors, _, _ = read_safetensors(path)
  if like is None:
    return _nest({k: jnp.asarray(v) for k, v in tensors.items()}, os.fspath(path))
  want = _flat_params(like)
  missing, extra = [k for k in want if k not in tensors], [k for k in tensors if k not in want]
  if missing or extra:
    raise AdapterFileError(
        f"{os.fspath(path)}: file and `like` differ: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}."
    )
  for k, leaf in want.items():
    t = tensors[k]
    if tuple(t.shape) != tuple(leaf.shape) or t.dtype != np.dtype(leaf.dtype):
      raise AdapterFileError(
          f"{os.fspath(path)}: {k!r}: expected {tuple(leaf.shape)} {np.dtype(leaf.dtype).name}, "
          f"found {tuple(t.shape)} {t.dtype.name}."
      )
  return tree_from_entries(like, [jnp.asarray(tensors[k]) for k in want])


__all__ = [
    "AdapterFileError",
    "adapters_to_tree",
    "flatten_adapters",
    "load",
    "load_config",
    "load_params",
    "read_header",
    "read_safetensors",
    "save",
    "save_merged",
    "save_params",
    "write_safetensors",
]
