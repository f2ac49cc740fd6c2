"""The Llama model's speed options: ``elementwise_remat``, ``rope_dtype``, ``logits_dtype``.

Each is checked against an independent reference (the default float32 path, Hugging Face's own
``apply_rotary_pos_emb`` in torch, a float64 hand computation), with gradients, and for what
makes it faster (fewer or smaller saved residuals, compute-dtype GEMMs in the head's backward),
which are properties of the traced program, not timings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from _util import assert_close, assert_trees_close, random_adapters
from lora_jax.models import llama as L


def _setup(**kw):
  config = L.LlamaConfig.tiny(**kw)
  model = L.LlamaForCausalLM(config)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  return config, model, params, tokens


def _loss_and_grad(model, params, tokens, **kw):
  return jax.jit(jax.value_and_grad(lambda p: model.apply(p, tokens, method="loss", **kw)))(params)


@pytest.mark.parametrize("scan", [True, False])
def test_elementwise_remat_changes_no_value_or_gradient(scan):
  base, model, params, tokens = _setup(scan_layers=scan, remat=False)
  fast = L.LlamaForCausalLM(base.replace(elementwise_remat=True))
  want = _loss_and_grad(model, params, tokens)
  got = _loss_and_grad(fast, params, tokens)
  assert_close(got[0], want[0], 1e-6)
  assert_trees_close(got[1], want[1], 1e-5)


def _residual_shapes(model, params, tokens):
  """Shapes and dtypes of what the backward pass keeps: the leaves of the vjp closure."""
  f = lambda p: model.apply(p, tokens, method="loss")  # noqa: E731
  _, f_vjp = jax.vjp(f, params)
  return [(tuple(x.shape), jnp.dtype(x.dtype)) for x in jax.tree.leaves(f_vjp)]


def test_elementwise_remat_saves_no_float32_activations():
  """bf16 compute without layer remat: the backward keeps no float32 copy of the residual stream
  (``(B, T, D)``) and no SwiGLU intermediate (``(B, T, F)``) beyond gate, up and the product."""
  config, model, params, tokens = _setup(scan_layers=False, remat=False, dtype=jnp.bfloat16)
  b, t = tokens.shape
  stream = (b, t, config.hidden_size)
  mlp = (b, t, config.intermediate_size)

  def count(shapes):
    return dict(f32_stream=sum(s == stream and d == jnp.float32 for s, d in shapes),
                mlp=sum(s == mlp for s, d in shapes))

  before = count(_residual_shapes(model, params, tokens))
  after = count(_residual_shapes(L.LlamaForCausalLM(config.replace(elementwise_remat=True)), params, tokens))
  layers = config.num_hidden_layers
  assert before["f32_stream"] >= 2 * layers, before  # each norm keeps its float32 input
  assert after["f32_stream"] == 0, after
  # gate, up and their product (down_proj's input, for its kernel's gradient); before: 6 a layer
  assert after["mlp"] <= 3 * layers < before["mlp"], (before, after)


def test_rope_in_compute_dtype_matches_hugging_face():
  torch = pytest.importorskip("torch")
  hf = pytest.importorskip("transformers.models.llama.modeling_llama")
  config = L.LlamaConfig.tiny(dtype=jnp.bfloat16)
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 16, 4, config.head_dim)).astype(np.float32)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  cos, sin = L.rope_cos_sin(positions, config)
  xq = jnp.asarray(q, jnp.bfloat16)
  ours = L.apply_rope(xq, cos, sin, config.replace(rope_dtype=None).rope_dtype)
  # Hugging Face: (B, heads, T, hd) with cos/sin cast to the query's dtype, all in bf16
  tq = torch.from_numpy(q).to(torch.bfloat16).transpose(1, 2)
  tc = torch.from_numpy(np.array(cos)).to(torch.bfloat16)
  ts = torch.from_numpy(np.array(sin)).to(torch.bfloat16)
  ref, _ = hf.apply_rotary_pos_emb(tq, tq, tc, ts)
  ref = ref.transpose(1, 2).float().numpy()
  exact32 = np.asarray(L.apply_rope(jnp.asarray(q), cos, sin), np.float64)
  err_ours = np.abs(np.asarray(ours, np.float64) - ref).max()
  # Both are bf16 computations of the same rotation: within a couple of bf16 rounding steps
  # of each other and of the float32 rotation of the same inputs.
  assert err_ours <= 2 ** -7 * np.abs(exact32).max(), err_ours
  assert_close(np.asarray(ours, np.float32), exact32, 2 ** -6)
  assert ours.dtype == jnp.bfloat16


def test_bf16_logits_are_the_float32_logits_rounded():
  config, model, params, tokens = _setup(dtype=jnp.bfloat16)
  fast = L.LlamaForCausalLM(config.replace(logits_dtype=None))
  want = np.asarray(jax.jit(model.apply)(params, tokens))
  got = np.asarray(jax.jit(fast.apply)(params, tokens))
  assert got.dtype == np.float32
  rounded = np.asarray(jnp.asarray(want).astype(jnp.bfloat16).astype(jnp.float32))
  # the product is written once in bf16: at most one bf16 step from the rounded float32 product
  assert_close(got, rounded, 2 ** -8, scale=np.abs(want).max())
  assert not np.array_equal(got, want)  # it did round


def _dot_input_dtypes(jaxpr, out_dim):
  """Input dtypes of every dot_general (nested jaxprs included) with an operand dimension ``out_dim``."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and any(out_dim in v.aval.shape for v in eqn.invars):
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for value in eqn.params.values():
      for x in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(x, "jaxpr", x)  # a ClosedJaxpr's jaxpr, or a Jaxpr
        if hasattr(sub, "eqns"):
          found += _dot_input_dtypes(sub, out_dim)
  return found


@pytest.mark.parametrize("chunk", [None, 8])
def test_bf16_logits_keep_the_head_backward_in_bf16(chunk):
  config, model, params, tokens = _setup(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, vocab_size=96)
  v = config.vocab_size

  def dtypes(m):
    f = lambda p: m.apply(p, tokens, method="loss", chunk_size=chunk)  # noqa: E731
    return _dot_input_dtypes(jax.make_jaxpr(jax.grad(f))(params).jaxpr, v)

  default = dtypes(model)
  fast = dtypes(L.LlamaForCausalLM(config.replace(logits_dtype=None)))
  assert any("float32" in d for d in default), default  # the float32 cotangent meets the head
  assert fast and all(d == ("bfloat16", "bfloat16") for d in fast), fast
  # and the loss and gradient stay close to the float32-logits ones
  want = _loss_and_grad(model, params, tokens, chunk_size=chunk)
  got = _loss_and_grad(L.LlamaForCausalLM(config.replace(logits_dtype=None)), params, tokens, chunk_size=chunk)
  assert_close(got[0], want[0], 2e-2)
  assert_close(got[1]["params"]["lm_head"]["kernel"], want[1]["params"]["lm_head"]["kernel"], 5e-2)


def test_wrap_keeps_a_targeted_bf16_head_factored():
  """LoRA on lm_head with bf16 logits: ``fallback='error'`` passes (nothing materialised), and the
  loss and gradients equal the hand-merged model's."""
  config, model, params, tokens = _setup(logits_dtype=None, elementwise_remat=True, rope_dtype=None)
  spec = lora_jax.LoraSpec(["lm_head", "v_proj", "down_proj"], rank=4, alpha=8.0, layout=L.lora_layout(config))
  adapters = random_adapters(params, spec, std=0.1)
  loss = lora_jax.wrap(functools.partial(model.apply, method="loss"), fallback="error")
  got = jax.jit(jax.value_and_grad(lambda ad: loss(params, ad, tokens)))(adapters)
  want = jax.jit(jax.value_and_grad(lambda ad: model.apply(lora_jax.merge(params, ad), tokens, method="loss")))(adapters)
  assert_close(got[0], want[0], 1e-5)
  assert_trees_close(got[1], want[1], 1e-4)


def test_speed_options_validate():
  with pytest.raises(ValueError, match="logits_dtype"):
    L.LlamaConfig.tiny(logits_dtype=jnp.int32)
  c = L.LlamaConfig.tiny(dtype=jnp.bfloat16, rope_dtype=None, logits_dtype=None)
  assert c.rope_dtype == jnp.bfloat16 and c.logits_dtype == jnp.bfloat16
  assert L.LlamaConfig.tiny().rope_dtype == jnp.float32
