"""LoraSpec: which kernels get adapters, with which rank/alpha/layout; and every error path."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraFactors, LoraSpec

VOCAB, DIM, HEADS, HIDDEN = 50, 16, 4, 32
# DenseGeneral (embed, heads, head_dim) and (heads, head_dim, embed): 3-D kernels need a layout
# without the function (tests/test_init_trace.py reads them off the model instead).
QKV_LAYOUT = {"query|key|value": "ioo", "out": "iio"}


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    proj = lambda name: nn.DenseGeneral((HEADS, DIM // HEADS), name=name)(x)
    q, k, v = proj("query"), proj("key"), proj("value")
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(DIM // HEADS))
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
    return nn.DenseGeneral(DIM, axis=(-2, -1), name="out")(o)


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(DIM, name="fc2")(nn.gelu(nn.Dense(HIDDEN, name="fc1")(x)))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + Attention(name="attn")(nn.LayerNorm(name="ln_1")(x))
    return x + Mlp(name="mlp")(nn.LayerNorm(name="ln_2")(x))


class TinyLM(nn.Module):
  head_name: str = "lm_head"

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, DIM, name="embed")(tokens)
    for i in range(2):
      x = Block(name=f"layers_{i}")(x)
    return nn.Dense(VOCAB, name=self.head_name)(nn.LayerNorm(name="ln_f")(x))


def _params(head_name="lm_head"):
  """Random params with the model's shapes (no compilation: the spec only needs shapes)."""
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = jax.eval_shape(TinyLM(head_name).init, jax.random.key(0), tokens)["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def params():
  return _params()


def _kernels(layers, modules):
  return {f"layers_{i}/{m}/kernel" for i in layers for m in modules}


ATTN = ["attn/query", "attn/key", "attn/value", "attn/out"]
MLP = ["mlp/fc1", "mlp/fc2"]


def _paths(spec, params):
  return [t.path for t in spec.resolve(params)]


# ---------------------------------------------------------------- which paths each form picks


@pytest.mark.parametrize("head_name", ["lm_head", "logits"])
def test_all_linear_skips_embedding_and_vocab_head(head_name):
  params = _params(head_name)
  got = _paths(LoraSpec("all-linear", rank=4, layout=QKV_LAYOUT), params)
  assert set(got) == _kernels([0, 1], ATTN + MLP)
  assert len(got) == len(set(got)) == 12
  assert got == [p for p, _ in lora_jax._paths.leaves_with_paths(params) if p in set(got)]


def test_short_names(params):
  assert set(_paths(LoraSpec(["query", "value"], rank=4, layout=QKV_LAYOUT), params)) == (
      _kernels([0, 1], ["attn/query", "attn/value"])
  )
  assert set(_paths(LoraSpec(["layers_1/attn/query"], rank=4, layout=QKV_LAYOUT), params)) == {
      "layers_1/attn/query/kernel"
  }
  assert _paths(LoraSpec(["embed"], rank=4), params) == ["embed/embedding"]
  assert set(_paths(LoraSpec(["mlp"], rank=4), params)) == _kernels([0, 1], MLP)


def test_regex_and_callable(params):
  spec = LoraSpec(r"layers_\d+/attn/(query|value)/kernel", rank=4, layout=QKV_LAYOUT)
  assert set(_paths(spec, params)) == _kernels([0, 1], ["attn/query", "attn/value"])
  assert set(_paths(LoraSpec("layers_1/.*/kernel", rank=4, layout=QKV_LAYOUT), params)) == (
      _kernels([1], ATTN + MLP)
  )
  pick_fc1 = lambda path, leaf: path.endswith("kernel") and leaf.shape[-1] == HIDDEN
  assert set(_paths(LoraSpec(pick_fc1, rank=4), params)) == _kernels([0, 1], ["mlp/fc1"])


def test_layouts_fans_and_defaults(params):
  by_path = {t.path: t for t in LoraSpec("all-linear", rank=4, layout=QKV_LAYOUT).resolve(params)}
  q, o, fc1 = (by_path[f"layers_0/{m}/kernel"] for m in ("attn/query", "attn/out", "mlp/fc1"))
  assert (q.layout, q.shape, q.fan_in, q.fan_out) == ("ioo", (DIM, HEADS, DIM // HEADS), DIM, DIM)
  assert (o.layout, o.fan_in, o.fan_out) == ("iio", DIM, DIM)
  assert (fc1.layout, fc1.fan_in, fc1.fan_out) == ("io", DIM, HIDDEN)
  assert not fc1.is_embedding
  (emb,) = LoraSpec(["embed"], rank=4).resolve(params)
  assert (emb.layout, emb.is_embedding, emb.shape) == ("io", True, (VOCAB, DIM))
  # A callable layout rule; None falls back to the default, 'io' for a 2-D kernel.
  rule = lambda path, leaf: ("ioo" if "out" not in path else "iio") if leaf.ndim == 3 else None
  got = {t.path: t.layout for t in LoraSpec(["layers_0/attn", "layers_0/mlp/fc1"], rank=4, layout=rule).resolve(params)}
  assert got == {
      "layers_0/attn/query/kernel": "ioo", "layers_0/attn/key/kernel": "ioo",
      "layers_0/attn/value/kernel": "ioo", "layers_0/attn/out/kernel": "iio",
      "layers_0/mlp/fc1/kernel": "io",
  }


def test_kernel_of_more_than_two_axes_needs_a_layout_without_the_function(params):
  with pytest.raises(ValueError, match=r"'layers_0/attn/query/kernel': a kernel with 3 axes has no default layout.*lora_jax.init\(rng, params, spec, apply_fn, \*example_args\).*layout=\{'layers_0/attn/query': \.\.\.\}.*'ioo' for a DenseGeneral"):
    LoraSpec(["query"], rank=2).resolve(params)
  with pytest.raises(ValueError, match=r"'layers_0/attn/out/kernel': a kernel with 3 axes has no default layout"):
    LoraSpec("all-linear", rank=2, layout={"query|key|value": "ioo"}).resolve(params)


def test_rank_and_alpha_patterns_first_match_wins(params):
  spec = LoraSpec(
      "all-linear", rank=8, alpha=16, layout=QKV_LAYOUT,
      rank_pattern={"query": 2, "layers_1/.*": 4}, alpha_pattern={"fc2": 32.0},
  )
  got = {t.path: t for t in spec.resolve(params)}
  assert got["layers_0/attn/query/kernel"].rank == 2
  assert got["layers_1/attn/query/kernel"].rank == 2  # "query" comes first
  assert got["layers_1/attn/key/kernel"].rank == 4
  assert got["layers_0/attn/key/kernel"].rank == 8
  assert got["layers_0/mlp/fc2/kernel"].alpha == 32.0
  assert got["layers_0/mlp/fc2/kernel"].scale == 32.0 / 8
  assert got["layers_1/mlp/fc2/kernel"].scale == 32.0 / 4
  assert got["layers_0/mlp/fc1/kernel"].scale == 16 / 8
  swapped = LoraSpec(
      "all-linear", rank=8, layout=QKV_LAYOUT, rank_pattern={"layers_1/.*": 4, "query": 2}
  )
  got = {t.path: t.rank for t in swapped.resolve(params)}
  assert got["layers_1/attn/query/kernel"] == 4 and got["layers_0/attn/query/kernel"] == 2


def test_rslora_scale(params):
  (t,) = LoraSpec(["layers_0/mlp/fc1"], rank=4, alpha=6, rslora=True).resolve(params)
  assert t.scale == 6 / 2.0
  (t,) = LoraSpec(["layers_0/mlp/fc1"], rank=4, alpha=6).resolve(params)
  assert t.scale == 6 / 4


def test_resolve_works_on_abstract_params():
  shapes = jax.eval_shape(lambda: _params())
  assert set(_paths(LoraSpec(["fc1"], rank=2), shapes)) == _kernels([0, 1], ["mlp/fc1"])


# ---------------------------------------------------------------- errors


def test_target_matching_nothing_lists_nearby(params):
  with pytest.raises(ValueError, match=r"no module named 'quey' holds a weight.*Module names that hold weights, nearest first: 'query'"):
    LoraSpec(["query", "quey"]).resolve(params)
  with pytest.raises(ValueError, match=r"targets='layers_0/atn/query/kernel'\) matches no parameter path.*Paths near it: 'layers_0/attn/query/kernel'"):
    LoraSpec("layers_0/atn/query/kernel").resolve(params)
  with pytest.raises(ValueError, match=r"the callable selected no parameter"):
    LoraSpec(lambda p, leaf: False).resolve(params)
  with pytest.raises(ValueError, match=r"'all-linear'\) matched no kernel"):
    LoraSpec("all-linear").resolve({"embed": {"embedding": jnp.ones((4, 3))}})


def test_rank_too_large(params):
  with pytest.raises(ValueError, match=r"'layers_0/mlp/fc1/kernel': rank 17 exceeds min\(fan_in, fan_out\) = min\(16, 32\) = 16.*rank_pattern=\{'layers_0/mlp/fc1': 16\}"):
    LoraSpec(["fc1"], rank=17).resolve(params)
  # A DenseGeneral query kernel stated as 'iio' has fan-out head_dim = 4.
  with pytest.raises(ValueError, match=r"'layers_0/attn/query/kernel': rank 8 exceeds .* min\(64, 4\) = 4 .*layout 'iio'.*pass the function to lora_jax.init so it reads the layout, or layout=\{'layers_0/attn/query'"):
    LoraSpec(["query"], rank=8, layout={"query": "iio"}).resolve(params)


def test_rank_pattern_overrides_too_large(params):
  with pytest.raises(ValueError, match=r"'layers_1/mlp/fc2/kernel': rank 20 exceeds"):
    LoraSpec(["mlp"], rank=4, rank_pattern={"layers_1/mlp/fc2": 20}).resolve(params)


def test_pattern_key_matching_nothing(params):
  with pytest.raises(ValueError, match=r"rank_pattern=...\): key 'qeury' matches no adapted path. Adapted paths: .*'layers_\d/attn/query/kernel'"):
    LoraSpec(["query"], rank=2, layout=QKV_LAYOUT, rank_pattern={"qeury": 1}).resolve(params)
  with pytest.raises(ValueError, match=r"alpha_pattern=...\): key 'fc1' matches no adapted path"):
    LoraSpec(["fc2"], rank=2, alpha_pattern={"fc1": 1.0}).resolve(params)


def test_invalid_regexes():
  with pytest.raises(ValueError, match=r"targets='dense/\(kernel'\) is not a valid regex"):
    LoraSpec("dense/(kernel").resolve({"dense": {"kernel": jnp.ones((2, 2))}})
  with pytest.raises(ValueError, match=r"rank_pattern=...\): key 'fc\[' is not a valid regex"):
    LoraSpec(["fc"], rank_pattern={"fc[": 2})
  with pytest.raises(ValueError, match=r"layout=...\): key 'q\(' is not a valid regex"):
    LoraSpec(["fc"], layout={"q(": "ioo"})


def test_bad_spec_arguments():
  with pytest.raises(ValueError, match=r"LoraSpec\(rank=0\): rank must be a positive integer"):
    LoraSpec(["fc"], rank=0)
  with pytest.raises(ValueError, match=r"rank_pattern=\{'fc': 0\}\): ranks must be positive"):
    LoraSpec(["fc"], rank_pattern={"fc": 0})
  with pytest.raises(TypeError, match=r"LoraSpec\(targets=\[\]\): expected 'all-linear'"):
    LoraSpec([])
  with pytest.raises(TypeError, match=r"entry 3 is not a non-empty module name"):
    LoraSpec(["fc", 3])
  with pytest.raises(TypeError, match=r"LoraSpec\(layout='ioo'\): expected a mapping"):
    LoraSpec(["fc"], layout="ioo")
  # Values that would make every merge NaN/Inf, or that are not what they look like.
  with pytest.raises(ValueError, match=r"LoraSpec\(alpha=nan\): alpha must be a finite number"):
    LoraSpec(["fc"], alpha=float("nan"))
  with pytest.raises(ValueError, match=r"LoraSpec\(alpha=inf\): alpha must be a finite number"):
    LoraSpec(["fc"], alpha=float("inf"))
  with pytest.raises(ValueError, match=r"LoraSpec\(alpha=1000000000.*\.\.\.\): alpha must be a finite number within float range"):
    LoraSpec(["fc"], alpha=10**400)
  with pytest.raises(ValueError, match=r"LoraSpec\(alpha_pattern=\{'fc': inf\}\): alpha must be a finite number"):
    LoraSpec(["fc"], alpha_pattern={"fc": float("inf")})
  with pytest.raises(TypeError, match=r"LoraSpec\(alpha='8'\): alpha must be a real number \(int or float\), found a str"):
    LoraSpec(["fc"], alpha="8")
  with pytest.raises(TypeError, match=r"LoraSpec\(rank=True\): rank must be a positive integer \(int\), found a bool"):
    LoraSpec(["fc"], rank=True)
  with pytest.raises(ValueError, match=r"LoraSpec\(rank=-3\): rank must be a positive integer"):
    LoraSpec(["fc"], rank=-3)
  with pytest.raises(TypeError, match=r"LoraSpec\(rank_pattern=\{'fc': True\}\): ranks must be positive integers \(int\), found a bool"):
    LoraSpec(["fc"], rank_pattern={"fc": True})
  with pytest.raises(TypeError, match=r"LoraSpec\(rslora=1\): expected True or False"):
    LoraSpec(["fc"], rslora=1)
  assert LoraSpec(["fc"], rank=np.int64(4), alpha=np.float32(8), rslora=np.bool_(True)).rank == 4


def test_bad_layout(params):
  with pytest.raises(ValueError, match=r"'layers_0/attn/query/kernel': layout 'iox' does not fit a kernel of shape \(16, 4, 4\).*'lio'"):
    LoraSpec(["query"], rank=2, layout={"query": "iox"}).resolve(params)
  with pytest.raises(ValueError, match=r"'layers_0/mlp/fc1/kernel': layout 'iio' does not fit a kernel of shape \(16, 32\)"):
    LoraSpec(["fc1"], rank=2, layout={"fc1": "iio"}).resolve(params)
  with pytest.raises(ValueError, match=r"layout 'ii' does not fit.*at least one 'i' and one 'o'"):
    LoraSpec(["fc1"], rank=2, layout=lambda p, leaf: "ii").resolve(params)


def test_non_array_and_integer_leaves():
  params = {"w": {"kernel": jnp.ones((3, 4)), "step": 3}}
  with pytest.raises(TypeError, match=r"'w/step': targeted leaf is a int, not an array"):
    LoraSpec(lambda p, leaf: True, rank=2).resolve(params)
  with pytest.raises(TypeError, match=r"'q/kernel': targeted kernel has dtype int8; LoRA needs a floating-point kernel"):
    LoraSpec(["q"]).resolve({"q": {"kernel": jnp.ones((4, 4), jnp.int8)}})


def test_bias_selected_by_regex(params):
  with pytest.raises(ValueError, match=r"'layers_0/mlp/fc1/bias': targeted leaf is a bias of shape \(32,\).*'layers_0/mlp/fc1/kernel'"):
    LoraSpec("layers_0/mlp/fc1/.*", rank=2).resolve(params)
  # A DenseGeneral bias has two axes; it is still not a kernel.
  with pytest.raises(ValueError, match=r"'layers_0/attn/query/bias': targeted leaf is a bias of shape \(4, 4\)"):
    LoraSpec("layers_0/attn/query/.*", rank=2, layout=QKV_LAYOUT).resolve(params)
  with pytest.raises(ValueError, match=r"'ln_f/scale': targeted leaf has shape \(16,\).*norm scale or bias"):
    LoraSpec("ln_f/scale", rank=2).resolve(params)


def _adapters(params):
  # Abstract adapters (shapes only): every check below happens before any arithmetic.
  return jax.eval_shape(lambda p: lora_jax.init(jax.random.key(1), p, LoraSpec(["mlp"], rank=2)), params)


def test_adapters_that_do_not_fit_params(params):
  ad = _adapters(params)
  # Structure: params of another model (no second layer).
  fewer = {k: v for k, v in params.items() if k != "layers_1"}
  with pytest.raises(ValueError, match=r"adapters do not mirror params: adapters have 'layers_1/mlp/fc1/kernel', which params lack"):
    jax.eval_shape(lora_jax.merge, fewer, ad)
  with pytest.raises(ValueError, match=r"adapters do not mirror params: their tree structures differ"):
    lora_jax.check_adapters(params, {"layers_0": ad["layers_0"]})
  # Factor shapes: a kernel of another width.
  wide = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.ones((DIM, 2 * HIDDEN)) if lora_jax._paths.path_str(p) == "layers_0/mlp/fc1/kernel" else x,
      params,
  )
  with pytest.raises(ValueError, match=r"'layers_0/mlp/fc1/kernel': kernel \(16, 64\) \(layout 'io'\) expects LoraFactors leaves a\(16, 2\) and b\(2, 64\) for rank 2, found a\(16, 2\) and b\(2, 32\)"):
    lora_jax.merge(wide, ad)
  # Something that is not a LoraFactors where one belongs.
  bad = jax.tree_util.tree_map_with_path(lambda p, x: x, ad, is_leaf=lambda x: isinstance(x, LoraFactors))
  bad["layers_0"]["mlp"]["fc2"]["kernel"] = np.zeros((HIDDEN, DIM))
  with pytest.raises(ValueError, match=r"adapters\['layers_0/mlp/fc2/kernel'\] is a ndarray, expected an adapter \(LoraFactors, or another lora_jax.kinds.Adapter\) or None"):
    lora_jax.check_adapters(params, bad)
  # An integer leaf holding factors.
  ints = jax.tree.map(lambda x: x.astype(jnp.int32), params)
  with pytest.raises(TypeError, match=r"'layers_0/mlp/fc1/kernel': adapters hold a LoraFactors for a leaf of type int32"):
    lora_jax.unmerge(ints, ad)
  # A layout with the wrong number of axes.
  f = ad["layers_0"]["mlp"]["fc1"]["kernel"]
  bad["layers_0"]["mlp"]["fc2"]["kernel"] = LoraFactors(a=f.a, b=f.b, scale=1.0, layout="iio")
  with pytest.raises(ValueError, match=r"'layers_0/mlp/fc2/kernel': adapter layout 'iio' has 3 axes but the kernel has shape \(32, 16\)"):
    lora_jax.check_adapters(params, bad)


def test_swapped_or_missing_arguments():
  model = nn.Dense(4)
  x = jnp.ones((2, 8))
  params = model.init(jax.random.key(0), x)
  adapters = lora_jax.init(jax.random.key(1), params, LoraSpec("params/kernel", rank=2))
  lora_apply = lora_jax.wrap(model.apply)
  assert lora_apply(params, adapters, x).shape == (2, 4)
  order = r"lora_jax takes the base params first and the adapters second: lora_apply\(params, adapters, \*args\).*only count takes \(adapters, params\)"
  swapped = r"the arguments look swapped: the params argument holds adapters \(LoraFactors at 'params/kernel'\) and the adapters argument holds none \(e.g. an array of shape \(4,\) \(float32\) at 'params/bias'\). " + order
  with pytest.raises(ValueError, match=swapped):
    lora_apply(adapters, params, x)
  with pytest.raises(ValueError, match=swapped):
    lora_jax.merge(adapters, params)
  with pytest.raises(ValueError, match=swapped):
    lora_jax.count(params, adapters)  # count is (adapters, params)
  assert lora_jax.count(adapters, params).trainable == 2 * (8 + 4)
  with pytest.raises(ValueError, match=r"the params argument holds adapters \(LoraFactors at 'params/kernel'\) and the adapters argument is an array of shape \(2, 8\) \(float32\): the base params look missing. " + order):
    lora_apply(adapters, x)
  with pytest.raises(ValueError, match=r"the adapters argument is an array of shape \(2, 8\) \(float32\), not a tree of adapters: the adapters look missing \(build them with lora_jax.init\(rng, params, spec\)\). " + order):
    lora_apply(params, x)
  with pytest.raises(ValueError, match=r"the params argument is an array of shape \(2, 8\) \(float32\) and the adapters argument a tree of adapters: the base params look missing"):
    lora_apply(x, adapters)
  with pytest.raises(ValueError, match=r"the adapters argument holds no adapter, only plain values \(e.g. an array of shape \(4,\) \(float32\) at 'params/bias'\): it looks like a params tree"):
    lora_jax.merge(params, params)
  with pytest.raises(ValueError, match=r"the params argument holds adapters \(LoraFactors at 'params/kernel'\): params must be the base parameters \(arrays only\)"):
    lora_jax.unmerge(adapters, adapters)
  # No adapter at all (every entry None) is still fine: merging changes nothing.
  nothing = jax.tree.map(lambda _: None, params)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), lora_jax.merge(params, nothing), params))
