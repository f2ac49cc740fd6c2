"""Optimizer helpers: state for the factors only, exactly-frozen base, LoRA+."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax
from _util import assert_close
from lora_jax import LoraFactors, LoraSpec
from lora_jax import freeze_base, lora_plus, trainable_mask


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="fc2")(nn.tanh(nn.Dense(16, name="fc1")(x)))


MODEL = Net()
SPEC = LoraSpec(["fc1", "fc2"], rank=2, alpha=2)


def _is_factors(x):
  return isinstance(x, LoraFactors)


def _random_params(seed):
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.ones((1, 8)))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / 2, s.dtype), shapes)


def _randomize(adapters, seed, std=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda f: LoraFactors(
          a=jnp.asarray(std * rng.normal(size=f.a.shape), jnp.float32),
          b=jnp.asarray(std * rng.normal(size=f.b.shape), jnp.float32),
          scale=f.scale, layout=f.layout,
      ),
      adapters, is_leaf=_is_factors,
  )


@functools.lru_cache(maxsize=None)
def _problem():
  """Base params, fresh adapters, and data from the base model plus a rank-2 change."""
  params = _random_params(0)
  adapters = jax.jit(functools.partial(lora_jax.init, spec=SPEC))(jax.random.key(1), params)
  teacher = _randomize(adapters, seed=2, std=0.5)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(64, 8)), jnp.float32)
  y = jax.jit(lambda p, t, x: MODEL.apply({"params": lora_jax.merge(p, t)}, x))(params, teacher, x)
  return params, adapters, x, y


def loss_fn(params, adapters, x, y):
  pred = MODEL.apply({"params": lora_jax.merge(params, adapters)}, x)
  return jnp.mean((pred - y) ** 2)


def _array_sizes(tree):
  return [int(np.size(x)) for x in jax.tree.leaves(tree) if hasattr(x, "shape")]


def _n_adapter_params(adapters):
  return lora_jax.count(adapters).trainable


# ---------------------------------------------------------------- masks and state


def test_trainable_mask():
  params, adapters, _, _ = _problem()
  mask = trainable_mask({"base": params, "lora": adapters})
  assert jax.tree.leaves(mask["base"]) == [False] * 4
  assert jax.tree.leaves(mask["lora"]) == [True] * 4
  f = mask["lora"]["fc1"]["kernel"]
  assert isinstance(f, LoraFactors) and (f.a, f.b, f.layout) == (True, True, "io")
  assert mask["lora"]["fc1"]["bias"] is None
  # NNX: a State holding frozen arrays and factors.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0))))
  ad = jax.eval_shape(lambda s: lora_jax.init(jax.random.key(0), s, LoraSpec("kernel", rank=2)), state)
  nnx_mask = trainable_mask({"base": state, "lora": ad})
  assert sorted(jax.tree.leaves(nnx_mask)) == [False, False, True, True]


@pytest.mark.parametrize("make", ["adam_adapters_only", "freeze_base", "lora_plus"])
def test_state_holds_nothing_for_frozen_leaves(make):
  params, adapters, _, _ = _problem()
  n = _n_adapter_params(adapters)
  assert n == 2 * (8 + 16) + 2 * (16 + 4)
  if make == "adam_adapters_only":
    tx, tree, n_counts = optax.adam(1e-2), adapters, 1
  elif make == "freeze_base":
    tx, tree, n_counts = freeze_base(optax.adam(1e-2)), {"base": params, "lora": adapters}, 1
  else:  # one adam for the a factors, one for the b factors: two step counts
    tx, tree, n_counts = lora_plus(optax.adam, 1e-3), {"base": params, "lora": adapters}, 2
  state = jax.jit(tx.init)(tree)
  sizes = _array_sizes(state)
  scalars = [x for x in jax.tree.leaves(state) if hasattr(x, "shape") and np.ndim(x) == 0]
  assert sum(s for s in sizes) - len(scalars) == 2 * n  # adam's mu and nu, factors only
  assert len(scalars) == n_counts
  assert all(jnp.issubdtype(x.dtype, jnp.integer) for x in scalars)


def _train(tx, tree, loss_of_tree, steps):
  @jax.jit
  def step(tree, opt_state):
    loss, grads = jax.value_and_grad(loss_of_tree)(tree)
    updates, opt_state = tx.update(grads, opt_state, tree)
    return optax.apply_updates(tree, updates), opt_state, loss, updates

  opt_state = tx.init(tree)
  losses, all_updates = [], []
  for _ in range(steps):
    tree, opt_state, loss, updates = step(tree, opt_state)
    losses.append(float(loss))
    all_updates.append(updates)
  return tree, losses, all_updates


def test_freeze_base_keeps_frozen_leaves_exactly():
  params, adapters, x, y = _problem()
  combined = {"base": params, "lora": adapters}
  loss = lambda t: loss_fn(t["base"], t["lora"], x, y)
  # The gradient does reach the base params; the optimizer must not pass it on.
  base_grads = jax.jit(jax.grad(loss))(combined)["base"]
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(base_grads))
  trained, _, updates = _train(freeze_base(optax.adam(1e-2)), combined, loss, steps=10)
  for u in updates:
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(u["base"]))
  jax.tree.map(lambda p, q: np.testing.assert_array_equal(np.asarray(q), np.asarray(p)), params, trained["base"])
  for before, after in zip(jax.tree.leaves(adapters), jax.tree.leaves(trained["lora"])):
    assert not np.array_equal(np.asarray(before), np.asarray(after))


def test_loss_decreases_both_ways():
  params, adapters, x, y = _problem()
  # 1. Differentiate with respect to the adapters only.
  only, losses, _ = _train(optax.adam(3e-2), adapters, lambda ad: loss_fn(params, ad, x, y), steps=150)
  assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
  # 2. One combined tree with freeze_base: the same gradients for the factors, so the same path.
  combined, losses2, _ = _train(
      freeze_base(optax.adam(3e-2)), {"base": params, "lora": adapters},
      lambda t: loss_fn(t["base"], t["lora"], x, y), steps=150,
  )
  np.testing.assert_allclose(losses2, losses, rtol=1e-4)  # positive losses: each relative to itself
  jax.tree.map(lambda p, q: assert_close(q, p, 1e-4), only, combined["lora"])
  jax.tree.map(lambda p, q: np.testing.assert_array_equal(np.asarray(q), np.asarray(p)), params, combined["base"])


def test_freeze_base_errors_without_factors():
  params, _, _, _ = _problem()
  with pytest.raises(ValueError, match=r"freeze_base: the tree holds no LoraFactors, so nothing would train \(found leaves 'fc1/bias', 'fc1/kernel', 'fc2/bias', 'fc2/kernel'\)"):
    freeze_base(optax.adam(1e-3)).init(params)
  with pytest.raises(ValueError, match=r"lora_plus: the tree holds no LoraFactors"):
    lora_plus(optax.adam, 1e-3).init({"base": params})
  with pytest.raises(ValueError, match=r"lora_plus\(ratio=0\): ratio must be positive"):
    lora_plus(optax.adam, 1e-3, ratio=0)


# ---------------------------------------------------------------- LoRA+


def _linear_problem():
  """One linear layer y = x @ (W + s a b) with non-zero a and b; grads by hand in float64."""
  rng = np.random.default_rng(7)
  w = rng.normal(size=(5, 3)).astype(np.float32)
  x = rng.normal(size=(10, 5)).astype(np.float32)
  y = rng.normal(size=(10, 3)).astype(np.float32)
  a = rng.normal(size=(5, 2)).astype(np.float32)
  b = rng.normal(size=(2, 3)).astype(np.float32)
  s = 0.75
  f = LoraFactors(a=jnp.asarray(a), b=jnp.asarray(b), scale=s, layout="io")
  # L = 0.5 * ||x (W + s a b) - y||^2  =>  dL/dM = x^T R,  dL/da = s x^T R b^T,  dL/db = s a^T x^T R.
  a64, b64, x64 = (np.asarray(v, np.float64) for v in (a, b, x))
  r = x64 @ (w + s * a64 @ b64) - y
  g = x64.T @ r
  return {"w": {"kernel": jnp.asarray(w)}}, {"w": {"kernel": f}}, x, y, (s * g @ b64.T, s * a64.T @ g)


def _linear_loss(params, adapters, x, y):
  return 0.5 * jnp.sum((x @ lora_jax.merge(params, adapters)["w"]["kernel"] - y) ** 2)


@pytest.mark.parametrize("combined", [False, True])
def test_lora_plus_sgd_step_by_hand(combined):
  params, adapters, x, y, (grad_a, grad_b) = _linear_problem()
  lr, ratio = 0.01, 16.0
  tx = lora_plus(optax.sgd, lr, ratio=ratio)
  if combined:
    tree, loss = {"base": params, "lora": adapters}, lambda t: _linear_loss(t["base"], t["lora"], x, y)
  else:
    tree, loss = adapters, lambda ad: _linear_loss(params, ad, x, y)
  new, _, (updates,) = _train(tx, tree, loss, steps=1)
  f_new = (new["lora"] if combined else new)["w"]["kernel"]
  f = adapters["w"]["kernel"]
  assert_close(f_new.a, np.asarray(f.a) - lr * grad_a, 1e-5)
  assert_close(f_new.b, np.asarray(f.b) - ratio * lr * grad_b, 1e-5)
  assert_close(f_new.b - f.b, -ratio * lr * grad_b, 1e-3)  # the step itself, not just the sum
  if combined:
    assert not np.any(np.asarray(updates["base"]["w"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(new["base"]["w"]["kernel"]), np.asarray(params["w"]["kernel"]))


def test_lora_plus_schedule_and_kwargs():
  _, adapters, _, _, _ = _linear_problem()
  schedule = optax.piecewise_constant_schedule(0.1, {1: 0.5})  # 0.1, then 0.05
  tx = lora_plus(optax.sgd, schedule, ratio=4.0, momentum=None)
  ones = jax.tree.map(jnp.ones_like, adapters)
  state = tx.init(adapters)
  update = jax.jit(tx.update)
  for lr in (0.1, 0.05, 0.05):
    u, state = update(ones, state, adapters)
    f = u["w"]["kernel"]
    np.testing.assert_allclose(np.asarray(f.a), -lr, rtol=1e-6)  # every entry is the constant: relative to it
    np.testing.assert_allclose(np.asarray(f.b), -4.0 * lr, rtol=1e-6)


def test_lora_plus_adam_first_step():
  # Adam's first step moves every weight by about lr * sign(grad): b moves ratio times as far.
  params, adapters, x, y, _ = _linear_problem()
  tx = lora_plus(optax.adam, 1e-3, ratio=16.0)
  _, _, (u,) = _train(tx, adapters, lambda ad: _linear_loss(params, ad, x, y), steps=1)
  f = u["w"]["kernel"]
  np.testing.assert_allclose(np.abs(np.asarray(f.a)), 1e-3, rtol=1e-3)  # relative to lr, entry by entry
  np.testing.assert_allclose(np.abs(np.asarray(f.b)), 16e-3, rtol=1e-3)
