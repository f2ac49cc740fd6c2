"""PEFT interop for DoRA and lora_dropout, against the real thing (transformers + peft, float32)."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import io
from _util import assert_close, assert_far
from lora_jax.files.adapters import flatten_adapters
from lora_jax._paths import leaves_with_paths, tree_from_entries
from lora_jax.interop import export_peft, import_peft, read_peft
from lora_jax.kinds import DoraFactors, LoraFactors, factor_shapes
from lora_jax.kinds.dora import dense_column_norm
from lora_jax.models import llama
from _hf import tiny_hf_llama

try:
  import peft
  import torch
  import transformers
except ImportError:  # the refusal tests below still run
  torch = peft = transformers = None

interop = pytest.mark.skipif(torch is None, reason="needs torch, transformers, peft: pip install 'lora_jax[interop]'")
TOKENS = np.array([[1, 5, 9, 33, 2, 77, 100, 3], [4, 4, 8, 15, 16, 23, 42, 127]])
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# As in test_interop.py: torch vs JAX float32 through the whole model, to RTOL of the largest
# value compared; each comparison also checks that the adapters move the result by >= 100x it.
RTOL = 1e-4
DORA_PREFIX = "base_model.model.model.layers.0.self_attn.q_proj."


@pytest.fixture(scope="module")
def tiny_llama():
  hf_config, torch_model, sd = tiny_hf_llama()
  config = llama.llama_config_from_hf(hf_config, remat=False, scan_layers=True)
  model = llama.LlamaForCausalLM(config)
  params = llama.load_hf_llama(sd, config)
  return torch_model, config, model, params


# One spec for both directions, so that the adapters made here and those imported from PEFT
# have one tree structure and share one compilation.
SPEC = dict(rank=4, alpha=8, rslora=True, rank_pattern={"down_proj": 2}, dropout=0.05)
PEFT_SPEC = dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 2}, lora_dropout=0.05)
LOSS_WEIGHTS = np.random.default_rng(7).standard_normal((*TOKENS.shape, 128)).astype(np.float32)


@pytest.fixture(scope="module")
def dora_step(tiny_llama):
  """``(loss, logits), grads`` of ``sum(logits * LOSS_WEIGHTS)`` w.r.t. the adapters (factored)."""
  lora_apply = lora_jax.wrap(tiny_llama[2].apply)

  def loss(adapters, params):
    logits = lora_apply(params, adapters, TOKENS)
    return jnp.sum(logits * LOSS_WEIGHTS), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def merged_apply(tiny_llama):
  return jax.jit(lambda params: tiny_llama[2].apply(params, TOKENS))


def _torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def _is_node(x):
  return x is None or isinstance(x, (DoraFactors, LoraFactors))


def _random_dora(params, spec, seed):
  """DoRA adapters with random non-zero a, b and a magnitude m moved away from ||W|| (numpy
  draws, as tests/_util.random_adapters, so nothing compiles)."""
  rng = np.random.default_rng(seed)
  targets = {t.path: t for t in spec.resolve(params)}
  entries = []
  for path, w in leaves_with_paths(params):
    t = targets.get(path)
    if t is None:
      entries.append(None)
      continue
    a_shape, b_shape = factor_shapes(t.shape, t.layout, t.rank)
    base_norm = np.linalg.norm(np.asarray(w, np.float64), axis=t.layout.index("i"))
    m = base_norm * (1 + 0.3 * rng.standard_normal(base_norm.shape))
    a, b, m, base_norm = (jnp.asarray(x, jnp.float32) for x in (
        rng.standard_normal(a_shape) * 0.3, rng.standard_normal(b_shape) * 0.3, m, base_norm))
    entries.append(DoraFactors(a=a, b=b, m=m, base_norm=base_norm, scale=t.scale, layout=t.layout,
                               rslora=t.rslora, dropout=t.dropout))
  return tree_from_entries(params, entries)


@pytest.mark.interop
@interop
def test_dora_jax_to_peft(tmp_path, tiny_llama, dora_step, merged_apply):
  torch_model, config, _, params = tiny_llama
  spec = lora_jax.LoraSpec(MODULES, kind="dora", layout=llama.lora_layout(config), **SPEC)
  adapters = _random_dora(params, spec, seed=0)
  (_, want), _ = dora_step(adapters, params)
  want = np.asarray(want)
  assert_far(want, _torch_logits(torch_model), RTOL)
  # The magnitude matters on its own: the same factors as plain LoRA (m = ||W + s*a@b||).
  as_lora = jax.tree.map(lambda f: f and LoraFactors(a=f.a, b=f.b, scale=f.scale, layout=f.layout), adapters, is_leaf=_is_node)
  assert_far(want, merged_apply(lora_jax.merge(params, as_lora)), RTOL)
  assert_close(merged_apply(lora_jax.merge(params, adapters)), want, RTOL)
  export_peft(tmp_path, adapters, "llama")
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert {k: cfg[k] for k in ("use_dora", *PEFT_SPEC)} == {
      "use_dora": True, **PEFT_SPEC, "rank_pattern": {r"model\.layers\.\d+\.mlp\.down_proj": 2}}
  tensors = io.read_safetensors(tmp_path / "adapter_model.safetensors")[0]
  assert tensors[DORA_PREFIX + "lora_magnitude_vector"].shape == (64,)
  assert tensors["base_model.model.model.layers.1.mlp.gate_proj.lora_magnitude_vector"].shape == (128,)
  assert not any("base_norm" in k for k in tensors) and len(tensors) == 3 * 14
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
  assert peft_model.peft_config["default"].use_dora and peft_model.peft_config["default"].lora_dropout == 0.05
  assert_close(_torch_logits(peft_model), want, RTOL)
  assert_close(_torch_logits(peft_model.merge_and_unload()), want, RTOL)
  # And back: the same leaves; base_norm recomputed from params (it was ||W|| at init too).
  back = flatten_adapters(import_peft(tmp_path, params, "llama"))
  for path, f in flatten_adapters(adapters).items():
    g = back[path]
    assert isinstance(g, DoraFactors) and g.static() == f.static(), path
    for leaf in ("a", "b", "m"):
      np.testing.assert_array_equal(getattr(g, leaf), getattr(f, leaf), err_msg=f"{path} {leaf}")
    np.testing.assert_allclose(g.base_norm, f.base_norm, rtol=1e-6, err_msg=path)


@pytest.fixture(scope="module")
def peft_dora(tmp_path_factory, tiny_llama):
  """A DoRA model made by PEFT (random lora_A / lora_B and magnitude), saved with save_pretrained."""
  torch_model = tiny_llama[0]
  torch.manual_seed(1)
  config = peft.LoraConfig(target_modules=MODULES, use_dora=True, task_type="CAUSAL_LM", **PEFT_SPEC)
  peft_model = peft.get_peft_model(copy.deepcopy(torch_model), config).eval()
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_A" in name or "lora_B" in name:
        p.copy_(torch.randn_like(p) * 0.3)
      elif "lora_magnitude_vector" in name:
        p.mul_(1 + 0.3 * torch.randn_like(p))
  d = tmp_path_factory.mktemp("peft_dora")
  peft_model.save_pretrained(d)
  return peft_model, d


@pytest.mark.interop
@interop
def test_dora_peft_to_jax(tiny_llama, peft_dora, dora_step, merged_apply):
  torch_model, _, _, params = tiny_llama
  peft_model, d = peft_dora
  want = _torch_logits(peft_model)
  assert_far(want, _torch_logits(torch_model), RTOL)
  assert read_peft(d).use_dora and read_peft(d).dropout == 0.05
  adapters = import_peft(d, params, "llama")
  flat = flatten_adapters(adapters)
  assert len(flat) == 7 and all(isinstance(f, DoraFactors) and f.dropout == 0.05 and f.rslora for f in flat.values())
  down = flat["params/layers/mlp/down_proj/kernel"]
  assert (down.rank, down.scale, down.m.shape) == (2, 8 / np.sqrt(2), (2, 64))
  w = params["params"]["layers"]["mlp"]["down_proj"]["kernel"]
  np.testing.assert_allclose(down.base_norm, dense_column_norm(w, "lio"), rtol=1e-6)
  (_, got), _ = dora_step(adapters, params)
  assert_close(got, want, RTOL)
  assert_close(merged_apply(lora_jax.merge(params, adapters)), want, RTOL)


@pytest.mark.interop
@interop
def test_dora_gradients_match_peft(tiny_llama, peft_dora, dora_step):
  """One step's gradients w.r.t. a, b and m equal PEFT's: the column norm is detached in both
  (DoRA's section 4.3), so gradients reach m through m / n and a, b through the low-rank path."""
  params = tiny_llama[3]
  peft_model, d = peft_dora
  peft_model.zero_grad()
  (peft_model(torch.tensor(TOKENS)).logits * torch.tensor(LOSS_WEIGHTS)).sum().backward()
  torch_grads = {n: p.grad.numpy().copy() for n, p in peft_model.named_parameters() if p.grad is not None}
  peft_model.zero_grad()
  assert len(torch_grads) == 3 * 14

  adapters = import_peft(d, params, "llama")
  _, grads = dora_step(adapters, params)
  for path, g in flatten_adapters(grads).items():
    module = ".".join(path.split("/")[2:4])  # params/layers/self_attn/q_proj/kernel -> self_attn.q_proj
    for leaf, key in (("a", "lora_A.default.weight"), ("b", "lora_B.default.weight"), ("m", "lora_magnitude_vector.default.weight")):
      want = np.stack([torch_grads[f"base_model.model.model.layers.{i}.{module}.{key}"] for i in range(2)])
      got = np.asarray(getattr(g, leaf))
      got = got if leaf == "m" else np.swapaxes(got, 1, 2)  # a (L, in, r), b (L, r, out): PEFT's transposed
      assert_close(got, want, RTOL, err_msg=f"{path} d/d{leaf}")
  # The comparison tells a detached norm from one that takes gradients: with G = dloss/dW' of
  # the merged kernel (from torch), b's gradient through m * v / ||v||, v = W + s*a@b, is far
  # from PEFT's when ||v|| is differentiated, and equal to it when it is not.
  f = flatten_adapters(adapters)["params/layers/self_attn/q_proj/kernel"]
  w = params["params"]["layers"]["self_attn"]["q_proj"]["kernel"][0]
  g_merged = _merged_kernel_grad(peft_model)

  def rescaled(b, detach):
    v = w + f.scale * f.a[0] @ b
    n = jnp.sqrt(jnp.sum(v * v, axis=0))
    return v * (f.m[0] / (jax.lax.stop_gradient(n) if detach else n))

  want = torch_grads["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"].T
  for detach in (True, False):
    _, vjp = jax.vjp(lambda b: rescaled(b, detach), f.b[0])
    got = np.asarray(vjp(g_merged)[0])
    if detach:
      assert_close(got, want, RTOL)
    else:
      assert_far(want, got, RTOL)


def _merged_kernel_grad(peft_model):
  """dloss/dW' for layer 0's q_proj, W' its merged DoRA kernel, in Flax layout ``(in, out)``."""
  merged = copy.deepcopy(peft_model).merge_and_unload()
  weight = merged.model.layers[0].self_attn.q_proj.weight
  weight.requires_grad_(True)
  (merged(torch.tensor(TOKENS)).logits * torch.tensor(LOSS_WEIGHTS)).sum().backward()
  return jnp.asarray(weight.grad.numpy().T)


# ----------------------------------------------------------------------------------------------
# Dropout.
# ----------------------------------------------------------------------------------------------


Q, V = "layers_0/self_attn/q_proj/kernel", "layers_0/self_attn/v_proj/kernel"


def _factors(kind=LoraFactors, n=8, rank=2, **static):
  """Small non-zero factors of an ``(n, n)`` kernel (numpy: nothing compiles)."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((n, rank)).astype(np.float32), rng.standard_normal((rank, n)).astype(np.float32)
  if kind is DoraFactors:
    static.update(m=np.full(n, 2.0, np.float32), base_norm=np.ones(n, np.float32))
  return kind(a=a, b=b, scale=1.0, layout="io", **static)


def test_dropout_round_trip(tmp_path):
  params = {"layers_0": {"self_attn": {n: {"kernel": jnp.ones((8, 8))} for n in ("q_proj", "v_proj")}}}
  ad = {Q: _factors(dropout=0.25), V: _factors(dropout=0.25)}
  export_peft(tmp_path / "lora", ad, "llama")
  assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["lora_dropout"] == 0.25
  back = flatten_adapters(import_peft(tmp_path / "lora", params, "llama"))
  assert all(type(f) is LoraFactors and f.dropout == 0.25 for f in back.values())
  # One rate per PEFT directory: different rates are refused by name, or chosen with lora_dropout=.
  mixed = {Q: back[Q], V: back[V].replace(dropout=0.0)}
  with pytest.raises(ValueError, match=r"'layers_0/self_attn/q_proj/kernel' has dropout 0.25 but 'layers_0/self_attn/v_proj/kernel' has dropout 0.0; PEFT's lora_dropout is one rate .* lora_dropout=rate"):
    export_peft(tmp_path / "mixed", mixed, "llama")
  export_peft(tmp_path / "mixed", mixed, "llama", lora_dropout=0.1)
  assert json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
  with pytest.raises(ValueError, match=r"export_peft\(lora_dropout=1.0\): a dropout rate is in \[0, 1\)"):
    export_peft(tmp_path / "x", mixed, "llama", lora_dropout=1.0)
  with pytest.raises(TypeError, match=r"export_peft\(lora_dropout='0.1'\): expected a float"):
    export_peft(tmp_path / "x", mixed, "llama", lora_dropout="0.1")
  assert not os.path.exists(tmp_path / "x")


# ----------------------------------------------------------------------------------------------
# Refusals.
# ----------------------------------------------------------------------------------------------


def _dora_dir(tmp_path, magnitude=None, **config):
  """A PEFT DoRA dir with one Linear module (q_proj of layer 0, 64 -> 64, rank 2)."""
  cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True, "target_modules": ["q_proj"], **config}
  os.makedirs(tmp_path, exist_ok=True)
  (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
  rng = np.random.default_rng(0)
  tensors = {DORA_PREFIX + "lora_A.weight": rng.standard_normal((2, 64)).astype(np.float32),
             DORA_PREFIX + "lora_B.weight": rng.standard_normal((64, 2)).astype(np.float32),
             DORA_PREFIX + "lora_magnitude_vector": np.ones(64, np.float32) if magnitude is None else magnitude}
  io.write_safetensors(tmp_path / "adapter_model.safetensors", {k: v for k, v in tensors.items() if v is not False}, {"format": "pt"})
  return tmp_path


def test_dora_import_refusals(tmp_path):
  w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 64)), jnp.float32)
  params = {"params": {"layers": {"self_attn": {"q_proj": {"kernel": w}}}}}
  d = _dora_dir(tmp_path / "ok")
  with pytest.warns(UserWarning, match=r"layers \[1\] have no adapter in the file; their factors are zero and their DoRA magnitudes the base's column norms \(a no-op\)"):
    f = import_peft(d, params, "llama")["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(f, DoraFactors) and f.m.shape == (2, 64)
  np.testing.assert_array_equal(f.m[1], dense_column_norm(w[1], "io"))  # a layer not in the file: a no-op
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is DoRA \(use_dora: true\), and DoRA adapters keep the column norms .* but params\['params/layers/self_attn/q_proj/kernel'\] is a ShapeDtypeStruct without values. Pass the params themselves"):
    import_peft(d, shapes, "llama")
  cases = [
      (dict(magnitude=np.ones(32, np.float32)), r"'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector' has shape \(32,\), expected \(64,\)"),
      (dict(magnitude=np.ones((1, 64, 1, 1), np.float32)), r"lora_magnitude_vector' has shape \(1, 64, 1, 1\), expected \(64,\)"),
      (dict(magnitude=np.ones(64, np.int32)), r"lora_magnitude_vector' has dtype int32; a DoRA magnitude is a float tensor"),
      (dict(magnitude=np.full(64, np.inf, np.float32)), r"lora_magnitude_vector' holds NaN or Inf"),
      (dict(magnitude=False), r"module 'model.layers.0.self_attn.q_proj' has no .*q_proj.lora_magnitude_vector, which DoRA \(use_dora: true\) needs"),
      (dict(use_dora=False), r"lora_magnitude_vector' is a DoRA magnitude, but adapter_config.json does not set use_dora: true"),
      (dict(use_dora="yes"), r"adapter_config.json: use_dora must be true or false, found 'yes'"),
      (dict(lora_dropout=1.5), r"adapter_config.json: lora_dropout must be a number in \[0, 1\) \(a dropout rate\), found 1.5"),
  ]
  for i, (kw, match) in enumerate(cases):
    d = _dora_dir(tmp_path / str(i), **kw)
    with pytest.raises(io.AdapterFileError, match=match) as e:
      import_peft(d, params, "llama")
    assert str(d) in str(e.value), (kw, e.value)
  d = tmp_path / "emb"  # DoRA on an embedding (PEFT's DoraEmbeddingLayer): refused by name
  d.mkdir()
  (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True}))
  io.write_safetensors(d / "adapter_model.safetensors", {
      "base_model.model.model.embed_tokens.lora_embedding_A": np.ones((2, 128), np.float32),
      "base_model.model.model.embed_tokens.lora_embedding_B": np.ones((64, 2), np.float32),
      "base_model.model.model.embed_tokens.lora_magnitude_vector": np.ones(64, np.float32)})
  with pytest.raises(io.AdapterFileError, match=r"module 'model.embed_tokens' is a DoRA embedding .* not embeddings"):
    read_peft(d)


def test_dora_export_refusals(tmp_path):
  with pytest.raises(ValueError, match=rf"'{V}' is plain LoRA but '{Q}' is DoRA; PEFT's use_dora is one switch for a whole adapter directory.*Export each kind to its own directory"):
    export_peft(tmp_path / "mix", {Q: _factors(DoraFactors), V: _factors()}, "llama")
  # Made by PiSSA / OLoRA (LoraSpec(init="pissa")): the factors belong to the residual base.
  for kind in (LoraFactors, DoraFactors):
    with pytest.raises(ValueError, match=rf"export_peft: '{Q}' was made by an init that rewrote its base kernel \(PiSSA / OLoRA: base_digest is set\).*lora_jax.to_original_base\(adapters, initial_adapters\)"):
      export_peft(tmp_path / "pissa", {Q: _factors(kind, base_digest="0123456789abcdef")}, "llama")
  conv = DoraFactors(a=np.ones((3, 3, 4, 2)), b=np.ones((2, 8)), m=np.ones(8), base_norm=np.ones(8), scale=1.0, layout="iiio")
  with pytest.raises(ValueError, match=r"'conv/kernel': layout 'iiio' has no PEFT equivalent that export_peft writes: DoRA is exported for Linear kernels only"):
    export_peft(tmp_path / "conv", {"conv/kernel": conv}, [(r"conv/kernel", "conv")])
  with pytest.raises(ValueError, match=r"'embed_tokens/embedding' is an embedding with DoRA factors"):
    export_peft(tmp_path / "emb", {"embed_tokens/embedding": _factors(DoraFactors)}, "llama")
  with pytest.raises(ValueError, match=r"DoRA magnitude m has shape \(4,\), but its factor b \(2, 8\) needs \(8,\)"):
    export_peft(tmp_path / "m", {Q: _factors(DoraFactors).replace(m=np.ones(4))}, "llama")
  assert not os.listdir(tmp_path)
