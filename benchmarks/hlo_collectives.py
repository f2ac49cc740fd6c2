"""The collectives of a compiled XLA module, read off its HLO text (``compiled.as_text()``).

:func:`collectives` lists every all-gather, all-reduce, reduce-scatter, all-to-all and
collective-permute (synchronous, or the ``-start`` of an async pair, whose result is read off
its ``-done``), with the arrays it produces (dtype and shape; a combined collective produces
several) and how many times it runs per call: instructions inside a ``while`` body count
``known_trip_count`` times (nested loops multiply), so a ``scan`` over layers that gathers one
layer's kernel per iteration counts once per layer. Only what the text states is used:

* an instruction line is ``[ROOT] [%]name = <shape> <opcode>(<operands>), <attributes>``,
  where ``<shape>`` is ``f32[2,64]{1,0}`` (a layout in braces, optional), a scalar ``u32[]``
  or a tuple ``(f32[16]{0}, f32[64]{0})``;
* a computation starts with ``[ENTRY] [%]name (<params>) -> <shape> {`` and ends with ``}``;
* a ``while`` names ``body=`` and ``condition=``; its trip count is in
  ``backend_config={"known_trip_count":{"n":"2"}}`` when XLA knows it (else it counts once and
  :attr:`Collective.trips_known` is False).

>>> text = '''
... ENTRY %main (p: f32[4,8]) -> f32[16,8] {
...   %p = f32[4,8]{1,0} parameter(0)
...   ROOT %all-gather.1 = f32[16,8]{1,0} all-gather(f32[4,8]{1,0} %p), replica_groups=[1,4]<=[4], dimensions={0}
... }
... '''
>>> [(c.op, c.arrays, c.count, c.bytes) for c in collectives(text)]
[('all-gather', (('f32', (16, 8)),), 1, 512)]
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable

OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# Bits per element of HLO primitive types (sub-byte types count their bits).
_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
    "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64,
    "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8, "f8e4m3fnuz": 8,
    "f8e5m2fnuz": 8, "f8e4m3b11fnuz": 8, "f8e3m4": 8, "f8e8m0fnu": 8, "f4e2m1fn": 4, "token": 0,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,\s]*)\]")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$"
)
_HEADER = re.compile(r"^\s*(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')
_CALLS = re.compile(r"\b(body|condition|to_apply|calls|branch_computations|true_computation|false_computation)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")


Array = tuple  # (dtype, shape)


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the module.

  Attributes:
    name: the instruction's name (``all-gather-start.3``).
    op: the collective, without ``-start`` (one of :data:`OPS`).
    arrays: the arrays it produces, ``((dtype, shape), ...)``: one, or several when XLA
      combined collectives into one instruction.
    count: how many times it runs per call of the module (loop trip counts multiplied).
    is_async: a ``-start`` / ``-done`` pair.
    computation: the computation it sits in.
    trips_known: every enclosing loop's trip count was stated in the text.
  """

  name: str
  op: str
  arrays: tuple[Array, ...]
  count: int
  is_async: bool
  computation: str
  trips_known: bool = True

  @property
  def elements(self) -> tuple[int, ...]:
    """Elements of each produced array."""
    return tuple(math.prod(s) for _, s in self.arrays)

  @property
  def bytes(self) -> int:
    """Bytes produced per run (all arrays)."""
    return sum(math.prod(s) * _BITS.get(d, 0) // 8 for d, s in self.arrays)

  @property
  def total_bytes(self) -> int:
    """Bytes produced per call of the module (``bytes * count``)."""
    return self.bytes * self.count


def parse_arrays(shape: str) -> tuple[Array, ...]:
  """The arrays of an HLO shape string: ``'(f32[2,3]{1,0}, bf16[4])'`` ->
  ``(('f32', (2, 3)), ('bf16', (4,)))``. Layouts, memory-space and tiling annotations in
  braces are ignored; scalars are ``(dtype, ())``.

  >>> parse_arrays("(f32[2,3]{1,0:T(8,128)}, u32[], bf16[4]{0})")
  (('f32', (2, 3)), ('u32', ()), ('bf16', (4,)))
  """
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BITS:
      continue
    out.append((dtype, tuple(int(d) for d in dims.replace(" ", "").split(",") if d)))
  return tuple(out)


def _instructions(text: str):
  """``(computation, name, shape, op, rest)`` of every instruction, and the entry's name."""
  comp, entry, rows = None, None, []
  for line in text.splitlines():
    if comp is None:
      m = _HEADER.match(line)
      if m:
        comp = m.group("name")
        if m.group("entry"):
          entry = comp
      continue
    if line.strip() == "}":
      comp = None
      continue
    m = _INSTR.match(line)
    if m:
      rows.append((comp, m.group("name"), m.group("shape"), m.group("op"), m.group("rest")))
  return rows, entry


def _multiplicities(rows, entry) -> dict[str, tuple[int, bool]]:
  """Runs per module call of each computation reachable from the entry, and whether every
  loop on the way had a known trip count."""
  edges = collections.defaultdict(list)  # caller -> [(callee, factor, known)]
  for comp, _, _, op, rest in rows:
    trip = _TRIP.search(rest)
    for kind, target in _CALLS.findall(rest):
      names = [t.strip().lstrip("%") for t in target.strip("{}").split(",") if t.strip()]
      for callee in names:
        if op == "while" and kind in ("body", "condition"):
          n = int(trip.group(1)) if trip else 1
          edges[comp].append((callee, n + (kind == "condition"), trip is not None))
        else:
          edges[comp].append((callee, 1, True))
  mult: dict[str, tuple[int, bool]] = {}

  def visit(comp: str, m: int, known: bool, depth: int = 0) -> None:
    if depth > 64:  # no recursion in HLO; guards against a parsing surprise
      return
    old = mult.get(comp, (0, True))
    mult[comp] = (old[0] + m, old[1] and known)
    for callee, f, k in edges.get(comp, ()):
      visit(callee, m * f, known and k, depth + 1)

  if entry is not None:
    visit(entry, 1, True)
  return mult


def collectives(text: str) -> list[Collective]:
  """Every collective of an HLO module's text, in text order (see the module docstring)."""
  rows, entry = _instructions(text)
  mult = _multiplicities(rows, entry)
  done_shape = {}
  for _, _, shape, op, rest in rows:
    if op.endswith("-done"):
      start = _operand(rest)
      if start:
        done_shape[start] = shape
  out = []
  for comp, name, shape, op, _ in rows:
    base = op[: -len("-start")] if op.endswith("-start") else op
    if base not in OPS:
      continue
    is_async = op.endswith("-start")
    if is_async:
      arrays = parse_arrays(done_shape[name]) if name in done_shape else _start_results(base, parse_arrays(shape))
    else:
      arrays = parse_arrays(shape)
    m, known = mult.get(comp, (1, False))
    out.append(Collective(name, base, arrays, m, is_async, comp, known))
  return out


def _operand(rest: str) -> str | None:
  """The first operand's name in ``rest`` (what follows ``opcode(``), printed with or
  without its shape and a ``%``."""
  m = re.search(r"%([\w.\-]+)", rest)
  if m:
    return m.group(1)
  bare = _ARRAY.sub(" ", re.sub(r"\{[^}]*\}", " ", rest))
  m = re.search(r"[A-Za-z_][\w.\-]*", bare)
  return m.group(0) if m else None


def _start_results(op: str, arrays: tuple[Array, ...]) -> tuple[Array, ...]:
  """The results of a ``-start`` with no ``-done`` found: its tuple is (operands, results
  [, context scalars]) for gathers and permutes; an all-reduce-start's shape is its result."""
  if op == "all-reduce" or len(arrays) < 2:
    return arrays
  arrays = tuple(a for a in arrays if a[1] != ())  # context scalars (u32[]) of a permute
  return arrays[len(arrays) // 2 :]


def multiset(colls: Iterable[Collective], op: str | None = None, min_elements: int = 0) -> collections.Counter:
  """``Counter`` of ``(op, dtype, shape)`` over every produced array of at least
  ``min_elements`` elements (of ``op`` only, if given), each counted ``count`` times."""
  c: collections.Counter = collections.Counter()
  for x in colls:
    if op is not None and x.op != op:
      continue
    for d, s in x.arrays:
      if math.prod(s) >= min_elements:
        c[(x.op, d, s)] += x.count
  return c


def summary(colls: Iterable[Collective]) -> dict[str, dict[str, int]]:
  """Per op: instructions, runs per call, and bytes produced per call."""
  out: dict[str, dict[str, int]] = {}
  for x in colls:
    s = out.setdefault(x.op, {"instructions": 0, "runs": 0, "bytes": 0})
    s["instructions"] += 1
    s["runs"] += x.count
    s["bytes"] += x.total_bytes
  return out


def total_bytes(colls: Iterable[Collective]) -> int:
  """Bytes that all collectives produce per call of the module."""
  return sum(x.total_bytes for x in colls)
