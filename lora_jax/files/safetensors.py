"""safetensors, read and written by hand so that every byte is checked before it is trusted.

Format: u64 little-endian header length N, N bytes of JSON (padded with spaces), then the
data buffer; each tensor's ``data_offsets`` are relative to the buffer; the tensors tile it.
``__metadata__`` maps strings to strings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, BinaryIO, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.files.atomic import atomic_write
from lora_jax.files.checks import AdapterFileError, fail, open_regular, parse_json_object, refuse_pickle, short

DTYPES: dict[str, np.dtype] = {
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
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit
DATA_DIGEST_KEY = "lora_jax_data_sha256"  # __metadata__: SHA-256 of the tensor table and the data
MAX_NDIM = 32
MAX_DIM = 2**48
_CHUNK = 1 << 20  # elements per finiteness check


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One entry of a safetensors header (validated)."""

  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int
  end: int


def is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def is_float_dtype(dtype: Any) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.floating))


def all_finite(x: np.ndarray) -> bool:
  """True if a floating-point array holds no NaN/Inf (checked in bounded chunks)."""
  if not is_float_dtype(x.dtype):
    return True
  flat = x.reshape(-1)
  for i in range(0, flat.size, _CHUNK):
    c = flat[i : i + _CHUNK]
    if not np.isfinite(c.astype(np.float32) if c.dtype.itemsize < 4 else c).all():
      return False
  return True


def _parse_header(path: Any, header: bytes, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  if not header.startswith(b"{"):
    raise fail(path, "safetensors header does not start with '{'; not a safetensors file, or corrupt.")
  obj = parse_json_object(header, path, "safetensors header: ")
  metadata = obj.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
  ):
    raise fail(path, "safetensors __metadata__ must map strings to strings; the file is corrupt.")
  infos = {}
  for name, entry in obj.items():
    where = f"tensor {short(name)}"
    if not name:
      raise fail(path, "a tensor with an empty name; the file is corrupt.")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
      raise fail(path, f"{where}: header entry must hold exactly dtype, shape and data_offsets, found {short(entry)}.")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
      raise fail(path, f"{where}: unsupported dtype {short(entry['dtype'])}; expected one of {sorted(DTYPES)}.")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(is_int(d) and 0 <= d <= MAX_DIM for d in shape)
    ):
      raise fail(path, f"{where}: shape {short(shape)} is not a list of at most {MAX_NDIM} sizes in [0, 2**48].")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
      raise fail(path, f"{where}: data_offsets {short(offsets)} is not a pair of integers.")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
      raise fail(path, f"{where}: data_offsets {offsets} fall outside the {data_len}-byte data buffer; the file is truncated or corrupt.")
    want = math.prod(shape) * dtype.itemsize
    if end - begin != want:
      raise fail(path, f"{where}: holds {end - begin} bytes but shape {tuple(shape)} of {entry['dtype']} needs {want}; the file is corrupt.")
    infos[name] = TensorInfo(name, dtype, tuple(shape), begin, end)
  pos = 0
  for info in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
    if info.begin != pos:
      raise fail(path, f"tensor {short(info.name)}: data starts at byte {info.begin}, expected {pos}: tensors overlap or leave gaps; the file is corrupt.")
    pos = info.end
  if pos != data_len:
    raise fail(path, f"tensors cover {pos} bytes of a {data_len}-byte data buffer; the file is corrupt or has trailing bytes.")
  return infos, metadata


def _sniff(head: bytes) -> str:
  if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
    return " It looks like a PyTorch/pickle file: see the note on converting .bin files to safetensors."
  return ""


def _open_checked(path: Any, f: BinaryIO) -> tuple[dict[str, TensorInfo], dict[str, str], int, bytes]:
  size = os.fstat(f.fileno()).st_size
  prefix = f.read(8)
  if len(prefix) < 8:
    raise fail(path, f"file has {size} bytes, too short for a safetensors header; truncated or not safetensors.")
  n = int.from_bytes(prefix, "little")
  if n < 2 or n > MAX_HEADER or n > size - 8:
    raise fail(
        path,
        f"safetensors header length {n} does not fit a {size}-byte file (limit {MAX_HEADER}); "
        "the file is truncated or not safetensors." + _sniff(prefix),
    )
  header = f.read(n)
  if len(header) != n:
    raise fail(path, "file ended inside the safetensors header; truncated (or it changed while being read).")
  infos, metadata = _parse_header(path, header, size - 8 - n)
  return infos, metadata, 8 + n, prefix + header


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Validated tensor entries and metadata of a safetensors file, without reading its data.

  Raises:
    FileNotFoundError: no file at ``path``.
    AdapterFileError: the header is malformed or inconsistent with the file size, the file is
      a pickle, or ``path`` is not a regular file (a directory, a FIFO, a device).

  >>> import tempfile, os
  >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
  >>> _ = write_safetensors(p, {"w": np.zeros((2, 3), np.float16)}, {"format": "pt"})
  >>> infos, meta = read_header(p)
  >>> infos["w"].shape, infos["w"].dtype, meta
  ((2, 3), dtype('float16'), {'format': 'pt'})
  """
  refuse_pickle(os.fspath(path))
  with open_regular(path) as f:
    infos, metadata, _, _ = _open_checked(path, f)
  return infos, metadata


def _table(infos: Mapping[str, Any]) -> bytes:
  """Canonical bytes of the tensor table (name -> dtype, shape, offsets), for the data checksum."""
  table = {n: [NAMES[i.dtype], list(i.shape), [i.begin, i.end]] for n, i in sorted(infos.items())}
  return json.dumps(table, separators=(",", ":"), ensure_ascii=True).encode() + b"\0"


def read_safetensors(
    path: str | os.PathLike, *, digest: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str], str | None]:
  """Reads a safetensors file after validating it; ``(tensors, metadata, sha256-or-None)``.

  Tensors come back in name order as writable numpy arrays, one allocation each, only after
  the whole header has been checked against the file size. A file that records a checksum
  of its tensors (``lora_jax_data_sha256`` in its metadata, as lora_jax's params files do)
  is checked against it.

  Raises:
    AdapterFileError: see :func:`read_header`; also a file that changed while being read, or
      whose tensors do not match their recorded checksum.

  >>> import tempfile, os
  >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
  >>> _ = write_safetensors(p, {"x": np.arange(3, dtype=np.float32)})
  >>> read_safetensors(p)[0]["x"]
  array([0., 1., 2.], dtype=float32)
  """
  refuse_pickle(os.fspath(path))
  h = hashlib.sha256() if digest else None
  with open_regular(path) as f:
    infos, metadata, start, head = _open_checked(path, f)
    if h is not None:
      h.update(head)
    recorded = metadata.get(DATA_DIGEST_KEY)
    d = None if recorded is None else hashlib.sha256(_table(infos))
    out = {}
    for info in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
      buf = bytearray(info.end - info.begin)
      f.seek(start + info.begin)
      if f.readinto(buf) != len(buf):
        raise fail(path, f"tensor {short(info.name)}: file ended early (it changed while being read?).")
      for x in (h, d):
        if x is not None:
          x.update(buf)
      out[info.name] = np.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
  if d is not None and d.hexdigest() != recorded:
    raise fail(path, f"the tensors or their table differ from the checksum the file records ({DATA_DIGEST_KEY}): "
                     "the file is corrupted or was edited. Write it again from its source.")
  return {k: out[k] for k in sorted(out)}, metadata, None if h is None else h.hexdigest()


def to_numpy(x: Any) -> np.ndarray:
  """A little-endian, C-contiguous numpy copy (or view) of an array on any device."""
  arr = x if isinstance(x, np.ndarray) else np.asarray(jax.device_get(x))
  if arr.dtype.byteorder == ">":
    arr = arr.astype(arr.dtype.newbyteorder("<"))
  return arr if arr.flags.c_contiguous else np.array(arr, order="C")  # keeps 0-d arrays 0-d


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A safetensors file serialised in memory: the length-prefixed header and the arrays."""

  head: bytes
  arrays: tuple[np.ndarray, ...]

  def chunks(self) -> Iterable[Any]:
    yield self.head
    for a in self.arrays:
      yield a.reshape(-1).view(np.uint8).data

  def write(self, f: BinaryIO) -> str:
    h = hashlib.sha256()
    for chunk in self.chunks():
      h.update(chunk)
      f.write(chunk)
    return h.hexdigest()


def encode_safetensors(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *, data_digest: bool = False
) -> Encoded:
  """Serialises the header of ``tensors`` (converted to numpy) without writing anything;
  ``data_digest`` records a checksum of the tensors that :func:`read_safetensors` verifies.

  Raises:
    TypeError: a bad tensor name, a dtype safetensors cannot hold, metadata not str -> str.
  """
  arrays = {}
  for name in sorted(tensors):
    if not isinstance(name, str) or not name or name == "__metadata__":
      raise TypeError(f"write_safetensors: tensor name {name!r} must be a non-empty string other than '__metadata__'.")
    arr = to_numpy(tensors[name])
    if arr.dtype not in NAMES:
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
  pos, infos = 0, {}
  for name, arr in arrays.items():
    header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
    infos[name] = TensorInfo(name, arr.dtype, tuple(arr.shape), pos, pos + arr.nbytes)
    pos += arr.nbytes
  if data_digest:
    h = hashlib.sha256(_table(infos))
    for arr in arrays.values():
      h.update(arr.reshape(-1).view(np.uint8).data)
    header.setdefault("__metadata__", {})[DATA_DIGEST_KEY] = h.hexdigest()
    header = {"__metadata__": header.pop("__metadata__"), **header}
  blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
  blob += b" " * (-len(blob) % 8)
  if len(blob) > MAX_HEADER:
    raise ValueError(f"write_safetensors: the header would take {len(blob)} bytes, over the {MAX_HEADER}-byte limit readers accept.")
  return Encoded(len(blob).to_bytes(8, "little") + blob, tuple(arrays.values()))


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> str:
  """Writes ``tensors`` (name -> array) as safetensors, atomically; returns the file's sha256.

  Tensors are laid out in name order, the header is padded to 8 bytes; any safetensors
  reader (``safetensors.torch.load_file``, ...) reads the result. The whole file is
  serialised before ``path`` is touched; it is written to a temp file (mode 0644 under umask
  022) and moved into place.

  Raises:
    TypeError: a tensor of a dtype safetensors cannot hold, or metadata that is not str -> str.
    ValueError: ``path`` is a directory.

  >>> import tempfile, os
  >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
  >>> len(write_safetensors(p, {"w": jnp.ones((2, 2), jnp.bfloat16)}))  # sha256 hex digest
  64
  """
  enc = encode_safetensors(tensors, metadata)
  return atomic_write(os.fspath(path), enc.write)


__all__ = [
    "AdapterFileError",
    "encode_safetensors",
    "read_header",
    "read_safetensors",
    "TensorInfo",
    "write_safetensors",
]
