"""LoRA dropout (PEFT's ``lora_dropout``): ``x -> dropout(x) @ a @ b`` on the adapter path only,
when the wrapped call gets ``lora_dropout_rng``. Checked against hand-written references with
the same masks (one per adapter, per use, per scanned layer), in expectation, under remat, for
DoRA, and for the errors."""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraSpec
from lora_jax.kinds import is_adapter
from tests._util import assert_close, assert_far

RATE = 0.3
X = jax.random.normal(jax.random.key(5), (4, 6))
RNG = jax.random.key(42)


def _random(adapters, seed=0, std=0.3):
  flat, treedef = jax.tree.flatten(adapters, is_leaf=is_adapter)
  rng = np.random.default_rng(seed)
  r = lambda x: jnp.asarray(rng.standard_normal(x.shape) * std, x.dtype)  # noqa: E731
  return jax.tree.unflatten(treedef, [f if f is None else f.replace(a=r(f.a), b=r(f.b)) for f in flat])


def _mask(path, shape, use=0, layers=()):
  """The documented key derivation: rng, then the path, the use's ordinal, each scan index."""
  key = jax.random.fold_in(RNG, zlib.crc32(path.encode()) & 0x7FFFFFFF)
  key = jax.random.fold_in(key, use)
  for i in layers:
    key = jax.random.fold_in(key, i)
  # Then 16-bit RngBitGenerator draws seeded from that key; the rate in 1/65536 steps.
  seed = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
  drop = round(RATE * 65536)
  return (jax.random.bits(seed, shape, jnp.uint16) >= drop) * (65536.0 / (65536 - drop))


class Two(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(8, name="fc1")(x))
    return nn.Dense(3, name="fc2")(h)


def _setup(model, x, targets, **spec_kw):
  v = model.init(jax.random.key(0), x)
  spec = LoraSpec(targets, rank=2, alpha=4, dropout=RATE, **spec_kw)
  return v, _random(lora_jax.init(jax.random.key(1), v, spec, model.apply, x))


def test_masks_match_a_hand_written_reference():
  v, ad = _setup(Two(), X, ["fc1", "fc2"])
  p, a = v["params"], ad["params"]
  y = lora_jax.wrap(Two().apply)(v, ad, X, lora_dropout_rng=RNG)

  def layer(name, x):
    f = a[name]["kernel"]
    xd = x * _mask(f"params/{name}/kernel", x.shape)
    return x @ p[name]["kernel"] + f.scale * (xd @ f.a) @ f.b + p[name]["bias"]

  want = layer("fc2", jnp.tanh(layer("fc1", X)))
  assert_close(y, want, 2e-6)
  # Without the rng (or at rate 0) the call is deterministic: the no-dropout output.
  plain = Two().apply(lora_jax.merge(v, ad), X)
  assert_close(lora_jax.wrap(Two().apply)(v, ad, X), plain, 2e-6)
  assert_far(y, plain, 2e-6)
  # Another key, other masks.
  assert_far(lora_jax.wrap(Two().apply)(v, ad, X, lora_dropout_rng=jax.random.key(7)), y, 2e-6)


def test_the_expected_value_is_the_no_dropout_output():
  """PEFT's dropout scales kept elements by 1/(1-p): the mean over masks is the plain output."""
  v, ad = _setup(Two(), X, ["fc1"])
  # fc1 is linear in its adapter path's input: average the pre-activation over 4000 masks.
  fn = lambda p, x: nn.Dense(8).apply({"params": p["params"]["fc1"]}, x)  # noqa: E731
  keys = jax.random.split(jax.random.key(3), 4000)
  ys = jax.jit(jax.vmap(lambda k: lora_jax.wrap(fn)(v, ad, X, lora_dropout_rng=k)))(keys)
  want = fn(lora_jax.merge(v, ad), X)
  mean, sem = jnp.mean(ys, 0), jnp.std(ys, 0) / np.sqrt(len(keys))
  assert float(jnp.max(sem)) > 0  # the masks do vary
  from lora_jax.interpret.sites import dropout

  kept = dropout(jax.random.key(0), jnp.ones(200_000), RATE)
  assert abs(float(jnp.mean(kept == 0)) - RATE) < 0.005  # the rate drawn is the rate asked
  assert abs(float(jnp.mean(kept)) - 1.0) < 0.01
  assert float(jnp.max(jnp.abs(mean - want) / (sem + 1e-12))) < 5.0  # within 5 standard errors


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(6, name="mlp")(h)), None


def _stack(remat: bool):
  block = nn.remat(Block) if remat else Block

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      h, _ = layers(name="layers")(x, None)
      return h

  return Stack()


def test_each_scanned_layer_gets_its_own_mask_and_remat_recomputes_the_same():
  model = _stack(False)
  v, ad = _setup(model, X, ["mlp"])
  f = ad["params"]["layers"]["mlp"]["kernel"]
  assert f.layout == "lio"
  y = lora_jax.wrap(model.apply)(v, ad, X, lora_dropout_rng=RNG)
  w, bias = v["params"]["layers"]["mlp"]["kernel"], v["params"]["layers"]["mlp"]["bias"]
  h = X
  for i in range(3):
    hd = h * _mask("params/layers/mlp/kernel", h.shape, layers=(i,))
    h = jnp.tanh(h @ w[i] + f.scale * (hd @ f.a[i]) @ f.b[i] + bias[i])
  assert_close(y, h, 2e-6)

  # Remat: the backward pass recomputes the forward with the same masks.
  rm = _stack(True)
  loss = lambda m: lambda a: jnp.sum(lora_jax.wrap(m.apply)(v, a, X, lora_dropout_rng=RNG) ** 2)  # noqa: E731
  g, g_remat = jax.grad(loss(model))(ad), jax.grad(loss(rm))(ad)
  for x1, x2 in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
    assert_close(x2, x1, 1e-6)


def test_grouped_projections_each_drop_their_own_input():
  class QK(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5, name="q")(x) * nn.Dense(5, name="k")(x)

  v, ad = _setup(QK(), X, ["q", "k"])
  y = lora_jax.wrap(QK().apply)(v, ad, X, lora_dropout_rng=RNG)
  p, a = v["params"], ad["params"]

  def proj(name):
    f = a[name]["kernel"]
    xd = X * _mask(f"params/{name}/kernel", X.shape)
    return X @ p[name]["kernel"] + f.scale * (xd @ f.a) @ f.b + p[name]["bias"]

  assert_close(y, proj("q") * proj("k"), 2e-6)


def test_dora_with_dropout_follows_peft():
  """PEFT: base(x) + (g - 1) * base(dropout(x)) + g * s * lora(dropout(x)), g = m/||W + s*a@b||."""
  v, ad = _setup(Two(), X, ["fc1"], kind="dora")
  f = ad["params"]["fc1"]["kernel"]
  f = f.replace(m=f.m * 1.3)
  ad["params"]["fc1"]["kernel"] = f
  fn = lambda p, x: nn.Dense(8).apply({"params": p["params"]["fc1"]}, x)  # noqa: E731
  y = lora_jax.wrap(fn)(v, ad, X, lora_dropout_rng=RNG)
  w, bias = v["params"]["fc1"]["kernel"], v["params"]["fc1"]["bias"]
  g = f.m / jnp.linalg.norm(w + f.scale * f.a @ f.b, axis=0)
  xd = X * _mask("params/fc1/kernel", X.shape)
  want = X @ w + (g - 1) * (xd @ w) + g * (f.scale * (xd @ f.a) @ f.b) + bias
  assert_close(y, want, 2e-6)


def test_dropout_trains_under_jit():
  import optax

  v, ad = _setup(Two(), X, ["fc1", "fc2"])
  apply = lora_jax.wrap(Two().apply)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(ad, opt, key):
    loss, g = jax.value_and_grad(lambda a: jnp.mean(apply(v, a, X, lora_dropout_rng=key) ** 2))(ad)
    up, opt = tx.update(g, opt, ad)
    return optax.apply_updates(ad, up), opt, loss

  opt = tx.init(ad)
  losses = []
  for i in range(30):
    ad, opt, loss = step(ad, opt, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0]


def test_errors():
  with pytest.raises(ValueError, match=r"LoraSpec\(dropout=1.0\): dropout must be in \[0, 1\)"):
    LoraSpec(["fc1"], dropout=1.0)
  with pytest.raises(ValueError, match=r"LoraSpec\(dropout=-0.1\)"):
    LoraSpec(["fc1"], dropout=-0.1)
  with pytest.raises(TypeError, match=r"LoraSpec\(dropout='0.1'\): dropout must be a probability"):
    LoraSpec(["fc1"], dropout="0.1")
  v, ad = _setup(Two(), X, ["fc1"])
  with pytest.raises(ValueError, match=r"wrap\(mode='merged'\) got lora_dropout_rng.*'params/fc1/kernel'"):
    lora_jax.wrap(Two().apply, mode="merged")(v, ad, X, lora_dropout_rng=RNG)
  with pytest.raises(TypeError, match=r"lora_dropout_rng=...\): expected one PRNG key"):
    lora_jax.wrap(Two().apply)(v, ad, X, lora_dropout_rng=3)

  def takes_it(params, x, lora_dropout_rng=None):
    return x

  with pytest.raises(TypeError, match="takes a keyword argument 'lora_dropout_rng'"):
    lora_jax.wrap(takes_it)
