"""Third-party model code, unchanged, through lora_jax: a Hugging Face Flax GPT-2 (transformers
4.x), a flaxmodels ResNet-18, an equinox ViT-style model, a penzai Llama-style transformer and an
NNX MultiHeadAttention model. CPU, tiny configs, random init, no downloads.

For each: ``init`` with the function selects the expected kernels with the expected layouts (no
layout stated), ``explain`` reports every use factored, the wrapped outputs and adapter
gradients equal ``apply(merge(...))``, and a few optax steps lower the loss.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import LoraFactors, LoraSpec
from lora_jax._paths import leaves_with_paths, path_str


def _factors(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, LoraFactors))
  return {path_str(p): f for p, f in flat if isinstance(f, LoraFactors)}


def _randomize(adapters, params, seed=0):
  """Both factors random, sized so that ``scale * a @ b`` is about half the kernel's spread:
  large enough to change the output, small enough to keep the float32 reference accurate."""
  rng = np.random.default_rng(seed)
  spread = {p: float(np.std(np.asarray(w))) or 1.0 for p, w in leaves_with_paths(params)}

  def fill(path, f):
    if not isinstance(f, LoraFactors):
      return f
    s = spread[path_str(path)]
    a = rng.standard_normal(f.a.shape) * 0.5 / np.sqrt(f.rank)
    b = rng.standard_normal(f.b.shape) * s / f.scale
    return f.replace(a=jnp.asarray(a, f.a.dtype), b=jnp.asarray(b, f.b.dtype))

  return jax.tree_util.tree_map_with_path(fill, adapters, is_leaf=lambda x: isinstance(x, LoraFactors))


def _close(got, want, rel, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  tol = rel * max(float(np.max(np.abs(want))), 1e-30)
  err = float(np.max(np.abs(got - want)))
  assert err <= tol, f"{what}: max |difference| {err:.3g} > {tol:.3g}"
  return tol


def check_model(fn, params, spec, args, expected, loss_fn, *, lr=1e-2, steps=3):
  """The checks every third-party model gets (see the module docstring)."""
  adapters = lora_jax.init(jax.random.key(1), params, spec, fn, *args)
  got = {p: f.layout for p, f in _factors(adapters).items()}
  assert got == expected

  report = lora_jax.explain(fn, params, adapters, *args)
  assert not report.fallbacks and not report.unused, str(report)
  assert {u.path for u in report.uses} == set(expected) and all(u.factored for u in report.uses)

  lora_apply = lora_jax.wrap(fn)

  def wrapped(ad, p):
    out = lora_apply(p, ad, *args)
    return loss_fn(out), out

  def merged(ad, p):
    out = fn(lora_jax.merge(p, ad), *args)
    return loss_fn(out), out

  grad_w = jax.jit(jax.value_and_grad(wrapped, has_aux=True))
  grad_m = jax.jit(jax.value_and_grad(merged, has_aux=True))

  # Training from the fresh adapters (b = 0: the base model) lowers the loss.
  tx = optax.adam(lr)
  update = jax.jit(lambda g, state, ad: tx.update(g, state, ad))
  ad, state = adapters, tx.init(adapters)
  losses = []
  for _ in range(steps):
    (loss, out), g = grad_w(ad, params)
    if not losses:
      base = out  # the base model's output
    losses.append(float(loss))
    updates, state = update(g, state, ad)
    ad = optax.apply_updates(ad, updates)
  assert losses[-1] < losses[0], losses

  # Both factors random: the wrapped outputs, loss and adapter gradients equal merge's.
  ad = _randomize(adapters, params)
  (loss_w, out_w), g_w = grad_w(ad, params)
  (loss_m, out_m), g_m = grad_m(ad, params)
  tol = _close(out_w, out_m, 1e-4, "outputs")
  # The adapters really change the output (so the comparison above can fail).
  assert float(np.max(np.abs(np.asarray(out_m) - np.asarray(base)))) > 100 * tol
  _close(loss_w, loss_m, 1e-4, "loss")
  fw, fm = _factors(g_w), _factors(g_m)
  assert set(fw) == set(fm) == set(expected)
  for path in fw:
    for leaf in ("a", "b"):
      _close(getattr(fw[path], leaf), getattr(fm[path], leaf), 2e-3, f"grad {path}/{leaf}")
  return adapters


def _random_like(shapes, seed=0):
  """Params with the shapes of ``shapes`` (from ``jax.eval_shape`` of a model's init) filled
  from numpy, with no compilation: kernels ~ N(0, 1/prod(shape[:-1])), norm scales and
  variances 1, biases and means 0."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path_str(path).rsplit("/", 1)[-1]
    if name in ("scale", "var", "variance") or (name == "weight" and len(s.shape) < 2):
      return jnp.ones(s.shape, s.dtype)
    if len(s.shape) < 2 or name in ("bias", "mean"):
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _xent(labels):
  return lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# ---------------------------------------------------------------- Hugging Face Flax


def test_hf_flax_gpt2():
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxGPT2LMHeadModel"):
    pytest.fail(
        f"transformers {transformers.__version__} has no Flax models; the interop extra pins "
        "transformers<5: pip install -e '.[test,interop]'"
    )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # transformers' own deprecation notes for its Flax classes
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    model = transformers.FlaxGPT2LMHeadModel(config, _do_init=False)
  params = _random_like(jax.eval_shape(lambda k: model.init_weights(k, (1, 6)), jax.random.key(0)))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)), jnp.int32)

  def fn(params, ids):
    return model(ids, params=params, train=False).logits

  # GPT-2's Conv1D kernels are stored (out, in): read as 'oi'. The tied head (wte) is an
  # embedding and the output layer; wpe is an embedding.
  expected = {
      f"transformer/h/0/{m}/kernel": "oi"
      for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
  }
  ad = check_model(fn, params, LoraSpec("all-linear", rank=4, alpha=8), (ids,), expected, _xent(jnp.roll(ids, -1, 1)))
  f = _factors(ad)["transformer/h/0/attn/c_attn/kernel"]
  assert (f.a.shape, f.b.shape) == ((32, 4), (4, 96))  # fan-in 32, fan-out 96 (q, k, v)


# ---------------------------------------------------------------- flaxmodels


def test_flaxmodels_resnet18():
  fm = pytest.importorskip("flaxmodels")
  model = fm.ResNet18(output="logits", pretrained=None, num_classes=10)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
  variables = _random_like(jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0)))

  def fn(variables, x):
    return model.apply(variables, x, train=False)

  convs = [f"params/BasicBlock_7/Conv_{k}/kernel" for k in range(2)]
  spec = LoraSpec(r"params/(BasicBlock_7/Conv_\d+|Dense_0)/kernel", rank=4)
  expected = {**{c: "iiio" for c in convs}, "params/Dense_0/kernel": "io"}
  check_model(fn, variables, spec, (x,), expected, _xent(jnp.array([1, 7])), lr=1e-3)
  # "all-linear": the only matmul is the classifier, the output layer.
  with pytest.raises(ValueError, match=r"'all-linear'\) matched no kernel.*output layer \(\['params/Dense_0/kernel'\]\)"):
    lora_jax.init(jax.random.key(0), variables, LoraSpec("all-linear"), fn, x)


# ---------------------------------------------------------------- equinox


def test_equinox_vit():
  eqx = pytest.importorskip("equinox")

  class ViT(eqx.Module):
    patch: eqx.nn.Conv2d
    attn: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, key):
      k = jax.random.split(key, 4)
      self.patch = eqx.nn.Conv2d(3, 16, kernel_size=4, stride=4, key=k[0])  # OIHW
      self.attn = eqx.nn.MultiheadAttention(num_heads=2, query_size=16, key=k[1])
      self.norm = eqx.nn.LayerNorm(16)
      self.mlp = eqx.nn.MLP(16, 16, width_size=32, depth=1, key=k[2])
      self.head = eqx.nn.Linear(16, 5, key=k[3])

    def __call__(self, img):
      h = self.patch(img).reshape(16, -1).T  # (tokens, 16)
      h = h + self.attn(h, h, h)
      h = h + jax.vmap(self.mlp)(jax.vmap(self.norm)(h))
      return self.head(h.mean(0))

  shapes, static = eqx.partition(eqx.filter_eval_shape(ViT, jax.random.key(0)), lambda x: isinstance(x, jax.ShapeDtypeStruct))
  params = _random_like(shapes)

  def fn(params, img):
    return jax.vmap(eqx.combine(params, static))(img)

  img = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8, 8)), jnp.float32)
  linear = ["attn/query_proj", "attn/key_proj", "attn/value_proj", "attn/output_proj", "mlp/layers/0", "mlp/layers/1"]
  # "all-linear": equinox's (out, in) Linear weights, not the head (the output layer).
  ad = lora_jax.init(jax.random.key(0), params, LoraSpec("all-linear", rank=2), fn, img)
  assert {p: f.layout for p, f in _factors(ad).items()} == {f"{m}/weight": "oi" for m in linear}
  # Module names select equinox 'weight' leaves; the OIHW conv is read as 'oiii'.
  expected = {"patch/weight": "oiii", **{f"{m}/weight": "oi" for m in linear}, "head/weight": "oi"}
  ad = check_model(fn, params, LoraSpec(["patch", "attn", "mlp", "head"], rank=2), (img,), expected, _xent(jnp.array([0, 3])))
  f = _factors(ad)["patch/weight"]
  assert (f.a.shape, f.b.shape) == ((3, 4, 4, 2), (2, 16))


# ---------------------------------------------------------------- penzai


def test_penzai_llamalike():
  pytest.importorskip("penzai")
  from penzai import pz
  from penzai.models.transformer.variants import llamalike_common as ll

  config = ll.LlamalikeTransformerConfig(
      num_kv_heads=2, query_head_multiplier=1, embedding_dim=16, projection_dim=4, mlp_hidden_dim=32,
      num_decoder_blocks=1, vocab_size=24, mlp_variant="swiglu", tie_embedder_and_logits=False,
  )
  # An "rbg" key: penzai initialises eagerly, and rbg's random ops compile faster than threefry's.
  params = pz.freeze_params(ll.build_llamalike_transformer(config, init_base_rng=jax.random.key(0, impl="rbg")))

  def fn(model, ids):
    return model(pz.nx.wrap(ids).tag("batch", "seq")).unwrap("batch", "seq", "vocabulary")

  ids = jnp.asarray(np.random.default_rng(0).integers(0, 24, (2, 5)), jnp.int32)
  w = "weights/value/data_array"
  per_block = {
      f"sublayers/0/delta/sublayers/1/input_to_query/sublayers/0/{w}": "ioo",  # (embed, heads, dim)
      f"sublayers/0/delta/sublayers/1/input_to_key/sublayers/0/{w}": "ioo",
      f"sublayers/0/delta/sublayers/1/input_to_value/sublayers/0/{w}": "ioo",
      f"sublayers/0/delta/sublayers/1/attn_value_to_output/sublayers/1/{w}": "iio",
      f"sublayers/1/delta/sublayers/1/sublayers/0/branches/0/sublayers/0/{w}": "io",
      f"sublayers/1/delta/sublayers/1/sublayers/0/branches/1/{w}": "io",
      f"sublayers/1/delta/sublayers/1/sublayers/1/{w}": "io",
  }
  # Not the embedding table, not the logits projection (the output layer), not the norms' 1-D weights.
  expected = {f"body/sublayers/1/{k}": v for k, v in per_block.items()}
  check_model(fn, params, LoraSpec("all-linear", rank=2), (ids,), expected, _xent(jnp.roll(ids, -1, 1)))
  # A module-name list works on penzai's names too.
  spec = LoraSpec(["input_to_query", "attn_value_to_output"], rank=2)
  got = {t.path: t.layout for t in spec.resolve(params, lora_jax.layout.trace_uses(fn, params, ids))}
  assert got == {k: v for k, v in expected.items() if "input_to_query" in k or "attn_value_to_output" in k}


# ---------------------------------------------------------------- NNX


def test_nnx_multi_head_attention():
  from flax import nnx

  class Encoder(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(20, 16, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=rngs)
      self.mix = nnx.LinearGeneral(16, (2, 8), rngs=rngs)  # (in, heads, dim)
      self.out = nnx.LinearGeneral((2, 8), 4, axis=(-2, -1), rngs=rngs)  # the classifier head

    def __call__(self, ids):
      h = self.embed(ids)
      h = h + self.attn(h)
      return self.out(self.mix(h)).mean(axis=1)

  apply_fn, params, _ = lora_jax.from_nnx(Encoder(nnx.Rngs(0)))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 20, (2, 5)), jnp.int32)
  expected = {
      "attn/query/kernel": "ioo", "attn/key/kernel": "ioo", "attn/value/kernel": "ioo",
      "attn/out/kernel": "iio", "mix/kernel": "ioo",
  }
  check_model(apply_fn, params, LoraSpec("all-linear", rank=2), (ids,), expected, _xent(jnp.array([1, 2])))
