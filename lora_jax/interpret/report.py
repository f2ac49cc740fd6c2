"""What the interpreter saw: each use of each adapted kernel, and the per-trace context."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

Array = Any


class LoraFallbackWarning(UserWarning):
  """An adapted kernel had to be materialised (``W + scale * a @ b``) for one of its uses."""


class LoraLayoutWarning(UserWarning):
  """An adapted kernel is used in a way that suggests its layout ('l'/'i'/'o' axes) is wrong."""


class LoraFallbackError(ValueError):
  """Raised instead of materialising when ``wrap(..., fallback="error")``."""


FALLBACK_MODES = ("warn", "error", "allow")


@dataclasses.dataclass
class Use:
  """One use of an adapted kernel found while rewriting.

  ``factored``: computed without forming the adapted kernel. Otherwise ``merged`` says whether
  merging at the use was chosen because it is cheaper (a small grouped-conv kernel) rather
  than forced (a fallback, which warns); ``reason`` says why.
  """

  path: str
  primitive: str
  factored: bool
  reason: str = ""
  merged: bool = False


@dataclasses.dataclass
class Report:
  """What :func:`lora_jax.explain` found: per adapted path, its layout and how each use of the
  kernel was computed."""

  paths: list[str]
  uses: list[Use]
  layout_notes: dict[str, str] = dataclasses.field(default_factory=dict)
  grouped: list[list[str]] = dataclasses.field(default_factory=list)
  layouts: dict[str, str] = dataclasses.field(default_factory=dict)

  def for_path(self, path: str) -> list[Use]:
    return [u for u in self.uses if u.path == path]

  @property
  def unused(self) -> list[str]:
    seen = {u.path for u in self.uses}
    return [p for p in self.paths if p not in seen]

  @property
  def fallbacks(self) -> list[Use]:
    """Uses that had to be materialised (not factored, and not merged by choice)."""
    return [u for u in self.uses if not u.factored and not u.merged]

  def __str__(self) -> str:
    width = max([len(p) for p in self.paths] + [4])
    lw = max([len(v) for v in self.layouts.values()] + [6])
    lines = [f"{'path':<{width}}  {'layout':<{lw}}  use"]
    for p in self.paths:
      head = f"{p:<{width}}  {self.layouts.get(p, '?'):<{lw}}"
      uses = self.for_path(p)
      if not uses:
        lines.append(f"{head}  UNUSED: the function never reads this kernel")
      for u in uses:
        how = "factored" if u.factored else f"merged at the use ({u.reason})" if u.merged else f"MATERIALISED ({u.reason})"
        lines.append(f"{head}  {u.primitive}: {how}")
    for p, note in self.layout_notes.items():
      lines.append(f"{p:<{width}}  LAYOUT? {note}")
    for paths in self.grouped:
      lines.append(f"one x @ [a...] matmul: {' + '.join(paths)}")
    n_fb = len(self.fallbacks)
    n_f = sum(u.factored for u in self.uses)
    merged = len(self.uses) - n_f - n_fb
    lines.append(
        f"{n_f} factored use(s), {f'{merged} merged by choice, ' if merged else ''}{n_fb} materialised, "
        f"{len(self.unused)} unused"
    )
    return "\n".join(lines)


def unique(groups: list[list[str]]) -> list[list[str]]:
  """Groups in first-seen order without repeats (a scan body or remat traces them again)."""
  seen, out = set(), []
  for g in groups:
    if tuple(g) not in seen:
      seen.add(tuple(g))
      out.append(g)
  return out


class Ctx:
  """Per-trace state: the uses seen and what to do on a fallback."""

  def __init__(self, fallback: str, group: bool = True, rng: Any = None):
    self.fallback = fallback
    self.group = group
    self.rng = rng  # the call's lora_dropout_rng (a typed key), or None: no dropout
    self.scan_index: list[Any] = []  # the iteration index of each enclosing scan (with an rng)
    self._site_uses: dict[str, int] = {}
    self.uses: list[Use] = []
    self.layout_notes: dict[str, str] = {}
    self.grouped: list[list[str]] = []  # paths whose x @ a products ran as one matmul
    self.contracted: dict[str, set[str]] = {}  # path -> roles its matmuls contract ('i', 'o')
    self.gathered: set[str] = set()  # paths used as lookup tables
    self.per_example = False  # a mixed-adapter call: the trace is one example of a vmapped batch

  def site_key(self, path: str) -> Any:
    """A dropout key for the next use of ``path``: the rng folded with the path, the use's
    ordinal and each enclosing scan's iteration (the same key when remat recomputes it)."""
    import zlib

    import jax

    n = self._site_uses.get(path, 0)
    self._site_uses[path] = n + 1
    key = jax.random.fold_in(self.rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    key = jax.random.fold_in(key, n)
    for i in self.scan_index:
      key = jax.random.fold_in(key, i)
    return key

  def contracts(self, t: Any, role: str) -> None:
    self.contracted.setdefault(t.path, set()).add(role)

  def gathers(self, t: Any) -> None:
    self.gathered.add(t.path)

  def transposed_notes(self) -> None:
    """A kernel that every matmul contracts along its fan-out axes, and that no lookup reads
    as rows (a tied embedding is read both ways), has its 'i' and 'o' axes swapped: an
    ``(out, in)`` kernel given the default ``'io'``."""
    for path, roles in self.contracted.items():
      if roles == {"o"} and path not in self.gathered:
        self.layout_notes.setdefault(
            path, "every matmul contracts the axes marked 'o' (fan-out): the kernel looks like "
            "(out, in), so a and b have swapped roles"
        )

  def layout_note(self, t: Any, why: str) -> None:
    self.layout_notes.setdefault(t.path, why)

  def factored(self, t: Any, prim: str) -> None:
    self.uses.append(Use(t.path, prim, True))

  def merged(self, t: Any, prim: str, reason: str) -> Array:
    """Merges at this use because that is the cheaper exact computation (not a fallback)."""
    self.uses.append(Use(t.path, prim, False, reason, merged=True))
    return t.materialize()

  def materialize(self, t: Any, prim: str, reason: str) -> Array:
    if t.frozen:  # a base leaf without adapter: its dense value, not a LoRA fallback
      return t.view_value()
    self.uses.append(Use(t.path, prim, False, reason))
    if self.fallback == "error":
      raise LoraFallbackError(
          f"{t.path!r}: the kernel meets `{prim}` ({reason}), which lora_jax cannot factor, "
          "and wrap(..., fallback='error') forbids materialising W + scale*a@b. Use "
          "fallback='warn' or 'allow' to materialise it for this use only."
      )
    return t.materialize()


def warn(report: Report) -> None:
  for p, note in report.layout_notes.items():
    warnings.warn(
        f"{p!r}: its layout {report.layouts.get(p, '?')!r} looks wrong for how the function uses "
        f"it: {note}. Results are exact, but the low-rank update is not the usual per-layer in x "
        "out one. Pass the function to lora_jax.init(rng, params, spec, apply_fn, *args) so "
        f"layouts are read off the trace, or state it, e.g. LoraSpec(layout={{{p!r}: 'lio'}}) "
        "for a stacked (layers, in, out) kernel, 'ioo' for a DenseGeneral (in, heads, dim) kernel, "
        "'oi' for an (out, in) kernel.",
        LoraLayoutWarning,
        stacklevel=4,
    )
  for p in report.unused:
    warnings.warn(
        f"{p!r} has adapters but the wrapped function never reads this kernel; its factors "
        "get no gradient. Check the spec's targets.",
        LoraFallbackWarning,
        stacklevel=4,
    )
  for u in report.fallbacks:
    warnings.warn(
        f"{u.path!r}: materialised W + scale*a@b for a `{u.primitive}` ({u.reason}). Results are "
        "exact; only the memory/speed benefit is lost for this use. lora_jax.explain() lists all uses.",
        LoraFallbackWarning,
        stacklevel=4,
    )
