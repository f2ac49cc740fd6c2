"""PEFT interop against the real thing: transformers models + peft, in torch float32."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import io
from _util import assert_close, assert_far, random_adapters
from lora_jax.kinds import LoraFactors
from lora_jax.interop import BERT, LLAMA, NameMap, export_peft, import_peft, read_peft
from lora_jax.models import bert, llama
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
# torch vs JAX in float32: the same sums in another order, through a whole model. Outputs are
# compared to RTOL of their largest magnitude (measured: 1e-7..8e-6 of it, across machines);
# each test also checks that the adapters move the outputs by >= 100x that tolerance.
RTOL = 1e-4


def _random_adapters(params, spec, seed=0):
  return random_adapters(params, spec, seed=seed, std=0.3)


def _assert_same(a, b):
  fa, fb = io.flatten_adapters(a), io.flatten_adapters(b)
  assert list(fa) == list(fb)
  for k in fa:
    assert (fa[k].scale, fa[k].layout, fa[k].rslora) == (fb[k].scale, fb[k].layout, fb[k].rslora), k
    np.testing.assert_array_equal(fa[k].a, fb[k].a)
    np.testing.assert_array_equal(fa[k].b, fb[k].b)


@pytest.fixture(scope="module")
def tiny_llama():
  hf_config, torch_model, sd = tiny_hf_llama()
  models = {}
  for scan in (True, False):
    config = llama.llama_config_from_hf(hf_config, remat=False, scan_layers=scan)
    model = llama.LlamaForCausalLM(config)
    models[scan] = (config, jax.jit(lora_jax.wrap(model.apply)), llama.load_hf_llama(sd, config))
  return torch_model, models


def _torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.interop
@interop
def test_jax_to_peft_llama(tmp_path, tiny_llama):
  torch_model, models = tiny_llama
  config, lora_apply, params = models[True]
  spec = lora_jax.LoraSpec(MODULES, rank=4, alpha=8, layout=llama.lora_layout(config))
  adapters = _random_adapters(params, spec)
  want = np.asarray(lora_apply(params, adapters, TOKENS))
  assert_far(want, _torch_logits(torch_model), RTOL)  # the adapters do something
  export_peft(tmp_path, adapters, "llama", base_model_name_or_path="tiny")
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["use_rslora"]) == (4, 8.0, {}, False)
  assert len(cfg["target_modules"]) == 14 and "model.layers.1.mlp.down_proj" in cfg["target_modules"]
  _, meta, _ = io.read_safetensors(tmp_path / "adapter_model.safetensors")
  assert meta == {"format": "pt"}
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
  assert_close(_torch_logits(peft_model), want, RTOL)
  assert_close(_torch_logits(peft_model.merge_and_unload()), want, RTOL)
  _assert_same(import_peft(tmp_path, params, "llama"), adapters)  # and back, exactly


@pytest.mark.interop
@interop
def test_jax_to_peft_patterns_rslora_embeddings_unscanned(tmp_path, tiny_llama):
  torch_model, models = tiny_llama
  _, lora_apply, params = models[False]
  spec = lora_jax.LoraSpec(
      MODULES + ["embed_tokens", "lm_head"], rank=4, alpha=8, rslora=True,
      rank_pattern={"q_proj": 2, "down_proj": 6, "lm_head": 3}, alpha_pattern={"v_proj": 3},
  )
  adapters = _random_adapters(params, spec, seed=1)
  want = np.asarray(lora_apply(params, adapters, TOKENS))
  assert_far(want, _torch_logits(torch_model), RTOL)
  export_peft(tmp_path, adapters, LLAMA)  # rsLoRA comes from the adapters themselves
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  # The spec's own numbers: use_rslora from the adapters (LoraFactors.rslora), integer alphas.
  assert (cfg["use_rslora"], cfg["r"], cfg["lora_alpha"]) == (True, 4, 8) and isinstance(cfg["lora_alpha"], int)
  assert cfg["rank_pattern"]["model\\.layers\\.0\\.self_attn\\.q_proj"] == 2
  assert cfg["alpha_pattern"]["model\\.layers\\.1\\.self_attn\\.v_proj"] == 3
  keys = read_peft(tmp_path).modules
  assert keys["model.embed_tokens"].embedding and keys["model.embed_tokens"].A.shape == (4, 128)
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
  assert_close(_torch_logits(peft_model), want, RTOL)
  assert_close(_torch_logits(peft_model.merge_and_unload()), want, RTOL)
  back = import_peft(tmp_path, params, "llama")
  _assert_same(back, adapters)
  assert all(f.rslora for f in io.flatten_adapters(back).values())  # kept, so re-exporting writes the same


@pytest.mark.interop
@interop
def test_peft_to_jax_llama(tmp_path, tiny_llama):
  torch_model, models = tiny_llama
  torch.manual_seed(1)
  config = peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=MODULES, init_lora_weights=False, use_rslora=True,
      rank_pattern={"q_proj": 2}, alpha_pattern={"o_proj": 5}, task_type="CAUSAL_LM",
  )
  peft_model = peft.get_peft_model(copy.deepcopy(torch_model), config).eval()
  peft_model.save_pretrained(tmp_path)
  want = _torch_logits(peft_model)
  assert_far(want, _torch_logits(torch_model), RTOL)
  for scan in (True, False):
    _, lora_apply, params = models[scan]
    adapters = import_peft(tmp_path, params, "llama")
    assert len(io.flatten_adapters(adapters)) == (7 if scan else 14)
    assert_close(lora_apply(params, adapters, TOKENS), want, RTOL)
  q = io.flatten_adapters(adapters)["params/layers_0/self_attn/q_proj/kernel"]
  o = io.flatten_adapters(adapters)["params/layers_1/self_attn/o_proj/kernel"]
  assert (q.rank, q.scale, o.scale) == (2, 8 / np.sqrt(2), 5 / 2)


@pytest.mark.interop
@interop
def test_peft_partial_layers_and_ignored_keys(tmp_path, tiny_llama):
  torch_model, models = tiny_llama
  torch.manual_seed(2)
  config = peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[1], init_lora_weights=False,
      modules_to_save=["lm_head"],
  )
  peft_model = peft.get_peft_model(copy.deepcopy(torch_model), config).eval()
  peft_model.save_pretrained(tmp_path)
  _, lora_apply, params = models[True]
  with pytest.warns(UserWarning, match=r"layers \[0\] have no adapter in the file; their factors are zero.*ignored non-LoRA keys .*lm_head"):
    adapters = import_peft(tmp_path, params, "llama")
  f = adapters["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert not np.asarray(f.a[0]).any() and np.asarray(f.a[1]).any()
  want = _torch_logits(peft_model)
  assert_far(want, _torch_logits(torch_model), RTOL)
  assert_close(lora_apply(params, adapters, TOKENS), want, RTOL)


@pytest.fixture(scope="module")
def tiny_bert():
  torch.manual_seed(0)
  hf_config = transformers.BertConfig(
      vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=32, max_position_embeddings=32,
  )
  torch_model = transformers.BertModel(hf_config, add_pooling_layer=False).eval()
  config = bert.bert_config_from_hf(hf_config.to_dict())
  params = bert.load_hf_bert({k: v.detach().numpy() for k, v in torch_model.state_dict().items()}, config)
  model = bert.BertModel(config)
  apply = jax.jit(lora_jax.wrap(lambda p, ids, mask: model.apply({"params": p}, ids, mask).last_hidden_state))
  return torch_model, params, apply


def _bert_torch(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).last_hidden_state.numpy()


@pytest.mark.interop
@interop
def test_bert_both_ways(tmp_path, tiny_bert):
  torch_model, params, apply = tiny_bert
  ids = np.array([[2, 5, 9, 11, 3, 0]])
  mask = np.array([[1, 1, 1, 1, 1, 0]])
  # PEFT -> JAX
  torch.manual_seed(3)
  config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value", "dense"], init_lora_weights=False)
  peft_model = peft.get_peft_model(copy.deepcopy(torch_model), config).eval()
  peft_model.save_pretrained(tmp_path / "from_peft")
  keys = io.read_safetensors(tmp_path / "from_peft" / "adapter_model.safetensors")[0]
  assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in keys  # bare BertModel: no prefix
  adapters = import_peft(tmp_path / "from_peft", params, "bert")
  assert len(io.flatten_adapters(adapters)) == 2 * 5
  want = _bert_torch(peft_model, ids, mask)
  assert_far(want, _bert_torch(torch_model, ids, mask), RTOL)
  assert_close(apply(params, adapters, ids, mask), want, RTOL)
  # JAX -> PEFT
  spec = lora_jax.LoraSpec(["query", "key", "intermediate/dense"], rank=3, alpha=5)
  adapters = _random_adapters(params, spec, seed=4)
  export_peft(tmp_path / "to_peft", adapters, BERT, task_type="FEATURE_EXTRACTION")
  loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "to_peft").eval()
  want = np.asarray(apply(params, adapters, ids, mask))
  assert_far(want, _bert_torch(torch_model, ids, mask), RTOL)
  assert_close(_bert_torch(loaded, ids, mask), want, RTOL)


@pytest.mark.interop
@interop
def test_bert_prefix_for_task_heads(tiny_bert):
  _, params, _ = tiny_bert
  hf_config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32)
  torch_model = transformers.BertForSequenceClassification(hf_config)
  peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
  names = {k.split(".lora_A")[0] for k in peft.get_peft_model_state_dict(peft_model) if ".lora_A" in k}
  ours = {"base_model.model." + BERT.with_prefix("bert.")(f"encoder/layer_{i}/attention/self/query/kernel") for i in range(2)}
  assert names == ours


# ----------------------------------------------------------------------------------------------
# Refusals.
# ----------------------------------------------------------------------------------------------


def _peft_dir(tmp_path, **config):
  cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}
  cfg.update(config)
  os.makedirs(tmp_path, exist_ok=True)
  (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
  return tmp_path


def test_refusals(tmp_path):
  sds = jax.ShapeDtypeStruct
  params = {"params": {"layers": {"self_attn": {
      "q_proj": {"kernel": sds((2, 64, 64), jnp.float32)}, "k_proj": {"kernel": sds((2, 64, 32), jnp.float32)}}}}}
  d = _peft_dir(tmp_path / "bin")
  (d / "adapter_model.bin").write_bytes(b"\x80\x04.")
  with pytest.raises(io.AdapterFileError, match="refusing to read a pickle-based file .* safetensors"):
    import_peft(d, params, "llama")
  d = _peft_dir(tmp_path / "loha", peft_type="LOHA")
  io.write_safetensors(d / "adapter_model.safetensors", {"x": np.ones(1, np.float32)})
  with pytest.raises(io.AdapterFileError, match="peft_type is 'LOHA'; lora_jax imports plain LoRA"):
    import_peft(d, params, "llama")
  d = _peft_dir(tmp_path / "mag")
  io.write_safetensors(d / "adapter_model.safetensors", {"base_model.model.q.lora_magnitude_vector": np.ones(4, np.float32)})
  with pytest.raises(io.AdapterFileError, match="DoRA magnitude"):
    import_peft(d, params, "llama")
  d = _peft_dir(tmp_path / "rank")
  io.write_safetensors(d / "adapter_model.safetensors", {
      "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((3, 64), np.float32),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((64, 3), np.float32),
  })
  with pytest.raises(io.AdapterFileError, match="has rank 3 but the config gives r=2"):
    import_peft(d, params, "llama")
  d = _peft_dir(tmp_path / "nan", r=3)
  io.write_safetensors(d / "adapter_model.safetensors", {
      "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.full((3, 64), np.nan, np.float32),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((64, 3), np.float32),
  })
  with pytest.raises(io.AdapterFileError, match="lora_A holds NaN or Inf"):
    import_peft(d, params, "llama")
  d = _peft_dir(tmp_path / "shape", r=3)
  io.write_safetensors(d / "adapter_model.safetensors", {
      "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": np.ones((3, 64), np.float32),
      "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": np.ones((64, 3), np.float32),
  })
  with pytest.raises(ValueError, match=r"expected lora_A \(r, 64\) and lora_B \(32, r\). Wrong name map or wrong model"):
    import_peft(d, params, "llama")
  with pytest.raises(ValueError, match="torch module 'model.layers.0.self_attn.k_proj' has no counterpart in params"):
    import_peft(d, params, "bert")


def test_export_refusals(tmp_path):
  params = {"attn": {"kernel": jnp.ones((2, 4, 8))}, "dense": {"kernel": jnp.ones((4, 8))}}
  ad = _random_adapters(params, lora_jax.LoraSpec(["attn"], rank=2, layout={"attn": "iio"}))
  with pytest.raises(ValueError, match="layout 'iio' has no PEFT equivalent"):
    export_peft(tmp_path, ad, [(r"attn/kernel", "attn")])
  ad = _random_adapters(params, lora_jax.LoraSpec(["dense"], rank=2))
  with pytest.raises(ValueError, match="no name-map rule gives a torch module for adapted path 'dense/kernel'"):
    export_peft(tmp_path, ad, "llama")
  with pytest.raises(ValueError, match="'dense2/kernel' and 'dense/kernel' both map to torch module 'x'"):
    export_peft(tmp_path, {"dense/kernel": io.flatten_adapters(ad)["dense/kernel"], "dense2/kernel": io.flatten_adapters(ad)["dense/kernel"]},
                lambda path, layer: "x")
  with pytest.raises(ValueError, match="the template uses \\['module'\\] which the regex does not capture"):
    NameMap([("a/kernel", "{module}")])
  assert not os.listdir(tmp_path)


@pytest.mark.interop
@interop
def test_stacked_import_needs_uniform_rank(tmp_path, tiny_llama):
  torch_model, models = tiny_llama
  config = peft.LoraConfig(r=2, target_modules=["q_proj"], rank_pattern={"model.layers.0.self_attn.q_proj": 3})
  peft.get_peft_model(copy.deepcopy(torch_model), config).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="have different \\(r, scale\\).*scan_layers=False"):
    import_peft(tmp_path, models[True][2], "llama")
  flat = io.flatten_adapters(import_peft(tmp_path, models[False][2], "llama"))
  assert [f.rank for f in flat.values()] == [3, 2]


def test_name_maps():
  assert LLAMA("params/layers/mlp/down_proj/kernel", 5) == "model.layers.5.mlp.down_proj"
  assert LLAMA("layers_12/self_attn/o_proj/kernel") == "model.layers.12.self_attn.o_proj"
  assert LLAMA("embed_tokens/embedding") == "model.embed_tokens" and LLAMA("lm_head/kernel") == "lm_head"
  assert LLAMA("norm/scale") is None and LLAMA.stacked("layers/mlp/up_proj/kernel")
  assert LLAMA.module_pattern("layers/self_attn/q_proj/kernel") == r"model\.layers\.\d+\.self_attn\.q_proj"
  assert BERT("encoder/layer_1/attention/output/dense/kernel") == "encoder.layer.1.attention.output.dense"
  assert BERT("embeddings/word_embeddings/embedding") == "embeddings.word_embeddings"
  assert BERT.with_prefix("bert.")("encoder/layer_0/output/dense/kernel") == "bert.encoder.layer.0.output.dense"
  with pytest.raises(ValueError, match="needs a layer index: the kernel must be stacked"):
    LLAMA("layers/mlp/up_proj/kernel")
  with pytest.raises(ValueError, match="not a valid regex"):
    NameMap([("(", "x")])


def test_peft_dir_given_to_load(tmp_path):
  f = LoraFactors(a=jnp.ones((4, 2)), b=jnp.ones((2, 3)), scale=0.5, layout="io")
  export_peft(tmp_path, {"lm_head/kernel": f}, "llama")
  with pytest.raises(io.AdapterFileError, match="is a PEFT adapter directory .* lora_jax.import_peft"):
    lora_jax.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="no adapter_config.json; not a PEFT adapter directory"):
    import_peft(tmp_path / "nope", {"lm_head": {"kernel": jnp.ones((4, 3))}}, "llama")


@pytest.mark.interop
@interop
def test_real_bdlora_dir_refused_by_name(tmp_path, tiny_llama):
  torch_model, models = tiny_llama
  config = peft.LoraConfig(r=4, target_modules=["q_proj"], use_bdlora=peft.BdLoraConfig(target_modules_bd_a=["q_proj"], nblocks=2))
  peft.get_peft_model(copy.deepcopy(torch_model), config).save_pretrained(tmp_path)
  with pytest.raises(io.AdapterFileError, match=r"adapter_config.json: BD-LoRA, block-diagonal lora_A/lora_B factors \(use_bdlora\) is not supported by lora_jax"):
    import_peft(tmp_path, models[True][2], "llama")


def _one_module_dir(tmp_path, name="model.layers.0.self_attn.q_proj", rank=2, **config):
  """A PEFT dir with one Linear module of rank ``rank``; ``config`` edits the config (r = rank)."""
  d = _peft_dir(tmp_path, **{"r": rank, **config})
  rng = np.random.default_rng(0)
  io.write_safetensors(d / "adapter_model.safetensors", {
      f"base_model.model.{name}.lora_A.weight": rng.standard_normal((rank, 64)).astype(np.float32),
      f"base_model.model.{name}.lora_B.weight": rng.standard_normal((64, rank)).astype(np.float32),
  }, {"format": "pt"})
  return d


def test_hostile_configs_refused_by_name(tmp_path):
  cases = [
      (dict(lora_alpha=10**400), r"adapter_config.json: lora_alpha: <number 1000000.* out of range>; numbers must fit in 64 bits"),
      (dict(lora_alpha=1e308 * 10), r"not valid JSON|lora_alpha must be a finite number"),
      (dict(r=True), r"r must be a positive integer, found True"),
      (dict(r=2**40), r"r must be a positive integer, found 1099511627776"),
      (dict(alpha_pattern={"q_proj": 10**400}), r"adapter_config.json: alpha_pattern\['q_proj'\]: <number 1000000.* out of range>"),
      (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be one of positive integers, found 0"),
      (dict(rank_pattern=[1]), r"rank_pattern must map regexes to positive integers, found a list"),
      (dict(rank_pattern={"(" * 5000: 2}), r"rank_pattern key '\(\(\(.*\.\.\. is refused: longer than 1000 characters \(5000\)"),
      (dict(rank_pattern={"(" * 40 + ")" * 40: 2}), r"rank_pattern key .* is refused: groups nested deeper than 32 levels"),
      (dict(alpha_pattern={"(q)\\1": 2}), r"alpha_pattern key '\(q\)\\\\1' is refused: an unsupported escape '\\1' \(backreference"),
      (dict(alpha_pattern={"(?i)Q_PROJ": 2}), r"alpha_pattern key '\(\?i\)Q_PROJ' is refused: an extension group"),
      (dict(target_modules="(a"), r"target_modules regex '\(a' is refused: a missing '\)'"),
      (dict(target_modules=3), r"target_modules must be a regex string or a list of module names, found 3"),
      (dict(use_rslora="yes"), r"use_rslora must be true or false, found 'yes'"),
      (dict(bias="some"), r"bias must be 'none', 'all' or 'lora_only', found 'some'"),
      (dict(use_bdlora={"target_modules_bd_a": ["q_proj"], "nblocks": 2}), r"BD-LoRA, block-diagonal lora_A/lora_B factors \(use_bdlora\) is not supported"),
      (dict(kasa_config={}), None),  # an empty sub-config switches nothing on
      (dict(kasa_config={"x": 1}), r"KaSA, a learned diagonal .* \(kasa_config\) is not supported"),
      (dict(arrow_config={"top_k": 3}), r"Arrow routing .* \(arrow_config\) is not supported"),
      (dict(init_lora_weights="pissa_niter_4"), r"init_lora_weights='pissa_niter_4': this initialisation changes the base weights.*path_initial_model_for_weight_conversion"),
      (dict(init_lora_weights="olora"), r"init_lora_weights='olora': this initialisation changes the base weights"),
      (dict(init_lora_weights="gaussian"), None),
      (dict(use_frobnication=True), r"use_frobnication=True is a PEFT option lora_jax does not know \(a newer PEFT variant\?\)"),
      (dict(frob_config={"k": 1}), r"frob_config=\{'k': 1\} is a PEFT option lora_jax does not know"),
      (dict(some_new_metadata="x"), None),  # unknown, but switches no variant on
  ]
  for i, (config, match) in enumerate(cases):
    d = _one_module_dir(tmp_path / str(i), **config)
    if match is None:
      assert read_peft(d).modules["model.layers.0.self_attn.q_proj"].r == 2, config
      continue
    with pytest.raises(io.AdapterFileError, match=match) as e:
      read_peft(d)
    assert str(d) in str(e.value), (config, e.value)


def test_catastrophic_pattern_keys_match_in_linear_time(tmp_path):
  import time

  evil = "a" * 3000 + "c"
  d = _one_module_dir(tmp_path / "evil", name=evil, rank_pattern={"(a|a)+b": 3, "(a+)+$": 2}, alpha_pattern={"(.*.*)*x": 5})
  start = time.perf_counter()
  m = read_peft(d).modules[evil]
  assert time.perf_counter() - start < 10  # re.match("(.*\\.)?((a|a)+b)$", evil) needs ~2**3000 steps
  assert (m.r, m.alpha) == (2, 4.0)  # the second key matches; no alpha key does
  d = _one_module_dir(tmp_path / "long", name="a" * 5000)
  with pytest.raises(io.AdapterFileError, match=r"module name 'aaaa.*\.\.\. is longer than 4096 characters"):
    read_peft(d)
  # Keys PEFT users write still mean what they mean to PEFT.
  d = _one_module_dir(tmp_path / "ok", rank_pattern={r"model\.layers\.\d+\.mlp": 4, "layers.0.self_attn.(q|k)_proj": 2}, r=3)
  assert read_peft(d).modules["model.layers.0.self_attn.q_proj"].r == 2


def test_unsupported_tensors_named(tmp_path):
  d = _one_module_dir(tmp_path / "bias", bias="all")
  tensors = io.read_safetensors(d / "adapter_model.safetensors")[0]
  tensors["base_model.model.model.layers.0.self_attn.q_proj.bias"] = np.ones(64, np.float32)
  io.write_safetensors(d / "adapter_model.safetensors", tensors)
  with pytest.raises(io.AdapterFileError, match=r"bias='all' \(in adapter_config.json\) trained base-model biases, saved as 'base_model.model.model.layers.0.self_attn.q_proj.bias'"):
    read_peft(d)
  d = _peft_dir(tmp_path / "bd", r=4)
  io.write_safetensors(d / "adapter_model.safetensors", {  # BD-LoRA factors without their config
      "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 64), np.float32),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, 2), np.float32),
  })
  with pytest.raises(io.AdapterFileError, match=r"lora_A has rank 4 but lora_B \(32, 2\) has 2; plain LoRA factors are \(r, in\) and \(out, r\). A PEFT variant with other factor shapes \(e.g. BD-LoRA"):
    read_peft(d)


def test_export_records_rslora(tmp_path):
  params = {"layers_0": {"self_attn": {n: {"kernel": jnp.ones((16, 16))} for n in ("q_proj", "v_proj")}}}
  spec = lora_jax.LoraSpec(["q_proj", "v_proj"], rank=4, alpha=8, rslora=True, rank_pattern={"v_proj": 2})
  ad = lora_jax.init(jax.random.key(0), params, spec)
  assert all(f.rslora for f in io.flatten_adapters(ad).values())
  export_peft(tmp_path / "rs", ad, "llama")  # no rslora=True needed: the adapters know
  cfg = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
  assert (cfg["use_rslora"], cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (
      True, 4, 8, {"model\\.layers\\.0\\.self_attn\\.v_proj": 2}, {})
  assert isinstance(cfg["lora_alpha"], int)
  back = import_peft(tmp_path / "rs", params, "llama")
  _assert_same(back, ad)
  export_peft(tmp_path / "again", back, "llama")
  assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()) == cfg
  # Asked for plain LoRA: the same scales, expressed as alpha / r.
  export_peft(tmp_path / "plain", ad, "llama", rslora=False)
  cfg = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
  assert (cfg["use_rslora"], cfg["lora_alpha"]) == (False, 16)
  assert {m.name: m.scale for m in read_peft(tmp_path / "plain").modules.values()} == {
      "model.layers.0.self_attn.q_proj": 4.0, "model.layers.0.self_attn.v_proj": 8 / np.sqrt(2)}
  # Plain LoRA adapters stay plain; a mix is written as plain LoRA with exact alphas.
  plain = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["q_proj"], rank=4, alpha=8))
  export_peft(tmp_path / "p", plain, "llama")
  cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
  assert (cfg["use_rslora"], cfg["lora_alpha"]) == (False, 8)
  mixed = {"layers_0/self_attn/q_proj/kernel": io.flatten_adapters(plain)["layers_0/self_attn/q_proj/kernel"],
           "layers_0/self_attn/v_proj/kernel": io.flatten_adapters(ad)["layers_0/self_attn/v_proj/kernel"]}
  export_peft(tmp_path / "mix", mixed, "llama")
  scales = {m.name: m.scale for m in read_peft(tmp_path / "mix").modules.values()}
  assert scales == pytest.approx({"model.layers.0.self_attn.q_proj": 2.0, "model.layers.0.self_attn.v_proj": 8 / np.sqrt(2)}, rel=1e-12)
  with pytest.raises(TypeError, match=r"export_peft\(rslora='yes'\): expected True, False or None"):
    export_peft(tmp_path / "x", ad, "llama", rslora="yes")
