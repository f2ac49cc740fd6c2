"""Generation with a KV cache for :mod:`lora_jax.models.llama`: base, one adapter, or one per row.

The pieces, each a pure function that works under ``jit``:

- :func:`~lora_jax.models.llama.init_cache` -- an empty :class:`~lora_jax.models.llama.KVCache`;
- :func:`prefill` -- run the prompts into the cache, logits of each row's last token;
- :func:`decode_step` -- one token per row against the cache;
- :func:`sample_logits` -- greedy, or temperature + top-p (nucleus) sampling;
- :func:`generate` -- all of them in one jitted function: a prefill, then a ``lax.while_loop``
  of decode steps (it stops early once every row has emitted ``eos_token_id``).

Adapters: ``adapters=None`` runs the base (pass ``lora_jax.merge(params, adapters)`` as
``params`` for a merged model); one adapter tree runs ``lora_jax.wrap(apply)`` (factored:
the update is never formed); a bank (``lora_jax.stack``) with ``adapter_ids`` ``(B,)`` runs
each row with its own adapter (``-1``: the base) in the same call.

Prompt lengths are bucketed (:func:`bucket_length`: the next power of two, at least 16): a
prompt batch is left-padded to its bucket, so prompts of one bucket share one compile.

>>> from lora_jax.models import llama
>>> config = llama.LlamaConfig.tiny()
>>> model = llama.LlamaForCausalLM(config)
>>> params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
>>> prompts = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])  # left-padded
>>> mask = prompts != 0
>>> out = generate(model, params, prompts, mask, max_new_tokens=4)
>>> out.tokens.shape, out.lengths.tolist()
((2, 4), [4, 4])
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax.bases import BaseLeaf
from lora_jax.models.llama import KVCache, LlamaForCausalLM, init_cache

Array = jax.Array
PyTree = Any

__all__ = [
    "Generated",
    "KVCache",
    "bucket_length",
    "decode_step",
    "generate",
    "init_cache",
    "prefill",
    "sample_logits",
]


class Generated(NamedTuple):
  """What :func:`generate` returns.

  Attributes:
    tokens: ``(B, max_new_tokens)`` int32; after a row's ``eos_token_id``, ``pad_token_id``.
    lengths: ``(B,)`` int32: tokens generated per row, its ``eos_token_id`` included.
  """

  tokens: Array
  lengths: Array


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def sample_logits(
    logits: Array, rng: Array | None = None, *, temperature: float | Array = 0.0, top_p: float | Array = 1.0
) -> Array:
  """The next token of each row: greedy, or sampled with temperature and top-p.

  Temperature divides the logits first; top-p then keeps the smallest set of most likely
  tokens whose probability reaches ``top_p`` (the most likely token always), as Hugging
  Face's ``TopPLogitsWarper`` does; the token is drawn from what is kept.

  Args:
    logits: ``(B, V)`` (any float dtype; computed in float32).
    rng: a PRNG key; needed unless ``temperature`` is the number 0.
    temperature: ``0`` (the Python number): greedy, ``argmax`` (the first on ties). A float
      ``> 0``, or a ``(B,)`` array (a row whose temperature is 0 is greedy).
    top_p: in ``(0, 1]``, a number or ``(B,)``; the number 1 skips the sort over the vocabulary.

  Returns:
    ``(B,)`` int32 tokens.

  Raises:
    ValueError: sampling without ``rng``; ``temperature < 0`` or ``top_p`` outside ``(0, 1]``.

  >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  >>> sample_logits(logits).tolist()
  [0]
  >>> draws = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_p=0.7))(
  ...     jax.random.split(jax.random.key(0), 200))
  >>> sorted(set(draws[:, 0].tolist()))  # 0.5 < 0.7 <= 0.5 + 0.3: tokens 0 and 1 only
  [0, 1]
  """
  if _is_number(temperature) and temperature < 0:
    raise ValueError(f"sample_logits(temperature={temperature}): expected >= 0 (0 is greedy).")
  if _is_number(top_p) and not 0 < top_p <= 1:
    raise ValueError(f"sample_logits(top_p={top_p}): expected 0 < top_p <= 1.")
  logits = jnp.asarray(logits).astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if _is_number(temperature) and temperature == 0:
    return greedy
  if rng is None:
    raise ValueError(
        f"sample_logits(temperature={temperature}): sampling needs a PRNG key, e.g. "
        "rng=jax.random.key(0) (temperature=0 is greedy and needs none)."
    )
  t_row = jnp.asarray(temperature, jnp.float32)  # () or (B,)
  t = t_row[..., None] if t_row.ndim else t_row
  scaled = logits / jnp.where(t > 0, t, 1.0)
  if not (_is_number(top_p) and top_p == 1):
    p = jnp.asarray(top_p, jnp.float32)
    p = p[..., None] if p.ndim else p
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    kept = before < p  # the first token always (0 < p)
    cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
  drawn = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
  return jnp.where(t_row > 0, drawn, greedy)


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _wrapped(apply: Callable[..., Any], per_row: bool) -> Callable[..., Any]:
  # Cached: a new wrap is a new jitted function, which would retrace on every call.
  if per_row:
    return lora_jax.wrap(apply, in_axes=0, out_axes=0)
  return lora_jax.wrap(apply)


def _runner(
    model: LlamaForCausalLM, apply: Callable[..., Any] | None, adapters: PyTree, adapter_ids: Array | None
) -> Callable[..., Any]:
  """``run(params, *args, **kwargs)``: ``model.apply``, with the adapters if any."""
  apply = model.apply if apply is None else apply
  if not callable(apply):
    raise TypeError(f"apply={apply!r}: expected a function like model.apply (params, *args, method=...).")
  if adapter_ids is not None:
    if adapters is None:
      raise ValueError(
          "adapter_ids given without adapters: pass a bank of adapters, "
          "adapters=lora_jax.stack({'name': adapters, ...}), with adapter_ids indexing it."
      )
    lora = _wrapped(apply, True)
    return lambda params, *args, **kw: lora(params, adapters, *args, adapter_ids=adapter_ids, **kw)
  if adapters is not None:
    lora = _wrapped(apply, False)
    return lambda params, *args, **kw: lora(params, adapters, *args, **kw)

  def base_alone(params, *args, **kw):
    # A quantized base is dequantized where each kernel is used, by the wrapped call with no adapters.
    if any(isinstance(x, BaseLeaf) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, BaseLeaf))):
      return _wrapped(apply, False)(params, None, *args, **kw)
    return apply(params, *args, **kw)

  return base_alone


def prefill(
    model: LlamaForCausalLM,
    params: PyTree,
    prompts: Array,
    prompt_mask: Array | None,
    cache: KVCache,
    *,
    adapters: PyTree = None,
    adapter_ids: Array | None = None,
    apply: Callable[..., Any] | None = None,
) -> tuple[Array, KVCache]:
  """Runs the prompts into ``cache``: the logits of each row's last real token, and the cache.

  Args:
    model: a :class:`~lora_jax.models.llama.LlamaForCausalLM`.
    params: its ``{"params": ...}`` (merged params for a merged model).
    prompts: ``(B, P)`` int, padded (on the left, usually).
    prompt_mask: ``(B, P)``: 1 real, 0 padding; ``None``: all real.
    cache: from :func:`~lora_jax.models.llama.init_cache` with at least ``P`` free slots.
    adapters: ``None`` (the base), one adapter tree, or a bank (with ``adapter_ids``).
    adapter_ids: ``(B,)`` int: each row's adapter in the bank, ``-1`` for the base.
    apply: a function to call instead of ``model.apply`` (the adapters wrap it).

  Returns:
    ``(logits, cache)``: float32 ``(B, V)`` and the cache holding the prompts.

  Jit it with the model static for timing, e.g.
  ``jax.jit(prefill, static_argnums=0, static_argnames="apply")``.

  >>> from lora_jax.models import llama
  >>> config = llama.LlamaConfig.tiny()
  >>> model = llama.LlamaForCausalLM(config)
  >>> params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  >>> cache = llama.init_cache(config, 2, 16)
  >>> run = jax.jit(prefill, static_argnums=0)
  >>> logits, cache = run(model, params, jnp.ones((2, 5), jnp.int32), None, cache)
  >>> logits.shape, cache.index.tolist()
  ((2, 128), [5, 5])
  """
  run = _runner(model, apply, adapters, adapter_ids)
  if prompt_mask is None:
    prompt_mask = jnp.ones(np.shape(prompts), bool)
  return run(params, prompts, cache, prompt_mask, method=LlamaForCausalLM.extend, last_only=True)


def decode_step(
    model: LlamaForCausalLM,
    params: PyTree,
    tokens: Array,
    cache: KVCache,
    *,
    mask: Array | None = None,
    adapters: PyTree = None,
    adapter_ids: Array | None = None,
    apply: Callable[..., Any] | None = None,
) -> tuple[Array, KVCache]:
  """One token per row against ``cache``: the next-token logits ``(B, V)`` and the cache.

  Args:
    model, params, adapters, adapter_ids, apply: as for :func:`prefill`.
    tokens: ``(B,)`` int, the last tokens.
    cache: with a free slot per row.
    mask: ``(B,)``: ``False`` writes the token as padding (a finished row); default all real.

  Returns:
    ``(logits, cache)``.

  >>> from lora_jax.models import llama
  >>> config = llama.LlamaConfig.tiny()
  >>> model = llama.LlamaForCausalLM(config)
  >>> params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  >>> cache = llama.init_cache(config, 2, 8)
  >>> logits, cache = jax.jit(prefill, static_argnums=0)(model, params, jnp.ones((2, 5), jnp.int32), None, cache)
  >>> step = jax.jit(decode_step, static_argnums=0)
  >>> for _ in range(2):
  ...   logits, cache = step(model, params, sample_logits(logits), cache)
  >>> logits.shape, cache.index.tolist()
  ((2, 128), [7, 7])
  """
  run = _runner(model, apply, adapters, adapter_ids)
  tokens = jnp.asarray(tokens)[:, None]
  mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)[:, None]
  return run(params, tokens, cache, mask, method=LlamaForCausalLM.extend, last_only=True)


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------


def bucket_length(length: int, *, minimum: int = 16) -> int:
  """The padded prompt length for ``length``: the next power of two, at least ``minimum``.

  Powers of two bound the compiles by ``log2`` of the longest prompt and the wasted prefill
  compute by 2x (the padding is masked, never attended).

  >>> [bucket_length(n) for n in (1, 16, 17, 100)]
  [16, 16, 32, 128]
  """
  if length < 1:
    raise ValueError(f"bucket_length({length}): expected a positive length.")
  return max(minimum, 1 << (int(length) - 1).bit_length())


def _is_traced(*xs: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in xs)


@functools.partial(
    jax.jit,
    static_argnames=("model", "apply", "max_new_tokens", "greedy", "nucleus", "cache_dtype", "merge"),
)
def _generate(
    params: PyTree,
    adapters: PyTree,
    adapter_ids: Array | None,
    prompts: Array,
    mask: Array,
    temperature: Array,
    top_p: Array,
    rng: Array | None,
    eos: Array,
    pad: Array,
    *,
    model: LlamaForCausalLM,
    apply: Callable[..., Any] | None,
    max_new_tokens: int,
    greedy: bool,
    nucleus: bool,
    cache_dtype: Any,
    merge: bool = False,
) -> Generated:
  if merge:  # one adapter folded in for this call only: the merged kernels are temporaries
    params, adapters = lora_jax.merge(params, adapters), None
  b, p = prompts.shape
  n = max_new_tokens
  kw = dict(adapters=adapters, adapter_ids=adapter_ids, apply=apply)
  temperature = 0.0 if greedy else temperature
  top_p = top_p if nucleus else 1.0

  def pick(logits: Array, step: Array | int) -> Array:
    key = None if greedy else jax.random.fold_in(rng, step)
    return sample_logits(logits, key, temperature=temperature, top_p=top_p)

  def finished(tok: Array) -> Array:
    return jnp.isin(tok, eos) if eos.size else jnp.zeros(tok.shape, bool)

  cache = init_cache(model.config, b, p + n - 1, cache_dtype)  # the last token is never fed
  logits, cache = prefill(model, params, prompts, mask, cache, **kw)
  tok = pick(logits, 0)
  out = jnp.full((b, n), pad, jnp.int32).at[:, 0].set(tok)
  state = (jnp.int32(1), tok, cache, out, finished(tok), jnp.ones((b,), jnp.int32))

  def cond(state: tuple) -> Array:
    step, _, _, _, done, _ = state
    return (step < n) & ~jnp.all(done)

  def body(state: tuple) -> tuple:
    step, tok, cache, out, done, lengths = state
    logits, cache = decode_step(model, params, tok, cache, mask=~done, **kw)
    nxt = jnp.where(done, pad, pick(logits, step))
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], step, axis=1)
    return step + 1, nxt, cache, out, done | finished(nxt), lengths + ~done

  _, _, _, out, _, lengths = jax.lax.while_loop(cond, body, state)
  return Generated(out, lengths)


def generate(
    model: LlamaForCausalLM,
    params: PyTree,
    prompts: Array,
    prompt_mask: Array | None = None,
    max_new_tokens: int = 16,
    *,
    adapters: PyTree = None,
    adapter_ids: Array | Sequence[str | int | None] | None = None,
    apply: Callable[..., Any] | None = None,
    temperature: float | Array = 0.0,
    top_p: float | Array = 1.0,
    rng: Array | None = None,
    eos_token_id: int | Sequence[int] | Array | None = None,
    pad_token_id: int | Array = 0,
    bucket: Callable[[int], int] | None = bucket_length,
    cache_dtype: Any = None,
    merge_adapters: bool | None = None,
) -> Generated:
  """Generates ``max_new_tokens`` per row: one jitted prefill + ``lax.while_loop`` of decode steps.

  The prompts are left-padded to ``bucket(P)`` columns first, so every prompt length of a
  bucket reuses one compile; a compile is keyed by the batch size, the bucket,
  ``max_new_tokens``, the adapters' structure and the static options (greedy or not, top-p
  or not, ``eos_token_id``, ``pad_token_id``), never by the steps or the prompts' contents.

  Args:
    model: a :class:`~lora_jax.models.llama.LlamaForCausalLM` (its config sizes the cache).
    params: ``{"params": ...}``; for a merged model, ``lora_jax.merge(params, adapters)``.
    prompts: ``(B, P)`` int, left-padded (any padding works: positions count real tokens,
      and generation continues after each row's last column).
    prompt_mask: ``(B, P)``: 1 real, 0 padding; ``None``: all real. Every row needs a real token.
    max_new_tokens: tokens to generate per row (``>= 1``); the cache holds
      ``bucket(P) + max_new_tokens - 1`` slots.
    adapters: ``None`` (the base); one adapter tree (``lora_jax.wrap``: factored); or a bank
      from ``lora_jax.stack`` with ``adapter_ids``.
    adapter_ids: ``(B,)`` int: each row's adapter in the bank, ``-1`` for the base alone; or
      a list of member names (``None`` for the base), as :func:`lora_jax.bank_ids` takes.
    merge_adapters: with one adapter tree, fold it into the params for this call only (inside
      the jit, before the prefill: every decode step then runs the merged model's executable,
      at the cost of one copy of the adapted kernels for the call; ``params`` and ``adapters``
      stay as given) instead of computing it factored at every step. ``None`` (the default)
      merges unless the base is quantized (merging would dequantize it); banks are never merged.
    apply: a function to call instead of ``model.apply`` (the adapters wrap it); it is a
      static argument: pass the same function object each time, or each call recompiles.
    temperature: ``0``: greedy. Else a float or ``(B,)`` array (see :func:`sample_logits`).
    top_p: nucleus mass, a float or ``(B,)``; ``1``: no nucleus filter.
    rng: a PRNG key, needed to sample; step ``i`` uses ``jax.random.fold_in(rng, i)``.
    eos_token_id: a token (or tokens) that ends a row: the row emits ``pad_token_id`` after
      it; the loop stops once every row has ended.
    pad_token_id: written after the end, and used for the bucket padding.
    bucket: the padded prompt length for ``P`` (default :func:`bucket_length`); ``None``: no
      bucketing (a compile per prompt length).
    cache_dtype: of the cached keys/values (default: the model's compute dtype).

  Returns:
    :class:`Generated`: ``tokens (B, max_new_tokens)`` and ``lengths (B,)``.

  Raises:
    ValueError: bad shapes, a row without a real token, ``max_new_tokens < 1``, sampling
      without ``rng``, a ``temperature`` or ``top_p`` out of range, ``adapter_ids`` without
      a bank.

  >>> from lora_jax.models import llama
  >>> config = llama.LlamaConfig.tiny()
  >>> model = llama.LlamaForCausalLM(config)
  >>> params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  >>> prompts = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
  >>> out = generate(model, params, prompts, prompts != 0, 6, temperature=0.8, top_p=0.9,
  ...                rng=jax.random.key(1))
  >>> out.tokens.shape
  (2, 6)
  """
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"generate(max_new_tokens={max_new_tokens!r}): expected an integer >= 1.")
  if np.ndim(prompts) != 2:
    raise ValueError(f"generate: prompts must be (batch, length) int, found shape {np.shape(prompts)}.")
  b, p = np.shape(prompts)
  if prompt_mask is None:
    prompt_mask = np.ones((b, p), bool)
  if np.shape(prompt_mask) != (b, p):
    raise ValueError(
        f"generate: prompt_mask has shape {np.shape(prompt_mask)}, the prompts {(b, p)}; "
        "pass one 1/0 (real/padding) entry per prompt token."
    )
  if not _is_traced(prompt_mask):
    real = np.asarray(prompt_mask).astype(bool).any(axis=1)
    if not real.all():
      raise ValueError(
          f"generate: prompt row(s) {np.flatnonzero(~real).tolist()[:8]} have no real token "
          "(prompt_mask all 0): each row needs at least one, e.g. a BOS token."
      )
  greedy = _is_number(temperature) and temperature == 0
  nucleus = not (_is_number(top_p) and top_p == 1)
  if _is_number(temperature) and temperature < 0:
    raise ValueError(f"generate(temperature={temperature}): expected >= 0 (0 is greedy).")
  if _is_number(top_p) and not 0 < top_p <= 1:
    raise ValueError(f"generate(top_p={top_p}): expected 0 < top_p <= 1.")
  if not greedy and rng is None:
    raise ValueError(
        f"generate(temperature={temperature}): sampling needs a PRNG key, e.g. rng=jax.random.key(0) "
        "(temperature=0 is greedy and needs none)."
    )
  if adapter_ids is not None and adapters is None:
    raise ValueError(
        "generate: adapter_ids given without adapters: pass a bank of adapters, "
        "adapters=lora_jax.stack({'name': adapters, ...}), with adapter_ids indexing it."
    )
  if adapter_ids is not None:
    if np.shape(adapter_ids) != (b,):  # (a list of names has its length as shape)
      raise ValueError(f"generate: adapter_ids has shape {np.shape(adapter_ids)}; expected ({b},), one per row.")
    if isinstance(adapter_ids, (list, tuple)) or not _is_traced(adapter_ids):
      # names to ids, ids checked against the bank: under jit an id out of range would give NaN
      ids = adapter_ids if isinstance(adapter_ids, (list, tuple)) else np.asarray(adapter_ids).tolist()
      adapter_ids = lora_jax.bank_ids(adapters, ids)
  eos = jnp.reshape(jnp.asarray([] if eos_token_id is None else eos_token_id, jnp.int32), (-1,))
  single = adapters is not None and adapter_ids is None
  if merge_adapters is None:
    quantized = any(isinstance(x, BaseLeaf) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, BaseLeaf)))
    merge_adapters = single and not quantized
  elif merge_adapters and not single:
    raise ValueError("generate(merge_adapters=True) needs one adapter tree: a bank with adapter_ids is never merged.")

  width = p if bucket is None else int(bucket(p))
  if width < p:
    raise ValueError(f"generate: bucket({p}) = {width} is shorter than the prompts.")
  if width > p:  # left-pad to the bucket: the padding is masked, positions count real tokens
    xp = jnp if _is_traced(prompts, prompt_mask) else np
    prompts = xp.pad(xp.asarray(prompts), ((0, 0), (width - p, 0)), constant_values=pad_token_id)
    prompt_mask = xp.pad(xp.asarray(prompt_mask).astype(bool), ((0, 0), (width - p, 0)))
  if rng is not None and not jax.dtypes.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
  return _generate(
      params,
      adapters,
      None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32),
      jnp.asarray(prompts, jnp.int32),
      jnp.asarray(prompt_mask, bool),
      jnp.asarray(temperature, jnp.float32),
      jnp.asarray(top_p, jnp.float32),
      rng,
      eos,
      jnp.asarray(pad_token_id, jnp.int32),
      model=model,
      apply=apply,
      max_new_tokens=int(max_new_tokens),
      greedy=greedy,
      nucleus=nucleus,
      cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype),
      merge=bool(merge_adapters),
  )
