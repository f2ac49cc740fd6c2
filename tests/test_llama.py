"""lora_jax.models.llama: numerics against transformers, the checkpoint loader, LoRA on top."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from _util import assert_close, assert_far, assert_trees_close
from lora_jax.models import llama as L

V, D, F, H, KV = 128, 64, 128, 4, 2
# Tolerances are relative to the largest value compared (tests/_util.py: assert_close).
HF_RTOL = 1e-4  # JAX vs transformers, float32, a whole model (measured: <= 1e-6 of max|logit|)
ORDER_RTOL = 2e-5  # JAX vs JAX, the same math in another order (factored vs merged, scan vs not)
GRAD_RTOL = 1e-4  # adapter / parameter gradients through a whole model, leaf by leaf


@pytest.fixture(autouse=True)
def _exact_matmuls():
  # On GPU, float32 matmuls default to TF32; the 1e-4 comparisons need real float32.
  with jax.default_matmul_precision("highest"):
    yield


def _config(**kw) -> L.LlamaConfig:
  return L.LlamaConfig.tiny(initializer_range=0.1, **kw)


@functools.partial(jax.jit, static_argnums=0)
def _init(config: L.LlamaConfig, key: jax.Array) -> dict:
  return L.LlamaForCausalLM(config).init(key, jnp.zeros((1, 8), jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _logits(config: L.LlamaConfig, params: dict, tokens: jax.Array, mask: jax.Array | None = None):
  return L.LlamaForCausalLM(config).apply(params, tokens, attention_mask=mask)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _losses(config: L.LlamaConfig, params: dict, tokens: jax.Array, labels: jax.Array, chunk: int):
  """(loss, chunked loss, causal_lm_loss of the logits), under one jit to save compiles."""
  model = L.LlamaForCausalLM(config)
  full = model.apply(params, tokens, labels, method="loss")
  chunked = model.apply(params, tokens, labels, method="loss", chunk_size=chunk)
  return full, chunked, L.causal_lm_loss(model.apply(params, tokens), labels)


def _tokens(b: int = 2, t: int = 12, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, V, (b, t)).astype(np.int32)


def _random_sd(config: L.LlamaConfig, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shapes = L.hf_param_shapes(config, include_tied_lm_head=True)
  sd = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
  if config.tie_word_embeddings:
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()
  return sd


# ----------------------------------------------------------------------------------------------
# Against transformers
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _hf(tied: bool, layers: int = 2, rope_scaling: tuple | None = None):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=V,
      hidden_size=D,
      intermediate_size=F,
      num_hidden_layers=layers,
      num_attention_heads=H,
      num_key_value_heads=KV,
      max_position_embeddings=256,
      rope_theta=5000.0,
      rope_scaling=dict(rope_scaling) if rope_scaling else None,
      tie_word_embeddings=tied,
      initializer_range=0.1,
      attn_implementation="eager",
  )
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # initialised to ones: randomise so that a wrong mapping shows
        p.uniform_(0.5, 1.5)
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return torch, model, hf_config, sd


def _hf_logits(torch, model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask).long()}
    return model(torch.from_numpy(tokens).long(), **kw).logits.numpy()


@pytest.mark.interop
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers(scan: bool, tied: bool):
  torch, model, hf_config, sd = _hf(tied)
  config = L.llama_config_from_hf(hf_config, scan_layers=scan, remat=scan)
  assert config.tie_word_embeddings == tied and config.head_dim == D // H
  params = L.load_hf_llama(sd, config)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert all(x.dtype == jnp.float32 for _, x in leaves)
  assert ("lm_head" in params["params"]) == (not tied)
  tokens = _tokens()
  want = _hf_logits(torch, model, tokens)
  got = np.asarray(_logits(config, params, tokens))
  assert got.dtype == np.float32 and np.std(want) > 0.1
  assert_close(got, want, HF_RTOL)
  # torch tensors are accepted directly, too.
  from_torch = L.load_hf_llama(model.state_dict(), config)
  jax.tree.map(np.testing.assert_array_equal, from_torch, params)
  back = L.to_hf_llama(params, config)
  assert list(back) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.interop
def test_loss_and_padding_match_transformers():
  torch, model, hf_config, sd = _hf(False)
  config = L.llama_config_from_hf(hf_config)
  params = L.load_hf_llama(sd, config)
  tokens = _tokens()
  labels = tokens.copy()
  labels[0, 3:6] = -100
  with torch.no_grad():
    want = model(torch.from_numpy(tokens).long(), labels=torch.from_numpy(labels).long()).loss.item()
  for got in _losses(config, params, tokens, labels, 5):
    np.testing.assert_allclose(float(got), want, rtol=1e-5)

  mask = np.ones_like(tokens)
  mask[1, 8:] = 0  # right padding
  mask[0, :2] = 0  # left padding
  want = _hf_logits(torch, model, tokens, mask)
  got = np.asarray(_logits(config, params, tokens, mask))
  keep = mask.astype(bool)
  assert_close(got[keep], want[keep], HF_RTOL)


@pytest.mark.interop
def test_llama3_rope_scaling_matches_transformers():
  scaling = (
      ("rope_type", "llama3"),
      ("factor", 8.0),
      ("low_freq_factor", 1.0),
      ("high_freq_factor", 4.0),
      ("original_max_position_embeddings", 16),
  )
  torch, model, hf_config, sd = _hf(False, 1, scaling)
  config = L.llama_config_from_hf(hf_config)
  assert config.rope_scaling == L.RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
  np.testing.assert_allclose(L.rope_inv_freq(config), model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
  tokens = _tokens(1, 40)
  got = np.asarray(_logits(config, L.load_hf_llama(sd, config), tokens))
  assert_close(got, _hf_logits(torch, model, tokens), HF_RTOL)


@pytest.mark.interop
def test_safetensors_both_ways(tmp_path):
  torch, model, hf_config, sd = _hf(True)
  import transformers

  config = L.llama_config_from_hf(hf_config)
  model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  assert L.llama_config_from_hf(tmp_path / "sharded") == config
  params = L.load_hf_llama(tmp_path / "sharded", config)
  jax.tree.map(np.testing.assert_array_equal, params, L.load_hf_llama(sd, config))

  # Our export loads in transformers and computes the same logits.
  L.save_hf_llama(params, config, tmp_path / "ours")
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
  tokens = _tokens()
  assert_close(_hf_logits(torch, reloaded, tokens), _hf_logits(torch, model, tokens), ORDER_RTOL)  # same weights; sdpa vs eager


# ----------------------------------------------------------------------------------------------
# Loader (no torch needed)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_round_trip_is_exact(scan: bool, tied: bool, dtype):
  config = _config(scan_layers=scan, tie_word_embeddings=tied, param_dtype=dtype)
  sd = _random_sd(config, np.dtype(dtype))
  params = L.load_hf_llama(sd, config)
  shapes = jax.eval_shape(functools.partial(_init, config), jax.random.key(0))
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shapes)):
    assert (x.shape, x.dtype) == (s.shape, s.dtype), path
  back = L.to_hf_llama(params, config)
  assert list(back) == list(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  if tied:
    assert "lm_head.weight" not in L.to_hf_llama(params, config, include_tied_lm_head=False)


def test_safetensors_sharded_directory(tmp_path):
  config = _config()
  sd = _random_sd(config)
  params = L.load_hf_llama(sd, config)
  L.save_hf_llama(params, config, tmp_path / "single")
  assert L.llama_config_from_hf(tmp_path / "single") == config
  for src in (tmp_path / "single", tmp_path / "single" / "model.safetensors"):
    jax.tree.map(np.testing.assert_array_equal, L.load_hf_llama(src, config), params)

  from safetensors.numpy import save_file

  shard = tmp_path / "sharded"
  shard.mkdir()
  names = list(sd)
  weight_map = {}
  for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
    fname = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: sd[k] for k in part}, str(shard / fname))
    weight_map.update({k: fname for k in part})
  index = json.dumps({"metadata": {}, "weight_map": weight_map})
  (shard / "model.safetensors.index.json").write_text(index)
  jax.tree.map(np.testing.assert_array_equal, L.load_hf_llama(shard, config), params)
  host = L.load_hf_llama(shard, config, to_device=False)
  assert isinstance(host["params"]["norm"]["scale"], np.ndarray)


def test_loader_errors(tmp_path):
  config = _config()
  sd = _random_sd(config)
  del sd["lm_head.weight"]
  with pytest.raises(ValueError, match=r"lacks 1 key\(s\).*'lm_head.weight'.*tie_word_embeddings=True"):
    L.load_hf_llama(sd, config)
  sd = _random_sd(config)
  match = r"lacks 9 key\(s\).*'model.layers.1.self_attn.q_proj.weight'.*checkpoint has 1 layers, the config 2"
  with pytest.raises(ValueError, match=match):
    L.load_hf_llama({k: v for k, v in sd.items() if ".layers.1." not in k}, config)
  with_bias = {**sd, "model.layers.0.self_attn.q_proj.bias": np.zeros(D, np.float32)}
  match = r"1 key\(s\) this config does not use: 'model.layers.0.self_attn.q_proj.bias'.*bias.*strict=False"
  with pytest.raises(ValueError, match=match):
    L.load_hf_llama(with_bias, config)
  L.load_hf_llama(with_bias, config, strict=False)
  L.load_hf_llama({**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)}, config)
  bad = {**sd, "model.layers.1.self_attn.k_proj.weight": np.zeros((D, D), np.float32)}
  with pytest.raises(
      ValueError,
      match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(64, 64\), but the config expects "
      r"\(32, 64\) = \(out, in\) = \(num_key_value_heads \* head_dim = 2 \* 16, hidden_size\)",
  ):
    L.load_hf_llama(bad, config)
  tied = config.replace(tie_word_embeddings=True)
  with pytest.raises(ValueError, match=r"tie_word_embeddings=True but .* 'lm_head.weight' differs"):
    L.load_hf_llama(sd, tied)
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
  with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*Pickled checkpoints"):
    L.load_hf_llama(tmp_path, config)
  with pytest.raises(ValueError, match=r"not a .safetensors file.*Pickled"):
    L.load_hf_llama(tmp_path / "pytorch_model.bin", config)
  with pytest.raises(TypeError, match=r"expected a dict name -> array"):
    L.load_hf_llama(42, config)
  params = L.load_hf_llama(sd, config)
  match = r"to_hf_llama: params do not fit the config; unexpected: 'lm_head/kernel'.*tie_word_embeddings=True"
  with pytest.raises(ValueError, match=match):
    L.to_hf_llama(params, tied)
  match = r"missing: 'layers_0/self_attn/q_proj/kernel'.*unexpected: 'layers/input_layernorm/scale'"
  with pytest.raises(ValueError, match=match):
    L.to_hf_llama(params, config.replace(scan_layers=False))
  match = r"'layers/mlp/gate_proj/kernel' has shape \(2, 64, 128\), but the config expects \(2, 64, 256\)"
  with pytest.raises(ValueError, match=match):
    L.to_hf_llama(params, config.replace(intermediate_size=256))


def test_config_errors():
  with pytest.raises(ValueError, match=r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
    L.LlamaConfig.tiny(num_key_value_heads=3)
  with pytest.raises(ValueError, match=r"hidden_size=66 is not divisible by num_attention_heads=4; pass"):
    L.LlamaConfig.tiny(hidden_size=66)
  assert L.LlamaConfig.tiny(hidden_size=66, head_dim=16).head_dim == 16
  with pytest.raises(ValueError, match=r"remat_policy='dots'.*expected one of"):
    L.LlamaConfig.tiny(remat_policy="dots")
  with pytest.raises(ValueError, match=r"scan_unroll=-1.*integer >= 0"):
    L.LlamaConfig.tiny(scan_unroll=-1)
  with pytest.raises(ValueError, match=r"attention_implementation='flash'.*'xla', 'cudnn' or None"):
    L.LlamaConfig.tiny(attention_implementation="flash")
  with pytest.raises(ValueError, match=r"rope_scaling type 'yarn' is not supported"):
    L.LlamaConfig.tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0})
  base = L.llama_config_to_hf(L.LlamaConfig.tiny())
  with pytest.raises(ValueError, match=r"attention_bias=True is not supported"):
    L.llama_config_from_hf({**base, "attention_bias": True})
  with pytest.raises(ValueError, match=r"hidden_act='gelu' is not supported"):
    L.llama_config_from_hf({**base, "hidden_act": "gelu"})
  with pytest.raises(TypeError, match=r"expected a transformers config, a dict, or a path"):
    L.llama_config_from_hf(3)
  assert L.llama_config_from_hf(base, scan_layers=True) == L.LlamaConfig.tiny()


# ----------------------------------------------------------------------------------------------
# Model variants, dtypes, losses, LoRA
# ----------------------------------------------------------------------------------------------


def test_scan_remat_and_unrolled_agree_with_gradients():
  scanned = _config(remat_policy="dots_with_no_batch_dims_saveable")
  unrolled = _config(scan_layers=False, remat=False)
  params = _init(scanned, jax.random.key(1))
  flat = L.load_hf_llama(L.to_hf_llama(params, scanned), unrolled)
  tokens = _tokens()

  def loss(config, p):
    return L.LlamaForCausalLM(config).apply(p, tokens, method="loss")

  l1, g1 = jax.jit(jax.value_and_grad(functools.partial(loss, scanned)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(functools.partial(loss, unrolled)))(flat)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  g2 = L.load_hf_llama(L.to_hf_llama(g2, unrolled), scanned)
  assert_trees_close(g1, g2, GRAD_RTOL)


def test_bfloat16_compute_and_chunked_loss():
  config = _config(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model = L.LlamaForCausalLM(config)
  params = _init(config, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  tokens = _tokens()

  @jax.jit
  def run(params):
    hidden = model.apply(params, tokens, method="hidden_states")
    return hidden, model.apply(params, tokens), *_losses(config, params, tokens, tokens, 7)

  hidden, logits, full, chunked, from_logits = run(params)
  assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  np.testing.assert_allclose(chunked, full, rtol=1e-3)
  np.testing.assert_allclose(from_logits, full, rtol=1e-6)


def test_chunked_loss_gradients_match():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 50, (2, 9)))
  m = jnp.asarray(rng.integers(0, 2, (2, 9)))
  full = jax.jit(jax.grad(lambda h, w: L.causal_lm_loss(jnp.dot(h, w), y, m), (0, 1)))(h, w)
  chunk = jax.jit(jax.grad(lambda h, w: L.chunked_causal_lm_loss(h, w, y, m, chunk_size=4), (0, 1)))(h, w)
  assert_trees_close(full, chunk, ORDER_RTOL)
  with pytest.raises(ValueError, match=r"chunk_size=0"):
    L.chunked_causal_lm_loss(h, w, y, chunk_size=0)
  assert float(L.causal_lm_loss(jnp.dot(h, w), y, jnp.zeros_like(m))) == 0.0


def _randomise_b(adapters, key: jax.Array):
  is_factors = lambda x: isinstance(x, lora_jax.LoraFactors)
  leaves, treedef = jax.tree.flatten(adapters, is_leaf=is_factors)
  keys = iter(jax.random.split(key, len(leaves)))
  out = [
      lora_jax.LoraFactors(f.a, 0.1 * jax.random.normal(next(keys), f.b.shape), f.scale, f.layout)
      if is_factors(f)
      else f
      for f in leaves
  ]
  return jax.tree.unflatten(treedef, out)


def test_lora_wrap_equals_merge():
  config = _config()
  model = L.LlamaForCausalLM(config)
  params = _init(config, jax.random.key(0))
  spec = lora_jax.LoraSpec(["q_proj", "v_proj"], rank=4, layout=L.lora_layout(config))
  adapters = jax.jit(lambda k, p: _randomise_b(lora_jax.init(k, p, spec), k))(jax.random.key(1), params)
  f = adapters["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert f.a.shape == (2, D, 4) and f.b.shape == (2, 4, H * 16)
  assert adapters["params"]["layers"]["self_attn"]["k_proj"]["kernel"] is None
  tokens = _tokens()

  @jax.jit
  def run(params, adapters):
    wrapped = lora_jax.wrap(model.apply)(params, adapters, tokens)
    return wrapped, model.apply(lora_jax.merge(params, adapters), tokens), model.apply(params, tokens)

  wrapped, merged, base = run(params, adapters)
  assert_far(merged, base, ORDER_RTOL)  # the adapters matter, far beyond the tolerance
  assert_close(wrapped, merged, ORDER_RTOL)


def test_unrolled_scan_with_grouped_all_linear_lora():
  """scan_unroll=2 over 3 layers (a remainder layer) with all-linear LoRA: q/k/v and gate/up
  share one x@[a...] matmul each, and loss and adapter gradients equal the merged model's."""
  rolled, unrolled = _config(num_hidden_layers=3), _config(num_hidden_layers=3, scan_unroll=2)
  params = _init(rolled, jax.random.key(0))
  spec = lora_jax.LoraSpec("all-linear", rank=4, layout=L.lora_layout(rolled))
  adapters = jax.jit(lambda k, p: _randomise_b(lora_jax.init(k, p, spec), k))(jax.random.key(1), params)
  tokens = _tokens()
  fact = lora_jax.wrap(functools.partial(L.LlamaForCausalLM(unrolled).apply, method="loss"), fallback="error")
  ref = lambda ad: L.LlamaForCausalLM(rolled).apply(lora_jax.merge(params, ad), tokens, method="loss")  # noqa: E731
  l1, g1 = jax.jit(jax.value_and_grad(lambda ad: fact(params, ad, tokens)))(adapters)
  l2, g2 = jax.jit(jax.value_and_grad(ref))(adapters)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  assert_trees_close(g1, g2, GRAD_RTOL)
  report = lora_jax.explain(functools.partial(L.LlamaForCausalLM(unrolled).apply, method="loss"), params, adapters, tokens)
  attn = [f"params/layers/self_attn/{n}_proj/kernel" for n in "qkv"]
  mlp = [f"params/layers/mlp/{n}_proj/kernel" for n in ("gate", "up")]
  assert attn in report.grouped and mlp in report.grouped, report.grouped
  assert not report.fallbacks


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_xla():
  config = _config(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, head_dim=64)
  params = _init(config, jax.random.key(0))
  tokens = _tokens(2, 128)
  mask = np.ones_like(tokens)
  mask[1, 100:] = 0
  xla = _logits(config.replace(attention_implementation="xla"), params, tokens, mask)
  cudnn = _logits(config.replace(attention_implementation="cudnn"), params, tokens, mask)
  keep = mask.astype(bool)
  assert_close(np.asarray(cudnn)[keep], np.asarray(xla)[keep], 5e-2)  # bf16 compute
