"""Weighted combination of adapters: PEFT's ``add_weighted_adapter`` on lora_jax trees.

Every combination works per adapted kernel, and per layer for stacked (``'l'``) kernels, on
the factors viewed as matrices: ``a`` as ``(layers, fan_in, r)``, ``b`` as
``(layers, r, fan_out)``. The result is plain LoRA with ``scale = 1`` (PEFT's new adapter has
``lora_alpha = r``), so its delta is ``a @ b``.

* ``"cat"``: ranks concatenated; exact.
* ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: PEFT's
  merge of the ``a``'s and, separately, of the ``b``'s, each weighted by
  ``sqrt(|w * scale|)`` (the sign on ``a``); not the weighted sum of deltas (cross terms).
* ``"svd"``: the best rank-``r`` approximation of ``sum_i w_i * delta_i``, from QR of the
  concatenated factors (nothing ``fan_in x fan_out`` is formed).
* ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``:
  PEFT's merge of the dense deltas (elementwise, so they are formed), then a truncated SVD.
"""

from __future__ import annotations

import functools
import numbers
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from lora_jax._paths import path_str
from lora_jax.kinds import DoraFactors, LoraFactors, is_adapter_or_none

Array = Any
PyTree = Any
_HI = jax.lax.Precision.HIGHEST

# ===================================================================================== Options

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *FACTOR_TYPES, *SVD_TYPES)
_NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
_NEEDS_DENSITY |= {t + "_svd" for t in _NEEDS_DENSITY}
_RANDOM = {"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"}
_SIGN_METHODS = ("total", "frequency")


def _check_options(combination_type, density, majority_sign_method, rank, svd_clamp, key) -> None:
  if combination_type not in COMBINATION_TYPES:
    raise ValueError(f"combine: unknown combination_type {combination_type!r}; expected one of {', '.join(COMBINATION_TYPES)}.")
  ct = combination_type
  if ct in _NEEDS_DENSITY:
    if density is None:
      raise ValueError(
          f"combine: combination_type {ct!r} needs density (the fraction of values kept, in (0, 1]), e.g. density=0.5."
      )
    if not isinstance(density, numbers.Real) or not 0 < float(density) <= 1:
      raise ValueError(f"combine: density must be a Python float in (0, 1], got {density!r}.")
  elif density is not None:
    raise ValueError(
        f"combine: density is used by {', '.join(sorted(_NEEDS_DENSITY))}, not by {ct!r}; leave it out."
    )
  if majority_sign_method not in _SIGN_METHODS:
    raise ValueError(f"combine: majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
  if ct in SVD_TYPES:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1):
      raise ValueError(f"combine: rank must be a positive int, got {rank!r}.")
    if svd_clamp is not None and (not isinstance(svd_clamp, numbers.Real) or not 0 <= float(svd_clamp) <= 1):
      raise ValueError(f"combine: svd_clamp is a quantile in [0, 1] (a Python float), got {svd_clamp!r}.")
  else:
    for name, v in (("rank", rank), ("svd_clamp", svd_clamp)):
      if v is not None:
        raise ValueError(
            f"combine: {name} is for the SVD types ({', '.join(SVD_TYPES)}), not {ct!r}"
            + (" ('cat' gives the sum of the ranks, the others the common rank)." if name == "rank" else ".")
        )
  if ct in _RANDOM and key is None:
    raise ValueError(f"combine: combination_type {ct!r} drops values at random and needs key=jax.random.key(...).")


# ===================================================================================== Merges
# PEFT's peft/utils/merge_utils.py on stacked tensors ``t`` of shape (n, layers, x, y): one
# entry per adapter; pruning is per adapter and per layer (a layer is one PEFT module).


def _magnitude_prune(t: Array, density: float) -> Array:
  if density >= 1:
    return t
  n, nl = t.shape[:2]
  flat = t.reshape(n * nl, -1)
  k = int(density * flat.shape[1])
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  mask = jnp.zeros(flat.shape, t.dtype).at[jnp.arange(n * nl)[:, None], idx].set(1)
  return (flat * mask).reshape(t.shape)


def _random_prune(t: Array, density: float, masks: Array) -> Array:
  return t if density >= 1 else t * masks / jnp.asarray(density, t.dtype)


def _weighted(t: Array, w: Array) -> Array:
  return t * w.astype(t.dtype).reshape((-1,) + (1,) * (t.ndim - 1))


def _disjoint(t: Array, w: Array, method: str) -> Array:
  sign = jnp.sign(t)
  magnitude = jnp.sum(t if method == "total" else sign, axis=0)
  keep = sign == jnp.where(magnitude >= 0, 1, -1).astype(t.dtype)
  return jnp.sum(_weighted(t, w) * keep, axis=0) / jnp.maximum(jnp.sum(keep, axis=0), 1).astype(t.dtype)


def _merge(ct: str, t: Array, w: Array, density: float | None, method: str, masks: Array | None) -> Array:
  """``ct``'s merge (without a trailing ``_svd``) of the stacked ``t`` weighted by ``w``."""
  ct = ct.removesuffix("_svd")
  if ct in ("linear", "svd"):
    return jnp.sum(_weighted(t, w), axis=0)
  if ct == "magnitude_prune":
    return jnp.sum(_weighted(_magnitude_prune(t, density), w), axis=0)
  if ct == "ties":
    return _disjoint(_magnitude_prune(t, density), w, method)
  pruned = _random_prune(t, density, masks)
  if ct == "dare_linear":
    return jnp.sum(_weighted(pruned, w), axis=0)
  return _disjoint(pruned, w, method)  # dare_ties


def path_id(path: str) -> int:
  """The number a path's DARE masks are keyed by: its CRC-32 (31 bits)."""
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


def keep_mask(key: Array, path: str | int, index: Any, size: int, density: float) -> Array:
  """The DARE keep mask (True keeps) that :func:`combine` draws for the adapter at position
  ``index`` of its list, at ``path`` (or its :func:`path_id`): ``size`` Bernoulli(``density``)
  draws from ``key`` folded with the path's id and ``index``, so a kernel's masks do not depend
  on the rest of the tree. With the factors viewed as matrices ``(layers, fan_in, r)`` and
  ``(layers, r, fan_out)``, the first entries mask ``a``, the next ``b`` (the factor types); or
  the whole mask is the ``(layers, fan_in, fan_out)`` delta's (the ``*_svd`` types)."""
  pid = path_id(path) if isinstance(path, str) else path
  return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, pid), index), density, (size,))


# ===================================================================================== SVD


def _canonical_signs(u: Array, vh: Array) -> tuple[Array, Array]:
  """Flips each singular pair so that the largest-magnitude entry of ``u``'s column is
  positive: the factors (and so ``svd_clamp``'s quantile) do not depend on the SVD routine."""
  idx = jnp.argmax(jnp.abs(u), axis=-2, keepdims=True)
  s = jnp.where(jnp.take_along_axis(u, idx, axis=-2) < 0, -1, 1).astype(u.dtype)
  return u * s, vh * jnp.swapaxes(s, -1, -2)


def _truncate(u: Array, s: Array, vh: Array, rank: int, clamp: Any) -> tuple[Array, Array]:
  """``a = u[:, :rank]``, ``b = s * vh[:rank]`` per layer (zero-padded to ``rank`` when the
  product has fewer singular values), then PEFT's ``svd_clamp``: both clipped to
  ``[-q, q]``, ``q`` the ``clamp`` quantile of their values together, per layer."""
  u, vh = _canonical_signs(u, vh)
  k = min(rank, s.shape[-1])
  a, b = u[..., :k], s[..., :k, None] * vh[..., :k, :]
  if k < rank:
    a = jnp.pad(a, ((0, 0), (0, 0), (0, rank - k)))
    b = jnp.pad(b, ((0, 0), (0, rank - k), (0, 0)))
  if clamp is not None:
    dist = jnp.concatenate([b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)], axis=1)
    hi = jnp.quantile(dist, jnp.asarray(clamp, dist.dtype), axis=1)[:, None, None]
    a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
  return a, b


def _svd_of_factors(a: Array, b: Array, rank: int, clamp: Any) -> tuple[Array, Array]:
  """Truncated SVD of ``a @ b`` (``(L, I, R) @ (L, R, O)``) through QR of both factors:
  ``a = Qa Ra``, ``b^T = Qb Rb``, ``a @ b = Qa (Ra Rb^T) Qb^T``, the SVD of the small middle."""
  qa, ra = jnp.linalg.qr(a)
  qb, rb = jnp.linalg.qr(jnp.swapaxes(b, 1, 2))
  um, s, vmh = jnp.linalg.svd(jnp.matmul(ra, jnp.swapaxes(rb, 1, 2), precision=_HI), full_matrices=False)
  u = jnp.matmul(qa, um, precision=_HI)
  vh = jnp.matmul(vmh, jnp.swapaxes(qb, 1, 2), precision=_HI)
  return _truncate(u, s, vh, rank, clamp)


# ===================================================================================== Per kernel


def _describe(x: Any) -> str:
  return f"a {type(x).__name__}" if not hasattr(x, "shape") else f"an array of shape {tuple(x.shape)}"


def _check_kernel(path: str, present: list[tuple[str, LoraFactors]], ct: str) -> None:
  """Raises unless the adapters at ``path`` can be combined (same kernel, layout, base)."""
  for label, f in present:
    if isinstance(f, DoraFactors):
      raise TypeError(
          f"combine: {label}[{path!r}] is DoRA (DoraFactors); its magnitude does not add, so DoRA "
          "adapters cannot be combined (PEFT would keep the new adapter's magnitude at the base's norm "
          "and mix the directions). Merge each DoRA adapter into the base with lora_jax.merge instead."
      )
    if type(f) is not LoraFactors:
      raise TypeError(f"combine: {label}[{path!r}] is {_describe(f)}; combine takes plain LoRA adapters (LoraFactors) or None.")
  (l0, f0), rest = present[0], present[1:]
  for label, f in rest:
    if f.layout != f0.layout:
      raise ValueError(
          f"combine: at {path!r}, {l0} has layout {f0.layout!r} and {label} {f.layout!r}; adapters of one "
          "kernel must share its layout (they must be made for the same model)."
      )
    if f.kernel_shape != f0.kernel_shape:
      raise ValueError(
          f"combine: at {path!r}, {l0} adapts a kernel of shape {f0.kernel_shape} and {label} one of shape "
          f"{f.kernel_shape}; the adapters must be made for the same model."
      )
    if f.base_digest != f0.base_digest:
      raise ValueError(
          f"combine: at {path!r}, {l0} and {label} were made for different base kernels (base_digest "
          f"{f0.base_digest!r} vs {f.base_digest!r}: a PiSSA/OLoRA init replaced the kernel), so their "
          "deltas do not add; convert each to plain LoRA on the original base first with "
          "lora_jax.to_original_base(adapters, initial_adapters)."
      )
    if ct in FACTOR_TYPES and f.rank != f0.rank:
      raise ValueError(
          f"combine: combination_type {ct!r} needs equal ranks, but at {path!r} {l0} has rank {f0.rank} "
          f"and {label} rank {f.rank}; use 'cat' (exact, ranks add) or 'svd' (rank=...)."
      )


def _combine_kernel(
    path: str, present: list[tuple[int, LoraFactors]], weights: Array, key: Array | None, ct: str, **options: Any
) -> LoraFactors:
  """The combination of the adapters ``present`` (their positions in the caller's list and
  factors) of the kernel at ``path``."""
  f0 = present[0][1]
  a, b = _combine_arrays(
      [f.a for _, f in present], [f.b for _, f in present], jnp.asarray([float(f.scale) for _, f in present]),
      weights, jnp.asarray([i for i, _ in present], jnp.int32), jnp.uint32(path_id(path)), key,
      nl=f0.layout.count("l"), ct=ct, **options,
  )
  return LoraFactors(a=a, b=b, scale=1.0, layout=f0.layout, dropout=f0.dropout, base_digest=f0.base_digest)


# Compiled per kernel shape and options, so kernels of one shape (the layers of an unstacked
# model) share one compilation: op-by-op dispatch of the small QRs, SVDs and top-ks would
# compile each op, and one program for the whole tree would grow with the model.
@functools.partial(jax.jit, static_argnames=("nl", "ct", "rank", "density", "method", "clamp"))
def _combine_arrays(a_list, b_list, scales, weights, index, pid, key, *, nl, ct, rank, density, method, clamp):
  lead, fan_in, fan_out = a_list[0].shape[:nl], a_list[0].shape[nl:-1], b_list[0].shape[nl + 1 :]
  nL, nI, nO = (int(np.prod(s)) for s in (lead, fan_in, fan_out))
  a_dtype, b_dtype = jnp.result_type(*a_list), jnp.result_type(*b_list)
  acc = jnp.promote_types(jnp.promote_types(a_dtype, b_dtype), jnp.float32)
  a3 = [x.astype(acc).reshape(nL, nI, -1) for x in a_list]
  b3 = [x.astype(acc).reshape(nL, -1, nO) for x in b_list]
  w = weights[index].astype(acc)
  ws = w * scales.astype(acc)

  def masks(*shapes):  # one draw per kernel (random bits are slow to compile on CPU)
    sizes = [int(np.prod(sh)) for sh in shapes]
    drawn = jax.vmap(lambda i: keep_mask(key, pid, i, sum(sizes), density))(index).astype(acc)
    parts = jnp.split(drawn, np.cumsum(sizes)[:-1], axis=1)
    return [x.reshape(-1, *sh) for x, sh in zip(parts, shapes)]

  if ct == "cat":
    a = jnp.concatenate([x * ws[j] for j, x in enumerate(a3)], axis=-1)
    b = jnp.concatenate(b3, axis=1)
  elif ct in FACTOR_TYPES:
    root = jnp.sqrt(jnp.abs(ws))
    mask_a, mask_b = masks(a3[0].shape, b3[0].shape) if ct in _RANDOM and density < 1 else (None, None)
    a = _merge(ct, jnp.stack(a3), jnp.where(ws >= 0, 1, -1).astype(acc) * root, density, method, mask_a)
    b = _merge(ct, jnp.stack(b3), root, density, method, mask_b)
  else:
    new_rank = rank if rank is not None else max(x.shape[-1] for x in a3)
    if ct == "svd":
      a_cat = jnp.concatenate([x * ws[j] for j, x in enumerate(a3)], axis=-1)
      a, b = _svd_of_factors(a_cat, jnp.concatenate(b3, axis=1), new_rank, clamp)
    else:
      deltas = jnp.stack([scales[j].astype(acc) * jnp.matmul(x, y, precision=_HI) for j, (x, y) in enumerate(zip(a3, b3))])
      mask = masks((nL, nI, nO))[0] if ct in _RANDOM and density < 1 else None
      d = _merge(ct, deltas, w, density, method, mask)
      u, s, vh = jnp.linalg.svd(d, full_matrices=False)
      a, b = _truncate(u, s, vh, new_rank, clamp)
  r = a.shape[-1]
  return a.reshape(*lead, *fan_in, r).astype(a_dtype), b.reshape(*lead, r, *fan_out).astype(b_dtype)


# ===================================================================================== API


def combine(
    adapters: Sequence[PyTree] | Mapping[str, PyTree],
    weights: Sequence[float] | Mapping[str, float] | Array,
    combination_type: str = "svd",
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
    key: Array | None = None,
) -> PyTree:
  """One adapter tree from a weighted combination of several, as PEFT's ``add_weighted_adapter``.

  Works per adapted kernel, and per layer for stacked (``'l'``) kernels. The result is plain
  LoRA with ``scale=1.0`` (``rslora=False``; dropout and ``base_digest`` from the first
  adapter at each path). Where only some adapters adapt a kernel, the others count as zero
  there, as in PEFT (which skips them). Jittable with the options static; ``weights`` and
  ``key`` may be traced.

  Adapters of a base-changing init (PiSSA, OLoRA) combine only with adapters of the same base
  (``base_digest``), and their deltas include the initial principal part ``s * a0 @ b0``: with
  weights that do not sum to 1 that part is rescaled too. To combine only what training
  changed, convert each with :func:`lora_jax.to_original_base` first.

  ``combination_type``:

  * ``"cat"``: ``a = [w_1 s_1 a_1 | w_2 s_2 a_2 | ...]``, ``b`` stacked: the delta is exactly
    ``sum_i w_i * delta_i``; the rank is the sum of the ranks.
  * ``"svd"`` (default): the best rank-``rank`` approximation of ``sum_i w_i * delta_i`` (its
    top singular triplets; ``rank`` defaults to the largest input rank), computed through QR of
    the concatenated factors, so no ``fan_in x fan_out`` array is formed. ``a`` holds the
    singular vectors, ``b`` the singular values times the others, as PEFT's ``A``/``B``.
  * ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``
    (equal ranks): PEFT's merge applied to the ``a``'s with weights
    ``sign(w s) sqrt(|w s|)`` and to the ``b``'s with ``sqrt(|w s|)``: cheap, but the delta
    is not the weighted sum of deltas (``(sum a_i)(sum b_j)`` has cross terms).
  * ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``:
    PEFT's merge of the dense deltas (elementwise, so each ``fan_in x fan_out`` delta is
    formed), then the truncated SVD as ``"svd"``.

  The merges: *magnitude_prune* keeps the ``int(density * size)`` largest-magnitude entries of
  each tensor (per layer) and sums the weighted results; *ties* also elects a sign per entry
  (``majority_sign_method``: ``"total"`` the sign of the sum, ``"frequency"`` the more common
  sign) and averages the weighted entries of that sign; *dare* keeps each entry with
  probability ``density`` and divides by ``density``, then sums (*dare_linear*) or elects
  signs (*dare_ties*). ``density=1`` prunes nothing.

  >>> import jax.numpy as jnp
  >>> from lora_jax import LoraFactors, combine
  >>> def lora(a, b):
  ...   return {"dense": {"kernel": LoraFactors(a=jnp.asarray(a), b=jnp.asarray(b), scale=2.0, layout="io")}}
  >>> x = lora([[1.0], [0.0]], [[1.0, 2.0, 0.0]])
  >>> y = lora([[0.0], [1.0]], [[0.0, 1.0, 1.0]])
  >>> both = combine([x, y], [0.5, 1.0], "cat")["dense"]["kernel"]
  >>> both.rank, both.scale
  (2, 1.0)
  >>> both.delta()
  Array([[1., 2., 0.],
         [0., 2., 2.]], dtype=float32)
  >>> combine({"x": x, "y": y}, [0.5, 1.0], "svd", rank=1)["dense"]["kernel"].a.shape
  (2, 1)

  Args:
    adapters: adapter trees of one model (each mirrors the params, ``LoraFactors`` where
      adapted, None elsewhere), as a sequence or a mapping from names (used in errors).
    weights: one weight per adapter (negative subtracts), in the adapters' order; a mapping
      with the adapters' names when ``adapters`` is one; or a 1-D array.
    combination_type: one of ``"svd"``, ``"cat"``, ``"linear"``, ``"ties"``, ``"ties_svd"``,
      ``"dare_linear"``, ``"dare_linear_svd"``, ``"dare_ties"``, ``"dare_ties_svd"``,
      ``"magnitude_prune"``, ``"magnitude_prune_svd"``.
    rank: the rank of the result, for the SVD types (default: the largest input rank at each
      kernel). Above the rank of the sum, the extra columns are zero.
    density: the fraction of entries kept, in ``(0, 1]``; required by the ties, dare and
      magnitude_prune types, refused by the others. A Python float (static).
    majority_sign_method: ``"total"`` or ``"frequency"``, for the ties types.
    svd_clamp: for the SVD types, PEFT's clamp: ``a`` and ``b`` clipped to ``[-q, q]``, ``q``
      the ``svd_clamp`` quantile of their entries (per kernel and layer). Singular pairs are
      sign-normalised first (largest entry of each column of ``a`` positive).
    key: a ``jax.random`` key, required by the dare types. Each kernel's masks come from the
      key folded with its path, so they do not depend on the rest of the tree.

  Returns:
    One adapter tree with the structure of the inputs (None where no input adapts a kernel).

  Raises:
    ValueError: an unknown ``combination_type``; a missing, unused or out-of-range option;
      ``weights`` of the wrong length or names; trees of different structures (the first path
      that differs is named); adapters of one kernel with different layouts, kernel shapes or
      base kernels (``base_digest``), or with different ranks for the factor-space types.
    TypeError: an entry that is not ``LoraFactors`` or None (DoRA adapters are refused).
  """
  _check_options(combination_type, density, majority_sign_method, rank, svd_clamp, key)
  if isinstance(adapters, Mapping):
    labels, trees = [f"adapters[{k!r}]" for k in adapters], list(adapters.values())
    if isinstance(weights, Mapping):
      if set(weights) != set(adapters):
        raise ValueError(
            f"combine: weights name {sorted(map(str, weights))}, the adapters {sorted(map(str, adapters))}; "
            "give one weight per adapter."
        )
      weights = [weights[k] for k in adapters]
  else:
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
      raise TypeError(f"combine: adapters must be a list or a dict of adapter trees, got {type(adapters).__name__}.")
    if isinstance(weights, Mapping):
      raise TypeError("combine: weights is a mapping but adapters is a sequence; give weights as a list in the adapters' order.")
    labels, trees = [f"adapters[{i}]" for i in range(len(adapters))], list(adapters)
  if not trees:
    raise ValueError("combine: no adapters given.")
  if np.ndim(weights) != 1 or len(weights) != len(trees):
    raise ValueError(f"combine: {len(trees)} adapters but weights has shape {np.shape(weights)}; give one weight per adapter.")

  flats = [jtu.tree_flatten_with_path(t, is_leaf=is_adapter_or_none) for t in trees]
  treedef = flats[0][1]
  for label, (flat, td) in zip(labels[1:], flats[1:]):
    if td != treedef:
      have = {path_str(p) for p, _ in flats[0][0]}
      other = {path_str(p) for p, _ in flat}
      diff = sorted(have ^ other)
      where = (
          f"{diff[0]!r} is in {labels[0] if diff[0] in have else label} only" if diff else "their containers differ"
      )
      raise ValueError(
          f"combine: {labels[0]} and {label} have different tree structures ({where}); adapters must "
          "mirror the same params (None where a kernel is not adapted)."
      )
  jobs, factors = [], []  # per adapted kernel: (path, positions of the adapters present), their factors
  for j, (path, _) in enumerate(flats[0][0]):
    name = path_str(path)
    present = [(i, label, flat[j][1]) for i, (label, (flat, _)) in enumerate(zip(labels, flats)) if flat[j][1] is not None]
    if present:
      _check_kernel(name, [(lab, x) for _, lab, x in present], combination_type)
      jobs.append((j, name, tuple(i for i, _, _ in present)))
      factors.append(tuple(x for _, _, x in present))
  if not jobs:
    raise ValueError("combine: none of the trees holds an adapter.")
  w = jnp.asarray(weights)
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  options = dict(
      rank=None if rank is None else int(rank), density=None if density is None else float(density),
      method=majority_sign_method, clamp=None if svd_clamp is None else float(svd_clamp),
  )
  out = [None] * len(flats[0][0])
  for (j, name, idx), fs in zip(jobs, factors):
    out[j] = _combine_kernel(name, list(zip(idx, fs)), w, key, combination_type, **options)
  return jtu.tree_unflatten(treedef, out)

__all__ = ["COMBINATION_TYPES", "combine", "keep_mask", "path_id"]
