"""lora_jax.models.generation and LlamaForCausalLM.extend: KV-cache decoding against the full forward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from _util import assert_close, random_adapters
from lora_jax.models import generation as G
from lora_jax.models import llama as L

ORDER_RTOL = 2e-5  # the same math in another order (cache vs full forward), float32
N_NEW = 6


@pytest.fixture(autouse=True)
def _exact_matmuls():
  # On GPU, float32 matmuls default to TF32; the comparisons need real float32.
  with jax.default_matmul_precision("highest"):
    yield


def _config(scan: bool = True) -> L.LlamaConfig:
  return L.LlamaConfig.tiny(initializer_range=0.1, scan_layers=scan, remat=scan)


@functools.lru_cache(maxsize=None)
def _params(scan: bool = True) -> dict:
  """Random weights (numpy, no compile), the same for both layouts; norms away from 1."""
  config = _config(scan)
  rng = np.random.default_rng(0)
  sd = {k: (rng.normal(size=s) * 0.1).astype(np.float32) for k, s in L.hf_param_shapes(config).items()}
  for k in sd:
    if "norm" in k:
      sd[k] = rng.uniform(0.5, 1.5, sd[k].shape).astype(np.float32)
  return L.load_hf_llama(sd, config)


def _model(scan: bool = True) -> L.LlamaForCausalLM:
  return L.LlamaForCausalLM(_config(scan))


def _positions(mask: np.ndarray) -> np.ndarray:
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _full(model, params, tokens, mask):
  """The reference: the training forward over the whole sequence."""
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  return model.apply(params, tokens, positions, mask)


@functools.partial(jax.jit, static_argnums=0)
def _extend(model, params, tokens, cache, mask):
  return model.apply(params, tokens, cache, mask, method="extend")


def _prompts() -> tuple[np.ndarray, np.ndarray]:
  """Three left-padded prompts of lengths 7, 4, 1."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 128, (3, 7)).astype(np.int32)
  mask = np.zeros((3, 7), bool)
  for row, n in enumerate((7, 4, 1)):
    mask[row, 7 - n :] = True
  return np.where(mask, tokens, 0), mask


# ----------------------------------------------------------------------------------------------
# extend: prefill and decode steps against the full forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_extend_equals_full_forward(scan: bool):
  model, params = _model(scan), _params(scan)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 128, (3, 10)).astype(np.int32)
  mask = np.ones((3, 10), bool)
  mask[1, :3] = False  # left padding
  mask[2, :6] = False
  want = np.asarray(_full(model, params, tokens, mask))
  assert np.std(want[mask]) > 0.1

  empty = L.init_cache(model.config, 3, 12)
  at_once, cache = _extend(model, params, tokens, empty, mask)
  assert_close(np.asarray(at_once)[mask], want[mask], ORDER_RTOL)
  np.testing.assert_array_equal(cache.mask[:, :10], mask)
  assert not cache.mask[:, 10:].any() and cache.index.tolist() == [10, 10, 10]

  chunked, c = [], empty  # two chunks of 5 (row 2's first chunk is all padding)
  for s in (slice(0, 5), slice(5, 10)):
    out, c = _extend(model, params, tokens[:, s], c, mask[:, s])
    chunked.append(np.asarray(out))
  assert_close(np.concatenate(chunked, axis=1)[mask], want[mask], ORDER_RTOL)

  one_by_one, c = [], empty
  for t in range(10):
    out, c = _extend(model, params, tokens[:, t : t + 1], c, mask[:, t : t + 1])
    one_by_one.append(np.asarray(out))
  assert_close(np.concatenate(one_by_one, axis=1)[mask], want[mask], ORDER_RTOL)
  real = lambda kv: np.moveaxis(np.asarray(kv)[:, :, :10], 2, 1)[mask]  # noqa: E731 - real slots
  assert_close(real(c.k), real(cache.k), ORDER_RTOL)  # (padding slots hold what they like)
  assert_close(real(c.v), real(cache.v), ORDER_RTOL)


def test_init_cache_layout():
  cache = L.init_cache(_config(), 3, 20, jnp.bfloat16)
  assert cache.k.shape == cache.v.shape == (3, 2, 20, 2, 16) and cache.k.dtype == jnp.bfloat16
  assert cache.mask.shape == (3, 20) and cache.index.shape == (3,)
  assert all(x.shape[0] == 3 for x in jax.tree.leaves(cache))  # batch-first: vmap over rows works
  with pytest.raises(ValueError, match=r"init_cache\(batch=0, max_len=4\): expected positive"):
    L.init_cache(_config(), 0, 4)


# ----------------------------------------------------------------------------------------------
# generate: greedy against a naive reference, rows alone, padding, eos
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 4))
def _naive_greedy(model, params, prompts, mask, n):
  """Greedy decoding by recomputing the full forward on the growing sequence each step.

  The sequence lives in a (B, P + n) buffer; its not-yet-generated columns come after the
  current token, so the causal mask keeps them out (one compile for every step)."""
  b, p = prompts.shape
  seq = jnp.concatenate([prompts, jnp.zeros((b, n), prompts.dtype)], axis=1)
  seq_mask = jnp.concatenate([mask, jnp.zeros((b, n), bool)], axis=1)

  def step(i, state):
    seq, seq_mask = state
    logits = jax.lax.dynamic_index_in_dim(_full(model, params, seq, seq_mask), p + i - 1, 1, False)
    seq = jax.lax.dynamic_update_index_in_dim(seq, jnp.argmax(logits, axis=-1).astype(seq.dtype), p + i, 1)
    return seq, jax.lax.dynamic_update_index_in_dim(seq_mask, jnp.ones((b,), bool), p + i, 1)

  seq, _ = jax.lax.fori_loop(0, n, step, (seq, seq_mask))
  return seq[:, p:]


@functools.lru_cache(maxsize=None)
def _greedy(scan: bool = True) -> np.ndarray:
  prompts, mask = _prompts()
  return np.asarray(G.generate(_model(scan), _params(scan), prompts, mask, N_NEW).tokens)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_greedy_equals_naive_reference(scan: bool):
  prompts, mask = _prompts()
  want = np.asarray(_naive_greedy(_model(scan), _params(scan), prompts, mask, N_NEW))
  np.testing.assert_array_equal(_greedy(scan), want)
  assert len(set(want.ravel().tolist())) > 3  # not a degenerate repetition


def test_greedy_rows_alone_and_padding():
  model, params = _model(), _params()
  prompts, mask = _prompts()
  tokens = _greedy()
  for row in range(3):
    alone = prompts[row : row + 1, mask[row]]  # unpadded
    out = G.generate(model, params, alone, None, N_NEW)
    np.testing.assert_array_equal(out.tokens[0], tokens[row], err_msg=f"row {row}")
  # Right padding (the same shapes: the same compile) continues after each row's last column
  # in the cache, but the positions count real tokens only, so the tokens are the same.
  right = np.stack([np.roll(prompts[r], -int((~mask[r]).sum())) for r in range(3)])
  right_mask = np.stack([np.roll(mask[r], -int((~mask[r]).sum())) for r in range(3)])
  out = G.generate(model, params, right, right_mask, N_NEW)
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_array_equal(out.lengths, [N_NEW] * 3)


def test_eos_rows_emit_pad():
  model, params = _model(), _params()
  prompts, mask = _prompts()
  tokens = _greedy()
  eos = int(tokens[0, 2])
  out = G.generate(model, params, prompts, mask, N_NEW, eos_token_id=[eos, eos], pad_token_id=-1)
  for row in range(3):
    hits = np.flatnonzero(tokens[row] == eos)
    n = hits[0] + 1 if hits.size else N_NEW
    np.testing.assert_array_equal(out.tokens[row, :n], tokens[row, :n])
    assert (np.asarray(out.tokens[row, n:]) == -1).all() and int(out.lengths[row]) == n
  # Rows 0 and 1 end at their first token; row 2 ends where it meets one of them.
  first = G.generate(model, params, prompts, mask, N_NEW, eos_token_id=tokens[:2, 0])  # no recompile
  np.testing.assert_array_equal(first.tokens[:, 0], tokens[:, 0])
  assert (np.asarray(first.tokens[:2, 1:]) == 0).all() and first.lengths.tolist()[:2] == [1, 1]


def test_no_recompile_across_steps_and_prompts_of_a_bucket():
  model, params = _model(), _params()
  traces = []

  def counting_apply(*args, **kwargs):  # runs only while jax traces (prefill + decode body)
    traces.append(kwargs.get("method"))
    return model.apply(*args, **kwargs)

  rng = np.random.default_rng(3)
  for length in (5, 9, 16, 12):  # one bucket: 16
    prompts = rng.integers(1, 128, (2, length))
    mask = np.ones((2, length), bool)
    mask[1, : rng.integers(0, length)] = False
    out = G.generate(model, params, prompts, mask, 8, apply=counting_apply)
    assert out.tokens.shape == (2, 8)
  assert len(traces) == 2, traces  # one prefill and one decode step, for 4 prompts x 8 steps
  G.generate(model, params, rng.integers(1, 128, (2, 16)), None, 8, apply=counting_apply, bucket=None)
  assert len(traces) == 2  # 16 columns without bucketing: the same shapes, the same compile
  G.generate(model, params, rng.integers(1, 128, (2, 3)), None, 8, apply=counting_apply, bucket=None)
  assert len(traces) == 4  # 3 columns: a new compile (the counter counts)
  assert [G.bucket_length(n) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 128]
  assert G.bucket_length(3, minimum=1) == 4


# ----------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _adapters(seed: int = 0):
  spec = lora_jax.LoraSpec("all-linear", rank=4, layout=L.lora_layout(_config()))
  return random_adapters(_params(), spec, seed=seed, std=0.1)


def test_one_adapter_equals_merged():
  model, params = _model(), _params()
  prompts, mask = _prompts()
  adapters = _adapters()
  factored = G.generate(model, params, prompts, mask, N_NEW, adapters=adapters, merge_adapters=False)
  merged = G.generate(model, lora_jax.merge(params, adapters), prompts, mask, N_NEW)
  np.testing.assert_array_equal(factored.tokens, merged.tokens)
  # the default folds the adapter in for the call (the merged model's executable): the same tokens
  auto = G.generate(model, params, prompts, mask, N_NEW, adapters=adapters)
  np.testing.assert_array_equal(auto.tokens, merged.tokens)
  # ... inside the jit: one merge per adapted kernel, then the base model's matmuls (no thin products)
  dots = lambda **kw: str(jax.make_jaxpr(lambda p: G.generate(model, p, prompts, mask, 3, **kw).tokens)(params)).count("dot_general")
  adapted = sum(f is not None for f in jax.tree.leaves(adapters, is_leaf=lambda f: f is None or isinstance(f, lora_jax.LoraFactors)))
  assert dots(adapters=adapters) == dots() + adapted < dots(adapters=adapters, merge_adapters=False)
  with pytest.raises(ValueError, match=r"merge_adapters=True\) needs one adapter tree"):
    G.generate(model, params, prompts, mask, N_NEW, adapters=lora_jax.stack({"x": adapters}),
               adapter_ids=[0, 0, 0], merge_adapters=True)
  assert (np.asarray(factored.tokens) != _greedy()).mean() > 0.3  # the adapter changes the text
  # The pieces, under one jit: prefill logits equal the merged model's full forward.
  cache = L.init_cache(model.config, 3, 8)
  logits, _ = jax.jit(functools.partial(G.prefill, model, adapters=adapters))(params, prompts, mask, cache)
  assert_close(logits, _full(model, lora_jax.merge(params, adapters), prompts, mask)[:, -1], ORDER_RTOL)


def test_quantized_base_with_an_adapter_equals_dequantized_merged():
  model, params = _model(), _params()
  prompts, mask = _prompts()
  quantized = lora_jax.quantize(params, "all-linear", layout=L.lora_layout(model.config))
  out = G.generate(model, quantized, prompts, mask, N_NEW, adapters=_adapters())
  # (jitted: one compilation, not one per operation and kernel shape)
  dense = jax.jit(lora_jax.dequantize)(quantized)
  merged = jax.jit(lora_jax.merge)(dense, _adapters())
  np.testing.assert_array_equal(out.tokens, G.generate(model, merged, prompts, mask, N_NEW).tokens)
  # the quantized base alone (dequantized kernel by kernel) equals the dequantized base
  alone = G.generate(model, quantized, prompts, mask, N_NEW)
  np.testing.assert_array_equal(alone.tokens, G.generate(model, dense, prompts, mask, N_NEW).tokens)


def test_mixed_batch_equals_each_row_merged():
  model, params = _model(), _params()
  prompts, mask = _prompts()
  prompts, mask = np.concatenate([prompts, prompts[:1]]), np.concatenate([mask, mask[:1]])
  bank = lora_jax.stack({"first": _adapters(0), "second": _adapters(1)})
  traces = []

  def counting_apply(*args, **kwargs):
    traces.append(kwargs.get("method"))
    return model.apply(*args, **kwargs)

  ids = np.array([1, -1, 0, 0], np.int32)
  out = G.generate(model, params, prompts, mask, N_NEW, adapters=bank, adapter_ids=ids, apply=counting_apply)
  merged = {i: lora_jax.merge(params, _adapters(i)) for i in (0, 1)}
  for row, i in enumerate(ids):
    row_params = params if i < 0 else merged[int(i)]
    alone = G.generate(model, row_params, prompts[row : row + 1], mask[row : row + 1], N_NEW)
    np.testing.assert_array_equal(out.tokens[row], alone.tokens[0], err_msg=f"row {row}, adapter {i}")
  assert not np.array_equal(out.tokens[0], out.tokens[3])  # one prompt, two adapters
  # Another pattern of ids, given by name: the same compile.
  names = G.generate(
      model, params, prompts, mask, N_NEW, adapters=bank, adapter_ids=["second", None, "first", "first"], apply=counting_apply
  )
  np.testing.assert_array_equal(names.tokens, out.tokens)
  G.generate(model, params, prompts, mask, N_NEW, adapters=bank, adapter_ids=[-1, 0, 1, -1], apply=counting_apply)
  assert len(traces) == 2, traces
  with pytest.raises(ValueError, match=r"adapter_ids\[1\] = 2 is not a member of the bank \['first', 'second'\]"):
    G.generate(model, params, prompts, mask, N_NEW, adapters=bank, adapter_ids=[0, 2, 0, 0])


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def test_sampling_tiny_top_p_is_greedy_and_a_key_reproduces():
  model, params = _model(), _params()
  prompts, mask = _prompts()
  run = functools.partial(G.generate, model, params, prompts, mask, N_NEW, temperature=1.0)
  np.testing.assert_array_equal(run(top_p=1e-6, rng=jax.random.key(0)).tokens, _greedy())
  a = run(top_p=0.9, rng=jax.random.key(7)).tokens
  np.testing.assert_array_equal(run(top_p=0.9, rng=jax.random.key(7)).tokens, a)
  assert not np.array_equal(run(top_p=0.9, rng=jax.random.key(8)).tokens, a)
  assert not np.array_equal(a, _greedy())
  raw = run(top_p=0.9, rng=jax.random.key_data(jax.random.key(7))).tokens  # a raw uint32 key
  np.testing.assert_array_equal(raw, a)


def _nucleus(probs: np.ndarray, top_p: float) -> set[int]:
  """The smallest set of most likely tokens with mass >= top_p (float64, by hand)."""
  order = np.argsort(-probs, kind="stable")
  mass = np.cumsum(probs[order])
  return set(order[: int(np.searchsorted(mass, top_p)) + 1].tolist())


def test_top_p_never_samples_outside_the_nucleus():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 128)) * np.array([[0.5], [1.0], [2.0], [4.0]])
  temperature, top_p = 0.7, 0.6
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = jax.jit(jax.vmap(functools.partial(G.sample_logits, temperature=temperature, top_p=top_p), (None, 0)))
  samples = np.asarray(draw(jnp.asarray(logits, jnp.float32), keys))
  for row in range(4):
    z = logits[row] / temperature
    probs = np.exp(z - z.max())
    nucleus = _nucleus(probs / probs.sum(), top_p)
    seen = set(samples[:, row].tolist())
    assert seen <= nucleus, (row, sorted(seen - nucleus))
    if len(nucleus) > 1:
      assert len(seen) > 1  # it samples, within the nucleus
  # Per-row temperature and top_p: a row at temperature 0 is greedy.
  t = jnp.array([0.0, 1.0, 1.0, 1.0])
  p = jnp.array([1.0, 1.0, 1e-6, 1.0])
  rows = jax.vmap(lambda k: G.sample_logits(logits, k, temperature=t, top_p=p))(keys[:200])
  greedy = np.argmax(logits, axis=-1)
  assert (np.asarray(rows[:, 0]) == greedy[0]).all() and (np.asarray(rows[:, 2]) == greedy[2]).all()
  assert len(set(np.asarray(rows[:, 1]).tolist())) > 5


def test_errors():
  model, params = _model(), _params()
  prompts, mask = _prompts()
  gen = functools.partial(G.generate, model, params)
  with pytest.raises(ValueError, match=r"max_new_tokens=0\): expected an integer >= 1"):
    gen(prompts, mask, 0)
  with pytest.raises(ValueError, match=r"prompts must be \(batch, length\) int, found shape \(7,\)"):
    gen(prompts[0], None, 4)
  with pytest.raises(ValueError, match=r"prompt_mask has shape \(3, 6\), the prompts \(3, 7\)"):
    gen(prompts, mask[:, 1:], 4)
  empty = mask.copy()
  empty[2] = False
  with pytest.raises(ValueError, match=r"prompt row\(s\) \[2\] have no real token"):
    gen(prompts, empty, 4)
  with pytest.raises(ValueError, match=r"temperature=0.5\): sampling needs a PRNG key"):
    gen(prompts, mask, 4, temperature=0.5)
  with pytest.raises(ValueError, match=r"top_p=0\): expected 0 < top_p <= 1"):
    gen(prompts, mask, 4, temperature=0.5, top_p=0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"temperature=-1.0\): expected >= 0"):
    gen(prompts, mask, 4, temperature=-1.0)
  with pytest.raises(ValueError, match=r"adapter_ids given without adapters: pass a bank"):
    gen(prompts, mask, 4, adapter_ids=np.zeros(3, np.int32))
  with pytest.raises(ValueError, match=r"adapter_ids has shape \(2,\); expected \(3,\)"):
    gen(prompts, mask, 4, adapters=_adapters(), adapter_ids=np.zeros(2, np.int32))
  with pytest.raises(ValueError, match=r"holds no LoraBank \(make one with lora_jax.stack\)"):
    gen(prompts, mask, 4, adapters=_adapters(), adapter_ids=np.zeros(3, np.int32))
  with pytest.raises(ValueError, match=r"bucket\(7\) = 4 is shorter than the prompts"):
    gen(prompts, mask, 4, bucket=lambda n: 4)
  with pytest.raises(TypeError, match=r"apply=3: expected a function like model.apply"):
    gen(prompts, mask, 4, apply=3)
  with pytest.raises(ValueError, match=r"sample_logits\(temperature=1.0\): sampling needs a PRNG key"):
    G.sample_logits(jnp.zeros((1, 4)), temperature=1.0)
  with pytest.raises(ValueError, match=r"sample_logits\(top_p=1.5\)"):
    G.sample_logits(jnp.zeros((1, 4)), jax.random.key(0), temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match=r"bucket_length\(0\): expected a positive length"):
    G.bucket_length(0)
