"""Reading untrusted files: the error type, regular-file opening, strict and bounded JSON.

Everything read from a file is bounded before it is trusted: sizes, string lengths, nesting
depth, integer digits; no regular expression ever runs on a string from a file.
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import Any, BinaryIO

MAX_JSON_BYTES = 100 * 1024 * 1024  # the safetensors reference implementation's header limit
MAX_DEPTH = 64  # nesting of JSON read from files (configs are at most ~6 deep)
MAX_INT_DIGITS = 20  # any integer a config or header holds fits in 64 bits
MAX_NAME = 4096  # a parameter path, a tensor name, a pattern


class AdapterFileError(ValueError):
  """A file that lora_jax refuses to read: malformed, inconsistent, unsafe or not finite.

  The message names the file and the field, tensor or parameter path, and says what to do.

  >>> issubclass(AdapterFileError, ValueError)
  True
  """


AdapterFileError.__module__ = "lora_jax"  # tracebacks show the public name

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def fail(path: Any, what: str) -> AdapterFileError:
  return AdapterFileError(f"{os.fspath(path)}: {what}")


def clip(s: str, n: int = 200) -> str:
  """``s`` cut to ``n`` characters (for messages that quote a file's contents)."""
  return s if len(s) <= n else s[:n] + f"... ({len(s)} characters)"


def short(s: Any, n: int = 60) -> str:
  """``repr`` of a value from a file, cut to about ``n`` characters (for error messages)."""
  r = repr(s) if not isinstance(s, str) or len(s) <= n else repr(s[:n]) + f"... ({len(s)} characters)"
  return r if len(r) <= n + 40 else r[: n + 40] + "..."


def names(keys: list[Any], n: int = 5) -> str:
  """``['a', 'b', ...]`` for up to ``n`` names from a file, each cut short (for error messages)."""
  more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
  return "[" + ", ".join(short(k) for k in keys[:n]) + more + "]"


def refuse_pickle(path: str) -> None:
  if str(path).lower().endswith(PICKLE_SUFFIXES):
    raise AdapterFileError(
        f"{path}: refusing to read a pickle-based file (.bin/.pt/.pth/.ckpt): unpickling runs "
        "arbitrary code. Convert it once, in an environment you trust, to safetensors, e.g.\n"
        "  python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{os.path.basename(path)}', weights_only=True), "
        "'adapter_model.safetensors', metadata={'format': 'pt'})\"\n"
        "and read the .safetensors file instead."
    )


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: Any) -> BinaryIO:
  """Opens ``path`` for reading if it is a regular file (or a link to one), without blocking.

  A FIFO in place of a file would block ``open`` forever, a device would never end: the file is
  opened non-blocking, checked with ``fstat``, and refused unless it is a regular file.

  Raises:
    FileNotFoundError: nothing at ``path``.
    AdapterFileError: a directory, FIFO, device or socket.
  """
  flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
  try:
    fd = os.open(path, flags)
  except IsADirectoryError:
    raise fail(path, "is a directory, expected a file.") from None
  try:
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
      raise fail(path, "is a directory, expected a file.")
    if not stat.S_ISREG(mode):
      what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
      raise fail(path, f"is {what}, not a regular file; refusing to read it (point at the file itself).")
    if flags & getattr(os, "O_NONBLOCK", 0):
      import fcntl  # POSIX only, as is O_NONBLOCK

      fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


# ----------------------------------------------------------------------------------------------
# Strict JSON. Numbers that do not fit are kept as markers, so that the field that holds them
# can be named (``check_json`` / a field validator), instead of an OverflowError later.
# ----------------------------------------------------------------------------------------------


class BadNumber:
  """A JSON number that does not fit: more than MAX_INT_DIGITS digits, or a float overflow."""

  __slots__ = ("text",)

  def __init__(self, text: str):
    self.text = text

  def __repr__(self) -> str:
    digits = len(self.text.lstrip("-"))
    return f"<number {self.text[:12]}{'...' if len(self.text) > 12 else ''} of {digits} characters, out of range>"


def _parse_int(s: str) -> Any:
  return int(s) if len(s.lstrip("-")) <= MAX_INT_DIGITS else BadNumber(s)


def _parse_float(s: str) -> Any:
  x = float(s)
  return x if math.isfinite(x) else BadNumber(s)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out = {}
  for k, v in pairs:
    if k in out:
      raise ValueError(f"duplicate key {short(k)}")
    out[k] = v
  return out


def _reject_constant(name: str) -> Any:
  raise ValueError(f"non-standard JSON constant {name}")


def strict_json(text: str | bytes) -> Any:
  """``json.loads`` without duplicate keys or NaN/Infinity; out-of-range numbers become
  :class:`BadNumber` markers. Raises ValueError or RecursionError."""
  return json.loads(
      text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_int=_parse_int,
      parse_float=_parse_float,
  )


def field_name(parts: tuple[Any, ...]) -> str:
  """``('adapters', 'out/kernel', 'alpha')`` -> ``"adapters['out/kernel']['alpha']"``."""
  if not parts:
    return "the top level"
  head, rest = parts[0], parts[1:]
  return str(head) + "".join(f"[{p}]" if isinstance(p, int) else f"[{short(p)}]" for p in rest)


def check_json(obj: Any, where: Any, max_depth: int = MAX_DEPTH, prefix: tuple[Any, ...] = ()) -> None:
  """Refuses (AdapterFileError naming the field) out-of-range numbers and nesting deeper than
  ``max_depth``, anywhere in ``obj``; iterative, so a hostile file cannot exhaust the stack."""
  stack = [(obj, prefix)]
  while stack:
    x, parts = stack.pop()
    if isinstance(x, BadNumber):
      raise fail(where, f"{field_name(parts)}: {x!r}; numbers must fit in 64 bits.")
    if isinstance(x, (dict, list)):
      if len(parts) - len(prefix) >= max_depth:
        raise fail(where, f"{field_name(parts)}: nested more than {max_depth} levels deep; refusing it.")
      items = x.items() if isinstance(x, dict) else enumerate(x)
      stack.extend((v, parts + (k,)) for k, v in items)


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
  """Reads a JSON object strictly (no duplicate keys, no NaN/Infinity, numbers that fit in 64
  bits, at most 64 levels deep, a regular file of at most ``max_bytes``); AdapterFileError if not.

  >>> import tempfile, pathlib
  >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.json"
  >>> _ = p.write_text('{"r": 1, "r": 2}')
  >>> read_json(p)
  Traceback (most recent call last):
  ...
  lora_jax.AdapterFileError: ...c.json: not valid JSON (duplicate key 'r').
  >>> _ = p.write_text('{"alpha": 1' + '0' * 400 + '}')
  >>> read_json(p)
  Traceback (most recent call last):
  ...
  lora_jax.AdapterFileError: ...c.json: alpha: <number 100000000000... of 401 characters, out of range>; ...
  """
  with open_regular(path) as f:
    raw = f.read(max_bytes + 1)
  if len(raw) > max_bytes:
    raise fail(path, f"JSON file larger than {max_bytes} bytes; refusing to parse it.")
  return parse_json_object(raw, path)


def parse_json_object(raw: str | bytes, where: Any, what: str = "") -> dict[str, Any]:
  """Strict, bounded JSON object from ``raw`` (see :func:`read_json`); ``what`` prefixes messages."""
  try:
    obj = strict_json(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
    raise fail(where, f"{what}not valid JSON ({clip(str(e))}).") from None
  if not isinstance(obj, dict):
    raise fail(where, f"{what}expected a JSON object at the top level.")
  check_json(obj, where)
  return obj


__all__ = [
    "AdapterFileError",
    "BadNumber",
    "check_json",
    "open_regular",
    "read_json",
    "refuse_pickle",
    "strict_json",
]
