"""A Llama-style decoder in Flax linen, and a Hugging Face checkpoint loader.

Parameter paths mirror Hugging Face's module names, so a PEFT name map is a string rewrite:

=====================================================  ============================================
Flax path (scanned: one stacked array, layer axis 0)    Hugging Face ``state_dict`` key
=====================================================  ============================================
``embed_tokens/embedding``               ``(V, D)``     ``model.embed_tokens.weight``       ``(V, D)``
``layers/input_layernorm/scale``         ``(L, D)``     ``model.layers.{i}.input_layernorm.weight``
``layers/self_attn/q_proj/kernel``       ``(L, D, H*hd)`` ``model.layers.{i}.self_attn.q_proj.weight`` (T)
``layers/self_attn/{k,v}_proj/kernel``   ``(L, D, KV*hd)`` ``...self_attn.{k,v}_proj.weight`` (T)
``layers/self_attn/o_proj/kernel``       ``(L, H*hd, D)`` ``...self_attn.o_proj.weight`` (T)
``layers/post_attention_layernorm/scale`` ``(L, D)``    ``...post_attention_layernorm.weight``
``layers/mlp/{gate,up}_proj/kernel``     ``(L, D, F)``  ``...mlp.{gate,up}_proj.weight`` (T)
``layers/mlp/down_proj/kernel``          ``(L, F, D)``  ``...mlp.down_proj.weight`` (T)
``norm/scale``                           ``(D,)``       ``model.norm.weight``
``lm_head/kernel`` (absent when tied)    ``(D, V)``     ``lm_head.weight`` (T)
=====================================================  ============================================

(T): a torch ``Linear`` weight is ``(out, in)``, a Flax kernel ``(in, out)``. With
``scan_layers=False`` the layers are ``layers_0/...``, ``layers_1/...`` without the layer axis.
Everything lives under the ``params`` collection: ``model.init`` and :func:`load_hf_llama`
return ``{"params": {...}}``.

>>> config = LlamaConfig.tiny()
>>> model = LlamaForCausalLM(config)
>>> tokens = jnp.zeros((1, 8), jnp.int32)
>>> params = jax.jit(model.init)(jax.random.key(0), tokens)
>>> params["params"]["layers"]["self_attn"]["q_proj"]["kernel"].shape
(2, 64, 64)
>>> jax.jit(model.apply)(params, tokens).shape
(1, 8, 128)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any
Source = Union[Mapping[str, Any], str, os.PathLike]

# Policies of jax.checkpoint_policies that take no arguments, selectable by name.
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)
_ROPE_TYPES = ("default", "linear", "llama3")

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, as in Hugging Face's ``rope_scaling`` / ``rope_parameters``.

  Args:
    rope_type: ``"linear"`` (positions divided by ``factor``) or ``"llama3"`` (Llama 3.1's
      wavelength-dependent interpolation).
    factor: the scaling factor.
    low_freq_factor: ``llama3`` only.
    high_freq_factor: ``llama3`` only.
    original_max_position_embeddings: ``llama3`` only: the pre-training context length.
  """

  rope_type: str
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("linear", "llama3"):
      raise ValueError(
          f"RopeScaling(rope_type={self.rope_type!r}): supported types are 'linear' and "
          "'llama3' (use rope_scaling=None for plain RoPE)."
      )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a Llama-style decoder.

  Args:
    vocab_size: number of tokens ``V``.
    hidden_size: model width ``D``.
    intermediate_size: MLP width ``F``.
    num_hidden_layers: number of decoder layers ``L``.
    num_attention_heads: query heads ``H``.
    num_key_value_heads: key/value heads ``KV`` (grouped-query attention); ``None`` means ``H``.
    head_dim: per-head width ``hd``; ``None`` means ``hidden_size // num_attention_heads``.
    rms_norm_eps: epsilon of the RMS norms.
    rope_theta: RoPE base.
    rope_scaling: a :class:`RopeScaling`, a Hugging Face ``rope_scaling`` dict, or ``None``.
    max_position_embeddings: context length (informational; RoPE is computed on the fly).
    tie_word_embeddings: the output head reuses ``embed_tokens`` (no ``lm_head`` params).
    initializer_range: standard deviation of the normal init of kernels and embeddings.
    dtype: compute dtype (e.g. ``jnp.bfloat16``). Norms, RoPE, softmax and logits are float32.
    param_dtype: dtype of the parameters.
    scan_layers: stack the layers with ``nn.scan`` (params get a leading layer axis).
    scan_unroll: layers per iteration of the layer ``scan`` (``nn.scan(unroll=...)``); ``0``
      or ``num_hidden_layers`` unrolls it fully (longer compiles; the params stay stacked).
    remat: rematerialise each layer in the backward pass (``nn.remat``).
    remat_policy: a name from :data:`REMAT_POLICIES` (``jax.checkpoint_policies``), a policy
      callable, or ``None`` (save nothing but the layer inputs).
    attention_implementation: ``"xla"``, ``"cudnn"`` (flash attention, GPU, bf16/fp16) or
      ``None`` (JAX picks), passed to ``jax.nn.dot_product_attention``.
    elementwise_remat: checkpoint the RMS norms' and SwiGLU's elementwise math on their own
      (``jax.checkpoint``), so that the backward pass keeps only their compute-dtype inputs and
      recomputes the float32 internals and the SwiGLU product: without ``remat`` the saved
      activations shrink by about a third (no float32 copies of the residual stream). Values
      and gradients are unchanged.
    rope_dtype: the dtype RoPE's multiply-adds run in. ``float32`` (the default) rotates in
      float32 and rounds once; ``None`` rotates in the compute dtype with ``cos``/``sin``
      rounded to it, as Hugging Face's ``apply_rotary_pos_emb`` does (fewer bytes per element
      in the fusions around attention, at bf16 rounding of each product).
    logits_dtype: the dtype the output head's matmul writes (always accumulated in float32;
      logits are returned, and the loss computed, in float32). ``float32`` (the default) keeps
      the accumulator; ``None`` rounds the logits to the compute dtype first, as Hugging
      Face's bf16 ``lm_head`` does: the head's backward then runs as compute-dtype GEMMs
      instead of float32 (TF32 on GPUs) ones, and the ``(B, T, V)`` logits take half the bytes.

  >>> LlamaConfig.tiny(num_key_value_heads=None).num_key_value_heads
  4
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | Mapping[str, Any] | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True
  scan_unroll: int = 1
  remat: bool = True
  remat_policy: str | Callable[..., Any] | None = None
  attention_implementation: str | None = None
  elementwise_remat: bool = False
  rope_dtype: Any = jnp.float32
  logits_dtype: Any = jnp.float32

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    for name in sizes:
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"LlamaConfig({name}={value!r}): expected a positive integer.")
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"LlamaConfig: num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention shares each "
          "key/value head among a whole number of query heads)."
      )
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(
            f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by "
            f"num_attention_heads={self.num_attention_heads}; pass head_dim explicitly."
        )
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig(head_dim={self.head_dim}): RoPE needs an even head_dim.")
    if isinstance(self.rope_scaling, Mapping):
      set_("rope_scaling", _rope_scaling_from_hf(self.rope_scaling))
    set_("dtype", jnp.dtype(self.dtype))
    set_("param_dtype", jnp.dtype(self.param_dtype))
    for name in ("rope_dtype", "logits_dtype"):
      value = getattr(self, name)
      value = self.dtype if value is None else jnp.dtype(value)
      if not jnp.issubdtype(value, jnp.floating):
        raise ValueError(f"LlamaConfig({name}={getattr(self, name)!r}): expected a floating dtype or None.")
      set_(name, value)
    if not isinstance(self.scan_unroll, (int, np.integer)) or self.scan_unroll < 0:
      raise ValueError(f"LlamaConfig(scan_unroll={self.scan_unroll!r}): expected an integer >= 0.")
    if isinstance(self.remat_policy, str) and self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"LlamaConfig(remat_policy={self.remat_policy!r}): expected one of {REMAT_POLICIES}, "
          "a jax.checkpoint_policies callable, or None."
      )
    if self.attention_implementation not in (None, "xla", "cudnn"):
      raise ValueError(
          f"LlamaConfig(attention_implementation={self.attention_implementation!r}): expected "
          "'xla', 'cudnn' or None."
      )

  @classmethod
  def tiny(cls, **overrides: Any) -> "LlamaConfig":
    """A 2-layer, 64-wide config for tests and doc examples (GQA: 4 heads, 2 KV heads)."""
    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    kw.update(overrides)
    return cls(**kw)

  def replace(self, **changes: Any) -> "LlamaConfig":
    """A copy with ``changes`` applied (e.g. ``config.replace(scan_layers=False)``)."""
    return dataclasses.replace(self, **changes)

  @property
  def policy(self) -> Callable[..., Any] | None:
    """The remat policy as a callable (``None``: save nothing)."""
    if isinstance(self.remat_policy, str):
      return getattr(jax.checkpoint_policies, self.remat_policy)
    return self.remat_policy


def _rope_scaling_from_hf(d: Mapping[str, Any]) -> RopeScaling | None:
  rope_type = d.get("rope_type", d.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise ValueError(
        f"rope_scaling type {rope_type!r} is not supported; supported: {_ROPE_TYPES}."
    )
  if float(d.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("rope_scaling: partial_rotary_factor != 1 is not supported.")
  if rope_type == "default":
    return None
  fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  kw = {k: d[k] for k in fields if k in d}
  return RopeScaling(rope_type=rope_type, **kw)


def llama_config_from_hf(hf_config: Any, **overrides: Any) -> LlamaConfig:
  """A :class:`LlamaConfig` from a Hugging Face Llama config.

  Args:
    hf_config: a ``transformers.LlamaConfig``, its ``to_dict()``, a ``config.json`` path, or
      a checkpoint directory holding ``config.json``.
    **overrides: fields that are not part of the checkpoint (``dtype``, ``param_dtype``,
      ``scan_layers``, ``remat``, ...) or that you want to change.

  Returns:
    The config.

  Raises:
    ValueError: a feature this model does not implement (attention/MLP biases, an activation
      other than SiLU, an unsupported RoPE scaling).

  >>> llama_config_from_hf({"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
  ...     "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1,
  ...     "rope_theta": 500000.0}, scan_layers=False).rope_theta
  500000.0
  """
  if isinstance(hf_config, (str, os.PathLike)):
    path = os.fspath(hf_config)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    with open(path) as f:
      d = json.load(f)
  elif isinstance(hf_config, Mapping):
    d = dict(hf_config)
  elif hasattr(hf_config, "to_dict"):
    d = hf_config.to_dict()
  else:
    raise TypeError(
        f"llama_config_from_hf: expected a transformers config, a dict, or a path; got "
        f"{type(hf_config).__name__}."
    )
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"llama_config_from_hf: hidden_act={act!r} is not supported (only 'silu').")
  for key in ("attention_bias", "mlp_bias"):
    if d.get(key):
      raise ValueError(f"llama_config_from_hf: {key}=True is not supported (bias-free Llama only).")
  rope = d.get("rope_parameters") or {}
  if "default_theta" in rope and "rope_theta" not in rope:
    rope = {**rope, "rope_theta": rope["default_theta"]}
  theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
  scaling = dict(rope) if rope else (d.get("rope_scaling") or {})
  kw: dict[str, Any] = dict(
      vocab_size=d["vocab_size"],
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_hidden_layers=d["num_hidden_layers"],
      num_attention_heads=d["num_attention_heads"],
      num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
      head_dim=d.get("head_dim"),
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      rope_theta=float(theta),
      rope_scaling=_rope_scaling_from_hf(scaling) if scaling else None,
      max_position_embeddings=d.get("max_position_embeddings", 2048),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      initializer_range=float(d.get("initializer_range", 0.02)),
  )
  kw.update(overrides)
  return LlamaConfig(**kw)


def llama_config_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """A Hugging Face ``config.json`` dict for ``config`` (``transformers.LlamaConfig(**d)``).

  >>> d = llama_config_to_hf(LlamaConfig.tiny())
  >>> d["model_type"], d["num_key_value_heads"], d["head_dim"]
  ('llama', 2, 16)
  """
  d: dict[str, Any] = dict(
      architectures=["LlamaForCausalLM"],
      model_type="llama",
      vocab_size=config.vocab_size,
      hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_hidden_layers,
      num_attention_heads=config.num_attention_heads,
      num_key_value_heads=config.num_key_value_heads,
      head_dim=config.head_dim,
      hidden_act="silu",
      rms_norm_eps=config.rms_norm_eps,
      rope_theta=config.rope_theta,
      rope_scaling=None,
      max_position_embeddings=config.max_position_embeddings,
      tie_word_embeddings=config.tie_word_embeddings,
      initializer_range=config.initializer_range,
      attention_bias=False,
      mlp_bias=False,
      torch_dtype=str(np.dtype(config.param_dtype)),
  )
  if config.rope_scaling is not None:
    d["rope_scaling"] = dataclasses.asdict(config.rope_scaling)
  return d


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """RoPE inverse frequencies ``(head_dim // 2,)`` in float32, as Hugging Face computes them."""
  dim = config.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv_freq
  if s.rope_type == "linear":
    return (inv_freq / np.float32(s.factor)).astype(np.float32)
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: Array, config: LlamaConfig) -> tuple[Array, Array]:
  """``cos, sin`` of shape ``(*positions.shape, head_dim)`` in float32 (halves repeated)."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(config))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array, dtype: Any = jnp.float32) -> Array:
  """Rotary embedding with Hugging Face's ``rotate_half`` convention.

  Args:
    x: ``(B, T, heads, head_dim)``.
    cos: ``(B, T, head_dim)`` float32.
    sin: ``(B, T, head_dim)`` float32.
    dtype: the dtype of the arithmetic (``x``, ``cos`` and ``sin`` are cast to it):
      ``float32``, or ``x.dtype`` for Hugging Face's numerics (:attr:`LlamaConfig.rope_dtype`).

  Returns:
    ``x`` rotated, in ``x.dtype``.
  """
  xd = x.astype(dtype)
  x1, x2 = jnp.split(xd, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = xd * cos[:, :, None, :].astype(dtype) + rotated * sin[:, :, None, :].astype(dtype)
  return out.astype(x.dtype)


class KVCache(NamedTuple):
  """A fixed-size key/value cache for :meth:`LlamaForCausalLM.extend`; every array is batch-first.

  Batch-first everywhere, so that a ``jax.vmap`` over axis 0 (one adapter per row: see
  ``lora_jax.wrap(..., in_axes=0)``) maps every row's state with it.

  Attributes:
    k: ``(B, L, S, KV, hd)`` cached keys (after RoPE), per layer.
    v: ``(B, L, S, KV, hd)`` cached values.
    mask: ``(B, S)`` bool: the slot holds a real token (``False``: padding or not yet written).
    index: ``(B,)`` int32: slots written so far, where the next token goes.
  """

  k: Array
  v: Array
  mask: Array
  index: Array


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
  """An empty :class:`KVCache` of ``max_len`` slots per row (zeros; no slot real).

  Args:
    config: the model's config (layers, key/value heads, head size).
    batch: rows ``B``.
    max_len: slots ``S``: prompt (with its padding) plus the tokens to generate.
    dtype: of ``k`` and ``v`` (default: ``config.dtype``, the compute dtype).

  >>> cache = init_cache(LlamaConfig.tiny(), batch=2, max_len=16)
  >>> cache.k.shape, cache.mask.shape, cache.index.tolist()
  ((2, 2, 16, 2, 16), (2, 16), [0, 0])
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"init_cache(batch={batch}, max_len={max_len}): expected positive integers.")
  dtype = config.dtype if dtype is None else dtype
  shape = (batch, config.num_hidden_layers, max_len, config.num_key_value_heads, config.head_dim)
  return KVCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      mask=jnp.zeros((batch, max_len), bool),
      index=jnp.zeros((batch,), jnp.int32),
  )


def _rms_norm(x: Array, scale: Array, eps: float, dtype: Any) -> Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(dtype) * y.astype(dtype)


def _swiglu(gate: Array, up: Array) -> Array:
  return nn.silu(gate) * up


def _elementwise(fn: Callable[..., Array], remat: bool) -> Callable[..., Array]:
  """``fn`` (of arrays only: bind the rest with ``functools.partial``), or ``fn`` under
  ``jax.checkpoint`` (its backward saves only its inputs)."""
  return jax.checkpoint(fn) if remat else fn


class RMSNorm(nn.Module):
  """RMS normalisation in float32 with a learned ``scale`` (Hugging Face's ``LlamaRMSNorm``).

  With ``remat`` the float32 internals are recomputed in the backward pass instead of saved
  (see :attr:`LlamaConfig.elementwise_remat`).
  """

  eps: float
  dtype: Any
  param_dtype: Any
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return _elementwise(functools.partial(_rms_norm, eps=self.eps, dtype=self.dtype), self.remat)(x, scale)


def _dense(config: LlamaConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(
      features,
      use_bias=False,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      kernel_init=nn.initializers.normal(config.initializer_range),
      name=name,
  )


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with RoPE; heads flattened into plain ``nn.Dense`` kernels.

  With ``kv = (k_cache, v_cache, cache_mask)`` (one layer's cached keys and values
  ``(B, S, KV, hd)`` and the ``(B, S)`` mask of the slots that hold real tokens) the queries
  attend to the cache and, causally, to the new tokens (``mask`` marks the real ones), and the
  new tokens' keys and values ``(B, T, KV, hd)`` are returned with the output.
  """

  config: LlamaConfig

  @nn.compact
  def __call__(
      self, x: Array, cos: Array, sin: Array, mask: Array | None, kv: tuple[Array, Array, Array] | None = None
  ) -> tuple[Array, tuple[Array, Array] | None]:
    c = self.config
    b, t, _ = x.shape
    q = _dense(c, c.num_attention_heads * c.head_dim, "q_proj")(x)
    k = _dense(c, c.num_key_value_heads * c.head_dim, "k_proj")(x)
    v = _dense(c, c.num_key_value_heads * c.head_dim, "v_proj")(x)
    q = apply_rope(q.reshape(b, t, c.num_attention_heads, c.head_dim), cos, sin, c.rope_dtype)
    k = apply_rope(k.reshape(b, t, c.num_key_value_heads, c.head_dim), cos, sin, c.rope_dtype)
    v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
    if kv is not None:
      out = _cached_attention(q, k, v, mask, *kv)
      return _dense(c, c.hidden_size, "o_proj")(out.reshape(b, t, -1)), (k, v)
    if mask is not None and c.attention_implementation == "cudnn":
      mask = jnp.broadcast_to(mask, (b, 1, t, t))  # cuDNN wants the query axis spelled out
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation=c.attention_implementation
    )
    return _dense(c, c.hidden_size, "o_proj")(out.reshape(b, t, -1)), None


def _cached_attention(
    q: Array, k: Array, v: Array, mask: Array, k_cache: Array, v_cache: Array, cache_mask: Array
) -> Array:
  """Attention of ``q`` over ``[cache | new keys]`` without concatenating the keys.

  The cache is read in place (the scores of the two parts are joined, not the keys), with
  ``jax.nn.dot_product_attention``'s XLA numerics: float32 scores and softmax, masked
  scores at a large finite negative (a query with no valid key averages, never NaN).

  Args:
    q: ``(B, T, H, hd)``; k, v: ``(B, T, KV, hd)``; mask: ``(B, 1, 1, T)`` bool, real new tokens.
    k_cache, v_cache: ``(B, S, KV, hd)``; cache_mask: ``(B, S)`` bool, slots holding real tokens.

  Returns:
    ``(B, T, H, hd)`` in ``q.dtype``.
  """
  b, t, h, d = q.shape
  s, kvh = k_cache.shape[1], k.shape[2]
  qg = q.reshape(b, t, kvh, h // kvh, d)
  k_cache, v_cache = k_cache.astype(k.dtype), v_cache.astype(v.dtype)
  f32 = jnp.float32
  scores = jnp.concatenate(
      [
          jnp.einsum("btkgd,bskd->bkgts", qg, k_cache, preferred_element_type=f32),
          jnp.einsum("btkgd,bukd->bkgtu", qg, k, preferred_element_type=f32),
      ],
      axis=-1,
  ) * jnp.asarray(1.0 / math.sqrt(d), f32)
  new_mask = mask.reshape(b, 1, 1, 1, t) & jnp.tril(jnp.ones((t, t), bool))
  old_mask = jnp.broadcast_to(cache_mask[:, None, None, None, :], (b, 1, 1, t, s))
  valid = jnp.concatenate([old_mask, new_mask], axis=-1)
  scores = jnp.where(valid, scores, jnp.asarray(-0.7 * jnp.finfo(f32).max, f32))
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs[..., :s], v_cache, preferred_element_type=f32)
  out = out + jnp.einsum("bkgtu,bukd->btkgd", probs[..., s:], v, preferred_element_type=f32)
  return out.astype(q.dtype).reshape(b, t, h, d)


class LlamaMLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    gate = _dense(c, c.intermediate_size, "gate_proj")(x)
    up = _dense(c, c.intermediate_size, "up_proj")(x)
    return _dense(c, c.hidden_size, "down_proj")(_elementwise(_swiglu, c.elementwise_remat)(gate, up))


class LlamaDecoderLayer(nn.Module):
  """Pre-norm residual block; returns ``(hidden, new_kv)`` so that it can be ``nn.scan``'d.

  ``new_kv`` is ``None`` without a cache; with ``cache`` (the whole :class:`KVCache`) and
  ``layer`` (this layer's index into its layer axis) it is this layer's new ``(k, v)``.
  """

  config: LlamaConfig

  @nn.compact
  def __call__(
      self,
      x: Array,
      cos: Array,
      sin: Array,
      mask: Array | None,
      layer: Array | int | None = None,
      cache: "KVCache | None" = None,
  ) -> tuple[Array, tuple[Array, Array] | None]:
    c = self.config
    norm = functools.partial(RMSNorm, c.rms_norm_eps, c.dtype, c.param_dtype, c.elementwise_remat)
    kv = None
    if cache is not None:
      pick = functools.partial(jax.lax.dynamic_index_in_dim, index=layer, axis=1, keepdims=False)
      kv = (pick(cache.k), pick(cache.v), cache.mask)
    attn, new_kv = LlamaAttention(c, name="self_attn")(norm(name="input_layernorm")(x), cos, sin, mask, kv)
    h = x + attn
    out = h + LlamaMLP(c, name="mlp")(norm(name="post_attention_layernorm")(h))
    return out.astype(c.dtype), new_kv


class LMHead(nn.Module):
  """The untied output projection: a ``kernel`` of shape ``(hidden_size, vocab_size)``."""

  config: LlamaConfig

  def setup(self):
    c = self.config
    self.kernel = self.param(
        "kernel",
        nn.initializers.normal(c.initializer_range),
        (c.hidden_size, c.vocab_size),
        c.param_dtype,
    )


class LlamaForCausalLM(nn.Module):
  """A Llama-style causal language model (Hugging Face ``LlamaForCausalLM``'s numerics).

  Methods (call with ``model.apply(params, ..., method=...)``):

  - ``__call__(tokens, positions=None, attention_mask=None)`` → float32 logits ``(B, T, V)``.
  - ``hidden_states(...)`` → the final normed hidden states ``(B, T, D)`` in ``dtype``.
  - ``loss(tokens, labels=None, mask=None, *, chunk_size=None, ...)`` → mean next-token
    cross-entropy; with ``chunk_size`` the logits are formed ``chunk_size`` tokens at a time
    (see :func:`chunked_causal_lm_loss`), so ``(B, T, V)`` never exists.
  - ``extend(tokens, cache, attention_mask=None, *, last_only=False)`` → ``(logits, cache)``:
    incremental decoding with a :class:`KVCache` (:func:`init_cache`); prefill and decode
    steps. :mod:`lora_jax.models.generation` builds ``generate`` on it.

  ``tokens`` is ``(B, T)`` int; ``positions`` defaults to ``arange(T)``; ``attention_mask``
  ``(B, T)`` marks real (1) and padding (0) keys, on top of the causal mask.
  """

  config: LlamaConfig

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
        c.vocab_size,
        c.hidden_size,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        embedding_init=nn.initializers.normal(c.initializer_range),
    )
    layer = LlamaDecoderLayer
    if c.remat:
      layer = nn.remat(layer, policy=c.policy, prevent_cse=not c.scan_layers)
    if c.scan_layers:
      self.layers = nn.scan(
          layer,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          # cos, sin, mask, the layer index (scanned), the KV cache (read whole, sliced by index)
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
          out_axes=1,  # the new keys/values (B, T, ...) stack to (B, L, T, ...)
          length=c.num_hidden_layers,
          unroll=c.scan_unroll or c.num_hidden_layers,
      )(c)
    else:
      self.layers = [layer(c) for _ in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, c.elementwise_remat)
    if not c.tie_word_embeddings:
      self.lm_head = LMHead(c)

  def hidden_states(
      self, tokens: Array, positions: Array | None = None, attention_mask: Array | None = None
  ) -> Array:
    """The final normed hidden states ``(B, T, D)``, in the compute dtype."""
    c = self.config
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_cos_sin(positions, c)
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    x = self.embed_tokens(tokens).astype(c.dtype)
    if c.scan_layers:
      x, _ = self.layers(x, cos, sin, mask, None, None)
    else:
      for layer in self.layers:
        x, _ = layer(x, cos, sin, mask)
    return self.norm(x)

  def extend(
      self, tokens: Array, cache: "KVCache", attention_mask: Array | None = None, *, last_only: bool = False
  ) -> tuple[Array, "KVCache"]:
    """Runs ``T`` new tokens against a KV cache: a prefill (``T`` = prompt) or a decode step.

    Each row's new tokens are written at its ``cache.index``; they attend to the cache's real
    slots and causally to each other. A token's RoPE position is the number of real tokens
    before it in its row (Hugging Face ``generate``'s ``cumsum(attention_mask) - 1``), so
    padding anywhere changes nothing for the real tokens.

    Args:
      tokens: ``(B, T)`` int.
      cache: from :func:`init_cache` or a previous call; ``cache.index + T`` must not exceed
        its length ``S`` (not checked under ``jit``: a write past the end is clamped by XLA).
      attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding (default: all real).
      last_only: return only the logits of each row's last real new token, ``(B, V)``
        (a prefill for generation never forms ``(B, T, V)``).

    Returns:
      ``(logits, new_cache)``: float32 logits ``(B, T, V)`` (or ``(B, V)``), and the cache
      with the new keys/values written, their slots marked real or padding, ``index + T``.

    >>> config = LlamaConfig.tiny()
    >>> model = LlamaForCausalLM(config)
    >>> params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    >>> prompt = jnp.array([[5, 6, 7]])
    >>> logits, cache = model.apply(params, prompt, init_cache(config, 1, 8), method="extend")
    >>> step, cache = model.apply(params, jnp.array([[8]]), cache, method="extend")
    >>> full = model.apply(params, jnp.array([[5, 6, 7, 8]]))
    >>> bool(jnp.allclose(step[:, 0], full[:, 3], atol=1e-5)), cache.index.tolist()
    (True, [4])
    """
    c = self.config
    b, t = tokens.shape
    new_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    seen = jnp.sum(cache.mask, axis=1, dtype=jnp.int32)  # real tokens before these
    positions = jnp.maximum(seen[:, None] + jnp.cumsum(new_mask, axis=1, dtype=jnp.int32) - 1, 0)
    cos, sin = rope_cos_sin(positions, c)
    mask = new_mask[:, None, None, :]
    x = self.embed_tokens(tokens).astype(c.dtype)
    if c.scan_layers:
      layer_ids = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
      x, (k, v) = self.layers(x, cos, sin, mask, layer_ids, cache)
    else:
      ks, vs = [], []
      for i, layer in enumerate(self.layers):
        x, (k_i, v_i) = layer(x, cos, sin, mask, i, cache)
        ks.append(k_i)
        vs.append(v_i)
      k, v = jnp.stack(ks, axis=1), jnp.stack(vs, axis=1)
    hidden = self.norm(x)
    if last_only:
      last = t - 1 - jnp.argmax(new_mask[:, ::-1], axis=1)
      hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    write = lambda axis: jax.vmap(functools.partial(jax.lax.dynamic_update_slice_in_dim, axis=axis))  # noqa: E731
    new_cache = KVCache(
        k=write(1)(cache.k, k.astype(cache.k.dtype), cache.index),
        v=write(1)(cache.v, v.astype(cache.v.dtype), cache.index),
        mask=write(0)(cache.mask, new_mask, cache.index),
        index=cache.index + t,
    )
    return self.logits(hidden), new_cache

  def head_kernel(self) -> Array:
    """The output projection as a ``(D, V)`` kernel (``embed_tokens.T`` when tied)."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.embedding.T
    return self.lm_head.kernel

  def logits(self, hidden: Array) -> Array:
    """Float32 logits ``(..., V)`` from hidden states (matmul in dtype, accumulated in f32)."""
    return _head(hidden, self.head_kernel(), self.config.dtype, self.config.logits_dtype)

  def __call__(
      self, tokens: Array, positions: Array | None = None, attention_mask: Array | None = None
  ) -> Array:
    return self.logits(self.hidden_states(tokens, positions, attention_mask))

  def loss(
      self,
      tokens: Array,
      labels: Array | None = None,
      mask: Array | None = None,
      *,
      positions: Array | None = None,
      attention_mask: Array | None = None,
      chunk_size: int | None = None,
  ) -> Array:
    """Mean next-token cross-entropy (see :func:`causal_lm_loss` for the conventions).

    Args:
      tokens: ``(B, T)`` input ids.
      labels: ``(B, T)`` targets aligned with ``tokens`` (shifted inside); default ``tokens``.
      mask: ``(B, T)`` which labels count; default ``attention_mask`` (or all).
      positions: see ``__call__``.
      attention_mask: see ``__call__``.
      chunk_size: if set, never form the full ``(B, T, V)`` logits.
    """
    labels = tokens if labels is None else labels
    mask = attention_mask if mask is None else mask
    hidden = self.hidden_states(tokens, positions, attention_mask)
    if chunk_size is None:
      return causal_lm_loss(self.logits(hidden), labels, mask)
    return chunked_causal_lm_loss(
        hidden, self.head_kernel(), labels, mask, chunk_size=chunk_size, dtype=self.config.dtype,
        logits_dtype=self.config.logits_dtype,
    )


def _head(hidden: Array, kernel: Array, dtype: Any, logits_dtype: Any = jnp.float32) -> Array:
  """Float32 logits of ``hidden @ kernel``: inputs in ``dtype``, accumulated in float32, the
  product written in ``logits_dtype`` (a compute-dtype product keeps the backward's GEMMs in it)."""
  out = jnp.dot(hidden.astype(dtype), kernel.astype(dtype), preferred_element_type=logits_dtype)
  return out.astype(jnp.float32)


def lora_layout(config: LlamaConfig) -> dict[str, str] | None:
  """The ``LoraSpec(layout=...)`` rule for this model: stacked kernels are ``'lio'``.

  >>> lora_layout(LlamaConfig.tiny()), lora_layout(LlamaConfig.tiny(scan_layers=False))
  ({'layers/.*': 'lio'}, None)
  """
  return {"layers/.*": "lio"} if config.scan_layers else None


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def _shifted(labels: Array, mask: Array | None, ignore_index: int) -> tuple[Array, Array]:
  targets = labels[:, 1:]
  valid = targets != ignore_index
  if mask is not None:
    valid = valid & mask[:, 1:].astype(bool)
  return jnp.where(valid, targets, 0), valid


def causal_lm_loss(
    logits: Array, labels: Array, mask: Array | None = None, *, ignore_index: int = -100
) -> Array:
  """Mean next-token cross-entropy, as Hugging Face's ``LlamaForCausalLM(labels=...)``.

  ``logits[:, t]`` predicts ``labels[:, t + 1]``; labels equal to ``ignore_index`` and
  positions where ``mask`` (aligned with ``labels``) is 0 are left out of the mean.

  Args:
    logits: ``(B, T, V)``, any float dtype (the loss is computed in float32).
    labels: ``(B, T)`` int, aligned with the inputs (usually the input ids themselves).
    mask: optional ``(B, T)`` 0/1 or bool.
    ignore_index: label value that does not count.

  Returns:
    A float32 scalar (0 when nothing counts).

  >>> logits = jnp.zeros((1, 3, 4))
  >>> float(causal_lm_loss(logits, jnp.array([[0, 1, 2]])))  # uniform over 4 classes: log 4
  1.386...
  """
  targets, valid = _shifted(labels, mask, ignore_index)
  logits = logits[:, :-1].astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def chunked_causal_lm_loss(
    hidden: Array,
    kernel: Array,
    labels: Array,
    mask: Array | None = None,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    dtype: Any = None,
    logits_dtype: Any = jnp.float32,
) -> Array:
  """:func:`causal_lm_loss` of ``hidden @ kernel`` without forming all the logits at once.

  Tokens are processed ``chunk_size`` at a time under ``lax.scan`` with a rematerialised body,
  so forward and backward hold one ``(chunk_size, V)`` float32 block instead of ``(B, T, V)``.

  Args:
    hidden: ``(B, T, D)`` final hidden states.
    kernel: ``(D, V)`` output projection.
    labels: ``(B, T)``; see :func:`causal_lm_loss`.
    mask: optional ``(B, T)``.
    chunk_size: tokens per chunk.
    ignore_index: label value that does not count.
    dtype: matmul input dtype (default: ``hidden.dtype``); accumulation is float32.
    logits_dtype: the dtype the matmul writes before the float32 loss
      (:attr:`LlamaConfig.logits_dtype`).

  Returns:
    A float32 scalar.

  >>> h, w = jnp.ones((2, 5, 3)), jnp.ones((3, 7))
  >>> y = jnp.array([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]])
  >>> bool(jnp.allclose(chunked_causal_lm_loss(h, w, y, chunk_size=3), causal_lm_loss(h @ w, y)))
  True
  """
  if chunk_size < 1:
    raise ValueError(f"chunked_causal_lm_loss(chunk_size={chunk_size}): expected a positive integer.")
  dtype = hidden.dtype if dtype is None else dtype
  targets, valid = _shifted(labels, mask, ignore_index)
  d = hidden.shape[-1]
  h = hidden[:, :-1].reshape(-1, d)
  targets, valid = targets.reshape(-1), valid.reshape(-1)
  n = h.shape[0]
  chunk = min(chunk_size, n)
  pad = (-n) % chunk
  h = jnp.pad(h, ((0, pad), (0, 0)))
  targets = jnp.pad(targets, (0, pad))
  valid_p = jnp.pad(valid, (0, pad))

  @jax.checkpoint
  def chunk_nll(h_c: Array, t_c: Array, v_c: Array) -> Array:
    logits = _head(h_c, kernel, dtype, logits_dtype)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t_c[:, None], -1)[:, 0]
    return jnp.sum(jnp.where(v_c, nll, 0.0))

  def body(total: Array, xs: tuple[Array, Array, Array]) -> tuple[Array, None]:
    return total + chunk_nll(*xs), None

  xs = (h.reshape(-1, chunk, d), targets.reshape(-1, chunk), valid_p.reshape(-1, chunk))
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total / jnp.maximum(jnp.sum(valid), 1)


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ----------------------------------------------------------------------------------------------

# (HF suffix within model.layers.{i}, Flax sub-path, is a torch Linear weight)
_LAYER_PARAMS = (
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), True),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), True),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), True),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), True),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True),
    ("input_layernorm.weight", ("input_layernorm", "scale"), False),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), False),
)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _torch_shapes(c: LlamaConfig) -> dict[str, tuple[tuple[int, ...], str]]:
  """HF layer-param suffix -> (torch shape, how the config determines it)."""
  q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  d, f = c.hidden_size, c.intermediate_size
  qs = f"num_attention_heads * head_dim = {c.num_attention_heads} * {c.head_dim}"
  kvs = f"num_key_value_heads * head_dim = {c.num_key_value_heads} * {c.head_dim}"
  return {
      "self_attn.q_proj.weight": ((q, d), f"(out, in) = ({qs}, hidden_size)"),
      "self_attn.k_proj.weight": ((kv, d), f"(out, in) = ({kvs}, hidden_size)"),
      "self_attn.v_proj.weight": ((kv, d), f"(out, in) = ({kvs}, hidden_size)"),
      "self_attn.o_proj.weight": ((d, q), f"(out, in) = (hidden_size, {qs})"),
      "mlp.gate_proj.weight": ((f, d), "(out, in) = (intermediate_size, hidden_size)"),
      "mlp.up_proj.weight": ((f, d), "(out, in) = (intermediate_size, hidden_size)"),
      "mlp.down_proj.weight": ((d, f), "(out, in) = (hidden_size, intermediate_size)"),
      "input_layernorm.weight": ((d,), "(hidden_size,)"),
      "post_attention_layernorm.weight": ((d,), "(hidden_size,)"),
  }


def hf_param_shapes(
    config: LlamaConfig, *, include_tied_lm_head: bool = False
) -> dict[str, tuple[int, ...]]:
  """Every Hugging Face ``state_dict`` key this config uses, with its torch shape, in order.

  >>> shapes = hf_param_shapes(LlamaConfig.tiny(num_hidden_layers=1))
  >>> list(shapes)[:2], shapes['model.layers.0.self_attn.k_proj.weight']
  (['model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight'], (32, 64))
  """
  return {k: v[0] for k, v in _expected(config, include_tied_lm_head).items()}


def _expected(c: LlamaConfig, include_tied_lm_head: bool) -> dict[str, tuple[tuple[int, ...], str]]:
  out = {"model.embed_tokens.weight": ((c.vocab_size, c.hidden_size), "(vocab_size, hidden_size)")}
  layer = _torch_shapes(c)
  for i in range(c.num_hidden_layers):
    for suffix, _, _ in _LAYER_PARAMS:
      out[f"model.layers.{i}.{suffix}"] = layer[suffix]
  out["model.norm.weight"] = ((c.hidden_size,), "(hidden_size,)")
  if not c.tie_word_embeddings or include_tied_lm_head:
    out["lm_head.weight"] = ((c.vocab_size, c.hidden_size), "(vocab_size, hidden_size)")
  return out


def _to_numpy(x: Any) -> np.ndarray:
  if isinstance(x, np.ndarray):
    return x
  if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor; bf16 has no numpy view
    t = x.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      return t.float().numpy().astype(jnp.bfloat16)
    return t.numpy()
  return np.asarray(x)


class _Tensors:
  """Name -> numpy array, read lazily from a mapping or from safetensors files."""

  def __init__(self, mapping: Mapping[str, Any] | None, handles: dict[str, Any] | None):
    self._mapping = mapping
    self._handles = handles  # name -> safe_open handle

  def keys(self) -> list[str]:
    return list(self._mapping if self._mapping is not None else self._handles)

  def __getitem__(self, name: str) -> np.ndarray:
    if self._mapping is not None:
      return _to_numpy(self._mapping[name])
    return self._handles[name].get_tensor(name)


def _safetensors_files(path: str) -> list[str]:
  if os.path.isfile(path):
    if path.endswith(".json"):
      return _index_files(path)
    if path.endswith(".safetensors"):
      return [path]
    raise ValueError(
        f"load_hf_llama: {path!r} is not a .safetensors file or a safetensors index (.json). "
        "Pickled checkpoints (.bin, .pt) are not loaded; re-save them with "
        "model.save_pretrained(dir, safe_serialization=True)."
    )
  if not os.path.isdir(path):
    raise FileNotFoundError(f"load_hf_llama: no such file or directory: {path!r}.")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    return _index_files(index)
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
  if found:
    return found
  raise FileNotFoundError(
      f"load_hf_llama: {path!r} holds no model.safetensors, no model.safetensors.index.json "
      f"and no *.safetensors (found: {sorted(os.listdir(path))[:10]}). Pickled checkpoints "
      "(pytorch_model.bin) are not loaded; re-save with model.save_pretrained(dir, "
      "safe_serialization=True)."
  )


def _index_files(index_path: str) -> list[str]:
  with open(index_path) as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ValueError(f"load_hf_llama: {index_path!r} has no 'weight_map' dict.")
  root = os.path.dirname(index_path)
  return [os.path.join(root, name) for name in sorted(set(weight_map.values()))]


@contextlib.contextmanager
def _open_source(source: Source) -> Iterator[_Tensors]:
  if isinstance(source, Mapping):
    yield _Tensors(dict(source), None)
    return
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError(
        "load_hf_llama: expected a dict name -> array (e.g. {k: v.numpy() for k, v in "
        "model.state_dict().items()}) or a path to Hugging Face safetensors; got "
        f"{type(source).__name__}."
    )
  from safetensors import safe_open

  with contextlib.ExitStack() as stack:
    handles: dict[str, Any] = {}
    for file in _safetensors_files(os.fspath(source)):
      h = stack.enter_context(safe_open(file, framework="numpy"))
      for name in h.keys():
        if name in handles:
          raise ValueError(f"load_hf_llama: key {name!r} appears in more than one safetensors file.")
        handles[name] = h
    yield _Tensors(None, handles)


def _fmt_keys(keys: list[str], n: int = 6) -> str:
  more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
  return ", ".join(repr(k) for k in keys[:n]) + more


def _layer_count(keys: list[str]) -> int:
  ids = set()
  for k in keys:
    parts = k.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
      ids.add(int(parts[2]))
  return max(ids) + 1 if ids else 0


def _check_keys(present: list[str], expected: Mapping[str, Any], config: LlamaConfig, strict: bool) -> None:
  present_set = set(present)
  missing = [k for k in expected if k not in present_set]
  if missing:
    hints = []
    found_layers = _layer_count(present)
    if found_layers != config.num_hidden_layers:
      hints.append(f"the checkpoint has {found_layers} layers, the config {config.num_hidden_layers}")
    if missing == ["lm_head.weight"]:
      hints.append("a checkpoint without lm_head.weight has tied embeddings: set tie_word_embeddings=True")
    if not any(k.startswith("model.") for k in present):
      hints.append(
          "keys should look like 'model.layers.0.self_attn.q_proj.weight' (LlamaForCausalLM's state_dict)"
      )
    raise ValueError(
        f"load_hf_llama: the checkpoint lacks {len(missing)} key(s) the config needs: "
        f"{_fmt_keys(missing)}." + (f" Hint: {'; '.join(hints)}." if hints else "")
    )
  extra = [
      k
      for k in present
      if k not in expected
      and not k.endswith(_IGNORED_SUFFIXES)
      and not (k == "lm_head.weight" and config.tie_word_embeddings)
  ]
  if extra and strict:
    hints = []
    found_layers = _layer_count(present)
    if found_layers > config.num_hidden_layers:
      hints.append(f"the checkpoint has {found_layers} layers, the config {config.num_hidden_layers}")
    if any(k.endswith(".bias") for k in extra):
      hints.append("bias terms (attention_bias / mlp_bias) are not supported")
    raise ValueError(
        f"load_hf_llama: the checkpoint has {len(extra)} key(s) this config does not use: "
        f"{_fmt_keys(extra)}."
        + (f" Hint: {'; '.join(hints)}." if hints else "")
        + " Pass strict=False to ignore them."
    )


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_hf_llama(
    source: Source, config: LlamaConfig, *, strict: bool = True, to_device: bool = True
) -> dict[str, Any]:
  """Loads a Hugging Face Llama checkpoint into this module's params.

  Args:
    source: a dict name -> array (numpy arrays, or torch tensors, e.g. ``model.state_dict()``),
      a ``*.safetensors`` file, a ``model.safetensors.index.json``, or a directory holding
      ``model.safetensors`` or sharded ``model-0000x-of-0000y.safetensors`` with their index.
      No hub access and no pickles.
    config: the target config (e.g. from :func:`llama_config_from_hf`); decides the layout
      (``scan_layers``) and dtype (``param_dtype``) of the result.
    strict: reject keys the config does not use (``rotary_emb.inv_freq`` buffers are always
      ignored; so is ``lm_head.weight`` when tied, after checking it equals the embedding).
    to_device: return jax arrays (``False``: numpy arrays, e.g. to ``device_put`` with a
      sharding yourself).

  Returns:
    ``{"params": {...}}``, ready for ``LlamaForCausalLM(config).apply``.

  Raises:
    ValueError: missing or unexpected keys, or a shape that does not fit the config (the
      message names the key, expected and found shapes); a tied config whose checkpoint has
      a different ``lm_head.weight``.
    FileNotFoundError: no safetensors at ``source``.
  """
  expected = _expected(config, include_tied_lm_head=False)
  dtype = np.dtype(config.param_dtype)
  with _open_source(source) as tensors:
    _check_keys(tensors.keys(), expected, config, strict)

    def get(name: str, transpose: bool) -> np.ndarray:
      arr = tensors[name]
      shape, how = expected[name]
      if tuple(arr.shape) != shape:
        raise ValueError(
            f"load_hf_llama: {name!r} has shape {tuple(arr.shape)}, but the config expects "
            f"{shape} = {how}. Check the config's sizes (llama_config_from_hf reads them from "
            "config.json)."
        )
      if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.dtype(jnp.bfloat16):
        raise TypeError(f"load_hf_llama: {name!r} has dtype {arr.dtype}; expected floating point.")
      return (arr.T if transpose else arr).astype(dtype)

    params: dict[str, Any] = {}
    embedding = get("model.embed_tokens.weight", False)
    params["embed_tokens"] = {"embedding": embedding}
    for suffix, sub, transpose in _LAYER_PARAMS:
      per_layer = [get(f"model.layers.{i}.{suffix}", transpose) for i in range(config.num_hidden_layers)]
      if config.scan_layers:
        _set(params, ("layers", *sub), np.stack(per_layer))
      else:
        for i, arr in enumerate(per_layer):
          _set(params, (f"layers_{i}", *sub), np.ascontiguousarray(arr))
    params["norm"] = {"scale": get("model.norm.weight", False)}
    if config.tie_word_embeddings:
      if "lm_head.weight" in set(tensors.keys()):
        head = tensors["lm_head.weight"].astype(dtype)
        if head.shape != embedding.shape or not np.array_equal(head, embedding):
          raise ValueError(
              "load_hf_llama: config.tie_word_embeddings=True but the checkpoint's "
              "'lm_head.weight' differs from 'model.embed_tokens.weight'; set "
              "tie_word_embeddings=False to load the separate head."
          )
    else:
      params["lm_head"] = {"kernel": np.ascontiguousarray(get("lm_head.weight", True))}
  if to_device:
    params = jax.tree.map(jnp.asarray, params)
  return {"params": params}


def _flat(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, (*prefix, str(k))))
    else:
      out[(*prefix, str(k))] = v
  return out


def _flax_shapes(c: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  out = {("embed_tokens", "embedding"): (c.vocab_size, c.hidden_size)}
  torch_shapes = _torch_shapes(c)
  for suffix, sub, transpose in _LAYER_PARAMS:
    shape = torch_shapes[suffix][0]
    shape = shape[::-1] if transpose else shape
    if c.scan_layers:
      out[("layers", *sub)] = (c.num_hidden_layers, *shape)
    else:
      for i in range(c.num_hidden_layers):
        out[(f"layers_{i}", *sub)] = shape
  out[("norm", "scale")] = (c.hidden_size,)
  if not c.tie_word_embeddings:
    out[("lm_head", "kernel")] = (c.hidden_size, c.vocab_size)
  return out


def to_hf_llama(
    params: Mapping[str, Any],
    config: LlamaConfig,
    *,
    dtype: Any = None,
    include_tied_lm_head: bool = True,
) -> dict[str, np.ndarray]:
  """The inverse of :func:`load_hf_llama`: Hugging Face ``state_dict`` names and layouts.

  Args:
    params: ``{"params": {...}}`` or the inner dict, laid out as ``config`` says.
    config: the config the params were built for.
    dtype: cast every array to this numpy dtype (default: keep the params' dtype; torch
      cannot read numpy bfloat16 directly, so pass ``np.float32`` before ``torch.from_numpy``).
    include_tied_lm_head: with tied embeddings, also emit ``lm_head.weight`` (a copy of the
      embedding) as ``LlamaForCausalLM.state_dict()`` does; ``save_pretrained`` omits it.

  Returns:
    ``{hf_name: np.ndarray}`` in ``state_dict`` order, torch layout (``Linear`` is ``(out, in)``).

  Raises:
    ValueError: params that do not fit ``config`` (the message names the path, expected and
      found shapes).

  >>> config = LlamaConfig.tiny(num_hidden_layers=1)
  >>> rng = np.random.default_rng(0)
  >>> sd = {k: rng.normal(size=s).astype(np.float32) for k, s in hf_param_shapes(config).items()}
  >>> params = load_hf_llama(sd, config)
  >>> params["params"]["layers"]["self_attn"]["q_proj"]["kernel"].shape
  (1, 64, 64)
  >>> back = to_hf_llama(params, config)
  >>> list(back) == list(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  True
  """
  if set(params) == {"params"}:
    params = params["params"]
  flat = _flat(params)
  want = _flax_shapes(config)
  missing = ["/".join(p) for p in want if p not in flat]
  extra = ["/".join(p) for p in flat if p not in want]
  if missing or extra:
    raise ValueError(
        "to_hf_llama: params do not fit the config"
        + (f"; missing: {_fmt_keys(missing)}" if missing else "")
        + (f"; unexpected: {_fmt_keys(extra)}" if extra else "")
        + f" (config: scan_layers={config.scan_layers}, tie_word_embeddings="
        f"{config.tie_word_embeddings}, num_hidden_layers={config.num_hidden_layers})."
    )
  for path, shape in want.items():
    found = tuple(np.shape(flat[path]))
    if found != shape:
      name = "/".join(path)
      raise ValueError(f"to_hf_llama: {name!r} has shape {found}, but the config expects {shape}.")

  def out(x: Any, transpose: bool) -> np.ndarray:
    arr = np.asarray(x)
    arr = np.ascontiguousarray(arr.T) if transpose else arr
    return arr if dtype is None else arr.astype(dtype)

  sd = {"model.embed_tokens.weight": out(flat[("embed_tokens", "embedding")], False)}
  for i in range(config.num_hidden_layers):
    for suffix, sub, transpose in _LAYER_PARAMS:
      x = flat[("layers", *sub)][i] if config.scan_layers else flat[(f"layers_{i}", *sub)]
      sd[f"model.layers.{i}.{suffix}"] = out(x, transpose)
  sd["model.norm.weight"] = out(flat[("norm", "scale")], False)
  if not config.tie_word_embeddings:
    sd["lm_head.weight"] = out(flat[("lm_head", "kernel")], True)
  elif include_tied_lm_head:
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()
  return sd


def save_hf_llama(
    params: Mapping[str, Any], config: LlamaConfig, directory: str | os.PathLike, *, dtype: Any = None
) -> str:
  """Writes ``config.json`` and ``model.safetensors`` that ``transformers`` loads.

  Args:
    params: ``{"params": {...}}`` (e.g. ``lora_jax.merge(params, adapters)``).
    config: their config.
    directory: created if missing.
    dtype: numpy dtype to store (default: the params' dtype; bfloat16 is fine).

  Returns:
    The directory path.
  """
  from safetensors.numpy import save_file

  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  sd = to_hf_llama(params, config, dtype=dtype, include_tied_lm_head=False)
  hf = llama_config_to_hf(config)
  if dtype is not None:
    hf["torch_dtype"] = str(np.dtype(dtype))
  tmp = os.path.join(directory, "model.safetensors.tmp")
  save_file(sd, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  return directory


__all__ = [
    "REMAT_POLICIES",
    "LlamaAttention",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "KVCache",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LMHead",
    "RMSNorm",
    "RopeScaling",
    "apply_rope",
    "causal_lm_loss",
    "chunked_causal_lm_loss",
    "hf_param_shapes",
    "init_cache",
    "llama_config_from_hf",
    "llama_config_to_hf",
    "load_hf_llama",
    "lora_layout",
    "rope_cos_sin",
    "rope_inv_freq",
    "save_hf_llama",
    "to_hf_llama",
]
