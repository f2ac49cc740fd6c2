"""PiSSA / OLoRA adapters as plain LoRA on the original weights (PEFT's weight conversion).

A base-changing init (``LoraSpec(init="pissa" | "pissa_niter_K" | "olora")``) trains on the
residual ``W_res = W - s * a0 @ b0``. After training, ``W_res + s * a @ b = W + s * (a @ b -
a0 @ b0) = W + s * [a | a0] @ [b ; -b0]``: a plain LoRA adapter of rank ``2r`` with the same
scale, relative to the original ``W``. This is what PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes (``r`` doubled,
``lora_alpha`` doubled -- times ``sqrt(2)`` with rsLoRA -- so the scale is unchanged,
``init_lora_weights=True``); :func:`lora_jax.export_peft` of the result writes the same.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._paths import path_str
from lora_jax.kinds.base import is_adapter, is_adapter_or_none
from lora_jax.kinds.inits import DIGEST_PENDING
from lora_jax.kinds.lora import LoraFactors

PyTree = Any


def _flat(tree: PyTree) -> tuple[list[tuple[str, Any]], Any]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapter_or_none)
  return [(path_str(p), x) for p, x in leaves], treedef


def _digests_differ(d: str | None, d0: str | None) -> bool:
  return DIGEST_PENDING not in (d, d0) and d != d0


def to_original_base(adapters: PyTree, initial_adapters: PyTree) -> PyTree:
  """Trained PiSSA/OLoRA adapters as plain LoRA adapters on the **original** weights.

  Each adapter becomes ``LoraFactors(a=[a | a0], b=[b ; -b0])`` (rank ``2r``, the same scale,
  no ``base_digest``), so that ``merge(original_params, result) == merge(residual_base,
  adapters)``: export it with :func:`lora_jax.export_peft` and load it with PEFT onto the
  unmodified model, or save it with :func:`lora_jax.save` and load it onto the original params.
  For LoftQ adapters the equality is only approximate: their base is the quantized kernel,
  ``W ~ dequant(Q) + scale * a0 @ b0`` up to the quantization error that LoftQ minimises.

  Args:
    adapters: the trained adapters (a tree, or a flat ``{path: adapter}`` dict).
    initial_adapters: the adapters :func:`lora_jax.split` returned with the residual base,
      before training, in the same structure.

  Returns:
    A tree of the structure of ``adapters`` holding the converted :class:`LoraFactors`.

  Raises:
    ValueError: the two trees differ (paths, shapes, scale, layout), ``initial_adapters``
      were not made by a base-changing init, the two belong to different bases, or an adapter
      is DoRA (or another kind that is not an additive low-rank update); the message names
      the path.

  >>> import lora_jax
  >>> params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (4, 3))}}
  >>> spec = lora_jax.LoraSpec(["d"], rank=1, alpha=2, init="pissa")
  >>> residual, ad0 = lora_jax.split(jax.random.key(1), params, spec)
  >>> trained = jax.tree.map(lambda x: x * 1.5, ad0)  # stands for training
  >>> plain = to_original_base(trained, ad0)
  >>> f = plain["d"]["kernel"]
  >>> f.rank, f.scale, f.base_digest
  (2, 2.0, None)
  >>> bool(jnp.allclose(lora_jax.merge(params, plain)["d"]["kernel"],
  ...                   lora_jax.merge(residual, trained)["d"]["kernel"], atol=1e-5))
  True
  """
  rows, treedef = _flat(adapters)
  rows0, _ = _flat(initial_adapters)
  by_path0 = dict(rows0)
  paths, paths0 = [p for p, _ in rows], [p for p, _ in rows0]
  if paths != paths0:
    missing = [p for p in paths if p not in by_path0][:1] or [p for p in paths0 if p not in dict(rows)][:1]
    where = f" (first difference at {missing[0]!r})" if missing else ""
    raise ValueError(
        "to_original_base(adapters, initial_adapters): the two trees have different structures"
        f"{where}; pass the adapters lora_jax.split returned together with the residual base, "
        "and the same adapters after training."
    )
  out = []
  for path, f in rows:
    f0 = by_path0[path]
    if (f is None) != (f0 is None):
      which = "the initial adapters" if f is None else "the trained adapters"
      raise ValueError(f"to_original_base: {path!r} has an adapter only in {which}; the two trees must adapt the same kernels.")
    if f is None:
      out.append(None)
      continue
    out.append(_convert(path, f, f0))
  return jax.tree_util.tree_unflatten(treedef, out)


def _convert(path: str, f: Any, f0: Any) -> LoraFactors:
  for x in (f, f0):
    if is_adapter(x) and type(x) is not LoraFactors:
      extra = (
          " DoRA's rescale m / ||W + s*a@b|| is not an additive low-rank update, so it has no "
          "plain-LoRA form on the original weights; merge the adapters into the residual base "
          "(lora_jax.merge) and use the merged params instead."
          if x.KIND == "dora" else ""
      )
      raise ValueError(f"to_original_base: {path!r} holds a {type(x).__name__} (kind {x.KIND!r}); only plain LoRA (LoraFactors) converts.{extra}")
  if f0.base_digest is None:
    raise ValueError(
        f"to_original_base: the initial adapter at {path!r} was not made by a base-changing init "
        "(it has no base_digest): only adapters from lora_jax.split with LoraSpec(init='pissa', "
        "'pissa_niter_K' or 'olora') differ from plain LoRA, and they must be passed as made, "
        "before training."
    )
  if f.base_digest is None:
    raise ValueError(
        f"to_original_base: the trained adapter at {path!r} has no base_digest: it was already "
        "converted, or not made by a base-changing init."
    )
  if _digests_differ(f.base_digest, f0.base_digest):
    raise ValueError(
        f"to_original_base: {path!r}: the trained and initial adapters belong to different bases "
        f"(base digests {f.base_digest!r} and {f0.base_digest!r}); pass the initial adapters of "
        "the split that the trained ones started from."
    )
  mine, theirs = (f.layout, f.scale, f.rslora, f.a.shape, f.b.shape), (f0.layout, f0.scale, f0.rslora, f0.a.shape, f0.b.shape)
  if mine != theirs:
    raise ValueError(
        f"to_original_base: {path!r}: the trained adapter (layout, scale, rslora, a, b shapes) = "
        f"{mine}, the initial one {theirs}; they must be the same adapter before and after training."
    )
  r_axis_b = f.layout.count("l")
  a = jnp.concatenate([f.a, f0.a.astype(f.a.dtype)], axis=-1)
  b = jnp.concatenate([f.b, -f0.b.astype(f.b.dtype)], axis=r_axis_b)
  return LoraFactors(a=a, b=b, scale=f.scale, layout=f.layout, rslora=f.rslora, dropout=f.dropout, base_digest=None)


__all__ = ["to_original_base"]
