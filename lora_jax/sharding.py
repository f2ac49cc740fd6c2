"""Adapter shardings derived from kernel shardings: ``a`` follows fan-in, ``b`` follows fan-out.

A kernel's sharding can come from where users keep it: the arrays themselves (a
``NamedSharding``), ``jax.ShapeDtypeStruct(..., sharding=)``, a tree of ``PartitionSpec`` /
``NamedSharding`` (``nn.get_partition_spec``, ``nn.logical_to_mesh_sharding``,
``nnx.get_partition_spec``, ``nnx.get_named_sharding``) or Flax linen boxes
(``nn.with_partitioning`` / ``nn.with_logical_partitioning``, resolved with the user's rules).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax import tree_util as jtu
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax.adapters import check_adapters
from lora_jax._paths import path_str
from lora_jax.bases import is_base_leaf
from lora_jax.kinds import Adapter, is_adapter_or_none, kernel_labels, leaf_labels

PyTree = Any
Rules = Sequence[tuple[str, Any]]


def _spec_axes(spec: PartitionSpec, ndim: int) -> list[Any]:
  entries = list(spec) + [None] * (ndim - len(spec))
  return entries[:ndim]


def _mesh_axes(entry: Any) -> tuple[Any, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def leaf_spec(kernel_spec: PartitionSpec, layout: str, pattern: str, rank_axis: Any = None) -> PartitionSpec:
  """PartitionSpec of an adapter leaf with role ``pattern`` on a kernel sharded as ``kernel_spec``.

  Each kernel-role axis of the leaf (``'l'``, ``'i'``, ``'o'``) keeps the sharding of the kernel
  axis it stands for; the adapter's own axes (bank ``'n'``, ...) are replicated, and so is the
  rank axis ``'r'`` unless ``rank_axis`` names a mesh (or logical) axis for it.

  >>> leaf_spec(PartitionSpec("fsdp", "tp"), "io", "lir", rank_axis="rank") == PartitionSpec("fsdp", "rank")
  True

  Raises:
    ValueError: ``rank_axis`` is a mesh axis the leaf's other axes already use (a
      ``PartitionSpec`` may name a mesh axis once).
  """
  axes = dict(zip(kernel_labels(layout), _spec_axes(kernel_spec, len(layout))))
  out = [axes.get(lab) for lab in leaf_labels(pattern, layout)]
  if rank_axis is not None and "r" in pattern:
    used = {a for e in out for a in _mesh_axes(e)}
    if set(_mesh_axes(rank_axis)) & used:
      raise ValueError(
          f"rank_axis={rank_axis!r} is already used by the kernel axes of this leaf (spec "
          f"{kernel_spec}, leaf role {pattern!r}); a PartitionSpec names a mesh axis once. Pick "
          "another mesh axis for the rank, or rank_axis=None (replicated)."
      )
    out[[lab[0] for lab in leaf_labels(pattern, layout)].index("r")] = rank_axis
  return PartitionSpec(*out)


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


# ----------------------------------------------------------------------------------------------
# Where a kernel's sharding comes from
# ----------------------------------------------------------------------------------------------


def _is_box(x: Any) -> bool:
  try:
    from flax.core.meta import Partitioned
  except ImportError:  # pragma: no cover - flax is a dependency
    return False
  return isinstance(x, Partitioned)


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (PartitionSpec, NamedSharding)) or _is_box(x) or is_base_leaf(x)


def _box_sharding(path: str, box: Any, mesh: Mesh | None, rules: Rules | None) -> Any:
  """A linen box's sharding: ``nn.Partitioned`` names are mesh axes; ``nn.LogicallyPartitioned``
  names are logical, resolved with ``rules`` (else the box's own, else flax's
  ``nn.logical_axis_rules`` context) as ``nn.logical_to_mesh_sharding`` does."""
  from flax.linen import spmd

  names = box.names
  if isinstance(box, spmd.LogicallyPartitioned):
    use = rules if rules is not None else (getattr(box, "rules", None) or None)
    spec = spmd.logical_to_mesh_axes(names, use)
    if spec is None:
      raise ValueError(f"{path!r}: logical axes {names} could not be resolved to mesh axes with rules {use!r}.")
  else:
    spec = PartitionSpec(*names)
  mesh = mesh if mesh is not None else getattr(box, "mesh", None)
  return NamedSharding(mesh, spec) if mesh is not None else spec


def _kernel_sharding(path: str, leaf: Any, mesh: Mesh | None, rules: Rules | None) -> Any:
  if _is_box(leaf):
    return _box_sharding(path, leaf, mesh, rules)
  if leaf is None:
    leaf = PartitionSpec()
  if isinstance(leaf, (PartitionSpec, NamedSharding)):
    s = leaf
  else:
    s = getattr(leaf, "sharding", None)
    if not isinstance(s, NamedSharding):
      raise ValueError(
          f"{path!r}: the kernel has sharding {s!r}; adapter shardings need a NamedSharding "
          "on every adapted kernel (place params with jax.device_put(x, NamedSharding(mesh, "
          "spec)) first), or a PartitionSpec for it (a tree like nn.get_partition_spec(...) or "
          "nnx.get_partition_spec(state) gives), or linen boxes (nn.with_logical_partitioning) "
          "with mesh= and rules=."
      )
  if isinstance(s, PartitionSpec) and mesh is not None:
    s = NamedSharding(mesh, s)
  return s


def _derive(path: str, kernel: Any, f: Adapter, rank_axis: Any) -> Adapter:
  spec = kernel.spec if isinstance(kernel, NamedSharding) else kernel
  if len(spec) > len(f.layout):
    raise ValueError(f"{path!r}: the kernel's spec {spec} has more entries than its layout {f.layout!r} has axes.")

  def one(pattern: str) -> Any:
    try:
      s = leaf_spec(spec, f.layout, pattern, rank_axis)
    except ValueError as e:
      raise ValueError(f"{path!r}: {e}") from None
    return NamedSharding(kernel.mesh, s) if isinstance(kernel, NamedSharding) else s

  return f.replace(**{n: one(pat) for n, pat in f.ROLES.items()})


def adapter_specs(specs: PyTree, adapters: PyTree, *, mesh: Mesh | None = None, rules: Rules | None = None,
                  rank_axis: Any = None) -> PyTree:
  """A tree like ``adapters`` holding, per adapter, each leaf's ``PartitionSpec`` (or
  ``NamedSharding``) derived from its kernel's (see :func:`leaf_spec`).

  ``specs`` mirrors the params and holds, per kernel, a ``PartitionSpec`` (mesh-axis or logical
  names alike: they are passed through), a ``NamedSharding``, an array or
  ``ShapeDtypeStruct`` carrying one, or a linen box (``nn.Partitioned`` /
  ``nn.LogicallyPartitioned``, resolved with ``rules``). Logical names in give logical names
  out: map them as Flax does, ``nn.logical_to_mesh_sharding(out, mesh, rules)``. With ``mesh``
  every result is a ``NamedSharding``. ``rank_axis`` shards the rank axis too.

  >>> import jax.numpy as jnp
  >>> from lora_jax import LoraSpec, init
  >>> params = {"up": {"kernel": jnp.ones((4, 8))}}
  >>> ad = init(jax.random.key(0), params, LoraSpec(["up"], rank=2))
  >>> s = adapter_specs({"up": {"kernel": PartitionSpec("embed", "mlp")}}, ad)["up"]["kernel"]
  >>> s.a == PartitionSpec("embed", None), s.b == PartitionSpec(None, "mlp")
  (True, True)

  Raises:
    ValueError: an adapted kernel with no entry in ``specs``, or whose entry gives no sharding;
      the message names its path.
  """
  by_path = {path_str(p): s for p, s in jtu.tree_flatten_with_path(specs, is_leaf=_is_spec_leaf)[0]}

  def one(path, f):
    if f is None:
      return None
    name = path_str(path)
    if name not in by_path:
      raise ValueError(f"{name!r}: adapted here, but `specs` has no entry for this kernel (specs must mirror the params).")
    return _derive(name, _kernel_sharding(name, by_path[name], mesh, rules), f, rank_axis)

  return jtu.tree_map_with_path(one, adapters, is_leaf=is_adapter_or_none)


def adapter_shardings(params: PyTree, adapters: PyTree, *, mesh: Mesh | None = None, rules: Rules | None = None,
                      rank_axis: Any = None) -> PyTree:
  """A tree like ``adapters`` holding, per adapted kernel, the adapter with a ``NamedSharding``
  in place of each leaf (derived from the leaf's roles, see :func:`leaf_spec`).

  Each kernel's sharding comes from the array (placed with ``jax.device_put`` or a jit's
  ``out_shardings``, or a ``jax.ShapeDtypeStruct(..., sharding=...)``), or from its linen box
  (``nn.with_partitioning``; ``nn.with_logical_partitioning`` resolved with ``rules`` on
  ``mesh``). Use the result as ``in_shardings``/``out_shardings`` of ``jax.jit`` (e.g. to
  create the adapters already sharded: ``jax.jit(lambda p: init(key, p, spec),
  out_shardings=adapter_shardings(params, jax.eval_shape(lambda p: init(key, p, spec), params)))``)
  or with :func:`shard_like`. For a tree of ``PartitionSpec`` use :func:`adapter_specs`.

  Raises:
    ValueError: an adapted kernel without a ``NamedSharding`` (or a box without a mesh); the
      message names its path.
  """
  check_adapters(params, adapters)
  out = adapter_specs(params, adapters, mesh=mesh, rules=rules, rank_axis=rank_axis)
  for path, f in jtu.tree_flatten_with_path(out, is_leaf=is_adapter_or_none)[0]:
    for x in ([] if f is None else f.leaves().values()):
      if not isinstance(x, NamedSharding):
        raise ValueError(
            f"{path_str(path)!r}: the kernel's sharding is the PartitionSpec {x!r} with no mesh; "
            "pass mesh= (or use adapter_specs for specs)."
        )
  return out


def shard_like(adapters: PyTree, params: PyTree, **kw: Any) -> PyTree:
  """Places each adapter factor with the sharding :func:`adapter_shardings` derives (same
  keywords).

  >>> import jax.numpy as jnp
  >>> from jax.sharding import Mesh
  >>> from lora_jax import LoraSpec, init
  >>> mesh = Mesh(jax.devices()[:1], ("tp",))
  >>> params = {"w": jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, PartitionSpec(None, "tp")))}
  >>> ad = shard_like(init(jax.random.key(0), params, LoraSpec("w", rank=2)), params)
  >>> ad["w"].b.sharding.spec == PartitionSpec(None, "tp")
  True
  """
  shardings = adapter_shardings(params, adapters, **kw)
  from lora_jax._multihost import place  # jax.device_put, or per-process shards on a multi-host mesh

  def put(f, s):
    if f is None:
      return None
    return f.replace(**{n: place(x, getattr(s, n)) for n, x in f.leaves().items()})

  return jax.tree.map(put, adapters, shardings, is_leaf=is_adapter_or_none)
