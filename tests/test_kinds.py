"""Adapter kinds and base leaves: a second, test-only kind (with an extra trainable leaf) and a
test-only quantized base go through every kind-dispatched function without any change to the
interpreter; and the transform gaps found on third-party code (float64 and grouped convs, a
vmapped row lookup) are factored and exact."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lora_jax
from lora_jax import LoraSpec
from lora_jax.bases import BaseLeaf
from lora_jax.kinds import Adapter, LoraFactors, factor_shapes, kernel_delta, register_kind
from tests._util import normal, random_params


@register_kind
@dataclasses.dataclass(frozen=True)
class GainLora(Adapter):
  """Test-only kind: ``W + scale * (a @ b) * g`` with a trainable per-fan-out gain ``g``."""

  KIND = "test_gain_lora"
  ROLES = {"a": "lir", "b": "lro", "g": "lo"}
  TRAINABLE = frozenset({"a", "b", "g"})
  LORA_PLUS_FAST = frozenset({"b"})
  GROUP_LEAF = "a"

  a: Any
  b: Any
  g: Any
  scale: float
  layout: str

  def _gained_b(self):
    return self.b * jnp.expand_dims(self.g, self.layout.count("l"))  # g broadcast over the rank

  def delta(self, dtype=None):
    return kernel_delta(self.a, self._gained_b(), self.scale, self.layout, dtype)

  def contribute(self, site):
    return site.base() + site.low_rank(self.a, self._gained_b(), self.scale)

  @classmethod
  def init(cls, key, target, dtype):
    lora = LoraFactors.init(key, target, dtype)
    g_shape = tuple(d for d, c in zip(target.shape, target.layout) if c in "lo")
    return cls(a=lora.a, b=lora.b, g=jnp.ones(g_shape, dtype), scale=lora.scale, layout=lora.layout)


def _random(adapters, seed=0, std=0.3):
  """Every leaf redrawn (NumPy: no compilation per shape); ``adapters`` may be abstract."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(adapters)
  return jax.tree.unflatten(treedef, [jnp.asarray(std * rng.standard_normal(x.shape), x.dtype) for x in leaves])


def _probe_loss(out):
  """A smooth, well-conditioned scalar of an output (no saturation, no huge phases)."""
  out = out.astype(jnp.float32)
  probe = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
  return jnp.sum(out * probe) + 0.1 * jnp.sum(out**2)


def _rel_close(x, y, rtol=2e-5):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  np.testing.assert_allclose(x, y, rtol=0, atol=rtol * float(np.abs(y).max()) + 1e-7)


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(8, name="mlp")(h)), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name="inp")(x)
    layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = layers(name="layers")(h, None)
    q = nn.Dense(8, name="q")(h)
    k = nn.Dense(8, name="k")(h)  # q and k read one input: grouped
    return q * k


X = normal(5, (4, 6))


@functools.lru_cache(maxsize=None)
def _stack_vars():
  return random_params(Stack().init, X)


def _gain_adapters(v, rank=2):
  spec = LoraSpec(["inp", "mlp", "q", "k"], rank=rank, alpha=4, kind=GainLora, layout={"params/layers/mlp/kernel": "lio"})
  # Abstract init (the kind's init traced, no draws to compile): every leaf is redrawn anyway.
  return _random(jax.eval_shape(lambda v: lora_jax.init(jax.random.key(1), v, spec), v))


def test_a_second_kind_merges_counts_and_checks_from_its_roles():
  v = _stack_vars()
  ad = _gain_adapters(v)
  f = ad["params"]["layers"]["mlp"]["kernel"]
  assert isinstance(f, GainLora) and f.a.shape == (3, 8, 2) and f.b.shape == (3, 2, 8) and f.g.shape == (3, 8)
  # merge == an independent float64 reference: W + scale * (a @ b) * g, layer by layer.
  merged = lora_jax.merge(v, ad)
  w = np.asarray(v["params"]["layers"]["mlp"]["kernel"], np.float64)
  a, b, g = (np.asarray(x, np.float64) for x in (f.a, f.b, f.g))
  want = w + f.scale * np.einsum("lir,lro->lio", a, b) * g[:, None, :]
  _rel_close(merged["params"]["layers"]["mlp"]["kernel"], want)
  back = lora_jax.unmerge(merged, ad)
  _rel_close(back["params"]["layers"]["mlp"]["kernel"], w, rtol=1e-5)
  # count: every leaf the kind declares trainable, g included.
  c = lora_jax.count(ad, v)
  want_n = sum(x.size for t in jax.tree.leaves(ad) for x in [t])
  assert c.trainable == want_n
  assert dict((r[0], r[3]) for r in c.rows)["params/layers/mlp/kernel"] == 3 * 8 * 2 * 2 + 3 * 8
  # check_adapters works from the roles: a g of the wrong width is named.
  bad = jax.tree.map(lambda x: x, ad, is_leaf=lambda x: isinstance(x, GainLora))
  bad["params"]["q"]["kernel"] = f.replace(a=f.a[0], b=f.b[0], g=jnp.ones(5), layout="io")
  with pytest.raises(ValueError, match=r"'params/q/kernel': kernel \(8, 8\) \(layout 'io'\) expects GainLora leaves a\(8, 2\) and b\(2, 8\) and g\(8,\) for rank 2, found a\(8, 2\) and b\(2, 8\) and g\(5,\)"):
    lora_jax.check_adapters(v, bad)


def test_a_second_kind_trains_through_wrap_with_its_extra_leaf():
  v = _stack_vars()
  ad = _gain_adapters(v)
  wrapped = lora_jax.wrap(Stack().apply)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no fallback, no layout warning
    y = wrapped(v, ad, X)
  merged_apply = jax.jit(lambda ad: Stack().apply(lora_jax.merge(v, ad), X))
  _rel_close(y, merged_apply(ad))
  rep = lora_jax.explain(Stack().apply, v, ad, X)
  assert not rep.fallbacks and not rep.unused and ["params/q/kernel", "params/k/kernel"] in rep.grouped

  def loss(fn):
    return lambda ad: _probe_loss(fn(ad))

  g_f = jax.jit(jax.grad(loss(lambda ad: wrapped(v, ad, X))))(ad)
  g_m = jax.jit(jax.grad(loss(merged_apply)))(ad)
  for x, y_ in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_m)):
    _rel_close(x, y_, rtol=1e-4)
  assert float(jnp.abs(g_f["params"]["layers"]["mlp"]["kernel"].g).max()) > 0
  # optax: the extra leaf trains (freeze_base, trainable_mask) and LoRA+ gives it the slow rate.
  tree = {"base": v, "lora": ad}
  mask = lora_jax.trainable_mask(tree)
  assert mask["lora"]["params"]["q"]["kernel"].g is True and mask["base"]["params"]["q"]["kernel"] is False
  tx = lora_jax.freeze_base(optax.sgd(0.1))
  grads = jax.tree.map(jnp.ones_like, tree)
  upd, _ = tx.update(grads, tx.init(tree), tree)
  assert float(upd["lora"]["params"]["q"]["kernel"].g[0]) == pytest.approx(-0.1)
  assert float(jnp.abs(upd["base"]["params"]["q"]["kernel"]).max()) == 0.0
  plus = lora_jax.lora_plus(optax.sgd, 0.1, ratio=4.0)
  upd, _ = plus.update(jax.tree.map(jnp.ones_like, ad), plus.init(ad), ad)
  q = upd["params"]["q"]["kernel"]
  assert float(q.g[0]) == pytest.approx(-0.1) and float(q.b[0, 0]) == pytest.approx(-0.4)
  # a few steps lower the loss
  opt = optax.adam(1e-2)
  state = opt.init(ad)
  target = jnp.zeros((4, 8))
  step_loss = jax.jit(jax.value_and_grad(lambda ad: jnp.mean((wrapped(v, ad, X) - target) ** 2)))
  first, _ = step_loss(ad)
  for _ in range(5):
    l, gr = step_loss(ad)
    upd, state = opt.update(gr, state, ad)
    ad = optax.apply_updates(ad, upd)
  assert float(l) < float(first)


def test_a_second_kind_saves_and_loads_bit_exactly(tmp_path):
  v = _stack_vars()
  ad = _gain_adapters(v)
  lora_jax.save(str(tmp_path / "run"), ad, params=v)
  back = lora_jax.load(str(tmp_path / "run"), v)
  assert jax.tree.structure(back) == jax.tree.structure(ad)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert isinstance(back["params"]["q"]["kernel"], GainLora)


def test_a_second_kind_takes_shardings_from_its_roles():
  mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
  v = _stack_vars()
  ad = _gain_adapters(v)
  kernel = v["params"]["layers"]["mlp"]["kernel"]
  placed = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), v)
  placed["params"]["layers"]["mlp"]["kernel"] = jax.device_put(kernel, NamedSharding(mesh, P(None, None, "tp")))
  sh = lora_jax.adapter_shardings(placed, ad)["params"]["layers"]["mlp"]["kernel"]
  assert sh.a.spec == P(None, None, None) and sh.b.spec == P(None, None, "tp") and sh.g.spec == P(None, "tp")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Kernel(BaseLeaf):
  """Test-only quantized base: int8 values and one float scale per output column."""

  q: Any
  s: Any

  @property
  def shape(self):
    return tuple(self.q.shape)

  @property
  def dtype(self):
    return self.s.dtype

  def materialize(self):
    return self.q.astype(self.s.dtype) * self.s


def test_a_base_leaf_is_one_leaf_and_is_dequantized_at_the_use():
  model = nn.Dense(5)
  v = random_params(model.init, X, seed=0)
  w = v["params"]["kernel"]
  s = jnp.abs(w).max(0) / 127
  qv = {"params": {"kernel": Int8Kernel(jnp.round(w / s).astype(jnp.int8), s), "bias": v["params"]["bias"]}}
  dense = {"params": {"kernel": qv["params"]["kernel"].materialize(), "bias": v["params"]["bias"]}}
  spec = LoraSpec(["params"], rank=2)
  # Paths and target selection see one leaf, 'params/kernel', with the dense shape and dtype.
  assert [t.path for t in spec.resolve(qv)] == ["params/kernel"]
  ad = _random(jax.eval_shape(lambda p: lora_jax.init(jax.random.key(1), p, spec), qv))
  assert ad["params"]["kernel"].a.shape == (6, 2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    y = lora_jax.wrap(model.apply)(qv, ad, X)
  _rel_close(y, model.apply(lora_jax.merge(dense, ad), X))
  _rel_close(lora_jax.merge(qv, ad)["params"]["kernel"], lora_jax.merge(dense, ad)["params"]["kernel"])
  rep = lora_jax.explain(model.apply, qv, ad, X)
  assert [(u.primitive, u.factored) for u in rep.uses] == [("dot_general", True)]


# ----------------------------------------------------------------------------------------------
# Transform gaps found on third-party models
# ----------------------------------------------------------------------------------------------


def _check_wrap(fn, params, spec, *args, rtol=2e-5, expect=("factored",), traced=True):
  init_args = (fn, *args) if traced else ()
  ad = _random(jax.eval_shape(lambda p: lora_jax.init(jax.random.key(1), p, spec, *init_args), params), std=0.5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    y = jax.jit(lora_jax.wrap(fn))(params, ad, *args)
  _rel_close(y, jax.jit(lambda ad: fn(lora_jax.merge(params, ad), *args))(ad), rtol)
  loss_f = lambda ad: _probe_loss(lora_jax.wrap(fn)(params, ad, *args))  # noqa: E731
  loss_m = lambda ad: _probe_loss(fn(lora_jax.merge(params, ad), *args))  # noqa: E731
  grad = lambda f: jax.jit(jax.grad(f))(ad)  # noqa: E731 - one compilation, not one per op
  for x, y_ in zip(jax.tree.leaves(grad(loss_f)), jax.tree.leaves(grad(loss_m))):
    _rel_close(x, y_, max(rtol, 1e-4))
  rep = lora_jax.explain(fn, params, ad, *args)
  hows = ["factored" if u.factored else "merged" if u.merged else "materialised" for u in rep.uses]
  assert hows == list(expect), str(rep)
  return rep


def test_conv_in_float64():
  prev = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    model = nn.Conv(4, (3, 3), dtype=jnp.float64, param_dtype=jnp.float64)
    x = normal(0, (2, 6, 6, 3), jnp.float64)
    v = random_params(model.init, x, seed=1)
    _check_wrap(model.apply, v, LoraSpec(["params"], rank=2, dtype=jnp.float64), x, rtol=1e-12)
  finally:
    jax.config.update("jax_enable_x64", prev)


def test_grouped_conv_is_factored_and_depthwise_merged_by_choice():
  x = normal(0, (2, 7, 7, 8))
  grouped = nn.Conv(16, (3, 3), feature_group_count=2)  # 2 groups x r=2 = 4 channels < 16
  v = random_params(grouped.init, x, seed=1)
  assert v["params"]["kernel"].shape == (3, 3, 4, 16)
  _check_wrap(grouped.apply, v, LoraSpec(["params"], rank=2), x)
  # Depthwise (8 groups): the factored form would need 8 x r channels > 8 outputs; its kernel
  # is tiny, so it is merged at the use, exactly and without a fallback warning.
  depthwise = nn.Conv(8, (3, 3), feature_group_count=8)
  v = random_params(depthwise.init, x, seed=1)
  rep = _check_wrap(depthwise.apply, v, LoraSpec(["params"], rank=2), x, expect=("merged",))
  assert "grouped conv with 8 groups" in rep.uses[0].reason and not rep.fallbacks
  assert "merged at the use (a grouped conv with 8 groups" in str(rep)


def test_vmapped_row_lookup_is_factored():
  # equinox's Embedding under vmap: weight[i] per example becomes a gather that indexes the
  # feature axis too, with a full-width slice.
  params = {"weight": normal(0, (11, 6))}
  ids = jnp.array([3, 0, 10, 3])
  fn = lambda p, ids: jax.vmap(lambda i: p["weight"][i])(ids)  # noqa: E731
  # (init cannot read this gather's layout off the trace yet: a 2-D table defaults to 'io')
  rep = _check_wrap(fn, params, LoraSpec("weight", rank=3), ids, traced=False)
  assert rep.uses[0].primitive == "gather"
  # and a 2-D batch of ids under a double vmap
  ids2 = jnp.array([[1, 2], [9, 0]])
  fn2 = lambda p, ids: jax.vmap(jax.vmap(lambda i: p["weight"][i]))(ids)  # noqa: E731
  _check_wrap(fn2, params, LoraSpec("weight", rank=3), ids2, traced=False)


def test_transposed_use_of_a_2d_kernel_warns():
  # An (out, in) kernel, as GPT-2-style or equinox code holds it, with the default 'io' layout.
  params = {"w": normal(0, (5, 6))}
  fn = lambda p, x: x @ p["w"].T  # noqa: E731
  ad = lora_jax.init(jax.random.key(1), params, LoraSpec("w", rank=2))
  with pytest.warns(lora_jax.LoraLayoutWarning, match=r"'w': its layout 'io' looks wrong .* every matmul contracts the axes marked 'o'"):
    lora_jax.wrap(fn)(params, ad, X)
  # A tied embedding (looked up as rows, and contracted along features by the head) does not.
  emb = {"e": normal(0, (9, 6))}
  tied = lambda p, ids: p["e"][ids] @ p["e"].T  # noqa: E731
  ad = lora_jax.init(jax.random.key(1), emb, LoraSpec("e", rank=2))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    lora_jax.wrap(tied)(emb, ad, jnp.array([1, 4]))


def test_wrap_refuses_an_nnx_module_and_points_to_from_nnx():
  from flax import nnx

  module = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"wrap\(Linear\(...\)\): an NNX module is not an apply function .* lora_jax.from_nnx\(module\)"):
    lora_jax.wrap(module)
  apply_fn, params, _ = lora_jax.from_nnx(module)
  ad = lora_jax.init(jax.random.key(1), params, LoraSpec("kernel", rank=2), apply_fn, X)
  assert lora_jax.wrap(apply_fn)(params, ad, X).shape == (4, 3)
