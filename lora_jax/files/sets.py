"""Named adapter sets: several adapters for one base in one directory, written and read whole.

A set is a ``{name: adapters}`` dict. On disk it takes PEFT's layout for several adapters:
the default adapter at the root, every other one in a sub-folder named after it, one level
deep. :func:`save_set` writes lora_jax files (each entry is what :func:`lora_jax.save` writes,
so ``lora_jax.load(directory / name)`` reads one) and an index, ``lora_jax_set.json``;
:func:`export_peft_set` writes PEFT directories (``adapter_config.json`` +
``adapter_model.safetensors`` per entry) that ``PeftModel.from_pretrained`` /
``load_adapter`` read; :func:`load_set` and :func:`import_peft_set` read them back::

    run/                          run/
      lora_jax_set.json             adapter_config.json        (the default adapter)
      adapters.safetensors          adapter_model.safetensors
      math/adapters.safetensors     math/adapter_config.json
      sql/adapters.safetensors      math/adapter_model.safetensors

Writing replaces the directory as a whole: the new set is written into a fresh sibling
directory (``.<name>.<host>.<pid>.<random>.tmp``), every file fsynced, and then swapped with
the old one in one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux (elsewhere: two renames,
the old set restored if the second fails), after which the old set is removed. A failure or a
kill at any moment before the swap leaves the previous set as it was (and at worst a temp
directory, removed by the next save once its writer is dead). A reader never gets a mix of two
sets: :func:`load_set` checks every entry against the index it read. Because the old directory goes away, a save refuses to replace a directory that
holds anything a set does not hold (a checkpoint, notes), naming it.

Reading trusts nothing: names are checked as on saving, an index is bounded (size, number of
adapters, name lengths), sub-folders must be real directories (not symbolic links), and every
entry must be the file the index recorded (its config checksum). Failures are
:class:`~lora_jax.AdapterFileError` naming the file and field.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import sys
import unicodedata
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from lora_jax._multihost import multiprocess, once, tree_to_host
from lora_jax.files.adapters import ADAPTERS_FILE, DIGEST_KEY, _encode, _version, _write_save, load
from lora_jax.files.atomic import _HOST, _pid_alive, fsync_dir, write_json
from lora_jax.files.checks import AdapterFileError, fail, names as _names, read_json, short
from lora_jax.files.safetensors import read_header
from lora_jax.spec import LoraSpec

if TYPE_CHECKING:  # lora_jax.interop imports lora_jax.files: imported late below
  from lora_jax.interop import NameMapLike

PyTree = Any

SET_INDEX = "lora_jax_set.json"
SET_FORMAT = "lora_jax.adapter_set"
SET_FORMAT_VERSION = 1
MAX_SET_SIZE = 1024  # adapters in one set
MAX_SET_NAME = 128  # characters of an adapter name (and at most 255 bytes of UTF-8: a file name)
MAX_INDEX_BYTES = 1024 * 1024
MAX_LISTING = 10_000  # entries of a PEFT directory looked at when finding its adapters
DEFAULT = "default"  # PEFT's name for the adapter at the root
_PEFT_CONFIG, _PEFT_WEIGHTS, _PEFT_PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
_MODEL_CARD = "README.md"  # PEFT writes one at the root; kept across an export_peft_set
_RESERVED = {SET_INDEX, ADAPTERS_FILE, _PEFT_CONFIG, _PEFT_WEIGHTS, _PEFT_PICKLE, _MODEL_CARD, "lora_jax.json"}
_BAD_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible format character", "Cs": "a lone surrogate",
                   "Zl": "a line separator", "Zp": "a paragraph separator"}


# ----------------------------------------------------------------------------------------------
# Names.
# ----------------------------------------------------------------------------------------------


def name_problem(name: Any) -> str | None:
  """Why ``name`` cannot name an adapter of a set (it becomes a sub-folder), or None.

  >>> name_problem("math"), name_problem("../etc")
  (None, "contains '/': a name becomes one sub-folder, so path separators are refused")
  """
  if not isinstance(name, str):
    return f"is a {type(name).__name__}, not a string"
  if not name:
    return "is empty"
  if len(name) > MAX_SET_NAME:
    return f"has {len(name)} characters, more than {MAX_SET_NAME}"
  for c in name:
    what = _BAD_CATEGORIES.get(unicodedata.category(c))
    if what:
      return f"contains {what} ({c!r}); use printable characters"
  for sep in ("/", "\\"):
    if sep in name:
      return f"contains {sep!r}: a name becomes one sub-folder, so path separators are refused"
  if name in (".", ".."):
    return f"is {name!r}, which names a directory, not an adapter"
  if name.startswith("."):
    return "starts with '.' (hidden and temporary files start so); start it with another character"
  if len(name.encode("utf-8")) > 255:
    return f"takes {len(name.encode('utf-8'))} bytes of UTF-8, more than a file name may (255)"
  if _fold(name) in {_fold(r) for r in _RESERVED}:
    return f"is the name of a file the set directory holds ({name!r}); choose another"
  return None


def _fold(name: str) -> str:
  """A name as a case-insensitive (macOS, Windows) file system compares it."""
  return unicodedata.normalize("NFC", name).casefold()


def _check_names(named: Iterable[str], what: str) -> list[str]:
  """The names, in order, refusing bad ones and ones that collide on a case-insensitive disk."""
  out, folded = [], {}
  for name in named:
    problem = name_problem(name)
    if problem:
      raise ValueError(f"{what}: adapter name {short(name)} {problem}.")
    other = folded.setdefault(_fold(name), name)
    if other != name:
      raise ValueError(f"{what}: adapter names {other!r} and {name!r} differ only in case (or Unicode form); "
                       "their sub-folders would be one on macOS and Windows. Rename one.")
    out.append(name)
  return out


def _check_set(fn: str, named: Any, default: str | None) -> tuple[list[str], str | None]:
  """``(names, root name or None)`` of a set to write, validated."""
  if not isinstance(named, Mapping):
    raise TypeError(f"{fn}: expected a dict {{name: adapters}}, found a {type(named).__name__}; a single tree "
                    "is saved with lora_jax.save (or export_peft).")
  if not named:
    raise ValueError(f"{fn}: the set is empty; nothing to save.")
  if len(named) > MAX_SET_SIZE:
    raise ValueError(f"{fn}: {len(named)} adapters, more than {MAX_SET_SIZE} in one set; split it into several sets.")
  order = _check_names(named, fn)
  if default is not None and not isinstance(default, str):
    raise TypeError(f"{fn}(default={default!r}): expected the name of an adapter of the set, or None.")
  if default is not None and default not in named:
    if default != DEFAULT:
      raise ValueError(f"{fn}(default={default!r}): the set has no adapter of that name; its names are "
                       f"{_names(order)}. Pass default=None to put every adapter in a sub-folder.")
    default = None  # PEFT's rule: with no adapter named "default", the root holds none
  return order, default


# ----------------------------------------------------------------------------------------------
# Replacing a directory as a whole.
# ----------------------------------------------------------------------------------------------

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
  if not sys.platform.startswith("linux"):
    return None
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.5
  except (OSError, AttributeError):
    return None
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  fn.restype = ctypes.c_int
  return fn


def _exchange(a: str, b: str) -> bool:
  """Swaps two existing paths in one atomic step; False where the system cannot."""
  fn = _renameat2()
  if fn is None:
    return False
  if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # old kernel, or a file system without it
    return False
  raise OSError(err, os.strerror(err), b)


def _temp_dir_name(target: str) -> str:
  parent, base = os.path.split(target)
  return os.path.join(parent, f".{base}.{_HOST}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def _stale_dirs(target: str) -> list[str]:
  """Temp directories of ``target`` left by dead writers on this host (a killed save)."""
  parent, base = os.path.split(target)
  rx = re.compile(re.escape(f".{base}.{_HOST}.") + r"(\d+)\.[0-9a-f]{8}\.tmp")
  out = []
  try:
    entries = os.listdir(parent)
  except OSError:
    return out
  for name in entries:
    m = rx.fullmatch(name)
    full = os.path.join(parent, name)
    if m and int(m[1]) != os.getpid() and not _pid_alive(int(m[1])) and os.path.isdir(full) and not os.path.islink(full):
      out.append(full)
  return out


def _replace_dir(fn: str, directory: str | os.PathLike, fill: Callable[[str], None],
                 foreign: Callable[[str], str | None]) -> str:
  """Writes a new directory with ``fill(temp)`` and swaps it in for ``directory``; all or nothing.

  ``foreign(existing)`` names what an existing directory holds that ``fill`` would not write
  (it would be lost with the old directory), or None; such a directory is refused.
  """
  target = os.path.realpath(os.fspath(directory))  # a symlinked set directory: replace what it points to
  if os.path.lexists(target):
    if not os.path.isdir(target):
      raise ValueError(f"{fn}: {os.fspath(directory)} exists and is not a directory; a set is a directory.")
    what = foreign(target)
    if what is not None:
      raise ValueError(
          f"{fn}: {what}, which is not part of an adapter set; saving replaces the whole directory "
          f"{os.fspath(directory)}, so it would be lost. Move it out, or save the set to another directory."
      )
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = _temp_dir_name(target)
  os.mkdir(tmp)
  try:
    fill(tmp)
    fsync_dir(tmp)
    if not os.path.lexists(target):
      os.rename(tmp, target)
    elif not _exchange(tmp, target):
      old = _temp_dir_name(target)
      os.rename(target, old)
      try:
        os.rename(tmp, target)
      except BaseException:
        os.rename(old, target)
        raise
      os.rename(old, tmp)  # so that the cleanup below removes the old set
    fsync_dir(os.path.dirname(target))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # the unfinished new set, or the old one once swapped
  for stale in _stale_dirs(target):
    shutil.rmtree(stale, ignore_errors=True)
  return os.fspath(directory)


def _is_temp(name: str, of: Iterable[str]) -> bool:
  """A temp file that lora_jax's atomic writes leave beside one of the files ``of`` when killed."""
  return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in of)


def _foreign(target: str, root: set[str], sub: set[str], listed: Callable[[str], bool]) -> str | None:
  """The first thing in ``target`` that is neither a file of ``root``, a temp file of one, nor a
  real sub-folder for which ``listed(name)`` holds with only files of ``sub`` (and their temps)."""
  with os.scandir(target) as it:
    for i, e in enumerate(it):
      if i >= MAX_LISTING:
        return f"{target} holds more than {MAX_LISTING} entries"
      path = os.path.join(target, e.name)
      if (e.is_file() or e.is_symlink()) and (e.name in root or _is_temp(e.name, root)):  # links: a hub cache's
        continue
      if not (e.is_dir(follow_symlinks=False) and name_problem(e.name) is None and listed(e.name)):
        return f"{path} exists"
      for f in os.listdir(path):
        if not (f in sub or _is_temp(f, sub)) or os.path.isdir(os.path.join(path, f)):
          return f"{os.path.join(path, f)} exists"
  return None


# ----------------------------------------------------------------------------------------------
# lora_jax sets.
# ----------------------------------------------------------------------------------------------


def _per_adapter(fn: str, arg: str, value: Any, order: Sequence[str]) -> dict[str, Any]:
  """``{name: value}`` from a per-adapter mapping (keys must be names of the set)."""
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise TypeError(f"{fn}({arg}=...): expected a dict {{adapter name: ...}}, found a {type(value).__name__}.")
  extra = [k for k in value if k not in order]
  if extra:
    raise ValueError(f"{fn}({arg}=...): {_names(extra)} are not adapters of the set; its names are {_names(list(order))}.")
  return dict(value)


def save_set(
    directory: str | os.PathLike,
    named: Mapping[str, PyTree],
    params: PyTree | None = None,
    *,
    default: str | None = DEFAULT,
    spec: LoraSpec | Mapping[str, LoraSpec] | None = None,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
  """Saves a named set of adapters for one base into one directory, replacing it atomically.

  The ``default`` adapter goes to ``directory/adapters.safetensors``, every other one to
  ``directory/<name>/adapters.safetensors``, each as :func:`lora_jax.save` writes it (so
  ``lora_jax.load(directory)`` reads the default, ``lora_jax.load(directory/name)`` another);
  ``lora_jax_set.json`` records the names, which one is the default, and each file's config
  checksum. The whole directory is written beside the old one and swapped in (see the module
  docstring): a failure midway leaves the previous set untouched.

  Args:
    directory: the set's directory. If it exists it must hold a set (or one
      :func:`lora_jax.save`, or nothing): anything else in it is refused, not removed.
    named: ``{name: adapters}``; each value as :func:`lora_jax.save` takes it. Names are
      non-empty strings of at most 128 characters without ``/``, ``\\``, control characters,
      a leading ``.``, or another name's spelling in other case.
    params: the base params every adapter is for (checked, and kernel dtypes recorded).
    default: the adapter stored at the root. It must name an adapter of the set, except for
      ``"default"`` (PEFT's convention): a set with no adapter of that name, or
      ``default=None``, puts every adapter in a sub-folder.
    spec: one :class:`~lora_jax.LoraSpec` for all, or ``{name: spec}``.
    metadata: ``{name: {...}}``: each adapter's JSON metadata (see :func:`lora_jax.save`).

  Returns:
    ``directory``.

  Raises:
    ValueError: a bad or duplicate name, an unknown ``default``, a directory holding other
      files, or any reason :func:`lora_jax.save` refuses an adapter (the message names it).
    TypeError: ``named`` is not a mapping; as :func:`lora_jax.save`.
    OSError: the directory cannot be written (multi-process: on processes other than 0 also
      when process 0 refused or failed to write it; its traceback gives the cause).

  Multi-process (``jax.distributed.initialize``): call it from every process with the same
  arguments. Every process gathers the adapters to the host and checks them (as
  :func:`lora_jax.save`); process 0 alone writes the directory; every process returns once it
  is in place.

  >>> import tempfile, os, jax, jax.numpy as jnp, lora_jax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> spec = lora_jax.LoraSpec(["dense"], rank=2)
  >>> named = {n: lora_jax.init(jax.random.key(i), params, spec) for i, n in enumerate(["default", "sql"])}
  >>> d = lora_jax.save_set(tempfile.mkdtemp() + "/run", named, params)
  >>> sorted(os.listdir(d)), os.listdir(d + "/sql")
  (['adapters.safetensors', 'lora_jax_set.json', 'sql'], ['adapters.safetensors'])
  >>> list(lora_jax.load_set(d, params))
  ['default', 'sql']
  """
  order, root = _check_set("save_set", named, default)
  specs = spec if isinstance(spec, LoraSpec) or spec is None else _per_adapter("save_set", "spec", spec, order)
  metas = _per_adapter("save_set", "metadata", metadata, order)
  prefix = "save_set: "

  def encode(name: str) -> Any:
    one = specs if isinstance(specs, LoraSpec) or specs is None else specs.get(name)
    try:
      return _encode(named[name], one, metas.get(name), params)
    except (ValueError, TypeError) as e:
      raise type(e)(f"{prefix}adapter {name!r}: {e}") from None

  encoded = {}
  if multiprocess():  # every process gathers, checks and serialises; process 0 writes below
    named = {name: tree_to_host(named[name]) for name in order}
    encoded = {name: encode(name) for name in order}

  def fill(tmp: str) -> None:
    entries = {}
    for name in order:
      path = tmp if name == root else os.path.join(tmp, name)
      file = os.path.join(path, ADAPTERS_FILE)  # a file name: save would take "x.safetensors" itself for one
      enc = encoded[name] if name in encoded else encode(name)
      try:
        _write_save(file, enc)
      except (ValueError, TypeError) as e:
        raise type(e)(f"{prefix}adapter {name!r}: {e}") from None
      entries[name] = {"sha256": read_header(file)[1][DIGEST_KEY]}
    write_json(os.path.join(tmp, SET_INDEX), {
        "format": SET_FORMAT, "format_version": SET_FORMAT_VERSION, "library_version": _version(),
        "default": root, "adapters": entries,
    })  # last: a directory with an index holds a whole set

  def foreign(target: str) -> str | None:
    return _foreign(target, {SET_INDEX, ADAPTERS_FILE}, {ADAPTERS_FILE}, lambda name: True)

  once(f"save_set({os.fspath(directory)!r})", lambda: _replace_dir("save_set", directory, fill, foreign))
  return os.fspath(directory)


def _read_index(directory: str) -> tuple[str, dict[str, str], str | None]:
  """``(index path, {name: config sha256}, default)``, validated and bounded."""
  index = os.path.join(directory, SET_INDEX)
  if not os.path.lexists(index):
    if os.path.lexists(os.path.join(directory, _PEFT_CONFIG)):
      hint = " It is a PEFT directory: read it with lora_jax.import_peft_set(dir, params, name_map)."
    elif os.path.lexists(os.path.join(directory, ADAPTERS_FILE)):
      hint = " It holds one adapter: read it with lora_jax.load(dir, params)."
    elif not os.path.isdir(directory):
      left = _stale_dirs(os.path.realpath(directory))
      hint = (f" An interrupted save_set left {left[0]}: if it holds {SET_INDEX}, it is a whole set; rename it to "
              f"{directory}." if left else " There is no such directory.")
    else:
      hint = ""
    raise FileNotFoundError(f"{index}: no set index here; not a set written by lora_jax.save_set.{hint}")
  cfg = read_json(index, max_bytes=MAX_INDEX_BYTES)

  def need(cond: bool, what: str) -> None:
    if not cond:
      raise fail(index, what)

  need(cfg.get("format") == SET_FORMAT, f"'format' is {short(cfg.get('format'))}, expected {SET_FORMAT!r}.")
  version = cfg.get("format_version")
  need(isinstance(version, int) and not isinstance(version, bool) and version >= 1,
       f"'format_version' must be a positive integer, found {short(version)}.")
  need(version <= SET_FORMAT_VERSION,
       f"'format_version' {version}: written by a newer lora_jax (this one reads {SET_FORMAT_VERSION}); upgrade lora_jax.")
  extra = sorted(set(cfg) - {"format", "format_version", "library_version", "default", "adapters"})
  need(not extra, f"unexpected fields {_names(extra)}; the file was edited or corrupted.")
  need(isinstance(cfg.get("library_version"), str) and len(cfg["library_version"]) <= 64,
       f"'library_version' must be a short string, found {short(cfg.get('library_version'))}.")
  entries = cfg.get("adapters")
  need(isinstance(entries, dict) and entries, f"'adapters' must be a non-empty object, found {short(entries)}.")
  need(len(entries) <= MAX_SET_SIZE, f"'adapters' lists {len(entries)} adapters, more than {MAX_SET_SIZE}; refusing it.")
  try:
    _check_names(entries, "'adapters'")
  except ValueError as e:
    raise fail(index, f"{e} The file was edited or corrupted.") from None
  digests = {}
  for name, e in entries.items():
    ok = isinstance(e, dict) and set(e) == {"sha256"} and isinstance(e["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"])
    need(bool(ok), f"adapters[{name!r}] must be {{\"sha256\": <64 hex digits>}}, found {short(e)}.")
    digests[name] = e["sha256"]
  default = cfg.get("default")
  need(default is None or (isinstance(default, str) and default in entries),
       f"'default' is {short(default)}, which is not one of the adapters {_names(list(entries))}.")
  return index, digests, default


def _selected(fn: str, where: str, found: Sequence[str], names: Sequence[str] | None) -> list[str]:
  if names is None:
    return list(found)
  if isinstance(names, str) or not isinstance(names, Iterable):
    raise TypeError(f"{fn}(names={names!r}): expected a list of adapter names (names=[{names!r}] for one).")
  names = list(names)
  missing = [n for n in names if n not in found]
  if missing:
    raise ValueError(f"{fn}({where}): no adapters named {_names(missing)}; the set holds {_names(list(found))}.")
  return list(dict.fromkeys(names))


def _sub_folder(directory: str, name: str, index: str) -> str:
  """``directory/name``, which must be a real directory (a symbolic link could point anywhere)."""
  path = os.path.join(directory, name)
  if os.path.islink(path):
    raise fail(path, f"adapter {name!r} is a symbolic link; a set's sub-folders must be real directories inside it "
                     "(a link may point anywhere). Copy the adapter into the set instead.")
  if not os.path.lexists(path):
    raise fail(path, f"missing, but {index} lists adapter {name!r}; the set was damaged. Save it again.")
  if not os.path.isdir(path):
    raise fail(path, f"adapter {name!r} is not a directory.")
  return path


def load_set(
    directory: str | os.PathLike,
    params: PyTree | None = None,
    names: Sequence[str] | None = None,
    *,
    check_dtype: bool = True,
) -> dict[str, PyTree]:
  """Loads a set written by :func:`save_set`: ``{name: adapters}`` in the saved order.

  Args:
    directory: the set's directory.
    params: the base params; each result then mirrors them (see :func:`lora_jax.load`).
    names: load only these adapters (default: all).
    check_dtype: as for :func:`lora_jax.load`.

  Returns:
    ``{name: adapters}``, each as :func:`lora_jax.load` returns it.

  Raises:
    FileNotFoundError: no set index in ``directory``.
    AdapterFileError: a malformed or edited index (bad names, too many adapters), a
      sub-folder that is missing or a symbolic link, an entry file that is not the one the
      index recorded (replaced since, or from another set), or any reason
      :func:`lora_jax.load` refuses a file; the message names the file and field.
    ValueError: a name in ``names`` the set does not hold; adapters that do not fit ``params``.

  >>> import tempfile, jax, jax.numpy as jnp, lora_jax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> ad = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["dense"], rank=2))
  >>> d = lora_jax.save_set(tempfile.mkdtemp(), {"a": ad, "b": ad}, params, default="a")
  >>> lora_jax.load_set(d, params, names=["b"])["b"]["dense"]["kernel"].a.shape
  (4, 2)
  """
  directory = os.fspath(directory)
  index, digests, default = _read_index(directory)
  out = {}
  for name in _selected("load_set", directory, list(digests), names):
    path = directory if name == default else _sub_folder(directory, name, index)
    file = os.path.join(path, ADAPTERS_FILE)
    if not os.path.lexists(file):
      raise fail(file, f"missing, but {index} lists adapter {name!r}; the set was damaged. Save it again.")
    out[name] = load(file, params, check_dtype=check_dtype)
    # Checked after reading, so that a file swapped in while it was read is caught too.
    found = read_header(file)[1].get(DIGEST_KEY)
    if found != digests[name]:
      raise fail(file, f"is not the file {index} records for adapters[{name!r}] (config checksum {short(found)}, "
                       f"expected {digests[name][:12]}...): it was replaced after save_set (by lora_jax.save?), "
                       "comes from another set, or a save_set ran while reading. Save the set again.")
  return out


# ----------------------------------------------------------------------------------------------
# PEFT's multi-adapter directories.
# ----------------------------------------------------------------------------------------------


def export_peft_set(
    directory: str | os.PathLike,
    named: Mapping[str, PyTree],
    name_map: NameMapLike,
    *,
    default: str | None = DEFAULT,
    **options: Any,
) -> str:
  """Writes a named set as PEFT's multi-adapter directory, replacing it atomically.

  The ``default`` adapter is written at the root, every other one to ``directory/<name>``,
  each by :func:`lora_jax.export_peft` (``adapter_config.json`` + ``adapter_model.safetensors``),
  as ``PeftModel.save_pretrained`` lays out several adapters. PEFT loads them with
  ``PeftModel.from_pretrained(model, directory)`` (the root, as adapter ``"default"``) and
  ``model.load_adapter(f"{directory}/{name}", adapter_name=name)`` for each other one. The
  directory is written beside the old one and swapped in; a ``README.md`` model card at the
  old root is kept.

  Args:
    directory: the output directory. If it exists it must hold a PEFT adapter set (or
      nothing): anything else in it is refused, not removed.
    named: ``{name: adapters}``; names as for :func:`save_set`.
    name_map: as for :func:`lora_jax.export_peft`.
    default: the adapter written at the root (as for :func:`save_set`). PEFT keeps the one
      named ``"default"`` there.
    **options: :func:`lora_jax.export_peft`'s keyword arguments (``task_type``,
      ``base_model_name_or_path``, ``rslora``, ``lora_dropout``, ``dtype``), for every adapter.

  Returns:
    ``directory``.

  Raises:
    ValueError, TypeError: as for :func:`save_set` and :func:`lora_jax.export_peft` (the
      message names the adapter).

  >>> import tempfile, os, jax, jax.numpy as jnp, lora_jax
  >>> params = {"lm_head": {"kernel": jnp.ones((4, 8))}}
  >>> ad = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["lm_head"], rank=2))
  >>> d = lora_jax.export_peft_set(tempfile.mkdtemp(), {"default": ad, "chat": ad}, "llama")
  >>> sorted(os.listdir(d)), sorted(os.listdir(d + "/chat"))
  (['adapter_config.json', 'adapter_model.safetensors', 'chat'], ['adapter_config.json', 'adapter_model.safetensors'])
  """
  from lora_jax.interop import export_peft  # late: lora_jax.interop imports lora_jax.files

  order, root = _check_set("export_peft_set", named, default)
  prefix = "export_peft_set: "

  def fill(tmp: str) -> None:
    card = os.path.join(os.path.realpath(os.fspath(directory)), _MODEL_CARD)
    if os.path.isfile(card) and not os.path.islink(card):
      shutil.copy2(card, os.path.join(tmp, _MODEL_CARD))
    for name in order:
      path = tmp if name == root else os.path.join(tmp, name)
      try:
        export_peft(path, named[name], name_map, **options)
      except (ValueError, TypeError) as e:
        raise type(e)(f"{prefix}adapter {name!r}: {e}") from None

  def foreign(target: str) -> str | None:
    files = {_PEFT_CONFIG, _PEFT_WEIGHTS}
    return _foreign(target, files | {_MODEL_CARD}, files,
                    lambda name: os.path.isfile(os.path.join(target, name, _PEFT_CONFIG)))

  return _replace_dir("export_peft_set", directory, fill, foreign)


def _peft_entries(directory: str, default: str) -> dict[str, str]:
  """``{name: adapter directory}`` of a PEFT multi-adapter directory: the root (if it holds an
  adapter) under ``default``, then each sub-folder holding an ``adapter_config.json``."""
  def holds(path: str, what: str) -> bool:
    return os.path.lexists(os.path.join(path, what))

  def check(path: str) -> bool:
    """Whether ``path`` holds an adapter; refuses weights without a config."""
    if holds(path, _PEFT_CONFIG):
      return True
    weights = next((w for w in (_PEFT_WEIGHTS, _PEFT_PICKLE) if holds(path, w)), None)
    if weights:
      raise fail(os.path.join(path, _PEFT_CONFIG), f"missing: {weights} is there but not its config; "
                                                   "refusing to guess how to read it (a partial copy?).")
    return False

  out: dict[str, str] = {}
  if check(directory):
    out[default] = directory
  subs = []
  with os.scandir(directory) as it:
    for i, e in enumerate(it):
      if i >= MAX_LISTING:
        raise fail(directory, f"holds more than {MAX_LISTING} entries; refusing to look for adapters among them. "
                              "Import them one by one with lora_jax.import_peft.")
      if e.name.startswith(".") or not e.is_dir():  # hidden folders (.git, .ipynb_checkpoints) hold no adapters
        continue
      subs.append(e.name)
  for name in sorted(subs):
    path = os.path.join(directory, name)
    if os.path.islink(path):
      if any(holds(path, f) for f in (_PEFT_CONFIG, _PEFT_WEIGHTS, _PEFT_PICKLE)):
        raise fail(path, f"adapter {name!r} is a symbolic link; a set's sub-folders must be real directories inside "
                         "it (a link may point anywhere). Copy the adapter into the set, or import it with "
                         "lora_jax.import_peft.")
      continue
    if not check(path):
      continue
    problem = name_problem(name)
    if problem:
      raise fail(path, f"adapter name {short(name)} {problem}. Rename the folder.")
    if name in out:
      raise fail(path, f"a sub-folder named {name!r}, as the root adapter is called (default={default!r}); "
                       "pass another default= to name the root adapter.")
    out[name] = path
    if len(out) > MAX_SET_SIZE:
      raise fail(directory, f"holds more than {MAX_SET_SIZE} adapters; refusing them. Pass names=[...] "
                            "after moving the others out, or import them one by one with lora_jax.import_peft.")
  return out


def import_peft_set(
    directory: str | os.PathLike,
    params: PyTree,
    name_map: NameMapLike,
    *,
    default: str = DEFAULT,
    names: Sequence[str] | None = None,
    dtype: Any = None,
) -> dict[str, PyTree]:
  """Reads PEFT's multi-adapter directory (``save_pretrained`` of a model with several adapters).

  The adapter at the root (if any) is named ``default``; every immediate sub-folder holding an
  ``adapter_config.json`` is an adapter named after the folder (so a Trainer's
  ``checkpoint-500/`` folders count too: pick with ``names=``). Each is read by
  :func:`lora_jax.import_peft`. Sub-folders one level deep only; hidden ones (``.git``) are
  not looked at.

  Args:
    directory: the PEFT directory.
    params: the Flax params the adapters are for.
    name_map: as for :func:`lora_jax.import_peft`.
    default: the name given to the adapter at the root (PEFT's ``"default"``).
    names: import only these adapters (default: all).
    dtype: as for :func:`lora_jax.import_peft`.

  Returns:
    ``{name: adapters}``: the root adapter first, then the sub-folders in sorted order.

  Raises:
    FileNotFoundError: no adapter in ``directory`` (nor in its sub-folders).
    AdapterFileError: a sub-folder that is a symbolic link, an adapter's weights without
      its ``adapter_config.json``, a folder name that is not a valid adapter name, more than
      1024 adapters, or any reason :func:`lora_jax.read_peft` refuses one (names the file).
    ValueError: a name in ``names`` the directory does not hold; as :func:`lora_jax.import_peft`.

  >>> import tempfile, jax, jax.numpy as jnp, lora_jax
  >>> params = {"lm_head": {"kernel": jnp.ones((4, 8))}}
  >>> ad = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["lm_head"], rank=2))
  >>> d = lora_jax.export_peft_set(tempfile.mkdtemp(), {"default": ad, "chat": ad}, "llama")
  >>> list(lora_jax.import_peft_set(d, params, "llama"))
  ['default', 'chat']
  """
  from lora_jax.interop import import_peft  # late: lora_jax.interop imports lora_jax.files

  directory = os.fspath(directory)
  problem = name_problem(default)
  if problem:
    raise ValueError(f"import_peft_set(default={default!r}): the name {problem}.")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such directory.")
  found = _peft_entries(directory, default)
  if not found:
    raise FileNotFoundError(f"{directory}: no PEFT adapter here ({_PEFT_CONFIG}), nor in its sub-folders.")
  return {name: import_peft(found[name], params, name_map, dtype=dtype)
          for name in _selected("import_peft_set", directory, list(found), names)}


__all__ = [
    "MAX_SET_NAME",
    "MAX_SET_SIZE",
    "SET_INDEX",
    "export_peft_set",
    "import_peft_set",
    "load_set",
    "name_problem",
    "save_set",
]
