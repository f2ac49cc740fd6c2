"""init(rng, params, spec, apply_fn, *args): layouts and "all-linear" read off the trace; module
names of other conventions; argument order. Shapes only where possible (eval_shape, no compile)."""

from __future__ import annotations

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax
from lora_jax import LoraSpec
from lora_jax.layout import trace_uses

X = jnp.ones((2, 8))


def abstract_init(params, spec, fn=None, *args, **kwargs):
  """init's result as shapes (nothing is compiled or computed)."""
  return jax.eval_shape(lambda p: lora_jax.init(jax.random.key(0), p, spec, fn, *args, **kwargs), params)


def layouts(adapters):
  flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: isinstance(x, lora_jax.LoraFactors))
  return {
      lora_jax._paths.path_str(p): (f.layout, f.a.shape, f.b.shape)
      for p, f in flat
      if isinstance(f, lora_jax.LoraFactors)
  }


# ---------------------------------------------------------------- layouts from the trace


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    q = nn.DenseGeneral((2, 4), name="query")(h)  # (in, heads, dim)
    o = nn.DenseGeneral(8, axis=(-2, -1), name="out")(q)  # (heads, dim, out)
    return h + o + nn.Dense(8, name="mlp")(h), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h = layers(name="layers")(x, None)[0]
    return nn.Dense(5, name="head")(h)


def test_scanned_stack_dense_general_and_head_from_the_trace():
  model = Stack()
  v = jax.eval_shape(model.init, jax.random.key(0), X)
  got = layouts(abstract_init(v, LoraSpec("all-linear", rank=2), model.apply, X))
  assert got == {
      "params/layers/query/kernel": ("lioo", (3, 8, 2), (3, 2, 2, 4)),
      "params/layers/out/kernel": ("liio", (3, 2, 4, 2), (3, 2, 8)),
      "params/layers/mlp/kernel": ("lio", (3, 8, 2), (3, 2, 8)),
  }  # one adapter per layer; the classifier head is the output layer, left out
  # A layout the spec states wins over the inferred one.
  got = layouts(abstract_init(v, LoraSpec(["mlp"], rank=2, layout={"mlp": "iio"}), model.apply, X))
  assert got == {"params/layers/mlp/kernel": ("iio", (3, 8, 2), (2, 8))}


def test_out_in_kernels_conv_oihw_and_vmapped_stacks():
  def fn(p, x, img):
    h = x @ p["proj"]["weight"].T  # an (out, in) kernel, as torch/equinox/GPT-2 Flax store it
    h = jax.vmap(lambda w, h: h @ w)(p["stack"]["kernel"], jnp.stack([h] * 4))  # an ensemble (L, in, out)
    y = jax.lax.conv_general_dilated(img, p["conv"]["weight"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return h.sum() + y.sum()

  params = {
      "proj": {"weight": jnp.zeros((6, 8))},
      "stack": {"kernel": jnp.zeros((4, 6, 3))},
      "conv": {"weight": jnp.zeros((5, 2, 3, 3))},
  }
  img = jnp.ones((1, 2, 7, 7))
  spec = LoraSpec(["proj", "stack", "conv"], rank=2)
  got = layouts(abstract_init(params, spec, fn, X, img))
  assert got == {
      "proj/weight": ("oi", (8, 2), (2, 6)),
      "stack/kernel": ("lio", (4, 6, 2), (4, 2, 3)),
      "conv/weight": ("oiii", (2, 3, 3, 2), (2, 5)),
  }
  # Without the function the 2-D (out, in) kernel would get 'io' (fan-in 6): init's bound
  # follows the real fan-in 8 once the function is given.
  ad = lora_jax.init(jax.random.key(1), params, spec, fn, X, img)
  a = np.asarray(ad["proj"]["weight"].a)
  assert 0.5 / np.sqrt(8) < np.abs(a).max() <= 1 / np.sqrt(8)


def test_init_accepts_kwargs_nnx_state_and_runs_under_jit():
  model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  apply_fn, params, _ = lora_jax.from_nnx(model)
  spec = LoraSpec(["layers"], rank=2)
  got = layouts(jax.jit(lambda k, p: lora_jax.init(k, p, spec, apply_fn, X))(jax.random.key(0), params))
  assert got == {"layers/0/kernel": ("io", (8, 2), (2, 16)), "layers/2/kernel": ("io", (16, 2), (2, 4))}

  def fn(p, x, *, scale):
    return scale * x @ p["w"]["kernel"]

  got = layouts(abstract_init({"w": {"kernel": jnp.zeros((8, 3))}}, LoraSpec(["w"], rank=2), fn, X, scale=2.0))
  assert got == {"w/kernel": ("io", (8, 2), (2, 3))}


def test_kernel_the_function_cannot_read_is_an_error():
  def fn(p, x):
    return x @ p["used"]["kernel"] + jnp.sum(p["scaled"]["kernel"] * 2.0)

  params = {k: {"kernel": jnp.zeros((8, 8))} for k in ("used", "unused", "scaled")}
  with pytest.raises(ValueError, match=r"'unused/kernel': its layout could not be read off the function: the function never reads this leaf. State it, LoraSpec\(..., layout=\{'unused': 'io'\}\)"):
    abstract_init(params, LoraSpec(["used", "unused"], rank=2), fn, X)
  with pytest.raises(ValueError, match=r"'scaled/kernel': its layout could not be read off the function: the function reads it only through `mul`, not as a matmul"):
    abstract_init(params, LoraSpec(["scaled"], rank=2), fn, X)
  # Stated, it is adapted (wrap then materialises that use, and says so).
  assert layouts(abstract_init(params, LoraSpec(["scaled"], rank=2, layout={"scaled": "io"}), fn, X)) == {
      "scaled/kernel": ("io", (8, 2), (2, 8))
  }


def test_trace_follows_jit_cond_loops_remat_and_custom_rules():
  @jax.custom_vjp
  def matmul(x, w):
    return x @ w

  matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

  def fn(p, x, flag):
    h = jax.jit(lambda h: h @ p["jit"].T)(x)
    h = jax.lax.cond(flag, lambda h: h @ p["cond"], lambda h: 2 * h, h)
    h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ p["loop"]), (0, h))[1]
    h = jax.checkpoint(lambda h: h @ p["remat"])(h)
    return matmul(h, p["custom"])

  params = {k: jnp.zeros((8, 8)) for k in ("jit", "cond", "loop", "remat", "custom")}
  t = trace_uses(fn, params, X, True)
  assert t.layouts == {"jit": "oi", "cond": "io", "loop": "io", "remat": "io", "custom": "io"}
  assert t.output_layers == {"custom"}
  assert t.linear() == ["cond", "jit", "loop", "remat"]


def test_trace_of_other_params_is_an_error():
  fn = lambda p, x: x @ p["w"]
  trace = trace_uses(fn, {"w": jnp.zeros((8, 2))}, X)
  with pytest.raises(ValueError, match=r"the trace was read off other params \(its 1 paths differ from these 2\)"):
    LoraSpec("w", rank=1).resolve({"w": jnp.zeros((8, 2)), "v": jnp.zeros((8, 2))}, trace)


# ---------------------------------------------------------------- "all-linear" from the trace


class Classifier(nn.Module):
  head_name: str = "head"

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(20, 8, name="tok")(ids)
    h = h + nn.Dense(8, name="fc")(nn.relu(nn.Dense(16, name="up")(h)))  # residual
    h = nn.LayerNorm(name="ln")(h).mean(axis=1)
    h = nn.tanh(nn.Dense(8, name="pool")(h))
    return nn.Dense(3, name=self.head_name)(h)


IDS = jnp.zeros((2, 5), jnp.int32)


@pytest.mark.parametrize("head_name", ["head", "lm_head", "classifier", "Dense_9"])
def test_all_linear_leaves_out_the_output_layer_whatever_its_name(head_name):
  model = Classifier(head_name)
  v = jax.eval_shape(model.init, jax.random.key(0), IDS)
  got = set(layouts(abstract_init(v, LoraSpec("all-linear", rank=4), model.apply, IDS)))
  # The pooler is a matmul before the head, not the output layer; the embedding is left out.
  assert got == {"params/up/kernel", "params/fc/kernel", "params/pool/kernel"}


def test_output_layer_of_a_loss_tied_head_and_nnx_out():
  class LM(nn.Module):
    tied: bool

    @nn.compact
    def __call__(self, ids, labels=None):
      emb = nn.Embed(20, 8, name="embed_tokens")
      h = emb(ids)
      h = h + nn.Dense(8, name="o_proj")(nn.Dense(8, name="q_proj")(h))
      logits = emb.attend(h) if self.tied else nn.Dense(20, use_bias=False, name="lm_head")(h)
      if labels is None:
        return logits
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1)) + 0.1 * jnp.mean(logp * jax.nn.one_hot(labels, 20))

  for tied in (False, True):
    model = LM(tied)
    v = jax.eval_shape(model.init, jax.random.key(0), IDS)
    t = trace_uses(model.apply, v, IDS, IDS)  # a loss over labels still ends in the head
    assert t.output_layers == {"params/embed_tokens/embedding" if tied else "params/lm_head/kernel"}
    assert t.embeddings == {"params/embed_tokens/embedding"}
    assert t.linear() == ["params/o_proj/kernel", "params/q_proj/kernel"]

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(8, 8, rngs=rngs)
      self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.hidden(x)))

  apply_fn, params, _ = lora_jax.from_nnx(Net(nnx.Rngs(0)))
  assert set(layouts(abstract_init(params, LoraSpec("all-linear", rank=2), apply_fn, X))) == {"hidden/kernel"}


def test_all_linear_keeps_a_last_layer_a_residual_bypasses():
  # The output is h + f(h): no matmul is the output layer.
  class NoHead(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x + nn.Dense(8, name="mlp")(x)

  v = jax.eval_shape(NoHead().init, jax.random.key(0), X)
  assert set(layouts(abstract_init(v, LoraSpec("all-linear", rank=2), NoHead().apply, X))) == {"params/mlp/kernel"}
  # A plain MLP ends in its output layer.
  mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  v = jax.eval_shape(mlp.init, jax.random.key(0), X)
  assert set(layouts(abstract_init(v, LoraSpec("all-linear", rank=2), mlp.apply, X))) == {"params/layers_0/kernel"}
  one = nn.Dense(3)
  v = jax.eval_shape(one.init, jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"'all-linear'\) matched no kernel: it adapts every leaf the function consumes as a matmul weight.*output layer \(\['params/kernel'\]\)"):
    abstract_init(v, LoraSpec("all-linear", rank=2), one.apply, X)


def test_without_the_function_all_linear_keeps_the_name_rule():
  model = Classifier("head")
  v = jax.eval_shape(model.init, jax.random.key(0), IDS)
  # By name: every 'kernel' (the classifier head too: its fan-out is not the vocabulary size).
  got = set(layouts(abstract_init(v, LoraSpec("all-linear", rank=2))))
  assert got == {f"params/{m}/kernel" for m in ("up", "fc", "pool", "head")}
  with pytest.raises(ValueError, match=r"without the function it adapts leaves named 'kernel'.*Pass the function and an example input"):
    abstract_init({"w": jnp.zeros((3, 3))}, LoraSpec("all-linear"))


# ---------------------------------------------------------------- module names of other conventions


def test_module_names_of_other_conventions():
  params = {
      "blocks": [
          {"q_proj": {"weight": jnp.zeros((6, 4)), "bias": jnp.zeros(6)}, "ln": {"weight": jnp.zeros(4), "bias": jnp.zeros(4)}},
          {"q_proj": {"weight": jnp.zeros((6, 4)), "bias": jnp.zeros(6)}, "ln": {"weight": jnp.zeros(4), "bias": jnp.zeros(4)}},
      ],
      "attn": {"q_einsum": {"w": jnp.zeros((4, 2, 3))}},  # haiku / Gemma style
      "body": {"query": {"weights": {"value": {"data_array": jnp.zeros((4, 2, 3))}}}},  # penzai
  }
  spec = LoraSpec(["q_proj", "q_einsum", "query"], rank=2, layout={"q_einsum|query": "ioo"})
  assert [t.path for t in spec.resolve(params)] == [
      "attn/q_einsum/w", "blocks/0/q_proj/weight", "blocks/1/q_proj/weight", "body/query/weights/value/data_array",
  ]
  # 1-D leaves named 'weight' (a norm scale) are not weights: the list never picks them.
  with pytest.raises(ValueError, match=r"no module named 'ln' holds a weight .*Module names that hold weights, nearest first: .*'q_proj'"):
    LoraSpec(["ln"]).resolve(params)
  with pytest.raises(ValueError, match=r"no module named 'q_porj' holds a weight.*nearest first: 'q_proj'"):
    LoraSpec(["q_porj"]).resolve(params)


def test_error_hints_name_only_paths_that_exist():
  params = {"ln": {"weight": jnp.zeros(4), "bias": jnp.zeros(4)}, "fc": {"weight": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}
  with pytest.raises(ValueError, match=r"'ln/weight': targeted leaf has shape \(4,\); LoRA adapts kernels with at least 2 axes.*a regex that ends in the weight leaf's name \(here: 'weight'\)") as e:
    LoraSpec(".*/weight", rank=2).resolve(params)
  assert "ln/kernel" not in str(e.value)
  with pytest.raises(ValueError, match=r"'fc/bias': targeted leaf is a bias of shape \(4,\).*Target 'fc/weight' instead") as e:
    LoraSpec("fc/.*", rank=2).resolve(params)
  with pytest.raises(ValueError, match=r"'ln/bias': targeted leaf is a bias.*Narrow the targets to weight leaves"):
    LoraSpec(lambda p, leaf: p.startswith("ln/b"), rank=2).resolve(params)
  # No leaf is a weight by name: the hint lists the paths and says the function finds weights by use.
  plain = {"enc": {"W": jnp.zeros((4, 4))}}
  with pytest.raises(ValueError, match=r"no module named 'dec'.*No leaf of these params is a weight by name.*pass the function to lora_jax.init to find weights by use. Paths: 'enc/W'"):
    LoraSpec(["dec"]).resolve(plain)
  # With the function, a leaf read by a matmul is a weight whatever its name.
  got = layouts(abstract_init(plain, LoraSpec(["enc"], rank=2), lambda p, x: x[:, :4] @ p["enc"]["W"], X))
  assert got == {"enc/W": ("io", (4, 2), (2, 4))}


# ---------------------------------------------------------------- argument order


def test_argument_order():
  params, spec, key = {"w": {"kernel": jnp.ones((4, 4))}}, LoraSpec(["w"], rank=2), jax.random.key(0)
  with pytest.raises(TypeError, match=r"lora_jax.init\(rng, params, spec, apply_fn=None, \*example_args\): the arguments are in another order: got \(params, spec, rng\). Pass the PRNG key first"):
    lora_jax.init(params, spec, key)
  with pytest.raises(TypeError, match=r"expected a LoraSpec as the third argument, got a dict"):
    lora_jax.init(key, params, {"targets": ["w"]})
  with pytest.raises(TypeError, match=r"expected a PRNG key as the first argument, e.g. jax.random.key\(0\), got a int"):
    lora_jax.init(0, params, spec)
  with pytest.raises(TypeError, match=r"apply_fn must be the function that uses params, got a ArrayImpl. Pass the function before the example input"):
    lora_jax.init(key, params, spec, X)
  with pytest.raises(TypeError, match=r"split\(rng, params, spec.*another order: got \(params, rng, spec\)"):
    lora_jax.split(params, key, spec)
  # split(params, spec, rng), the old order, still works and warns.
  with pytest.warns(DeprecationWarning, match=r"split\(params, spec, rng\) is deprecated: call lora_jax.split\(rng, params, spec\)"):
    frozen, old = lora_jax.split(params, spec, key)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    frozen_new, new = lora_jax.split(key, params, spec)
    raw = lora_jax.init(jax.random.PRNGKey(0), params, spec)  # a raw uint32 key works too
  assert frozen is frozen_new is params
  np.testing.assert_array_equal(old["w"]["kernel"].a, new["w"]["kernel"].a)
  assert raw["w"]["kernel"].a.shape == (4, 2)


# ---------------------------------------------------------------- the transform's side (lead)


def test_explain_shows_layouts():
  model = nn.DenseGeneral((2, 4))
  v = model.init(jax.random.key(0), X)
  ad = lora_jax.init(jax.random.key(1), v, LoraSpec(["params"], rank=2), model.apply, X)
  report = lora_jax.explain(model.apply, v, ad, X)
  assert report.layouts == {"params/kernel": "ioo"}
  assert re.search(r"^path +layout +use$", str(report), re.M)
  assert re.search(r"^params/kernel +ioo +dot_general: factored$", str(report), re.M)


def test_wrap_warns_for_a_transposed_2d_use():
  fn = lambda p, x: x @ p["proj"]["weight"].T  # (out, in)
  params = {"proj": {"weight": jnp.ones((6, 8))}}
  ad = lora_jax.init(jax.random.key(1), params, LoraSpec(["proj"], rank=2))  # no function: 'io'
  with pytest.warns(lora_jax.LoraLayoutWarning, match=r"'proj/weight': its layout 'io' looks wrong"):
    lora_jax.wrap(fn)(params, ad, X)
