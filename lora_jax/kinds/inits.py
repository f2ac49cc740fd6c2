"""How factors start (PEFT's ``init_lora_weights``): ``LoraSpec(init=...)``.

Each init gives ``(a, b, new_kernel)`` for one target: ``a`` with roles ``'lir'``, ``b`` with
roles ``'lro'`` (see :mod:`lora_jax.kinds`), and ``new_kernel`` None unless the init changes
the base (PiSSA, OLoRA: the base becomes the residual ``W - scale * a @ b``, so the adapted
model's output is unchanged at step 0; LoftQ: the base becomes a quantized kernel ``Q`` with
``dequant(Q) + scale * a @ b`` close to ``W``, see :mod:`lora_jax.kinds.loftq`).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.bases import dense
from lora_jax.kinds.base import einsum_delta, kernel_labels, leaf_labels

Array = Any

INIT_NAMES = ("peft", "gaussian", "pissa", "pissa_niter_K", "olora", "loftq", "loftq_iter_K", "loftq_int8", "loftq_int8_iter_K")
_NITER = re.compile(r"pissa_niter_([0-9]{1,3})")
BASE_CHANGING = ("pissa", "olora", "loftq")
# The base_digest of adapters made under a trace (jax.jit(lora_jax.split)): the base was
# replaced, but its values were not known; lora_jax.save(..., params=) fills in the digest.
DIGEST_PENDING = "pending"
_HI = jax.lax.Precision.HIGHEST


def check_init_name(shown: str, name: Any) -> None:
  """Raises naming ``shown`` (e.g. ``LoraSpec(init='pisa')``) unless ``name`` is an init."""
  if not isinstance(name, str):
    raise TypeError(f"{shown}: init must be one of {list(INIT_NAMES)}, found a {type(name).__name__}.")
  if name in ("peft", "gaussian", "pissa", "olora") or _NITER.fullmatch(name):
    return
  if name.startswith("loftq"):
    from lora_jax.kinds import loftq

    try:
      loftq.parse(name)
    except ValueError as e:
      raise ValueError(f"{shown}: {e}") from None
    return
  raise ValueError(
      f"{shown}: no such init; expected one of {list(INIT_NAMES)} (K: power iterations of the "
      "randomized SVD, e.g. 'pissa_niter_4'; LoftQ's alternating iterations, e.g. 'loftq_iter_5')."
  )


def changes_base(name: str) -> bool:
  """Whether the init ``name`` replaces the base kernel (PiSSA, OLoRA, LoftQ)."""
  return name.startswith(BASE_CHANGING)


def check_init_target(target: Any) -> None:
  """Raises naming the path when ``target``'s init cannot start its factors."""
  if target.init.startswith("loftq"):
    from lora_jax.kinds import loftq

    return loftq.check_target(target)
  if changes_base(target.init) and target.is_embedding:
    raise ValueError(
        f"{target.path!r}: init={target.init!r} is for matmul and convolution kernels, not "
        "embeddings (PEFT has no PiSSA/OLoRA for Embedding either); exclude the embedding from "
        "the targets or use init='peft'."
    )


def base_digest(w: Array) -> str:
  """A short digest of a kernel's values: what adapters made by a base-changing init (PiSSA,
  OLoRA, LoftQ) record of the base they belong to, and what :func:`lora_jax.load` checks. A
  base leaf (LoftQ's :class:`lora_jax.QuantizedKernel`) has the digest of its dense values.

  It covers the shape and up to 4096 evenly spaced entries rounded to bfloat16, so it tells
  the residual base from the original weights (they differ by the top-``r`` part) but not a
  base from its own cast to another dtype (``load``'s ``check_dtype`` is about dtypes).

  Under a trace (``jax.jit(lora_jax.split)``) the values are unknown: the digest is then
  :data:`DIGEST_PENDING`, which :func:`lora_jax.save` replaces by the digest of the kernel in
  ``params=`` (and refuses to save without it).

  >>> base_digest(jnp.ones((2, 3))) == base_digest(jnp.ones((2, 3), jnp.bfloat16))
  True
  >>> base_digest(jnp.ones((2, 3))) == base_digest(jnp.zeros((2, 3)))
  False
  >>> from lora_jax.bases.quantized import quantize_kernel
  >>> q = quantize_kernel(jnp.linspace(-1, 1, 128).reshape(64, 2))
  >>> base_digest(q) == base_digest(dense(q))
  True
  """
  import hashlib

  # A quantized base (LoftQ) has the digest of the dense values it stands for.
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(w)):
    return DIGEST_PENDING
  n = int(np.prod(w.shape))
  idx = np.linspace(0, max(n - 1, 0), min(n, 4096)).astype(np.int64)
  if isinstance(w, np.ndarray):
    sample = np.reshape(w, (-1,))[idx].astype(jnp.bfloat16)
  else:  # gathered where the kernel lives (only the sample comes to the host)
    sample = np.asarray(_sample(w, idx))
  sample = sample.view(np.uint16)
  h = hashlib.sha256(repr(tuple(int(d) for d in w.shape)).encode())
  h.update(sample.tobytes())
  return h.hexdigest()[:16]


@jax.jit
def _sample(w: Any, idx: Array) -> Array:
  return jnp.reshape(dense(w), (-1,))[idx].astype(jnp.bfloat16)  # a base leaf: only the sample dequantized


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
  if not changes_base(name):  # pragma: no cover - check_init_name admits no other name
    raise NotImplementedError(f"{target.path!r}: init={name!r}")
  if w is None:
    raise ValueError(
        f"{target.path!r}: init={name!r} starts the factors from the kernel's values, but only its "
        "shape is known here (a jax.ShapeDtypeStruct); pass the params themselves to lora_jax.split."
    )
  if name.startswith("loftq"):
    from lora_jax.kinds import loftq

    return loftq.loftq_factors(target, w, dtype, a_shape, b_shape)
  if name.startswith("pissa") and not target.scale > 0:
    raise ValueError(
        f"{target.path!r}: init={name!r} divides the singular values by the scale alpha/r = "
        f"{target.scale}, which must be positive; use alpha > 0."
    )
  return _base_changing(key, jnp.asarray(w), name=name, layout=target.layout, rank=target.rank,
                        scale=float(target.scale), dtype=jnp.dtype(dtype), a_shape=a_shape, b_shape=b_shape)


@functools.partial(jax.jit, static_argnames=("name", "layout", "rank", "scale", "dtype", "a_shape", "b_shape"))
def _base_changing(key, w, *, name, layout, rank, scale, dtype, a_shape, b_shape):
  """``(a, b, residual)`` of a base-changing init; one compiled function per kernel shape and
  options (inlined under an outer jit)."""
  acc = jnp.promote_types(w.dtype, jnp.float32)
  m = _matrices(w.astype(acc), layout)  # (*L, fan_in, fan_out)
  r = rank
  if name == "olora":
    # PEFT: Q, R = qr(W) of the torch (out, in) weight; lora_B = Q[:, :r], lora_A = R[:r]; no
    # scaling. Ours is the transpose: a = lora_A^T, b = lora_B^T.
    q, rr = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))
    a, b = jnp.swapaxes(rr[..., :r, :], -1, -2), jnp.swapaxes(q[..., :, :r], -1, -2)
  else:
    if name == "pissa":
      # W (in, out) = U S Vh, i.e. PEFT's (out, in) weight W^T = Vh^T S U^T: PEFT's
      # lora_A = sqrt(S/s) U^T and lora_B = Vh^T sqrt(S/s), transposed to our a, b.
      u, sv, vh = jnp.linalg.svd(m, full_matrices=False)
      u, sv, vh = u[..., :r], sv[..., :r], vh[..., :r, :]
    else:
      # PEFT: V, S, U = svd_lowrank(W^T, r, niter=K) of the torch weight.
      v, sv, u = svd_lowrank(jnp.swapaxes(m, -1, -2), r, int(_NITER.fullmatch(name).group(1)), key)
      vh = jnp.swapaxes(v, -1, -2)
    root = jnp.sqrt(sv / jnp.asarray(scale, acc))
    a, b = u * root[..., None, :], root[..., :, None] * vh
  a, b = jnp.reshape(a, a_shape).astype(dtype), jnp.reshape(b, b_shape).astype(dtype)
  # The residual against the factors as stored (in their dtype), so that
  # W_res + scale * a @ b reproduces W up to the kernel's rounding.
  d = einsum_delta(a, leaf_labels("lir", layout), b, leaf_labels("lro", layout), kernel_labels(layout), scale)
  new_w = (w.astype(jnp.promote_types(acc, d.dtype)) - d).astype(w.dtype)
  return a, b, new_w


def _order(layout: str) -> list[int]:
  """Kernel axes in factor order: the 'l' axes, then 'i', then 'o', each in kernel order."""
  return [j for role in "lio" for j, c in enumerate(layout) if c == role]


def _matrices(w: Array, layout: str) -> Array:
  """The kernel as a batch of ``(fan_in, fan_out)`` matrices, one per index of its 'l' axes."""
  wt = jnp.transpose(w, _order(layout))
  n_l, n_i = layout.count("l"), layout.count("i")
  lead, ins, outs = wt.shape[:n_l], wt.shape[n_l : n_l + n_i], wt.shape[n_l + n_i :]
  return jnp.reshape(wt, (*lead, int(np.prod(ins)), int(np.prod(outs))))


@functools.partial(jax.jit, static_argnums=(1, 2))
def svd_lowrank(m: Array, q: int, niter: int, key: Array) -> tuple[Array, Array, Array]:
  """``(U, S, V)`` with ``m ~ U diag(S) V^T``, ``q`` components, batched over leading axes:
  :func:`torch.svd_lowrank` (Halko et al. 2009, algorithms 4.4 and 5.1, ``niter`` subspace
  iterations, no oversampling) as PEFT's ``pissa_niter_K`` calls it, with draws from ``key``.

  >>> m = jnp.outer(jnp.arange(1.0, 5.0), jnp.arange(1.0, 4.0))  # rank 1
  >>> u, s, v = svd_lowrank(m, 1, 2, jax.random.key(0))
  >>> bool(jnp.allclose((u * s) @ v.T, m, atol=1e-4))
  True
  """
  rows, cols = m.shape[-2:]
  wide = rows < cols
  a = jnp.swapaxes(m, -1, -2) if wide else m
  at = jnp.swapaxes(a, -1, -2)
  mm = lambda x, y: jnp.matmul(x, y, precision=_HI)  # noqa: E731
  r = jax.random.normal(key, (*a.shape[:-2], a.shape[-1], q), a.dtype)
  basis = jnp.linalg.qr(mm(a, r))[0]

  def power(_, basis):
    basis = jnp.linalg.qr(mm(at, basis))[0]
    return jnp.linalg.qr(mm(a, basis))[0]

  basis = jax.lax.fori_loop(0, niter, power, basis)  # as torch: QR after each product
  u, s, vh = jnp.linalg.svd(mm(jnp.swapaxes(basis, -1, -2), a), full_matrices=False)
  u, v = mm(basis, u), jnp.swapaxes(vh, -1, -2)
  return (v, s, u) if wide else (u, s, v)


__all__ = ["BASE_CHANGING", "DIGEST_PENDING", "base_digest", "svd_lowrank", "INIT_NAMES", "changes_base", "check_init_name", "check_init_target", "initial_factors"]
