"""Optimizer helpers: state and updates for the LoRA factors only, and LoRA+.

Two ways to train adapters, both supported:

* differentiate with respect to the adapters tree alone (``jax.grad`` over ``adapters``):
  any optax optimizer then keeps state for the factors only, by construction;
* one combined tree (``{"base": params, "lora": adapters}``, an NNX state holding both, ...)
  with :func:`freeze_base`: every leaf outside a :class:`LoraFactors` gets an update of
  exactly zero and no optimizer state.

:func:`lora_plus` builds LoRA+ (Hayou et al., 2024): the ``b`` factors learn ``ratio`` times
faster than the ``a`` factors.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import optax

from lora_jax._paths import leaves_with_paths
from lora_jax.kinds import Adapter, LoraFactors, is_adapter

PyTree = Any
ScalarOrSchedule = Union[float, Callable[[Any], Any]]

# optax.partition is the newer name of optax.multi_transform; older optax has only the latter.
_partition = getattr(optax, "partition", None) or optax.multi_transform

_FROZEN = "frozen"
_LORA = "lora"
_A = "lora_a"
_B = "lora_b"


_is_factors = is_adapter


def _label_tree(tree: PyTree, slow: Any, fast: Any, other: Any) -> PyTree:
  """``tree`` with a label at every leaf: inside each adapter, ``fast`` for the kind's
  ``LORA_PLUS_FAST`` leaves, ``slow`` for its other trainable leaves and ``other`` for its
  frozen ones; ``other`` at every leaf outside an adapter."""

  def label(x: Any) -> Any:
    if not isinstance(x, Adapter):
      return other
    return x.replace(**{
        n: (fast if n in x.LORA_PLUS_FAST else slow) if n in x.TRAINABLE else other for n in x.ROLES
    })

  return jax.tree.map(label, tree, is_leaf=_is_factors)


def trainable_mask(tree: PyTree) -> PyTree:
  """A bool tree shaped like ``tree``: True for the trainable leaves of every adapter
  (:class:`LoraFactors`, or what another kind declares ``TRAINABLE``).

  ``tree`` may be an adapters tree, a combined tree such as ``{"base": params, "lora":
  adapters}``, or any tree that mixes frozen arrays and adapters; every leaf outside an
  adapter, and every frozen adapter leaf, is False. The result can serve as an optax mask.

  Args:
    tree: any pytree.

  Returns:
    A tree of the same structure with bool leaves.

  >>> import jax.numpy as jnp
  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.zeros((1, 2)), scale=1.0, layout="io")
  >>> mask = trainable_mask({"base": {"kernel": jnp.ones((3, 2))}, "lora": {"kernel": f}})
  >>> mask["base"]["kernel"], mask["lora"]["kernel"].a, mask["lora"]["kernel"].b
  (False, True, True)
  """
  return _label_tree(tree, True, True, False)


def _labels_or_raise(who: str, a: str, b: str) -> Callable[[PyTree], PyTree]:
  def labels(tree: PyTree) -> PyTree:
    out = _label_tree(tree, a, b, _FROZEN)
    if not any(_is_factors(x) for x in jax.tree.leaves(out, is_leaf=_is_factors)):
      paths = [p for p, _ in leaves_with_paths(tree)]
      shown = ", ".join(repr(p) for p in paths[:5]) + (f" (of {len(paths)})" if len(paths) > 5 else "")
      raise ValueError(
          f"{who}: the tree holds no LoraFactors, so nothing would train (found leaves "
          f"{shown or 'none'}). Pass the adapters from lora_jax.init, or a tree that contains "
          "them, e.g. {'base': params, 'lora': adapters}."
      )
    return out

  return labels


def freeze_base(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps ``tx`` so that only the LoRA factors train.

  On any tree that mixes frozen arrays and :class:`LoraFactors` (e.g. ``{"base": params,
  "lora": adapters}``), the factors get ``tx``'s updates and every other leaf gets an update of
  exactly zero and holds no optimizer state. Built on ``optax.partition`` with
  ``optax.set_to_zero()`` (bare ``optax.masked`` would pass raw gradients through to the
  frozen leaves).

  Args:
    tx: any optax gradient transformation.

  Returns:
    A gradient transformation for such trees.

  Raises:
    ValueError: (at ``init``/``update``) the tree holds no ``LoraFactors``.

  >>> import jax.numpy as jnp
  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.zeros((1, 2)), scale=1.0, layout="io")
  >>> tree = {"base": {"kernel": jnp.ones((3, 2))}, "lora": {"kernel": f}}
  >>> tx = freeze_base(optax.adam(1e-2))
  >>> state = tx.init(tree)
  >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, tree), state, tree)
  >>> float(abs(updates["base"]["kernel"]).max()), updates["lora"]["kernel"].b.shape
  (0.0, (1, 2))
  """
  return _partition(
      {_LORA: tx, _FROZEN: optax.set_to_zero()},
      _labels_or_raise("freeze_base", _LORA, _LORA),
  )


def lora_plus(
    optimizer_factory: Callable[..., optax.GradientTransformation],
    learning_rate: ScalarOrSchedule,
    *,
    ratio: float = 16.0,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """LoRA+ (Hayou et al., 2024): the ``b`` factors learn ``ratio`` times faster than ``a``.

  Builds ``optimizer_factory(learning_rate=learning_rate, **kwargs)`` for every ``a`` factor
  and ``optimizer_factory(learning_rate=ratio * learning_rate, **kwargs)`` for every ``b``
  factor (``b`` is the output-side factor, the one that starts at zero for linear kernels).
  Leaves outside :class:`LoraFactors` get exactly-zero updates and no state, as with
  :func:`freeze_base`, so the result works on an adapters tree and on a combined tree alike.
  Unlike PEFT's ``create_loraplus_optimizer``, embedding adapters get no learning rate of
  their own: their ``b`` also learns ``ratio`` times faster.

  Args:
    optimizer_factory: an optax optimizer constructor taking ``learning_rate`` as a keyword,
      e.g. ``optax.adamw`` or ``optax.sgd``.
    learning_rate: the learning rate of ``a``: a float or an optax schedule
      (``step -> lr``); ``b`` uses ``ratio`` times it.
    ratio: ``lr_b / lr_a``; the paper recommends 2**4 = 16 as a default.
    **kwargs: passed on to ``optimizer_factory`` (``b1``, ``weight_decay``, ...).

  Returns:
    A gradient transformation.

  Raises:
    ValueError: ``ratio`` is not positive, or (at ``init``) the tree holds no ``LoraFactors``.

  >>> import jax.numpy as jnp
  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=1.0, layout="io")
  >>> tx = lora_plus(optax.sgd, 0.5, ratio=4.0)
  >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, f), tx.init(f), f)
  >>> float(updates.a[0, 0]), float(updates.b[0, 0])
  (-0.5, -2.0)
  """
  if not ratio > 0:
    raise ValueError(f"lora_plus(ratio={ratio!r}): ratio must be positive; the paper uses 16.")
  if callable(learning_rate):
    schedule = learning_rate

    def lr_b(step: Any) -> Any:
      return ratio * schedule(step)

  else:
    lr_b = ratio * learning_rate
  return _partition(
      {
          _A: optimizer_factory(learning_rate=learning_rate, **kwargs),
          _B: optimizer_factory(learning_rate=lr_b, **kwargs),
          _FROZEN: optax.set_to_zero(),
      },
      _labels_or_raise("lora_plus", _A, _B),
  )


__all__ = ["freeze_base", "lora_plus", "trainable_mask"]
