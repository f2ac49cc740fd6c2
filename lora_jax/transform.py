"""wrap(): make targeted kernels act as ``W + scale * a @ b`` inside any apply function.

The transform traces ``apply_fn`` to a jaxpr (``jax.make_jaxpr``) with every adapted kernel as
an input, then evaluates that jaxpr equation by equation (:mod:`lora_jax.interpret`). An
adapted kernel travels through the evaluation as a *view*: the base kernel, its adapter (of any
kind) and a map from each axis of the current view (after casts, transposes, slices, ...) to
the adapter axis it came from. Where a view meets a matmul, a convolution or an embedding
lookup, the adapter's kind computes its contribution there -- for plain LoRA
``op(x, W) + scale * op(op(x, a), b)`` -- so the ``(fan_in x fan_out)`` update is never formed,
forward or backward. Any other use of the kernel materialises the adapted kernel for that use
only (and says so).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp  # noqa: F401 - used by the doctests
import numpy as np
from jax import tree_util as jtu

from lora_jax._jaxpr import is_dynamic, join_static, split_static
from lora_jax.adapters import check_adapters, merge
from lora_jax.bases import BaseLeaf
from lora_jax.interpret.core import evaluate, finalize
from lora_jax.interpret.report import (
    FALLBACK_MODES,
    Ctx,
    LoraFallbackError,
    LoraFallbackWarning,
    LoraLayoutWarning,
    Report,
    Use,
    unique,
    warn,
)
from lora_jax.interpret.sites import THIN_PRODUCT_NAME
from lora_jax.interpret.views import Frozen, View, frozen_layout
from lora_jax import mixed
from lora_jax.kinds.bank import BankRow

PyTree = Any

__all__ = [
    "LoraFallbackError",
    "LoraFallbackWarning",
    "LoraLayoutWarning",
    "Report",
    "THIN_PRODUCT_NAME",
    "Use",
    "explain",
    "remat_policy",
    "wrap",
]


def _trace_and_run(apply_fn, fallback, params, adapters, static, dyn, group=True, rng=None):
  """Traces ``apply_fn`` at these shapes and evaluates it with the factored rules."""
  rows = check_adapters(params, adapters)
  ptree = jtu.tree_structure(params, is_leaf=lambda x: isinstance(x, BaseLeaf))
  # The function is traced with a dense kernel where a base leaf (e.g. a quantized kernel)
  # stands; the interpreter decides at each use how to compute with the base leaf itself.
  leaves = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if isinstance(leaf, BaseLeaf) else leaf for _, leaf, _ in rows]

  def flat_fn(leaves, dyn):
    args, kwargs = join_static(static, dyn)
    return apply_fn(jtu.tree_unflatten(ptree, leaves), *args, **kwargs)

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(leaves, dyn)
  ctx = Ctx(fallback, group, rng)
  ctx.per_example = any(isinstance(f, BankRow) for _, _, f in rows)
  inputs = [_input(path, leaf, f) for path, leaf, f in rows]
  inputs += list(jax.tree.leaves(dyn))
  outs = finalize(ctx, evaluate(ctx, closed.jaxpr, closed.consts, inputs))
  ctx.transposed_notes()
  report = Report(
      [p for p, _, f in rows if f is not None], ctx.uses, ctx.layout_notes, unique(ctx.grouped),
      {p: f.layout for p, _, f in rows if f is not None},
  )
  return jtu.tree_unflatten(jtu.tree_structure(out_shape), outs), report


def _input(path: str, leaf: Any, f: Any) -> Any:
  """How a params leaf enters the interpreter: a view when it has an adapter or is a base
  leaf (so it is dequantized where it is used), else the array itself."""
  if f is not None:
    return View.of(leaf, f.prepare(leaf), path)
  if isinstance(leaf, BaseLeaf):
    return View.of(leaf, Frozen(frozen_layout(leaf)), path)
  return leaf


def _is_nnx_module(fn: Any) -> bool:
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover - flax is a dependency
    return False
  return isinstance(fn, nnx.Module)


def wrap(
    apply_fn: Callable[..., Any],
    *,
    mode: str = "factored",
    fallback: str = "warn",
    group: bool = True,
    in_axes: Any = 0,
    out_axes: Any = 0,
    bank_mode: str = "auto",
) -> Callable[..., Any]:
  """Makes the targeted kernels of ``apply_fn`` act as ``W + scale * a @ b``.

  Returns ``lora_apply(params, adapters, *args, **kwargs)``, equal to
  ``apply_fn(lora_jax.merge(params, adapters), *args, **kwargs)``. ``params`` is the first
  argument of ``apply_fn`` (linen: ``{'params': ...}`` variables; NNX: see :func:`from_nnx`)
  and ``adapters`` mirrors it (from :func:`lora_jax.init`). ``lora_apply`` is jitted (array
  arguments are traced, all other arguments are static) and composes with ``jax.grad``,
  ``jax.vmap``, ``jax.checkpoint`` and an outer ``jax.jit``.

  Args:
    apply_fn: any function whose first argument is a params pytree.
    mode: ``"factored"`` rewrites each matmul / conv / embedding lookup that consumes an
      adapted kernel into ``op(x, W) + scale * op(op(x, a), b)``: the full-size update is
      never formed, forward or backward. ``"merged"`` computes
      ``apply_fn(merge(params, adapters), ...)``: the reference.
    fallback: what to do when a use of an adapted kernel cannot be factored (an unknown op,
      a kernel returned as an output, ...): ``"warn"`` materialises ``W + scale*a@b`` for
      that use only and warns (:class:`LoraFallbackWarning`), ``"allow"`` does so silently,
      ``"error"`` raises :class:`LoraFallbackError`. Results are exact in every case.
    group: adapted matmuls that read the same input with the same dimension numbers (q/k/v
      projections, a SwiGLU's gate and up) compute their thin ``x @ a`` products as one
      matmul over ``[a_1 | a_2 | ...]``, split afterwards: one pass over ``x`` instead of
      one per adapter, forward and backward. The result is the same up to float rounding of
      a different matmul shape. ``explain`` lists the groups.
    in_axes: for mixed-adapter calls (``adapter_ids=``, below): where the example axis of each
      positional argument after ``adapters`` lies, as for ``jax.vmap`` (an int, None for an
      argument shared by all examples, or a tuple of those); array keyword arguments are
      mapped at axis 0.
    out_axes: for mixed-adapter calls: where the example axis of each output lies.
    bank_mode: how a bank's thin products are computed in a mixed call: ``"dense"`` (one
      masked matmul over every member, shared by the batch), ``"gather"`` (each example's
      factors gathered, then batched matmuls) or ``"auto"`` (per use, from the bank size, the
      batch and the rows per example). Exact in every case.

  **Mixed-adapter batches.** With a bank of adapters (:func:`lora_jax.stack`) as ``adapters``,
  ``lora_apply(params, bank, *args, adapter_ids=ids)`` runs each example with its own member:
  ``ids`` is an int array ``(B,)`` (``-1``: the base alone; see :func:`lora_jax.bank_ids`)
  or a list of member names. It equals running each example alone (as a batch of one) with
  its adapter, in one call that compiles once for every pattern of ids (see
  :mod:`lora_jax.mixed`). Under an outer ``jit`` an id out of range gives NaN for its example.

  >>> import flax.linen as nn
  >>> model = nn.Dense(3)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> from lora_jax import LoraSpec, init
  >>> adapters = init(jax.random.key(1), variables, LoraSpec("params/kernel", rank=2))
  >>> y = wrap(model.apply)(variables, adapters, jnp.ones((2, 4)))
  >>> bool(jnp.allclose(y, model.apply(variables, jnp.ones((2, 4)))))  # b = 0 at init
  True
  """
  if _is_nnx_module(apply_fn):
    raise TypeError(
        f"wrap({type(apply_fn).__name__}(...)): an NNX module is not an apply function of a params "
        "tree. Split it first: apply_fn, params, rest = lora_jax.from_nnx(module); then "
        "lora_jax.wrap(apply_fn)(params, adapters, *args)."
    )
  if mode not in ("factored", "merged"):
    raise ValueError(f"wrap(mode={mode!r}): expected 'factored' or 'merged'.")
  if fallback not in FALLBACK_MODES:
    raise ValueError(f"wrap(fallback={fallback!r}): expected one of {FALLBACK_MODES}.")
  if not isinstance(group, bool):
    raise TypeError(f"wrap(group={group!r}): expected True or False.")
  if bank_mode not in mixed.BANK_MODES:
    raise ValueError(f"wrap(bank_mode={bank_mode!r}): expected one of {mixed.BANK_MODES}.")
  mixed.check_axes("in_axes", in_axes)
  mixed.check_axes("out_axes", out_axes)

  def run(static, params, adapters, dyn, rng=None):
    if mode == "merged":
      dropping = _dropout_paths(adapters) if rng is not None else []
      if dropping:
        raise ValueError(
            f"wrap(mode='merged') got lora_dropout_rng, but dropout acts on the adapter path's "
            f"input, which a merged kernel no longer has (adapters with dropout: "
            f"{dropping[:3]}). Use mode='factored' to train with dropout."
        )
      args, kwargs = join_static(static, dyn)
      return apply_fn(merge(params, adapters), *args, **kwargs)
    out, report = _trace_and_run(apply_fn, fallback, params, adapters, static, dyn, group, rng)
    if fallback == "warn":
      warn(report)
    return out

  jitted = jax.jit(run, static_argnums=0)

  for reserved, what in ((DROPOUT_RNG, "the dropout rng"), (ADAPTER_IDS, "the per-example adapter ids")):
    if _accepts_keyword(apply_fn, reserved):
      raise TypeError(
          f"wrap({getattr(apply_fn, '__name__', apply_fn)!r}): the function takes a keyword "
          f"argument {reserved!r}, the name lora_apply reserves for {what}; rename it."
      )

  def single(params, adapters, args, kwargs, rng):
    for path, leaf, _ in check_adapters(params, adapters):
      if not (is_dynamic(leaf) or isinstance(leaf, (BaseLeaf, bool, int, float, complex))):
        raise TypeError(
            f"params[{path!r}] is a {type(leaf).__name__}, not an array: the params passed to "
            "a wrapped function are traced, so every leaf must be an array or a number. Move "
            "configuration out of the params tree (e.g. into a static argument)."
        )
    static, dyn = split_static((args, kwargs))
    try:
      hash(static)
    except TypeError:
      return run(static, params, adapters, dyn, rng)
    return jitted(static, params, adapters, dyn, rng)

  def run_mixed(static, params, adapters, dyn, ids, rng):
    args, kwargs = join_static(static, dyn)
    return mixed.call(single, params, adapters, args, kwargs, ids, rng, in_axes, out_axes, bank_mode)

  jitted_mixed = jax.jit(run_mixed, static_argnums=0)

  @functools.wraps(apply_fn)
  def lora_apply(
      params: PyTree, adapters: PyTree, *args: Any, lora_dropout_rng: Any = None, adapter_ids: Any = None, **kwargs: Any
  ) -> Any:
    rng = _check_rng(lora_dropout_rng)
    if adapter_ids is None:
      mixed.refuse_banks(adapters)
      return single(params, adapters, args, kwargs, rng)
    ids = mixed.prepare_ids(adapters, adapter_ids, kwargs)
    static, dyn = split_static((args, kwargs))
    try:
      hash(static)
    except TypeError:
      return run_mixed(static, params, adapters, dyn, ids, rng)
    return jitted_mixed(static, params, adapters, dyn, ids, rng)

  return lora_apply


DROPOUT_RNG = "lora_dropout_rng"
ADAPTER_IDS = "adapter_ids"


def _accepts_keyword(fn: Any, name: str) -> bool:
  import inspect

  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return False
  p = sig.parameters.get(name)
  return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _check_rng(rng: Any) -> Any:
  """``lora_dropout_rng`` as a typed key (a raw ``uint32[2]`` key is wrapped), or None."""
  if rng is None:
    return None
  dtype = getattr(rng, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and jnp.shape(rng) == ():
    return rng
  if dtype == np.uint32 and jnp.shape(rng) == (2,):
    return jax.random.wrap_key_data(rng)
  raise TypeError(
      f"lora_apply(..., lora_dropout_rng=...): expected one PRNG key (jax.random.key(0)), found "
      f"a {type(rng).__name__} of shape {jnp.shape(rng) if dtype is not None else '?'}."
  )


def _dropout_paths(adapters: PyTree) -> list[str]:
  from lora_jax._paths import path_str
  from lora_jax.kinds import is_adapter, is_adapter_or_none

  flat, _ = jtu.tree_flatten_with_path(adapters, is_leaf=is_adapter_or_none)
  return [path_str(p) for p, f in flat if is_adapter(f) and f.dropout]


def explain(apply_fn: Callable[..., Any], params: PyTree, adapters: PyTree, *args: Any, **kwargs: Any) -> Report:
  """Traces ``wrap(apply_fn)(params, adapters, *args, **kwargs)`` and reports, per adapted path,
  each use of the kernel: factored, or materialised and why; and adapted kernels never used.

  >>> import flax.linen as nn
  >>> from lora_jax import LoraSpec, init
  >>> model = nn.Dense(3)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> adapters = init(jax.random.key(1), variables, LoraSpec("params/kernel", rank=2))
  >>> print(explain(model.apply, variables, adapters, jnp.ones((2, 4))))
  path           layout  use
  params/kernel  io      dot_general: factored
  1 factored use(s), 0 materialised, 0 unused
  """
  static, dyn = split_static((args, kwargs))
  dyn_abs = [None if d is None else jax.ShapeDtypeStruct(np.shape(d), d.dtype) for d in dyn]
  box = {}

  def go(params, adapters, dyn):
    out, box["report"] = _trace_and_run(apply_fn, "allow", params, adapters, static, dyn)
    return out

  jax.eval_shape(go, params, adapters, dyn_abs)
  return box["report"]


def remat_policy(base: Callable[..., Any] | None = None) -> Callable[..., Any]:
  """A ``jax.checkpoint`` policy that keeps each adapter's thin ``x @ a`` product.

  Under ``jax.checkpoint`` / ``nn.remat`` the backward pass recomputes what the policy does
  not save, including the first product of every factored matmul, which reads the whole
  input ``x`` again. This policy saves those products (``(..., r)``: tiny, in float32) on
  top of what ``base`` saves (``None``: nothing, i.e. ``nothing_saveable``). ``wrap`` names
  them ``THIN_PRODUCT_NAME`` with ``jax.ad_checkpoint.checkpoint_name``; without remat the
  name changes nothing.

  Args:
    base: another policy (e.g. ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``).

  Returns:
    The combined policy.

  >>> import flax.linen as nn
  >>> from lora_jax import LoraSpec, init
  >>> model = nn.remat(nn.Dense, policy=remat_policy())(3)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> adapters = init(jax.random.key(1), variables, LoraSpec("params/kernel", rank=2))
  >>> loss = lambda ad: wrap(model.apply)(variables, ad, jnp.ones((2, 4))).sum()
  >>> jax.grad(loss)(adapters)["params"]["kernel"].a.shape
  (4, 2)
  """
  if base is not None and not callable(base):
    raise TypeError(f"remat_policy(base={base!r}): expected a jax.checkpoint policy (a callable) or None.")
  keep = jax.checkpoint_policies.save_only_these_names(THIN_PRODUCT_NAME)
  return keep if base is None else jax.checkpoint_policies.save_from_both_policies(base, keep)


