"""NNX in one line: an NNX module as ``(apply_fn, params, rest)`` for :func:`lora_jax.wrap`, and back."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax  # noqa: F401 - used by the doctests
import jax.numpy as jnp  # noqa: F401 - used by the doctests

PyTree = Any


def from_nnx(module: Any, *filters: Any, method: str | Callable[..., Any] = "__call__"):
  """Turns an NNX module into ``(apply_fn, params, rest)`` for :func:`wrap`.

  ``params`` is the ``nnx.Param`` state (or the state selected by ``filters``); ``rest`` is
  everything else (batch stats, RNG state, ...). ``apply_fn(params, *args)`` rebuilds the
  module with ``nnx.merge`` and calls ``method``; it is pure (state updates inside are
  dropped). ``to_nnx(apply_fn, params)`` gives a module back, e.g. with merged params.

  >>> from flax import nnx
  >>> from lora_jax import LoraSpec, init, merge, wrap
  >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  >>> apply_fn, params, rest = from_nnx(layer)
  >>> adapters = init(jax.random.key(1), params, LoraSpec("kernel", rank=2))
  >>> wrap(apply_fn)(params, adapters, jnp.ones((2, 4))).shape
  (2, 3)
  """
  from flax import nnx

  graphdef, params, rest = nnx.split(module, *(filters or (nnx.Param,)), ...)

  def apply_fn(params, *args, **kwargs):
    m = nnx.merge(graphdef, params, rest)
    fn = getattr(m, method) if isinstance(method, str) else functools.partial(method, m)
    return fn(*args, **kwargs)

  apply_fn.graphdef = graphdef  # type: ignore[attr-defined]
  apply_fn.rest = rest  # type: ignore[attr-defined]
  return apply_fn, params, rest


def to_nnx(apply_fn: Callable[..., Any], params: PyTree) -> Any:
  """The NNX module for ``params`` (e.g. ``merge(params, adapters)``), from :func:`from_nnx`'s
  ``apply_fn``."""
  from flax import nnx

  return nnx.merge(apply_fn.graphdef, params, apply_fn.rest)
