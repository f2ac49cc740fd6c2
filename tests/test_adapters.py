"""init / split / merge / unmerge / count against independent float64 numpy references."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax
from _util import assert_close
from lora_jax import LoraFactors, LoraSpec

# float32 results vs float64 references, to RTOL of the magnitude of the terms summed
# (|W| + |scale| * |a| @ |b|): float32 keeps ~7 digits of the largest term (measured errors
# <= 1e-7 of it); any wrong scale, transpose or axis is an O(1) error.
RTOL = 1e-5

merge = jax.jit(lora_jax.merge)
unmerge = jax.jit(lora_jax.unmerge)


def init(key, params, spec):
  return jax.jit(functools.partial(lora_jax.init, spec=spec))(key, params)


def abstract_init(params, spec):
  """init's structure, shapes, dtypes, scales and layouts, without computing anything."""
  return jax.eval_shape(lambda p: lora_jax.init(jax.random.key(0), p, spec), params)


def random_params(module, *args, seed=0):
  """Params shaped like ``module.init``'s, filled from numpy (no compilation needed)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def _is_factors(x):
  return isinstance(x, LoraFactors)


def randomize(adapters, seed=0):
  """The same adapters with both factors random (init leaves one of them zero)."""
  rng = np.random.default_rng(seed)

  def fill(f):
    if not isinstance(f, LoraFactors):
      return f
    a = rng.normal(size=f.a.shape).astype(np.float32)
    b = rng.normal(size=f.b.shape).astype(np.float32)
    return f.replace(a=jnp.asarray(a), b=jnp.asarray(b))

  return jax.tree.map(fill, adapters, is_leaf=_is_factors)


def f64(x):
  return np.asarray(x, np.float64)


def absmax(*xs):
  return max(float(np.abs(f64(x)).max()) if np.size(x) else 0.0 for x in xs)


def assert_unmerged(params, back, merged):
  """unmerge(merge(W)) == W, to RTOL of the values that were added and subtracted."""
  jax.tree.map(lambda p, q, m: assert_close(q, p, RTOL, scale=absmax(p, m)), params, back, merged)


class One(nn.Module):
  """Holds one layer under the name 'layer', so its params are {'layer': {...}}."""

  layer: nn.Module

  def __call__(self, x):
    return self.layer(x)


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.Dense(x.shape[-1])(x), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return scan(name="layers")(x, None)[0]


# (id, module, example input, spec, the path adapted, float64 reference of scale * a @ b as
# an array shaped like the kernel, written out by hand for each layer).
CASES = [
    ("dense", One(nn.Dense(5)), jnp.ones((2, 3)), LoraSpec(["layer"], rank=2, alpha=3),
     "layer/kernel", lambda a, b: a @ b),
    ("dense_general_in", One(nn.DenseGeneral((4, 5))), jnp.ones((2, 3)),
     LoraSpec(["layer"], rank=2, layout={"layer": "ioo"}), "layer/kernel",
     lambda a, b: np.einsum("ir,rhd->ihd", a, b)),
    ("dense_general_out", One(nn.DenseGeneral(6, axis=(-2, -1))), jnp.ones((2, 4, 5)),
     LoraSpec(["layer"], rank=3, layout={"layer": "iio"}), "layer/kernel",
     lambda a, b: np.einsum("hdr,ro->hdo", a, b)),
    ("einsum", One(nn.Einsum((3, 4, 5), "bi,ihd->bhd")), jnp.ones((2, 3)),
     LoraSpec(["layer"], rank=2, layout={"layer": "ioo"}), "layer/kernel",
     lambda a, b: np.einsum("ir,rhd->ihd", a, b)),
    ("conv1d", One(nn.Conv(4, (3,))), jnp.ones((1, 8, 2)), LoraSpec(["layer"], rank=2, layout={"layer": "iio"}),
     "layer/kernel", lambda a, b: np.einsum("kcr,ro->kco", a, b)),
    ("conv2d", One(nn.Conv(4, (3, 3))), jnp.ones((1, 8, 8, 2)), LoraSpec(["layer"], rank=3, layout={"layer": "iiio"}),
     "layer/kernel", lambda a, b: np.einsum("hwcr,ro->hwco", a, b)),
    ("embed", One(nn.Embed(10, 6)), jnp.ones((2,), jnp.int32),
     LoraSpec(["layer"], rank=2, layout={"layer": "io"}), "layer/embedding", lambda a, b: a @ b),
    ("scan", Stack(), jnp.ones((2, 4)), LoraSpec("layers/Dense_0/kernel", rank=2, layout={"layers/.*": "lio"}),
     "layers/Dense_0/kernel", lambda a, b: np.einsum("lir,lro->lio", a, b)),
]


@pytest.fixture(scope="module")
def cases():
  """Params and fresh adapters of every case, initialised in one compiled call (fast)."""
  params = {c[0]: random_params(c[1], c[2], seed=i) for i, c in enumerate(CASES)}
  specs = {c[0]: c[3] for c in CASES}

  @jax.jit
  def init_all(key, params):
    keys = dict(zip(specs, jax.random.split(key, len(specs))))
    return {k: lora_jax.init(keys[k], params[k], spec) for k, spec in specs.items()}

  return params, init_all(jax.random.key(1), params)


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_merge_matches_float64_reference(case, cases):
  name, module, x, spec, path, reference = case
  params, ad = cases[0][name], cases[1][name]
  # init: b = 0 (a = 0 for an embedding), so merging changes nothing, bit for bit.
  merged0 = merge(params, ad)
  assert jax.tree.structure(merged0) == jax.tree.structure(params)
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(merged0)):
    assert m.dtype == p.dtype and np.array_equal(np.asarray(m), np.asarray(p))
  f = _get(ad, path)
  zero = f.a if path.endswith("embedding") else f.b
  assert not np.any(np.asarray(zero))
  # Random non-zero factors: every merged kernel is W + scale * a @ b.
  ad = randomize(ad)
  f = _get(ad, path)
  merged = merge(params, ad)
  want = f64(_get(params, path)) + f.scale * reference(f64(f.a), f64(f.b))
  terms = np.abs(f64(_get(params, path))) + abs(f.scale) * reference(np.abs(f64(f.a)), np.abs(f64(f.b)))
  got = _get(merged, path)
  assert got.shape == want.shape and got.dtype == _get(params, path).dtype
  assert_close(got, want, RTOL, scale=terms.max())
  # Everything else is untouched; unmerge undoes merge.
  for (kp, p), m in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(merged)):
    if lora_jax._paths.path_str(kp) != path:
      assert np.array_equal(np.asarray(m), np.asarray(p))
  assert_unmerged(params, unmerge(merged, ad), merged)
  # The merged params run the unchanged model.
  jax.eval_shape(module.apply, {"params": merged}, x)


def test_merged_dense_layer_computes_lora_forward():
  x = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
  params = random_params(One(nn.Dense(5)), x)
  ad = randomize(abstract_init(params, LoraSpec(["layer"], rank=2, alpha=6)), seed=3)
  f = ad["layer"]["kernel"]
  out = jax.jit(lambda p: One(nn.Dense(5)).apply({"params": p}, x))(merge(params, ad))
  w, bias = f64(params["layer"]["kernel"]), f64(params["layer"]["bias"])
  want = x @ w + 3.0 * (x @ f64(f.a)) @ f64(f.b) + bias
  terms = np.abs(x) @ np.abs(w) + 3.0 * (np.abs(x) @ np.abs(f64(f.a))) @ np.abs(f64(f.b)) + np.abs(bias)
  assert_close(out, want, RTOL, scale=terms.max())


def test_permuted_layout():
  # A kernel whose axes are (out, layer, in): layout 'oli'.
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 3, 4)).astype(np.float32)
  params = {"w": {"kernel": jnp.asarray(w)}}
  ad = abstract_init(params, LoraSpec(["w"], rank=2, layout={"w": "oli"}))
  f = ad["w"]["kernel"]
  assert f.a.shape == (3, 4, 2) and f.b.shape == (3, 2, 5)
  f = randomize(ad)["w"]["kernel"]
  want = w + f.scale * np.einsum("lir,lro->oli", f64(f.a), f64(f.b))
  delta_terms = f.scale * np.einsum("lir,lro->oli", np.abs(f64(f.a)), np.abs(f64(f.b)))
  got = merge(params, {"w": {"kernel": f}})["w"]["kernel"]
  assert_close(got, want, RTOL, scale=(np.abs(w) + delta_terms).max())
  assert_close(f.delta(), want - w, RTOL, scale=delta_terms.max())


def test_rslora_scale():
  params = {"w": {"kernel": jnp.zeros((8, 8))}}
  ad = abstract_init(params, LoraSpec(["w"], rank=4, alpha=6, rslora=True))
  f = randomize(ad)["w"]["kernel"]
  assert f.scale == 3.0
  got = merge(params, {"w": {"kernel": f}})["w"]["kernel"]
  assert_close(got, 3.0 * f64(f.a) @ f64(f.b), RTOL, scale=3.0 * (np.abs(f64(f.a)) @ np.abs(f64(f.b))).max())


def test_init_values():
  params = {
      "d": {"kernel": jnp.zeros((64, 8))},
      "e": {"embedding": jnp.zeros((20, 8))},
      "x": {"kernel": jnp.zeros((64, 8))},
  }
  ad = init(jax.random.key(0), params, LoraSpec(["d", "e", "x"], rank=4))
  d, e, x = ad["d"]["kernel"], ad["e"]["embedding"], ad["x"]["kernel"]
  assert d.a.dtype == jnp.float32 and d.scale == 16 / 4 and d.layout == "io"
  # PEFT's kaiming_uniform(a=sqrt(5)) on a: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); b = 0.
  a = np.asarray(d.a)
  assert 0.9 / 8 < np.abs(a).max() <= 1 / 8 and np.abs(a).min() > 0 and abs(a.mean()) < 0.02
  assert not np.any(np.asarray(d.b))
  # Embeddings as in PEFT: a = 0, b standard normal.
  assert not np.any(np.asarray(e.a)) and 0.6 < np.std(np.asarray(e.b)) < 1.4
  # Every kernel gets its own key.
  assert not np.array_equal(a, np.asarray(x.a))


def test_dtypes_preserved():
  params = {"w": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.bfloat16)}}
  ad = randomize(abstract_init(params, LoraSpec(["w"], rank=2)))
  merged = merge(params, ad)["w"]["kernel"]
  assert merged.dtype == jnp.bfloat16
  f = ad["w"]["kernel"]
  want = (params["w"]["kernel"].astype(jnp.float32) + f.scale * (f.a @ f.b)).astype(jnp.bfloat16)
  assert_close(merged, want, 1e-2)  # the same float32 sum, cast to bfloat16 (8 bits: 4e-3)
  same = abstract_init(params, LoraSpec(["w"], rank=2, dtype=None))
  assert same["w"]["kernel"].a.dtype == same["w"]["kernel"].b.dtype == jnp.bfloat16


def test_split_is_params_and_init():
  params = {"w": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
  spec = LoraSpec(["w"], rank=2)
  frozen, ad = lora_jax.split(jax.random.key(3), params, spec)
  assert frozen is params
  want = lora_jax.init(jax.random.key(3), params, spec)
  assert jax.tree.structure(ad) == jax.tree.structure(want)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), ad, want)
  assert ad["w"]["bias"] is None


def test_init_under_jit_and_eval_shape():
  module, x, spec = One(nn.DenseGeneral((4, 5))), jnp.ones((2, 3)), LoraSpec(["layer"], rank=2, layout={"layer": "ioo"})
  params = random_params(module, x)
  fn = lambda key, p: lora_jax.init(key, p, spec)
  eager = fn(jax.random.key(1), params)
  jitted = jax.jit(fn)(jax.random.key(1), params)
  assert jax.tree.structure(jitted) == jax.tree.structure(eager)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), jitted, eager)
  shapes = jax.eval_shape(fn, jax.random.key(1), params)
  f = shapes["layer"]["kernel"]
  assert isinstance(f, LoraFactors) and f.a.shape == (3, 2) and f.b.shape == (2, 4, 5)
  assert f.a.dtype == jnp.float32 and f.scale == 8.0 and f.layout == "ioo"
  # From abstract params only.
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  assert jax.eval_shape(fn, jax.random.key(1), abstract)["layer"]["kernel"].b.shape == (2, 4, 5)
  assert jax.eval_shape(lora_jax.merge, abstract, shapes)["layer"]["kernel"].shape == (3, 4, 5)


def _factors_by_path(adapters):
  flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_factors)
  return {lora_jax._paths.path_str(p).rsplit("/", 1)[0]: f for p, f in flat if _is_factors(f)}


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(3, 8, rngs=rngs)
    self.fc2 = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def test_nnx_state():
  graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), state)
  spec = LoraSpec(["fc1", "fc2"], rank=2, alpha=4)
  assert [t.path for t in spec.resolve(state)] == ["fc1/kernel", "fc2/kernel"]
  fresh = init(jax.random.key(0), state, spec)
  assert isinstance(fresh, nnx.State)
  jax.tree.map(lambda p, m: np.testing.assert_array_equal(np.asarray(m), np.asarray(p)), state, merge(state, fresh))
  ad = randomize(fresh)
  merged = merge(state, ad)
  assert isinstance(merged, nnx.State)
  x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  out = nnx.merge(graphdef, merged)(jnp.asarray(x))
  factors = _factors_by_path(ad)
  kernel = {p: f64(x) for p, x in lora_jax._paths.leaves_with_paths(state)}
  w = {n: kernel[f"{n}/kernel"] + 2.0 * f64(factors[n].a) @ f64(factors[n].b) for n in ("fc1", "fc2")}
  h = np.maximum(x @ w["fc1"] + kernel["fc1/bias"], 0)
  want = h @ w["fc2"] + kernel["fc2/bias"]
  assert_close(out, want, RTOL)
  assert_unmerged(state, unmerge(merged, ad), merged)
  c = lora_jax.count(ad, state)
  assert (c.trainable, c.base) == (2 * (3 + 8) + 2 * (8 + 2), 3 * 8 + 8 + 8 * 2 + 2)


def test_count_by_hand():
  params = {
      "fc1": {"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(5)},
      "fc2": {"kernel": jnp.zeros((5, 2), jnp.bfloat16), "bias": jnp.zeros(2)},
      "stack": {"kernel": jnp.zeros((3, 4, 6))},
      "perm": {"kernel": jnp.zeros((5, 3, 4))},
  }
  spec = LoraSpec(["fc1", "fc2", "stack", "perm"], rank=2, layout={"stack": "lio", "perm": "oli"})
  ad = abstract_init(params, spec)  # count needs shapes only
  c = lora_jax.count(ad, params)
  fc1, fc2, stack, perm = 2 * (3 + 5), 2 * (5 + 2), 3 * 2 * (4 + 6), 3 * 2 * (4 + 5)
  assert c.rows == (
      ("fc1/kernel", (3, 5), 2, fc1),
      ("fc2/kernel", (5, 2), 2, fc2),
      ("perm/kernel", (5, 3, 4), 2, perm),
      ("stack/kernel", (3, 4, 6), 2, stack),
  )
  assert c.trainable == fc1 + fc2 + stack + perm == 16 + 14 + 60 + 54
  assert c.trainable_bytes == 4 * c.trainable  # float32 factors, also for the bf16 kernel
  assert c.base == 15 + 5 + 10 + 2 + 72 + 60
  assert c.base_bytes == 4 * (15 + 5 + 2 + 72 + 60) + 2 * 10
  assert c.total == c.base + c.trainable and c.fraction == pytest.approx(144 / (144 + 164))
  text = str(c)
  assert "trainable: 144 params (576 B)" in text and "base (frozen): 164 params (636 B)" in text
  assert "stack/kernel" in text
  alone = lora_jax.count(ad)
  assert alone.rows == c.rows and alone.base is None and alone.total is None and alone.fraction is None
  assert "base" not in str(alone)


# ---------------------------------------------------------------- properties


@st.composite
def dense_case(draw):
  n_l = draw(st.integers(0, 1))
  lead = tuple(draw(st.lists(st.integers(1, 3), min_size=n_l, max_size=n_l)))
  fan_in, fan_out = draw(st.integers(1, 8)), draw(st.integers(1, 8))
  rank = draw(st.integers(1, min(fan_in, fan_out)))
  alpha = draw(st.sampled_from([1.0, 4.0, 16.0, 0.5]))
  rslora = draw(st.booleans())
  seed = draw(st.integers(0, 2**16))
  return lead, fan_in, fan_out, rank, alpha, rslora, seed


@settings(max_examples=25, deadline=None)
@given(dense_case())
def test_merge_unmerge_properties(case):
  lead, fan_in, fan_out, rank, alpha, rslora, seed = case
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(*lead, fan_in, fan_out)).astype(np.float32)
  params = {"dense": {"kernel": jnp.asarray(w), "bias": jnp.asarray(rng.normal(size=fan_out), jnp.float32)}}
  spec = LoraSpec(["dense"], rank=rank, alpha=alpha, rslora=rslora, layout={"dense": "l" * len(lead) + "io"})
  a = rng.normal(size=(*lead, fan_in, rank)).astype(np.float32)
  b = rng.normal(size=(*lead, rank, fan_out)).astype(np.float32)

  # init's structure and scale, without compiling its random number generation per shape.
  ad = jax.eval_shape(lambda p: lora_jax.init(jax.random.key(seed), p, spec), params)
  f = ad["dense"]["kernel"]
  assert (f.a.shape, f.b.shape) == (a.shape, b.shape)
  factors = lambda a, b: {"dense": {"kernel": LoraFactors(a=a, b=b, scale=f.scale, layout=f.layout), "bias": None}}

  @jax.jit  # one compilation per example
  def run(params, a, b):
    merged = lora_jax.merge(params, factors(a, b))
    return lora_jax.merge(params, factors(a, jnp.zeros_like(b))), merged, lora_jax.unmerge(merged, factors(a, b))

  merged0, merged, back = run(params, a, b)
  # b = 0 (as init leaves it): merging is a no-op, exactly.
  jax.tree.map(lambda p, m: np.testing.assert_array_equal(np.asarray(m), np.asarray(p)), params, merged0)
  # merge = W + scale * a @ b, with scale = alpha / r (alpha / sqrt(r) for rsLoRA).
  scale = alpha / (np.sqrt(rank) if rslora else rank)
  assert f.scale == pytest.approx(scale)
  want = f64(w) + scale * np.matmul(f64(a), f64(b))
  terms = np.abs(f64(w)) + abs(scale) * np.matmul(np.abs(f64(a)), np.abs(f64(b)))
  assert_close(merged["dense"]["kernel"], want, RTOL, scale=terms.max())
  np.testing.assert_array_equal(np.asarray(merged["dense"]["bias"]), np.asarray(params["dense"]["bias"]))
  # unmerge inverts merge (up to float32 rounding of the terms added and taken away).
  assert_close(back["dense"]["kernel"], w, RTOL, scale=terms.max())
  assert lora_jax.count(factors(a, b)).trainable == int(np.prod(lead, dtype=int)) * rank * (fan_in + fan_out)
