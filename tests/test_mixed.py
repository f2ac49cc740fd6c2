"""Mixed-adapter batches: a bank of adapters (lora_jax.stack), one member per example.

Every result is checked against running each example alone (a batch of one) with its adapter
merged into the params by hand (``lora_jax.merge`` of that member), or with the base alone.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import lora_jax
from lora_jax import LoraFactors, LoraSpec
from lora_jax.models import llama
from tests._util import assert_close, normal, random_adapters, random_params

RTOL = 2e-5


def _is_node(x):
  return x is None or isinstance(x, (LoraFactors, lora_jax.LoraBank))


def _members(params, spec_kw, n, seed=0, **kw):
  """``n`` random adapters with different ranks and alphas (and kernels) on ``params``."""
  out = {}
  for k in range(n):
    r = 1 + (k % 3)
    spec = LoraSpec(spec_kw[k % len(spec_kw)], rank=r, alpha=float(2 * r + k), **kw)
    out[f"m{k}"] = random_adapters(params, spec, seed=seed + k, std=0.5)
  return out


def _alone(apply_fn, params, members, names, xs, *extra):
  """Each example alone (a batch of one), merged by hand: the reference. Jitted (one
  compilation per member, not one per operation and shape): the same merge-then-apply."""
  one = jax.jit(lambda p, ad, *a: apply_fn(p if ad is None else lora_jax.merge(p, ad), *a))
  outs = []
  for i, nm in enumerate(names):
    outs.append(one(params, None if nm is None else members[nm], *(x[i : i + 1] for x in xs), *extra)[0])
  return np.stack(outs)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, name="up")(x))
    h = nn.DenseGeneral((2, 8), name="heads")(h)
    return nn.Dense(5, name="out")(h.reshape(*h.shape[:-2], 16))


@pytest.fixture(scope="module")
def mlp():
  model = MLP()
  x = normal(0, (7, 12))
  params = random_params(model.init, x, seed=1)
  members = _members(params, ["params/up/kernel", "params/(heads|out)/kernel", ".*kernel"], 4, layout={"params/heads/kernel": "ioo"})
  return model, params, members, x


@pytest.mark.parametrize("bank_mode", ["dense", "gather", "auto"])
def test_mixed_equals_each_alone(mlp, bank_mode):
  model, params, members, x = mlp
  bank = lora_jax.stack(members)
  names = ["m1", None, "m0", "m3", "m2", "m1", None]
  lora_apply = lora_jax.wrap(model.apply, bank_mode=bank_mode)
  want = _alone(model.apply, params, members, names, [x])
  got = lora_apply(params, bank, x, adapter_ids=names)
  assert_close(got, want, RTOL)
  # the same with integer ids, and each row differs from the base where it has an adapter
  got2 = lora_apply(params, bank, x, adapter_ids=lora_jax.bank_ids(bank, names))
  np.testing.assert_array_equal(got, got2)
  base = model.apply(params, x)
  for i, nm in enumerate(names):
    moved = np.max(np.abs(np.asarray(got[i]) - np.asarray(base[i])))
    assert (moved <= 1e-5 * float(np.max(np.abs(base)))) == (nm is None), (i, nm, moved)


def test_gradients_equal_per_example_gradients(mlp):
  model, params, members, x = mlp
  bank = lora_jax.stack(members)
  names = ["m0", "m2", "m0", None, "m3", "m1", "m2"]
  w = normal(5, (7, 5))
  lora_apply = lora_jax.wrap(model.apply)

  def loss(bank):
    return jnp.sum(lora_apply(params, bank, x, adapter_ids=names) * w)

  g = lora_jax.unstack(jax.jit(jax.grad(loss))(bank))
  one = jax.jit(jax.grad(lambda ad, xi, wi: jnp.sum(lora_jax.wrap(model.apply)(params, ad, xi) * wi)))
  for nm in members:
    ref = jax.tree.map(np.zeros_like, members[nm])
    for i, n_i in enumerate(names):
      if n_i == nm:
        gi = one(members[nm], x[i : i + 1], w[i])
        ref = jax.tree.map(lambda r, g: r + np.asarray(g), ref, gi)
    for (p, got), want in zip(jax.tree_util.tree_leaves_with_path(g[nm]), jax.tree.leaves(ref)):
      assert_close(got, want, 1e-5, err_msg=f"{nm} {jax.tree_util.keystr(p)}")


def test_one_compile_for_every_pattern_and_hot_swap(mlp):
  model, params, members, x = mlp
  traces = []

  def apply_fn(p, x):
    traces.append(1)
    return model.apply(p, x)

  bank = lora_jax.stack(members)
  lora_apply = jax.jit(lora_jax.wrap(apply_fn))
  rng = np.random.default_rng(0)
  outs = [lora_apply(params, bank, x, adapter_ids=rng.integers(-1, 4, 7).astype(np.int32)) for _ in range(4)]
  assert len(traces) == 1, len(traces)
  # hot swap: new weights (and a new alpha) for one member, same shapes: no retrace
  new = random_adapters(params, LoraSpec("params/(heads|out)/kernel", rank=2, alpha=9.0, layout={"params/heads/kernel": "ioo"}), seed=42, std=0.5)
  swapped = lora_jax.replace_adapter(bank, "m1", new)
  ids = np.array([1, 1, 0, -1, 2, 3, 1], np.int32)
  got = lora_apply(params, swapped, x, adapter_ids=ids)
  assert len(traces) == 1, len(traces)
  want = _alone(model.apply, params, dict(members, m1=new), ["m1", "m1", "m0", None, "m2", "m3", "m1"], [x])
  assert_close(got, want, RTOL)
  assert not np.allclose(outs[0], outs[1])


def test_stack_unstack_round_trip_exact(mlp):
  _, _, members, _ = mlp
  assert lora_jax.stack(members, dtype=jnp.bfloat16)["params"]["up"]["kernel"].a.dtype == jnp.bfloat16
  back = lora_jax.unstack(lora_jax.stack(members))
  assert list(back) == list(members)
  for nm in members:
    fa = jax.tree.leaves(members[nm], is_leaf=_is_node)
    fb = jax.tree.leaves(back[nm], is_leaf=_is_node)
    assert len(fa) == len(fb)
    for a, b in zip(fa, fb):
      assert (a is None) == (b is None)
      if a is not None:
        assert (a.scale, a.layout, a.rank) == (b.scale, b.layout, b.rank)
        np.testing.assert_array_equal(a.a, b.a)
        np.testing.assert_array_equal(a.b, b.b)


def test_base_alone_and_out_of_range_ids(mlp):
  model, params, members, x = mlp
  bank = lora_jax.stack(members)
  lora_apply = lora_jax.wrap(model.apply)
  got = lora_apply(params, bank, x, adapter_ids=np.full(7, -1, np.int32))
  assert_close(got, model.apply(params, x), 1e-6)
  with pytest.raises(ValueError, match=r"adapter_ids holds \[4\], outside -1 \(the base alone\) \.\. 3"):
    lora_apply(params, bank, x, adapter_ids=np.array([0, 1, 2, 3, 4, 0, 0], np.int32))
  with pytest.raises(ValueError, match=r"adapter_ids\[1\] = 'nope' is not a member of the bank"):
    lora_apply(params, bank, x, adapter_ids=["m0", "nope"] + [None] * 5)
  # under an outer jit the ids are not known: an id out of range gives NaN for its example only
  out = jax.jit(lambda ids: lora_apply(params, bank, x, adapter_ids=ids))(np.array([0, 9, -1, 1, 1, 1, -5], np.int32))
  bad = np.isnan(np.asarray(out)).any(axis=-1)
  assert bad.tolist() == [False, True, False, False, False, False, True]


def test_refusals(mlp):
  model, params, members, x = mlp
  bank = lora_jax.stack(members)
  lora_apply = lora_jax.wrap(model.apply)
  with pytest.raises(ValueError, match=r"the adapters hold a bank of 4 adapters \(at 'params/heads/kernel'.*pass adapter_ids="):
    lora_apply(params, bank, x)
  with pytest.raises(ValueError, match="adapter_ids= was given, but the adapters hold no bank"):
    lora_apply(params, members["m0"], x, adapter_ids=[None] * 7)
  with pytest.raises(ValueError, match=r"args\[0\]: shape \(7, 12\) has no axis 0 of size 3 .*pass wrap\(in_axes=...\)"):
    lora_apply(params, bank, x, adapter_ids=["m0", "m1", None])
  with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
    lora_apply(params, bank, x, adapter_ids=[None] * 7, mutable=["batch_stats"])
  with pytest.raises(ValueError, match="has no single merge"):
    lora_jax.merge(params, bank)
  with pytest.raises(ValueError, match=r"wrap\(bank_mode='fast'\)"):
    lora_jax.wrap(model.apply, bank_mode="fast")
  with pytest.raises(ValueError, match=r"wrap\(in_axes=-1\)"):
    lora_jax.wrap(model.apply, in_axes=-1)

  def takes_ids(p, x, adapter_ids=None):
    return x

  with pytest.raises(TypeError, match="takes a keyword argument 'adapter_ids'"):
    lora_jax.wrap(takes_ids)


def test_stack_refusals(mlp):
  _, params, members, _ = mlp
  dora = lora_jax.init(jax.random.key(0), params, LoraSpec("params/up/kernel", rank=2, kind="dora"))
  with pytest.raises(ValueError, match=r"'params/up/kernel' of adapter 'd' is a DoraFactors; a bank holds plain LoRA"):
    lora_jax.stack({"a": members["m0"], "d": dora})
  other = {"params": {"up": {"kernel": None}}}
  with pytest.raises(ValueError, match=r"adapters 'x' and 'a' mirror different params \(first difference at"):
    lora_jax.stack({"a": members["m0"], "x": other})
  drop = random_adapters(params, LoraSpec(".*kernel", rank=2, dropout=0.1, layout={"params/heads/kernel": "ioo"}), seed=3)
  drop = jax.tree.map(lambda f: None if f is None else f.replace(dropout=0.1), drop, is_leaf=_is_node)
  with pytest.raises(ValueError, match=r"'params/heads/kernel' has dropout 0.0 in 'a' but 0.1 in 'b'"):
    lora_jax.stack({"a": members["m2"], "b": drop})
  with pytest.raises(ValueError, match="no adapters given"):
    lora_jax.stack({})
  with pytest.raises(ValueError, match="adapter name '' must be a non-empty printable string"):
    lora_jax.stack({"": members["m0"]})
  bank = lora_jax.stack(members)
  wrong_rank = random_adapters(params, LoraSpec("params/up/kernel", rank=3), seed=1)
  with pytest.raises(ValueError, match=r"'params/up/kernel' of 'm0' has rank 1 .* restack with lora_jax.stack"):
    lora_jax.replace_adapter(bank, "m0", wrong_rank)
  with pytest.raises(ValueError, match=r"'params/heads/kernel' of 'm1' has rank 2 .* restack with lora_jax.stack"):
    lora_jax.replace_adapter(bank, "m1", wrong_rank)
  with pytest.raises(ValueError, match="'zz' is not a member of the bank"):
    lora_jax.replace_adapter(bank, "zz", wrong_rank)


# ----------------------------------------------------------------------------------------------
# Model code of many kinds
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
  config = llama.LlamaConfig.tiny(dtype=jnp.float32, param_dtype=jnp.float32, scan_layers=True, remat=False)
  model = llama.LlamaForCausalLM(config)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (5, 9)), jnp.int32)
  params = random_params(model.init, tokens, seed=1)  # NumPy draws: no initializer to compile
  return config, model, params, tokens


@pytest.mark.parametrize("bank_mode", ["dense", "gather"])
def test_llama_scanned_stack_with_padding_mask(tiny_llama, bank_mode):
  config, model, params, tokens = tiny_llama
  lay = llama.lora_layout(config)
  members = {
      "all": random_adapters(params, LoraSpec(".*(q|k|v|o|gate|up|down)_proj/kernel", rank=3, alpha=6.0, layout=lay), seed=0, std=0.3),
      "qv": random_adapters(params, LoraSpec(".*(q|v)_proj/kernel", rank=2, alpha=8.0, layout=lay), seed=1, std=0.3),
      "emb": random_adapters(params, LoraSpec("params/embed_tokens/embedding|.*down_proj/kernel", rank=4, alpha=4.0, layout=lay), seed=2, std=0.3),
  }
  bank = lora_jax.stack(members)
  mask = np.ones(tokens.shape, np.int32)
  mask[1, :3] = 0
  names = ["qv", "all", None, "emb", "all"]
  lora_apply = lora_jax.wrap(model.apply, bank_mode=bank_mode)
  got = jax.jit(lambda b, ids: lora_apply(params, b, tokens, attention_mask=mask, adapter_ids=ids))(bank, lora_jax.bank_ids(bank, names))
  want = _alone(lambda p, t, m: model.apply(p, t, attention_mask=m), params, members, names, [tokens, mask])
  assert_close(got, want, RTOL)


def test_conv_and_embed():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, ids, img):
      e = nn.Embed(11, 6, name="emb")(ids).mean(axis=1)
      h = nn.Conv(4, (3, 3), name="conv")(img).mean(axis=(1, 2))
      return nn.Dense(3, name="head")(jnp.concatenate([e, h], -1))

  net = Net()
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 5)), jnp.int32)
  img = normal(1, (4, 6, 6, 2))
  params = random_params(net.init, ids, img, seed=2)
  members = _members(params, ["params/(emb/embedding|conv/kernel)", "params/(head|conv)/kernel"], 3, layout={"params/conv/kernel": "iiio"})
  bank = lora_jax.stack(members)
  names = ["m2", None, "m0", "m1"]
  for mode in ("dense", "gather"):
    got = lora_jax.wrap(net.apply, bank_mode=mode)(params, bank, ids, img, adapter_ids=names)
    assert_close(got, _alone(net.apply, params, members, names, [ids, img]), RTOL)


def test_nnx_model_and_shared_argument():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(6, 8, rngs=rngs)
      self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x, shift):
      return self.out(jax.nn.gelu(self.lin(x)) + shift)

  apply_fn, params, _ = lora_jax.from_nnx(Block(nnx.Rngs(0)))
  x = normal(3, (5, 6))
  shift = jnp.float32(0.25)  # shared by every example: in_axes None
  members = _members(params, [".*kernel"], 2)
  bank = lora_jax.stack(members)
  names = ["m1", "m0", None, "m1", "m0"]
  got = lora_jax.wrap(apply_fn, in_axes=(0, None))(params, bank, x, shift, adapter_ids=names)
  assert_close(got, _alone(apply_fn, params, members, names, [x], shift), RTOL)


def test_quantized_base():
  model = MLP()
  x = normal(0, (4, 12))
  params = random_params(model.init, x, seed=1)
  q = lora_jax.quantize(params, "all-linear", model.apply, x, format="nf4", block_size=4)
  members = _members(params, [".*kernel"], 2, layout={"params/heads/kernel": "ioo"})
  bank = lora_jax.stack(members)
  names = ["m0", None, "m1", "m0"]
  got = lora_jax.wrap(model.apply)(q, bank, x, adapter_ids=names)
  assert_close(got, _alone(model.apply, lora_jax.dequantize(q), members, names, [x]), RTOL)


def test_dropout_masks_are_per_example(mlp):
  model, params, members, _ = mlp
  drop = {k: jax.tree.map(lambda f: None if f is None else f.replace(dropout=0.5), v, is_leaf=_is_node) for k, v in members.items()}
  bank = lora_jax.stack(drop)
  x = jnp.ones((6, 12))  # identical examples, one adapter: only the masks can tell them apart
  lora_apply = lora_jax.wrap(model.apply)
  ids = np.zeros(6, np.int32)
  y = lora_apply(params, bank, x, adapter_ids=ids, lora_dropout_rng=jax.random.key(0))
  assert len({tuple(np.round(np.asarray(r), 5)) for r in y}) == 6
  # without the rng there is no dropout: all rows equal the adapter's output
  y0 = lora_apply(params, bank, x, adapter_ids=ids)
  assert_close(y0, np.broadcast_to(_alone(model.apply, params, members, ["m0"], [x[:1]]), y0.shape), RTOL)


def test_explicit_axes_and_pytree_outputs():
  def fn(p, x, y):  # x: example axis 1; returns a dict with the example axis at 0 and at 1
    h = jnp.einsum("tbi,io->bto", x, p["w"]["kernel"])
    return {"h": h, "t": jnp.swapaxes(h, 0, 1) + y}

  params = {"w": {"kernel": normal(0, (4, 3))}}
  members = _members(params, ["w/kernel"], 2)
  bank = lora_jax.stack(members)
  x = normal(1, (2, 5, 4))
  y = jnp.float32(1.0)
  names = ["m0", "m1", None, "m1", "m0"]
  got = lora_jax.wrap(fn, in_axes=(1, None), out_axes={"h": 0, "t": 1})(params, bank, x, y, adapter_ids=names)
  for i, nm in enumerate(names):
    p = params if nm is None else lora_jax.merge(params, members[nm])
    want = fn(p, x[:, i : i + 1], y)
    assert_close(got["h"][i], want["h"][0], RTOL)
    assert_close(got["t"][:, i], want["t"][:, 0], RTOL)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 5),
    batch=st.integers(1, 6),
    ranks=st.lists(st.integers(1, 4), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_property_dense_gather_reference(n, batch, ranks, seed):
  rng = np.random.default_rng(seed)
  fin, fout = 5, 3
  params = {"d": {"kernel": jnp.asarray(rng.standard_normal((fin, fout)), jnp.float32)}}
  members = {}
  for k in range(n):
    r = ranks[k]
    members[f"a{k}"] = {"d": {"kernel": LoraFactors(
        a=jnp.asarray(rng.standard_normal((fin, r)), jnp.float32), b=jnp.asarray(rng.standard_normal((r, fout)), jnp.float32),
        scale=float(rng.uniform(0.1, 4.0)), layout="io")}}
  bank = lora_jax.stack(members)
  ids = rng.integers(-1, n, batch).astype(np.int32)
  x = jnp.asarray(rng.standard_normal((batch, 2, fin)), jnp.float32)
  fn = lambda p, x: x @ p["d"]["kernel"]  # noqa: E731
  want = np.stack([
      np.asarray(x[i], np.float64) @ (np.asarray(params["d"]["kernel"], np.float64) + (0 if k < 0 else
          members[f"a{k}"]["d"]["kernel"].scale * np.asarray(members[f"a{k}"]["d"]["kernel"].a, np.float64)
          @ np.asarray(members[f"a{k}"]["d"]["kernel"].b, np.float64)))
      for i, k in enumerate(ids)
  ])
  for mode in ("dense", "gather"):
    got = lora_jax.wrap(fn, bank_mode=mode)(params, bank, x, adapter_ids=ids)
    assert_close(got, want, 1e-5)
