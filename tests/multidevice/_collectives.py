"""The collectives of a compiled XLA module, read off its HLO text (``compiled.as_text()``)."""

from __future__ import annotations

import re

import numpy as np

OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}
# `%name = f32[4,8]{1,0} all-gather(...)` or a tuple result `(f32[..], f32[..]) all-gather-start(`.
_LINE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(OPS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def collectives(hlo: str) -> list[tuple[str, int, int]]:
  """``[(op, elements, bytes), ...]`` of each collective's result (the largest array of a tuple
  result: an async start carries its operand beside its result). ``-done`` halves are skipped.

  >>> collectives("%ag = f32[8,16]{1,0} all-gather(f32[2,16]{1,0} %p), dimensions={0}")
  [('all-gather', 128, 512)]
  >>> collectives("%s = (bf16[2,4]{1,0}, bf16[8,4]{1,0}) all-gather-start(bf16[2,4]{1,0} %p)")
  [('all-gather', 32, 64)]
  """
  out = []
  for line in hlo.splitlines():
    m = _LINE.search(line)
    if not m:
      continue
    best = (0, 0)
    for dtype, dims in _SHAPE.findall(m.group(1)):
      n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      best = max(best, (n, n * _DTYPE_BYTES.get(dtype, 4)))
    out.append((m.group(2), best[0], best[1]))
  return out
