"""wrap(): factored results and gradients equal the merged reference, for real Flax layers."""

from __future__ import annotations

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax
from _util import assert_close, assert_trees_close, random_params
from lora_jax import LoraFactors, LoraSpec

ORDER_RTOL = 2e-5  # factored vs merged, float32: the same sums in another order, relative to max|value|


def randomize(adapters, seed=0, scale=0.1):
  """Non-zero a and b (fresh init has b = 0, which would hide most bugs). NumPy draws: no
  compilation per leaf shape (a jitted normal per shape cost most of this file's time).
  ``adapters`` may be abstract (``jax.eval_shape`` of ``init``)."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(adapters)
  return jax.tree.unflatten(
      treedef, [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]
  )


def random_init(params, spec, seed=0):
  """``randomize(init(...))`` without running init's random draws (its structure, shapes and
  dtypes, traced abstractly): the values are overwritten anyway."""
  return randomize(jax.eval_shape(lambda p: lora_jax.init(jax.random.key(1), p, spec), params), seed)


def _close(x, y, dtype):
  # Relative to the largest value of the tree (sums reorder roundings): float32 keeps ~7
  # significant digits, bf16 ~3. One scale for the whole tree, not each leaf's own: the
  # gradient of one factor sums terms of the whole loss that can cancel to far below them
  # (hypothesis found a (1, 5, 1) factor gradient of max 0.15 off by 6e-6 in float32, both
  # before and after grouping, from terms of order 1), and the rounding is the terms'.
  rel = 0.05 if dtype == jnp.bfloat16 else ORDER_RTOL
  chex.assert_trees_all_equal_structs(x, y)
  scale = max([float(np.abs(np.asarray(b, np.float32)).max()) for b in jax.tree.leaves(y) if np.size(b)] + [0.0])
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    assert_close(a, b, rel, scale=scale)


def check_equivalent(apply_fn, params, spec, *args, dtype=jnp.float32, loss_arg=None, **kwargs):
  """Factored == merged == apply_fn(merge(...)) for outputs and for gradients w.r.t. a and b."""
  adapters = random_init(params, spec)
  fact = lambda p, ad, *a: lora_jax.wrap(apply_fn)(p, ad, *a, **kwargs)  # noqa: E731
  merged = lambda p, ad, *a: lora_jax.wrap(apply_fn, mode="merged")(p, ad, *a, **kwargs)  # noqa: E731
  ref = lambda p, ad, *a: apply_fn(lora_jax.merge(p, ad), *a, **kwargs)  # noqa: E731

  def loss(fn, p, ad, *a):
    out = fn(p, ad, *a)
    out = (out[0] if isinstance(out, tuple) else out).astype(jnp.float32)
    probe = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(out * probe) + 0.1 * jnp.sum(out**2)

  # One jitted program for the three outputs and two gradients (each its own computation; one
  # compilation instead of five).
  @jax.jit
  def run(p, ad, *a):
    outs = tuple(f(p, ad, *a) for f in (fact, merged, ref))
    grads = tuple(jax.grad(lambda ad, f=f: loss(f, p, ad, *a))(ad) for f in (fact, merged))
    return outs, grads

  (y_f, y_m, y_r), (g_f, g_m) = run(params, adapters, *args)
  _close(y_f, y_m, dtype)
  _close(y_f, y_r, dtype)
  _close(g_f, g_m, dtype)
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(g_f)), "gradients are all zero"
  report = lora_jax.explain(apply_fn, params, adapters, *args, **kwargs)
  return adapters, report


def all_factored(report):
  assert not report.fallbacks, str(report)
  assert not report.unused, str(report)
  assert report.uses, str(report)


X = jax.random.normal(jax.random.key(42), (3, 5, 8))


def test_dense():
  model = nn.Dense(6)
  v = model.init(jax.random.key(0), X)
  _, rep = check_equivalent(model.apply, v, LoraSpec("params/kernel", rank=3), X)
  all_factored(rep)


def test_dense_bf16():
  model = nn.Dense(16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  x = X.astype(jnp.bfloat16)
  v = model.init(jax.random.key(0), x)
  _, rep = check_equivalent(model.apply, v, LoraSpec("params/kernel", rank=4), x, dtype=jnp.bfloat16)
  all_factored(rep)
  ad = lora_jax.init(jax.random.key(1), v, LoraSpec("params/kernel", rank=4))
  assert lora_jax.wrap(model.apply)(v, ad, x).dtype == jnp.bfloat16


def test_dense_mixed_precision():
  model = nn.Dense(16, dtype=jnp.bfloat16)  # float32 params, bf16 compute (a convert on W)
  v = model.init(jax.random.key(0), X)
  _, rep = check_equivalent(model.apply, v, LoraSpec("params/kernel", rank=4), X, dtype=jnp.bfloat16)
  all_factored(rep)


@pytest.mark.parametrize(
    "features,axis,layout",
    [((4, 3), -1, "ioo"), (6, (-2, -1), "iio"), ((2, 3), (-2, -1), "iioo")],
)
def test_dense_general(features, axis, layout):
  model = nn.DenseGeneral(features, axis=axis)
  x = jax.random.normal(jax.random.key(3), (2, 5, 4, 2))
  v = model.init(jax.random.key(0), x)
  spec = LoraSpec("params/kernel", rank=2, layout={"params/kernel": layout})
  _, rep = check_equivalent(model.apply, v, spec, x)
  all_factored(rep)


def test_einsum():
  model = nn.Einsum((8, 4, 6), "bti,ihd->bthd")
  v = model.init(jax.random.key(0), X)
  spec = LoraSpec("params/kernel", rank=3, layout={"kernel": "ioo"})
  _, rep = check_equivalent(model.apply, v, spec, X)
  all_factored(rep)


@pytest.mark.parametrize(
    "kernel,strides,shape",
    [((3,), 1, (2, 9, 4)), ((3,), 2, (2, 9, 4)), ((3, 3), (2, 1), (2, 7, 6, 4)), ((1, 1), 1, (2, 5, 5, 4))],
)
def test_conv(kernel, strides, shape):
  model = nn.Conv(5, kernel, strides=strides, padding="SAME")
  x = jax.random.normal(jax.random.key(3), shape)
  v = model.init(jax.random.key(0), x)
  layout = {"params/kernel": "i" * (len(kernel) + 1) + "o"}  # (*window, in, out)
  _, rep = check_equivalent(model.apply, v, LoraSpec("params/kernel", rank=2, layout=layout), x)
  all_factored(rep)


def test_embed_lookup_and_tied_head():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
      emb = nn.Embed(11, 6)
      h = nn.Dense(6)(emb(ids))
      return emb.attend(h)

  ids = jnp.array([[1, 2, 3, 10], [0, 5, 5, 7]])
  model = Tied()
  v = model.init(jax.random.key(0), ids)
  _, rep = check_equivalent(model.apply, v, LoraSpec(["Embed_0", "Dense_0"], rank=3), ids)
  uses = {u.primitive: u.factored for u in rep.for_path("params/Embed_0/embedding")}
  # Lookup (gather of rows of a) and tied head (x contracted with b, then a) are both factored.
  assert uses == {"gather": True, "dot_general": True}, str(rep)
  all_factored(rep)


def test_fallback_is_exact_and_reported():
  def fn(params, x):  # the kernel meets an elementwise op: no factored form exists
    w = params["w"] * params["mask"]
    return x @ w

  params = {"w": jax.random.normal(jax.random.key(0), (4, 5)), "mask": jnp.tril(jnp.ones((4, 5)))}
  x = jnp.ones((2, 4))
  spec = LoraSpec("w", rank=2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", lora_jax.LoraFallbackWarning)
    _, rep = check_equivalent(fn, params, spec, x)
  (use,) = rep.for_path("w")
  assert not use.factored and use.primitive == "mul" and "mul" in use.reason
  assert "MATERIALISED" in str(rep)
  ad = random_init(params, spec)
  with pytest.warns(lora_jax.LoraFallbackWarning, match="'w': materialised .* `mul`"):
    lora_jax.wrap(fn)(params, ad, x)
  with pytest.raises(lora_jax.LoraFallbackError, match="'w': the kernel meets `mul`"):
    lora_jax.wrap(fn, fallback="error")(params, ad, x)


def test_unused_adapter_is_reported():
  def fn(params, x):
    return x @ params["used"]

  params = {"used": jnp.ones((4, 4)), "unused": jnp.ones((4, 4))}
  ad = lora_jax.init(jax.random.key(1), params, LoraSpec("used|unused", rank=2))
  rep = lora_jax.explain(fn, params, ad, jnp.ones((1, 4)))
  assert rep.unused == ["unused"]
  with pytest.warns(lora_jax.LoraFallbackWarning, match="'unused' has adapters but the wrapped function never reads"):
    lora_jax.wrap(fn)(params, ad, jnp.ones((1, 4)))


class Block(nn.Module):
  d: int = 8
  heads: int = 2

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.LayerNorm()(x)
    q = nn.DenseGeneral((self.heads, self.d // self.heads), name="query")(h)
    k = nn.DenseGeneral((self.heads, self.d // self.heads), name="key")(h)
    v = nn.DenseGeneral((self.heads, self.d // self.heads), name="value")(h)
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v)
    x = x + nn.DenseGeneral(self.d, axis=(-2, -1), name="out")(o)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(self.d, name="down")(nn.gelu(nn.Dense(2 * self.d, name="up")(h)))
    return x, None


ATTN_LAYOUT = {"query|key|value": "ioo", "out": "iio"}


def test_transformer_block():
  model = Block()
  v = model.init(jax.random.key(0), X)
  spec = LoraSpec(["query", "key", "value", "out", "up", "down"], rank=2, layout={f"(.*/)?({k})/kernel": l for k, l in ATTN_LAYOUT.items()})
  _, rep = check_equivalent(lambda p, x: model.apply(p, x)[0], v, spec, X)
  all_factored(rep)


class Stack(nn.Module):
  n: int = 4

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(
        nn.remat(Block),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.n,
    )
    x, _ = blocks(name="layers")(x, None)
    return nn.Dense(3, name="head")(x)


STACK_LAYOUT = {"layers/(query|key|value)/kernel": "lioo", "layers/out/kernel": "liio", "layers/.*": "lio"}


@pytest.fixture(scope="module")
def stack_checked():
  """``check_equivalent`` on the scanned remat stack with all-linear LoRA, once for the tests
  that read its adapters and report (each used to run the same check itself)."""
  model = Stack()
  v = model.init(jax.random.key(0), X)
  spec = LoraSpec("all-linear", rank=2, layout=STACK_LAYOUT)
  ad, rep = check_equivalent(model.apply, v, spec, X)
  return v, spec, ad, rep


def test_scanned_remat_stack(stack_checked):
  _, _, ad, rep = stack_checked
  assert ad["params"]["layers"]["query"]["kernel"].a.shape == (4, 8, 2)
  assert ad["params"]["layers"]["query"]["kernel"].b.shape == (4, 2, 2, 4)
  all_factored(rep)


def test_scanned_stack_with_shared_factor_axis():
  # Layout 'iio' on a stacked (L, in, out) kernel: the scanned axis is a fan-in axis
  # of ``a`` and ``b`` is shared across layers. Unusual, but it must stay exact.
  model = Stack(n=3)
  v = model.init(jax.random.key(0), X)
  spec = LoraSpec("params/layers/up/kernel", rank=2, layout={"params/layers/up/kernel": "iio"})
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", lora_jax.LoraLayoutWarning)
    _, rep = check_equivalent(model.apply, v, spec, X)
  all_factored(rep)
  assert "scan slices the kernel along an axis marked 'i'" in rep.layout_notes["params/layers/up/kernel"]
  ad = lora_jax.init(jax.random.key(1), v, spec)
  with pytest.warns(lora_jax.LoraLayoutWarning, match="'params/layers/up/kernel': its layout 'iio' looks wrong"):
    lora_jax.wrap(model.apply)(v, ad, X)


def test_dense_general_default_layout_is_flagged():
  model = nn.DenseGeneral((4, 3))  # kernel (in, heads, dim): layout 'iio' splits it oddly
  v = model.init(jax.random.key(0), X)
  ad = lora_jax.init(jax.random.key(1), v, LoraSpec("params/kernel", rank=2, layout={"params/kernel": "iio"}))
  rep = lora_jax.explain(model.apply, v, ad, X)
  assert "contracts kernel-view axes [0] but leaves axes [1]" in rep.layout_notes["params/kernel"]
  assert "LAYOUT?" in str(rep)
  with pytest.warns(lora_jax.LoraLayoutWarning, match="'ioo' for a DenseGeneral"):
    lora_jax.wrap(model.apply)(v, ad, X)


def test_nnx_model():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(8, 16, rngs=rngs)
      self.down = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.down(jax.nn.relu(self.up(x)))

  apply_fn, params, _ = lora_jax.from_nnx(MLP(nnx.Rngs(0)))
  ad, rep = check_equivalent(apply_fn, params, LoraSpec(["up", "down"], rank=3), X)
  all_factored(rep)
  merged_module = lora_jax.to_nnx(apply_fn, lora_jax.merge(params, ad))
  assert_close(merged_module(X), lora_jax.wrap(apply_fn)(params, ad, X), ORDER_RTOL)


def test_plain_jax_function_with_jit_cond_and_transposed_use():
  inner = jax.jit(lambda x, w: jnp.tanh(x @ w))

  def fn(p, x, flag):
    h = inner(x, p["w1"])
    h = jax.lax.cond(flag, lambda h: h @ p["w2"], lambda h: -(h @ p["w2"]), h)
    return jnp.einsum("...o,io->...i", h, p["w1"])  # w1 used transposed: contracts fan-out

  params = {"w1": jax.random.normal(jax.random.key(0), (8, 6)), "w2": jax.random.normal(jax.random.key(1), (6, 6))}
  for flag in (True, False):
    _, rep = check_equivalent(fn, params, LoraSpec("w1|w2", rank=2), X, jnp.asarray(flag))
    all_factored(rep)


def test_linen_mutable_and_rngs():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(8)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.Dropout(0.5, deterministic=not train)(x)
      return nn.Dense(2)(x)

  model = Net()
  v = model.init(jax.random.key(0), X, train=False)
  ad = random_init(v, LoraSpec(["Dense_0", "Dense_1"], rank=2))
  rngs = {"dropout": jax.random.key(7)}
  out, upd = lora_jax.wrap(model.apply)(v, ad, X, train=True, mutable=["batch_stats"], rngs=rngs)
  ref, ref_upd = model.apply(lora_jax.merge(v, ad), X, train=True, mutable=["batch_stats"], rngs=rngs)
  assert_close(out, ref, ORDER_RTOL)
  assert_trees_close(upd, ref_upd, ORDER_RTOL)
  assert_close(
      lora_jax.wrap(model.apply)(v, ad, X, train=False), model.apply(lora_jax.merge(v, ad), X, train=False), ORDER_RTOL
  )


def test_vmap_checkpoint_and_outer_jit():
  model = nn.Dense(4)
  v = model.init(jax.random.key(0), X)
  ad = random_init(v, LoraSpec("params/kernel", rank=2))
  f = lora_jax.wrap(model.apply)
  ref = model.apply(lora_jax.merge(v, ad), X)
  assert_close(jax.vmap(f, in_axes=(None, None, 0))(v, ad, X), ref, ORDER_RTOL)
  assert_close(jax.jit(jax.checkpoint(f))(v, ad, X), ref, ORDER_RTOL)
  # vmap over adapters: a batch of adapters on one base model.
  ads = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), ad)
  ys = jax.vmap(f, in_axes=(None, 0, None))(v, ads, X)
  ad2 = jax.tree.map(lambda x: 2 * x, ad)
  assert_close(ys[1], model.apply(lora_jax.merge(v, ad2), X), ORDER_RTOL)


def test_no_retrace_on_repeated_calls():
  traces = []

  def fn(p, x):
    traces.append(1)
    return x @ p["w"]

  params = {"w": jnp.ones((8, 4))}
  ad = lora_jax.init(jax.random.key(1), params, LoraSpec("w", rank=2))
  f = lora_jax.wrap(fn)
  for _ in range(3):
    f(params, ad, X)
  n = len(traces)
  f(params, ad, X + 1)
  assert len(traces) == n
  f(params, ad, X[:1])  # new shape: one new trace
  assert len(traces) > n


def test_base_params_are_arguments_not_constants():
  model = nn.Dense(4)
  v = model.init(jax.random.key(0), X)
  ad = lora_jax.init(jax.random.key(1), v, LoraSpec("params/kernel", rank=2))
  jaxpr = jax.make_jaxpr(lora_jax.wrap(model.apply))(v, ad, X)
  big = [c for c in jaxpr.consts if np.size(c) >= 8 * 4]
  assert not big


def _derived_shapes(jaxpr, tainted):
  """Shapes of every value computed from a tainted input, recursing into sub-jaxprs."""
  shapes = []
  tainted = set(tainted)
  for eqn in jaxpr.eqns:
    ins = [v for v in eqn.invars if not isinstance(v, jax.extend.core.Literal)]
    if any(v in tainted for v in ins):
      for sub in jax.extend.core.subjaxprs(jaxpr) if False else []:
        pass
      for p in eqn.params.values():
        for j in p if isinstance(p, (tuple, list)) else [p]:
          inner = getattr(j, "jaxpr", j)
          if isinstance(inner, jax.extend.core.Jaxpr):
            shapes += _derived_shapes(inner, inner.invars)
      for v in eqn.outvars:
        tainted.add(v)
        shapes.append(tuple(v.aval.shape))
  return shapes


@pytest.mark.parametrize("which", ["dense", "block"])
def test_gradient_never_forms_full_kernel(which):
  if which == "dense":
    model, spec, x = nn.Dense(24), LoraSpec("params/kernel", rank=2), jax.random.normal(jax.random.key(0), (3, 5, 16))
    forbidden = {(16, 24), (24, 16)}
    fn = model.apply
  else:
    model = Block(d=16, heads=2)
    spec = LoraSpec(["up", "down"], rank=2)
    x = jax.random.normal(jax.random.key(0), (3, 5, 16))
    forbidden = {(16, 32), (32, 16)}
    fn = lambda p, x: model.apply(p, x)[0]  # noqa: E731
  v = model.init(jax.random.key(1), x)
  ad = lora_jax.init(jax.random.key(2), v, spec)

  def loss(ad, f):
    return jnp.sum(f(v, ad, x) ** 2)

  for f, should_form in ((lora_jax.wrap(fn), False), (lora_jax.wrap(fn, mode="merged"), True)):
    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(ad, f)
    ad_vars = jaxpr.jaxpr.invars  # the adapter leaves
    shapes = set(_derived_shapes(jaxpr.jaxpr, ad_vars))
    assert bool(shapes & forbidden) == should_form, (shapes & forbidden, should_form)


@settings(max_examples=15, deadline=None)
@given(
    d_in=st.integers(1, 7),
    d_out=st.integers(1, 7),
    extra=st.integers(1, 3),
    rank=st.integers(1, 3),
    batch=st.integers(1, 3),
)
def test_hypothesis_dense_general(d_in, d_out, extra, rank, batch):
  rank = min(rank, d_in, d_out * extra)
  model = nn.DenseGeneral((d_out, extra))
  x = jnp.asarray(np.random.default_rng(d_in).standard_normal((batch, d_in)), jnp.float32)
  v = random_params(model.init, x)  # NumPy draws: no compilation per hypothesis shape
  spec = LoraSpec("params/kernel", rank=rank, layout={"kernel": "ioo"})
  ad = random_init(v, spec)
  y = lora_jax.wrap(model.apply)(v, ad, x)
  # Independent float64 reference: x @ (W + scale a@b).
  w = np.asarray(v["params"]["kernel"], np.float64)
  f: LoraFactors = ad["params"]["kernel"]
  delta = np.einsum("ir,rjk->ijk", np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)) * f.scale
  ref = np.einsum("bi,ijk->bjk", np.asarray(x, np.float64), w + delta) + np.asarray(v["params"]["bias"], np.float64)
  a64, b64 = np.abs(np.asarray(f.a, np.float64)), np.abs(np.asarray(f.b, np.float64))
  terms = np.einsum("bi,ijk->bjk", np.abs(np.asarray(x, np.float64)), np.abs(w) + abs(f.scale) * np.einsum("ir,rjk->ijk", a64, b64))
  assert_close(y, ref, 1e-5, scale=(terms + np.abs(np.asarray(v["params"]["bias"], np.float64))).max())


def test_bad_inputs():
  params = {"w": jnp.ones((4, 4))}
  ad = lora_jax.init(jax.random.key(1), params, LoraSpec("w", rank=2))
  f = lora_jax.wrap(lambda p, x: x @ p["w"])
  with pytest.raises(ValueError, match="adapters have 'v', which params lack"):
    f(params, {"v": ad["w"]}, jnp.ones((1, 4)))
  bad = {"w": LoraFactors(jnp.ones((3, 2)), jnp.ones((2, 4)), 1.0, "io")}
  with pytest.raises(ValueError, match=r"'w': kernel \(4, 4\) .* expects LoraFactors leaves a\(4, 2\)"):
    f(params, bad, jnp.ones((1, 4)))
  with pytest.raises(TypeError, match="params\\['name'\\] is a str, not an array"):
    f({"w": params["w"], "name": "dense"}, {"w": ad["w"], "name": None}, jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="wrap\\(mode='fast'\\)"):
    lora_jax.wrap(lambda p: p, mode="fast")
  with pytest.raises(ValueError, match="wrap\\(fallback='never'\\)"):
    lora_jax.wrap(lambda p: p, fallback="never")
  with pytest.raises(TypeError, match="wrap\\(group='yes'\\): expected True or False"):
    lora_jax.wrap(lambda p: p, group="yes")


def test_infer_layout_reads_real_models(stack_checked):
  v, stack_spec, _, _ = stack_checked
  got = lora_jax.infer_layout(Stack().apply, v, X)
  assert got["params/layers/query/kernel"] == "lioo"
  assert got["params/layers/out/kernel"] == "liio"
  assert got["params/layers/up/kernel"] == "lio"
  assert got["params/head/kernel"] == "io"
  # Plugged into the spec, it gives the targets (per-layer factors) of the hand-written
  # layouts, which ``stack_checked`` showed give an all-factored transform equal to merging.
  spec = LoraSpec("all-linear", rank=2, layout=got)
  assert spec.resolve(v) == stack_spec.resolve(v)

  class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
      emb = nn.Embed(11, 6)
      return emb.attend(nn.Conv(6, (3,))(emb(ids)))

  ids = jnp.array([[1, 2, 3, 10]])
  v = Tied().init(jax.random.key(0), ids)
  got = lora_jax.infer_layout(Tied().apply, v, ids)
  assert got == {"params/Embed_0/embedding": "io", "params/Conv_0/kernel": "iio"}


def test_views_of_the_kernel_stay_factored():
  def fn(p, x, i):
    w = p["w"]  # (8, 6)
    y = x @ w.T.T  # transpose twice
    y = y + jnp.einsum("bi,xio->bxo", x, w[None])[:, 0]  # unit axis added (reshape/broadcast)
    y = y[..., :3] + x @ w[:, 2:5]  # slice of fan-out (b is sliced)
    y = y + (x[:, :4] @ w[:4])[..., :3]  # slice of fan-in (a is sliced)
    row = jax.lax.dynamic_slice(w, (i, 0), (1, 6))  # dynamic slice of fan-in
    return y + jnp.squeeze(row, 0)[:3] + jnp.expand_dims(w, 0).sum()  # last use: a reduction

  params = {"w": jax.random.normal(jax.random.key(0), (8, 6))}
  x = jax.random.normal(jax.random.key(1), (5, 8))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", lora_jax.LoraFallbackWarning)
    _, rep = check_equivalent(fn, params, LoraSpec("w", rank=3), x, jnp.int32(2))
  kinds = [(u.primitive, u.factored) for u in rep.for_path("w")]
  assert kinds.count(("dot_general", True)) == 4, kinds
  # The dynamic row slice feeds an add and the expanded kernel a reduce_sum: no factored
  # form exists for those two uses, so they (and only they) are materialised.
  assert sorted(p for p, f in kinds if not f) == ["add", "reduce_sum"], kinds


class SharedInputs(nn.Module):
  """q/k/v and gate/up read the same input; `mix` reads it along another axis."""

  @nn.compact
  def __call__(self, x):
    q = nn.Dense(8, name="q")(x)
    k = nn.Dense(4, name="k")(x)
    v = nn.Dense(4, name="v", precision="highest")(x)  # another precision: not grouped
    mix = nn.Einsum((5, 5), "btd,tu->bud", name="mix")(x)  # contracts the time axis
    h = jnp.concatenate([q, k, v], -1) + mix.sum()
    return nn.Dense(8, name="gate")(h) * nn.Dense(8, name="up")(h)




def test_adapters_reading_one_input_share_one_matmul():
  model = SharedInputs()
  v = model.init(jax.random.key(0), X)
  spec = LoraSpec(["q", "k", "v", "mix", "gate", "up"], rank=2, rank_pattern={"k": 3},
                  layout={"mix/kernel": "io"})
  ad, rep = check_equivalent(model.apply, v, spec, X)
  all_factored(rep)
  assert rep.grouped == [["params/q/kernel", "params/k/kernel"], ["params/gate/kernel", "params/up/kernel"]], rep.grouped
  assert "one x @ [a...] matmul: params/q/kernel + params/k/kernel" in str(rep)
  # Grouped and ungrouped agree (float32 rounding only), outputs and gradients.
  grouped, single = lora_jax.wrap(model.apply), lora_jax.wrap(model.apply, group=False)
  _close(grouped(v, ad, X), single(v, ad, X), jnp.float32)
  loss = lambda f: jax.grad(lambda ad: jnp.sum(jnp.sin(f(v, ad, X))))  # noqa: E731
  _close(loss(grouped)(ad), loss(single)(ad), jnp.float32)
  # One x @ [a_q|a_k] and one h @ [a_gate|a_up] instead of two each.
  dots = [
      sum(e.primitive.name == "dot_general" for e in _inner_eqns(jax.make_jaxpr(f)(v, ad, X).jaxpr))
      for f in (grouped, single)
  ]
  assert dots[1] - dots[0] == 2, dots


def _inner_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      inner = getattr(p, "jaxpr", p)
      if hasattr(inner, "eqns"):
        yield from _inner_eqns(inner)


def test_grouping_inside_scanned_remat_layers(stack_checked):
  *_, rep = stack_checked
  assert ["params/layers/query/kernel", "params/layers/key/kernel", "params/layers/value/kernel"] in rep.grouped, rep.grouped


@settings(max_examples=8, deadline=None)  # each example compiles its own programs (~1.5 s)
@given(
    outs=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    ranks=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    layers=st.integers(1, 3),
    d_in=st.integers(2, 6),
)
def test_hypothesis_grouped_batched_matmuls(outs, ranks, layers, d_in):
  """Several stacked (L, in, out) kernels meet one (L, B, in) input through batched matmuls
  (the layer axis is a batch dimension): grouped == ungrouped == merged, values and grads."""
  params = {f"w{i}": jnp.asarray(np.random.default_rng(i).standard_normal((layers, d_in, o)), jnp.float32)
            for i, o in enumerate(outs)}
  ranks = {f"w{i}": min(ranks[i], d_in, o) for i, o in enumerate(outs)}
  spec = LoraSpec("w[0-9]", rank=1, rank_pattern=ranks, layout={".*": "lio"})
  x = jnp.asarray(np.random.default_rng(9).standard_normal((layers, 3, d_in)), jnp.float32)

  def f(p, x):  # every output value, not their sum (a sum cancels, and hides errors)
    return jnp.concatenate([jnp.sin(jnp.einsum("lbd,ldo->lbo", x, p[k])).ravel() for k in sorted(p)])

  _, rep = check_equivalent(f, params, spec, x)
  all_factored(rep)
  assert rep.grouped == [sorted(params)], rep.grouped
  ad = random_init(params, spec)
  probe = jnp.cos(jnp.arange(sum(layers * 3 * o for o in outs), dtype=jnp.float32))
  g = jax.jit(lambda ad: [jax.grad(lambda ad, grp=grp: lora_jax.wrap(f, group=grp)(params, ad, x) @ probe)(ad) for grp in (True, False)])(ad)
  _close(g[0], g[1], jnp.float32)


def _saved_thin_products(fn, *args) -> list[tuple[int, ...]]:
  """Shapes of the residuals that ``fn``'s remat saves from inside ``wrap``'s jitted call."""
  import contextlib
  import io

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  lines = [ln for ln in buf.getvalue().splitlines() if "output of jitted function" in ln]
  return [tuple(int(n) for n in ln.split("[", 1)[1].split("]", 1)[0].split(",")) for ln in lines]


def test_remat_policy_keeps_only_the_thin_products():
  model = SharedInputs()
  v = model.init(jax.random.key(0), X)
  ad = random_init(v, LoraSpec(["q", "k", "v", "gate", "up"], rank=2))
  wrapped = lora_jax.wrap(model.apply)
  loss = lambda policy: jax.checkpoint(lambda ad, x: jnp.sum(jnp.sin(wrapped(v, ad, x))), policy=policy)  # noqa: E731
  assert _saved_thin_products(loss(None), ad, X) == []
  # x @ [a_q|a_k] (r = 2 + 2), x @ a_v (alone: another precision), h @ [a_gate|a_up]: (..., r) only.
  assert sorted(_saved_thin_products(loss(lora_jax.remat_policy()), ad, X)) == [(3, 5, 2), (3, 5, 4), (3, 5, 4)]
  g = [jax.grad(loss(p))(ad, X) for p in (None, lora_jax.remat_policy())]
  _close(g[0], g[1], jnp.float32)
  both = lora_jax.remat_policy(jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  assert len(_saved_thin_products(loss(both), ad, X)) > 3
  with pytest.raises(TypeError, match=r"remat_policy\(base='dots'\)"):
    lora_jax.remat_policy("dots")
