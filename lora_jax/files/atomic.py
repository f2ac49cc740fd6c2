"""Atomic file writes: a temp file beside the target, fsync, one ``os.replace``, fsync the
directory. A kill at any moment leaves the old file or the new one, never a mix.

Temp files are named ``.<target>.<host>.<pid>.<random>.tmp`` and created with mode 0666 less
the umask (0644 under the usual umask 022, like every other file the user writes;
``tempfile.mkstemp`` would give 0600). Before each write, temp files of the same
target left by dead processes of this host (a killed save) are removed first.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from typing import Any, BinaryIO, Callable

_HOST = re.sub(r"[^A-Za-z0-9_-]", "", socket.gethostname())[:32] or "host"
_LEGACY_AGE_S = 3600  # temp files of lora_jax <= 0.1 (mkstemp names, no pid) older than this are stale


def temp_name(path: str) -> str:
  d, base = os.path.split(path)
  return os.path.join(d, f".{base}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
  if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: it exists, owned by someone else
    return True
  return True


def stale_temps(path: str) -> list[str]:
  """Temp files of ``path`` left behind by dead writers (names only; nothing is removed)."""
  d, base = os.path.split(os.path.abspath(path))
  prefix = f".{base}."
  out = []
  try:
    names = os.listdir(d)
  except OSError:
    return out
  now = time.time()
  for name in names:
    if not (name.startswith(prefix) and name.endswith(".tmp")):
      continue
    fields = name[len(prefix) : -len(".tmp")].split(".")
    full = os.path.join(d, name)
    if len(fields) == 3 and fields[0] == _HOST and fields[1].isdigit():
      if int(fields[1]) != os.getpid() and not _pid_alive(int(fields[1])):
        out.append(full)
    elif len(fields) == 1 and re.fullmatch(r"[A-Za-z0-9_]{8}", fields[0]):  # mkstemp's names
      try:
        if now - os.lstat(full).st_mtime > _LEGACY_AGE_S:
          out.append(full)
      except OSError:
        pass
  return out


def remove_stale_temps(path: str) -> None:
  for name in stale_temps(path):
    try:
      os.unlink(name)
    except OSError:
      pass


def fsync_dir(directory: str) -> None:
  try:  # makes the rename itself durable; not possible on every platform / file system
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def check_target(path: str) -> None:
  """Refuses (ValueError) a target that is a directory: ``os.replace`` could not overwrite it."""
  if os.path.isdir(path):
    raise ValueError(
        f"{path}: is a directory; give the name of the file to write there, e.g. "
        f"{os.path.join(path, 'merged.safetensors')}."
    )


def atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> Any:
  """Runs ``write`` on a fresh temp file beside ``path`` and moves it into place; all or nothing.

  Raises:
    ValueError: ``path`` is a directory.
    OSError: the directory cannot be created or written (the message names it); nothing
      at ``path`` has changed then.
  """
  path = os.fspath(path)
  check_target(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  remove_stale_temps(path)  # so that killed saves leave at most one temp file behind
  tmp = temp_name(os.path.abspath(path))
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      result = write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  fsync_dir(directory)
  return result


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as indented JSON, atomically (serialised before the file is touched)."""
  text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
  atomic_write(os.fspath(path), lambda f: f.write(text.encode("utf-8")))


__all__ = ["atomic_write", "write_json", "check_target", "fsync_dir", "remove_stale_temps", "stale_temps"]
