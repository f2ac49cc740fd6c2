"""wrap(): make targeted kernels act as W + scale*a@b inside any apply function."""

from __future__ import annotations

import functools
from typing import Any, Callable

from lora_jax.adapters import merge

PyTree = Any


def wrap(apply_fn: Callable[..., Any], *, mode: str = "factored") -> Callable[..., Any]:
  """Returns ``lora_apply(params, adapters, *args, **kwargs)`` computing
  ``apply_fn(merge(params, adapters), *args, **kwargs)``.

  (Work in progress: the factored interpreter lands next; until then both modes merge.)
  """
  if mode not in ("factored", "merged"):
    raise ValueError(f"wrap(mode={mode!r}): expected 'factored' or 'merged'.")

  @functools.wraps(apply_fn)
  def lora_apply(params: PyTree, adapters: PyTree, *args: Any, **kwargs: Any) -> Any:
    return apply_fn(merge(params, adapters), *args, **kwargs)

  return lora_apply
