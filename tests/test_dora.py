"""DoRA (``kind="dora"``): factored == merged == an independent float64 reference, outputs and
gradients (the norm detached as PEFT does), on Dense, DenseGeneral, Einsum, an nn.scan'd stack,
convolutions (plain and depthwise) and NNX; init, unmerge, files, masks, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import DoraFactors, LoraSpec
from lora_jax.kinds import is_adapter
from tests._util import assert_close, assert_far, assert_trees_close, random_params


def _perturb(adapters, seed=0, std=0.3, mag=0.3):
  """Non-zero a, b and a magnitude moved away from ||W|| (base_norm untouched)."""
  flat, treedef = jax.tree.flatten(adapters, is_leaf=is_adapter)
  rng = np.random.default_rng(seed)
  out = []
  for f in flat:
    if not isinstance(f, DoraFactors):
      out.append(f)
      continue
    r = lambda x, s: jnp.asarray(rng.standard_normal(x.shape) * s, x.dtype)  # noqa: E731
    out.append(f.replace(a=r(f.a, std), b=r(f.b, std), m=f.m * (1 + r(f.m, mag))))
  return jax.tree.unflatten(treedef, out)


def _probe(out):
  out = out.astype(jnp.float32)
  w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
  return jnp.sum(out * w) + 0.1 * jnp.sum(out**2)


def _dora_kernel(w, f):
  """Independent float64 reference: ``m * V / ||V||`` with ``V = W + s*a@b``, the kernel
  viewed as (layers, fan_in, fan_out) by its layout."""
  w = np.asarray(w, np.float64)
  lay = f.layout
  order = [i for i, c in enumerate(lay) if c == "l"] + [i for i, c in enumerate(lay) if c == "i"] + [i for i, c in enumerate(lay) if c == "o"]
  wt = np.transpose(w, order)
  nl, ni = lay.count("l"), lay.count("i")
  L, I, O = wt.shape[:nl], wt.shape[nl : nl + ni], wt.shape[nl + ni :]
  w3 = wt.reshape(int(np.prod(L)), int(np.prod(I)), int(np.prod(O)))
  a = np.asarray(f.a, np.float64).reshape(w3.shape[0], w3.shape[1], -1)
  b = np.asarray(f.b, np.float64).reshape(w3.shape[0], -1, w3.shape[2])
  v = w3 + f.scale * a @ b
  m = np.asarray(f.m, np.float64).reshape(w3.shape[0], 1, w3.shape[2])
  out = (m * v / np.linalg.norm(v, axis=1, keepdims=True)).reshape(wt.shape)
  return np.transpose(out, np.argsort(order))


def _reference_params(params, adapters):
  rows = lora_jax.check_adapters(params, adapters)
  from lora_jax._paths import tree_from_entries

  return tree_from_entries(params, [leaf if f is None else jnp.asarray(_dora_kernel(leaf, f), leaf.dtype) for _, leaf, f in rows])


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(8, name="mlp")(h)), None


class Net(nn.Module):
  """Dense, DenseGeneral ('ioo'), an Einsum, an nn.scan'd stack ('lio'), and q/k/v reading one input."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name="inp")(x)
    h = nn.DenseGeneral((2, 4), name="heads")(h).reshape(h.shape[0], 8)
    h = nn.Einsum((8, 8), "bi,io->bo", name="mix")(h)
    layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = layers(name="layers")(h, None)
    q, k, v = (nn.Dense(8, name=n)(h) for n in "qkv")
    return q * k + v


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(6, (3, 3), name="conv")(x)
    h = nn.Conv(6, (3, 3), feature_group_count=6, name="depthwise")(jnp.tanh(h))
    return nn.Conv(4, (1, 1), name="pointwise")(jnp.tanh(h))


X = jax.random.normal(jax.random.key(5), (4, 6))
XC = jax.random.normal(jax.random.key(6), (2, 7, 7, 3))
SPEC = LoraSpec(["inp", "heads", "mix", "mlp", "q", "k", "v"], rank=2, alpha=4, kind="dora")


@pytest.fixture(scope="module")
def net():
  model = Net()
  v = model.init(jax.random.key(0), X)
  ad = _perturb(lora_jax.init(jax.random.key(1), v, SPEC, model.apply, X))
  return model, v, ad


def test_init_magnitude_is_the_column_norm_and_the_output_is_unchanged(net):
  model, v, _ = net
  ad = lora_jax.init(jax.random.key(1), v, SPEC, model.apply, X)
  f = ad["params"]["layers"]["mlp"]["kernel"]
  assert isinstance(f, DoraFactors) and f.layout == "lio" and f.m.shape == (3, 8) and f.a.shape == (3, 8, 2)
  w = np.asarray(v["params"]["layers"]["mlp"]["kernel"], np.float64)
  assert_close(f.m, np.linalg.norm(w, axis=1), 1e-6)
  assert_close(f.base_norm, np.linalg.norm(w, axis=1), 1e-6)
  assert ad["params"]["heads"]["kernel"].m.shape == (2, 4)  # per output feature of (heads, dim)
  y = lora_jax.wrap(model.apply, fallback="error")(v, ad, X)
  assert_close(y, model.apply(v, X), 1e-5)


def test_factored_equals_merged_equals_float64_reference(net):
  model, v, ad = net
  y = lora_jax.wrap(model.apply, fallback="error")(v, ad, X)
  merged = lora_jax.merge(v, ad)
  ref = _reference_params(v, ad)
  assert_trees_close(merged, ref, 2e-6)
  assert_close(y, model.apply(merged, X), 2e-5)
  assert_close(y, model.apply(ref, X), 2e-5)
  assert_far(y, model.apply(v, X), 2e-5)  # the adapters matter
  report = lora_jax.explain(model.apply, v, ad, X)
  assert not report.fallbacks and len({u.path for u in report.uses if u.factored}) == 7
  assert any({"params/q/kernel", "params/k/kernel", "params/v/kernel"} <= set(g) for g in report.grouped)


def test_gradients_match_merged_and_detach_the_norm(net):
  model, v, ad = net
  loss = lambda fn: lambda a: _probe(fn(v, a, X))  # noqa: E731
  grad = lambda f: jax.jit(jax.grad(f))  # noqa: E731 - one compilation each, not one per op
  g_fact = grad(loss(lora_jax.wrap(model.apply)))(ad)
  g_merged = grad(loss(lora_jax.wrap(model.apply, mode="merged")))(ad)
  assert_trees_close(g_fact, g_merged, 1e-4)

  # An independent reference: W' = m * V / sg(||V||) written out here, per kernel, in float32.
  def ref_apply(a):
    rows = lora_jax.check_adapters(v, a)
    from lora_jax._paths import tree_from_entries

    def one(w, f):
      if f is None:
        return w
      d = f.delta()
      v_ = w + d
      lay = f.layout
      axes = tuple(i for i, c in enumerate(lay) if c == "i")
      n = jnp.sqrt(jnp.sum(v_**2, axis=axes, keepdims=True))
      m = lora_jax.kinds.dora.along_kernel(f.m, lay)
      return m * v_ / jax.lax.stop_gradient(n)

    return model.apply(tree_from_entries(v, [one(w, f) for _, w, f in rows]), X)

  g_ref = grad(lambda a: _probe(ref_apply(a)))(ad)
  assert_trees_close(g_fact, g_ref, 1e-4)
  # Without the detach the gradients of a and b differ: the test can tell.
  f, fr = g_fact["params"]["inp"]["kernel"], None

  def undetached(a):
    rows = lora_jax.check_adapters(v, a)
    from lora_jax._paths import tree_from_entries

    def one(w, f):
      if f is None:
        return w
      v_ = w + f.delta()
      n = jnp.sqrt(jnp.sum(v_**2, axis=tuple(i for i, c in enumerate(f.layout) if c == "i"), keepdims=True))
      return lora_jax.kinds.dora.along_kernel(f.m, f.layout) * v_ / n

    return model.apply(tree_from_entries(v, [one(w, f) for _, w, f in rows]), X)

  fr = grad(lambda a: _probe(undetached(a)))(ad)["params"]["inp"]["kernel"]
  assert_far(f.a, fr.a, 1e-4, factor=10)
  # base_norm is frozen: it gets no gradient from the transform.
  assert float(jnp.max(jnp.abs(g_fact["params"]["inp"]["kernel"].base_norm))) == 0.0


def test_convolutions_plain_and_depthwise():
  model = ConvNet()
  v = random_params(model.init, XC)  # NumPy draws: no jitted initializer per kernel shape
  apply = jax.jit(model.apply)
  spec = LoraSpec(["conv", "depthwise", "pointwise"], rank=2, alpha=4, kind="dora")
  ad = _perturb(lora_jax.init(jax.random.key(1), v, spec, model.apply, XC))
  f = ad["params"]["conv"]["kernel"]
  assert f.layout == "iiio" and f.m.shape == (6,)
  y = lora_jax.wrap(model.apply)(v, ad, XC)
  ref = _reference_params(v, ad)
  assert_close(y, apply(ref, XC), 2e-5)
  assert_close(y, apply(lora_jax.merge(v, ad), XC), 2e-5)
  uses = {u.path: u for u in lora_jax.explain(model.apply, v, ad, XC).uses}
  assert uses["params/conv/kernel"].factored and uses["params/pointwise/kernel"].factored
  g1 = jax.jit(jax.grad(lambda a: _probe(lora_jax.wrap(model.apply)(v, a, XC))))(ad)
  g2 = jax.jit(jax.grad(lambda a: _probe(lora_jax.wrap(model.apply, mode="merged")(v, a, XC))))(ad)
  assert_trees_close(g1, g2, 1e-4)


def test_float64_exact():
  prev = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    model = Net()
    x = X.astype(jnp.float64)
    v = jax.tree.map(lambda t: jnp.asarray(np.asarray(t), jnp.float64), random_params(model.init, x))
    spec = LoraSpec(["inp", "heads", "mix", "mlp", "q"], rank=2, alpha=4, kind="dora", dtype=jnp.float64)
    ad = _perturb(lora_jax.init(jax.random.key(1), v, spec, model.apply, x))
    y = lora_jax.wrap(model.apply, fallback="error")(v, ad, x)
    assert y.dtype == jnp.float64
    assert_close(y, jax.jit(model.apply)(_reference_params(v, ad), x), 1e-12)
  finally:
    jax.config.update("jax_enable_x64", prev)


def test_bfloat16_base_and_jit():
  model = Net(dtype=None) if False else Net()
  v = model.init(jax.random.key(0), X)
  vb = jax.tree.map(lambda t: t.astype(jnp.bfloat16), v)
  ad = _perturb(lora_jax.init(jax.random.key(1), vb, SPEC, model.apply, X.astype(jnp.bfloat16)))
  step = jax.jit(lambda a: lora_jax.wrap(model.apply)(vb, a, X.astype(jnp.bfloat16)))
  y = step(ad).astype(jnp.float32)
  ref = model.apply(_reference_params(v, ad), X)
  assert_close(y, ref, 3e-2)


def test_unmerge_round_trip_and_ambiguity(net):
  model, v, _ = net
  # A trained-size update (||s*a@b|| below ||W|| per column): unmerge is exact from the merged
  # kernel and the adapters alone (base_norm pins the lost column norm).
  ad = _perturb(lora_jax.init(jax.random.key(1), v, SPEC, model.apply, X), std=0.1)
  back = lora_jax.unmerge(lora_jax.merge(v, ad), ad)
  assert_trees_close(back, v, 2e-5)
  huge = jax.tree.map(lambda f: f.replace(b=f.b * 100.0) if isinstance(f, DoraFactors) else f, ad, is_leaf=is_adapter)
  with pytest.raises(ValueError, match=r"'params/heads/kernel': DoRA unmerge is ambiguous at output features \[\[0, 0\]"):
    lora_jax.unmerge(lora_jax.merge(v, huge), huge)


def test_save_load_round_trip_is_bit_exact(net, tmp_path):
  _, v, ad = net
  lora_jax.save(tmp_path / "dora", ad, params=v)
  back = lora_jax.load(tmp_path / "dora", params=v)
  for (p, f), g in zip(jax.tree_util.tree_flatten_with_path(ad, is_leaf=is_adapter)[0], jax.tree.leaves(back, is_leaf=is_adapter)):
    if f is None:
      continue
    assert isinstance(g, DoraFactors) and g.scale == f.scale and g.layout == f.layout
    for name in f.ROLES:
      np.testing.assert_array_equal(np.asarray(getattr(g, name)), np.asarray(getattr(f, name)), err_msg=f"{p} {name}")


def test_masks_and_counts_follow_the_roles(net):
  _, v, ad = net
  mask = lora_jax.trainable_mask(ad)
  f = mask["params"]["inp"]["kernel"]
  assert f.a and f.b and f.m and not f.base_norm
  c = lora_jax.count(ad, v)
  k = ad["params"]["inp"]["kernel"]
  assert c.rows[[r[0] for r in c.rows].index("params/inp/kernel")][3] == k.a.size + k.b.size + k.m.size


def test_a_transposed_use_falls_back_exactly():
  """x @ W.T contracts the kernel's fan-out: DoRA's output rescale would be an input rescale
  there, so that use materialises (and says why); the numbers stay exact."""
  params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (5, 4))}}
  fn = lambda p, x: jnp.tanh(x @ p["w"]["kernel"]) @ p["w"]["kernel"].T  # noqa: E731
  x = jax.random.normal(jax.random.key(1), (3, 5))
  ad = _perturb(lora_jax.init(jax.random.key(2), params, LoraSpec("w/kernel", rank=2, kind="dora")))
  with pytest.warns(lora_jax.LoraFallbackWarning, match="DoRA rescales the kernel's fan-out"):
    y = lora_jax.wrap(fn)(params, ad, x)
  assert_close(y, fn(_reference_params(params, ad), x), 2e-5)


def test_nnx_linear():
  from flax import nnx

  class M(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 8, rngs=rngs)
      self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  apply_fn, params, _ = lora_jax.from_nnx(M(nnx.Rngs(0)))
  ad = _perturb(lora_jax.init(jax.random.key(1), params, LoraSpec(["l1", "l2"], rank=2, kind="dora"), apply_fn, X))
  y = lora_jax.wrap(apply_fn, fallback="error")(params, ad, X)
  assert_close(y, apply_fn(lora_jax.merge(params, ad), X), 2e-5)


def test_errors_name_the_path_or_option():
  class Emb(nn.Module):
    @nn.compact
    def __call__(self, ids):
      return nn.Dense(3, name="out")(nn.Embed(10, 4, name="tok")(ids))

  ids = jnp.array([[1, 2, 3]])
  v = Emb().init(jax.random.key(0), ids)
  with pytest.raises(ValueError, match=r"'params/tok/embedding': DoRA adapts matmul and convolution kernels, not embeddings"):
    lora_jax.init(jax.random.key(1), v, LoraSpec(["tok", "out"], kind="dora", rank=2), Emb().apply, ids)
  with pytest.raises(ValueError, match=r"LoraSpec\(kind='doraa'\): no adapter kind of that name; registered kinds: \[.*'dora'.*'lora'"):
    LoraSpec(["out"], kind="doraa")
  with pytest.raises(ValueError, match="needs the kernel's values"):
    shapes = jax.eval_shape(lambda: v)
    lora_jax.init(jax.random.key(1), shapes, LoraSpec(["out"], kind="dora", rank=2), Emb().apply, ids)
