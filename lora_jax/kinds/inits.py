"""How factors start (PEFT's ``init_lora_weights``): ``LoraSpec(init=...)``.

Each init gives ``(a, b, new_kernel)`` for one target: ``a`` with roles ``'lir'``, ``b`` with
roles ``'lro'`` (see :mod:`lora_jax.kinds`), and ``new_kernel`` None unless the init changes
the base (PiSSA, OLoRA: the base becomes the residual ``W - scale * a @ b``, so the adapted
model's output is unchanged at step 0).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

INIT_NAMES = ("peft", "gaussian", "pissa", "pissa_niter_K", "olora")
_NITER = re.compile(r"pissa_niter_([0-9]{1,3})")
BASE_CHANGING = ("pissa", "olora")


def check_init_name(shown: str, name: Any) -> None:
  """Raises naming ``shown`` (e.g. ``LoraSpec(init='pisa')``) unless ``name`` is an init."""
  if not isinstance(name, str):
    raise TypeError(f"{shown}: init must be one of {list(INIT_NAMES)}, found a {type(name).__name__}.")
  if name in ("peft", "gaussian", "pissa", "olora") or _NITER.fullmatch(name):
    return
  raise ValueError(
      f"{shown}: no such init; expected one of {list(INIT_NAMES)} (K = power iterations of the "
      "randomized SVD, e.g. 'pissa_niter_4')."
  )


def changes_base(name: str) -> bool:
  """Whether the init ``name`` replaces the base kernel (PiSSA, OLoRA)."""
  return name.startswith(BASE_CHANGING)


def check_init_target(target: Any) -> None:
  """Raises naming the path when ``target``'s init cannot start its factors."""
  if changes_base(target.init) and target.is_embedding:
    raise ValueError(
        f"{target.path!r}: init={target.init!r} is for matmul and convolution kernels, not "
        "embeddings (PEFT has no PiSSA/OLoRA for Embedding either); exclude the embedding from "
        "the targets or use init='peft'."
    )


def base_digest(w: Array) -> str:
  """A short digest of a kernel's values (shape, dtype and up to 4096 evenly spaced entries):
  what adapters made by a base-changing init record of the base they belong to."""
  import hashlib

  n = int(np.prod(w.shape))
  idx = np.linspace(0, max(n - 1, 0), min(n, 4096)).astype(np.int64)
  sample = np.asarray(jnp.reshape(w, (-1,))[idx])
  h = hashlib.sha256(repr((tuple(w.shape), np.dtype(w.dtype).name)).encode())
  h.update(sample.tobytes())
  return h.hexdigest()[:16]


def factor_shapes(target: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
  from lora_jax.kinds.lora import factor_shapes as shapes

  return shapes(target.shape, target.layout, target.rank)


def initial_factors(key: Array, target: Any, dtype: Any, w: Array | None = None) -> tuple[Array, Array, Array | None]:
  """``(a, b, new_kernel)`` for ``target`` by its ``init`` (see the module docstring)."""
  a_shape, b_shape = factor_shapes(target)
  name = target.init
  if name == "peft" or (target.is_embedding and name == "gaussian"):
    if target.is_embedding:
      # PEFT's embedding init: A (our a) zero, B (our b) standard normal.
      return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype), None
    # PEFT's default: kaiming_uniform(a=sqrt(5)) on A, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(target.fan_in)
    return jax.random.uniform(key, a_shape, dtype, -bound, bound), jnp.zeros(b_shape, dtype), None
  if name == "gaussian":
    # PEFT: nn.init.normal_(lora_A, std=1 / r), lora_B zero.
    return jax.random.normal(key, a_shape, dtype) / target.rank, jnp.zeros(b_shape, dtype), None
  raise NotImplementedError(f"{target.path!r}: init={name!r}")


__all__ = ["BASE_CHANGING", "base_digest", "INIT_NAMES", "changes_base", "check_init_name", "check_init_target", "initial_factors"]
