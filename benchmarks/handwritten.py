"""A hand-written factored LoRA Llama in plain JAX: the baseline that wrap() should match.

Same parameters, shapes and numerics as :class:`lora_jax.models.llama.LlamaForCausalLM`
(stacked layers under ``lax.scan``, ``jax.checkpoint`` per layer, float32 norms and RoPE,
``jax.nn.dot_product_attention`` with the config's implementation, e.g. cuDNN), but every
adapted projection is written out by hand as ``x @ W + scale * (x @ a) @ b``. No lora_jax
transform is involved; only the model's RoPE helpers and loss functions are reused.
"""

from __future__ import annotations

import functools

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.models import llama

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def init_adapters(key: jax.Array, params: dict[str, Any], targets: tuple[str, ...], rank: int) -> dict[str, Any]:
  """``{name: (a, b)}`` float32 factors for the stacked kernels named in ``targets``.

  ``a`` is ``(L, in, r)`` (PEFT's kaiming-uniform bound ``1/sqrt(in)``), ``b`` is ``(L, r, out)``
  and starts at zero.
  """
  layers = params["params"]["layers"]
  out = {}
  for i, name in enumerate(targets):
    group = "self_attn" if name in ATTN else "mlp"
    n_layers, d_in, d_out = layers[group][name]["kernel"].shape
    bound = 1.0 / d_in**0.5
    a = jax.random.uniform(jax.random.fold_in(key, i), (n_layers, d_in, rank), jnp.float32, -bound, bound)
    out[name] = (a, jnp.zeros((n_layers, rank, d_out), jnp.float32))
  return out


def _rms(x: jax.Array, scale: jax.Array, eps: float, dtype: Any, remat: bool = False) -> jax.Array:
  # the model's own elementwise function (and its elementwise_remat), so both run the same math
  return llama._elementwise(functools.partial(llama._rms_norm, eps=eps, dtype=dtype), remat)(x, scale)


def loss(
    params: dict[str, Any],
    adapters: dict[str, Any],
    tokens: jax.Array,
    *,
    config: llama.LlamaConfig,
    scale: float,
    chunk_size: int | None,
    group: bool = False,
) -> jax.Array:
  """Mean next-token cross-entropy of the factored-LoRA model (labels = tokens).

  With ``group=True`` the adapters that read the same input share one thin GEMM:
  ``h @ [a_q|a_k|a_v]`` and ``g @ [a_gate|a_up]`` (then split), an experiment that measures
  what grouping is worth before the transform does it. ``config.scan_unroll`` unrolls the scan.
  """
  c = config
  if not c.scan_layers:
    raise ValueError("handwritten.loss scans stacked layers: LlamaConfig(scan_layers=False) tunes are not supported")
  dt = c.dtype
  p = params["params"]
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cos, sin = llama.rope_cos_sin(positions, c)

  def dense(x, w, ad, low=None):
    y = x @ w.astype(dt)
    if ad is None:
      return y
    a, bb = ad
    if low is None:
      low = jnp.dot(x, a.astype(dt), preferred_element_type=jnp.float32).astype(dt)
    delta = jnp.dot(low, bb.astype(dt), preferred_element_type=jnp.float32)
    return y + (scale * delta).astype(dt)

  def lows(x, la, names):
    """``{name: x @ a_name}`` from one GEMM over the concatenated ``a``s (``group=True``)."""
    present = [n for n in names if n in la]
    if not group or len(present) < 2:
      return {}
    a = jnp.concatenate([la[n][0].astype(dt) for n in present], axis=-1)
    low = jnp.dot(x, a, preferred_element_type=jnp.float32).astype(dt)
    parts = jnp.split(low, len(present), axis=-1)
    return dict(zip(present, parts))

  def layer(x, lp, la):
    h = _rms(x, lp["input_layernorm"]["scale"], c.rms_norm_eps, dt, c.elementwise_remat)
    at, mlp = lp["self_attn"], lp["mlp"]
    lo = lows(h, la, ("q_proj", "k_proj", "v_proj"))
    q = dense(h, at["q_proj"]["kernel"], la.get("q_proj"), lo.get("q_proj"))
    k = dense(h, at["k_proj"]["kernel"], la.get("k_proj"), lo.get("k_proj"))
    v = dense(h, at["v_proj"]["kernel"], la.get("v_proj"), lo.get("v_proj"))
    q = llama.apply_rope(q.reshape(b, t, c.num_attention_heads, c.head_dim), cos, sin, c.rope_dtype)
    k = llama.apply_rope(k.reshape(b, t, c.num_key_value_heads, c.head_dim), cos, sin, c.rope_dtype)
    v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=c.attention_implementation)
    h = x + dense(o.reshape(b, t, -1), at["o_proj"]["kernel"], la.get("o_proj"))
    g = _rms(h, lp["post_attention_layernorm"]["scale"], c.rms_norm_eps, dt, c.elementwise_remat)
    lo = lows(g, la, ("gate_proj", "up_proj"))
    up = llama._elementwise(llama._swiglu, c.elementwise_remat)(
        dense(g, mlp["gate_proj"]["kernel"], la.get("gate_proj"), lo.get("gate_proj")),
        dense(g, mlp["up_proj"]["kernel"], la.get("up_proj"), lo.get("up_proj")),
    )
    return (h + dense(up, mlp["down_proj"]["kernel"], la.get("down_proj"))).astype(dt)

  if c.remat:
    layer = jax.checkpoint(layer, policy=c.policy, prevent_cse=False)

  def body(x, xs):
    lp, la = xs
    return layer(x, lp, la), None

  x = p["embed_tokens"]["embedding"][tokens].astype(dt)
  x, _ = lax.scan(body, x, (p["layers"], adapters), unroll=c.scan_unroll or c.num_hidden_layers)
  hidden = _rms(x, p["norm"]["scale"], c.rms_norm_eps, dt, c.elementwise_remat)
  kernel = p["lm_head"]["kernel"]
  if chunk_size is None:
    logits = llama._head(hidden, kernel, dt, c.logits_dtype)
    return llama.causal_lm_loss(logits, tokens)
  return llama.chunked_causal_lm_loss(hidden, kernel, tokens, chunk_size=chunk_size, dtype=dt,
                                     logits_dtype=c.logits_dtype)
