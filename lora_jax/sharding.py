"""Adapter shardings derived from kernel shardings: ``a`` follows fan-in, ``b`` follows fan-out."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax.adapters import check_adapters
from lora_jax._paths import tree_from_entries
from lora_jax.kinds import is_adapter_or_none, kernel_labels, leaf_labels

PyTree = Any


def _spec_axes(spec: PartitionSpec, ndim: int) -> list[Any]:
  entries = list(spec) + [None] * (ndim - len(spec))
  return entries[:ndim]


def leaf_spec(kernel_spec: PartitionSpec, layout: str, pattern: str) -> PartitionSpec:
  """PartitionSpec of an adapter leaf with role ``pattern`` on a kernel sharded as ``kernel_spec``.

  Each kernel-role axis of the leaf (``'l'``, ``'i'``, ``'o'``) keeps the sharding of the kernel
  axis it stands for; the adapter's own axes (rank, bank) are replicated.
  """
  axes = dict(zip(kernel_labels(layout), _spec_axes(kernel_spec, len(layout))))
  return PartitionSpec(*(axes.get(lab) for lab in leaf_labels(pattern, layout)))


def factor_specs(kernel_spec: PartitionSpec, layout: str) -> tuple[PartitionSpec, PartitionSpec]:
  """PartitionSpecs of ``a`` and ``b`` for a kernel sharded as ``kernel_spec``.

  Leading (``'l'``) and fan-in (``'i'``) axes of ``a`` keep the kernel's sharding, leading
  and fan-out (``'o'``) axes of ``b`` keep theirs; the rank axis is replicated. So
  ``x @ a`` needs the same communication as ``x @ W`` and ``(x @ a) @ b`` produces output
  sharded like ``x @ W``'s.

  >>> a, b = factor_specs(PartitionSpec("fsdp", "tp"), "io")
  >>> a == PartitionSpec("fsdp", None), b == PartitionSpec(None, "tp")
  (True, True)
  """
  return leaf_spec(kernel_spec, layout, "lir"), leaf_spec(kernel_spec, layout, "lro")


def adapter_shardings(params: PyTree, adapters: PyTree) -> PyTree:
  """A tree like ``adapters`` holding, per adapted kernel, the adapter with a sharding in
  place of each leaf (derived from the leaf's roles, see :func:`leaf_spec`).

  Kernels must carry a ``NamedSharding`` (arrays placed with ``jax.device_put`` or a jit's
  ``out_shardings``, or ``jax.ShapeDtypeStruct(..., sharding=...)``). Use the result as
  ``in_shardings``/``out_shardings`` of ``jax.jit`` or with :func:`shard_like`.

  Raises:
    ValueError: an adapted kernel without a ``NamedSharding``; the message names its path.
  """
  entries = []
  for path, leaf, f in check_adapters(params, adapters):
    if f is None:
      entries.append(None)
      continue
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
      raise ValueError(
          f"{path!r}: the kernel has sharding {sharding!r}; adapter_shardings needs a "
          "NamedSharding on every adapted kernel (place params with jax.device_put(x, "
          "NamedSharding(mesh, spec)) first)."
      )
    entries.append(
        f.replace(**{n: NamedSharding(sharding.mesh, leaf_spec(sharding.spec, f.layout, pat)) for n, pat in f.ROLES.items()})
    )
  return tree_from_entries(params, entries)


def shard_like(adapters: PyTree, params: PyTree) -> PyTree:
  """Places each adapter factor with the sharding :func:`adapter_shardings` derives.

  >>> import jax.numpy as jnp
  >>> from jax.sharding import Mesh
  >>> from lora_jax import LoraSpec, init
  >>> mesh = Mesh(jax.devices()[:1], ("tp",))
  >>> params = {"w": jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, PartitionSpec(None, "tp")))}
  >>> ad = shard_like(init(jax.random.key(0), params, LoraSpec("w", rank=2)), params)
  >>> ad["w"].b.sharding.spec == PartitionSpec(None, "tp")
  True
  """
  shardings = adapter_shardings(params, adapters)
  return jax.tree.map(
      lambda f, s: None if f is None else jax.device_put(f, s), adapters, shardings, is_leaf=is_adapter_or_none
  )
