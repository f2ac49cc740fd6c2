"""Initialisations (LoraSpec(init=...)): PiSSA, pissa_niter_K, OLoRA, gaussian; the residual
base, its digest through save/load, and the conversion to plain LoRA on the original weights.

References are independent: numpy float64 SVD / QR of each kernel viewed per layer as a
(fan_in, fan_out) matrix (transposed by hand from its layout), and PEFT itself."""

import copy
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

import lora_jax
from _util import assert_close, assert_far
from _models import Stack, oi_apply
from lora_jax.kinds.inits import DIGEST_PENDING, svd_lowrank
from _hf import tiny_hf_llama

RTOL = 1e-5  # float32 results against float64 references, relative to their largest value
INITS = ("pissa", "pissa_niter_4", "olora")


# ----------------------------------------------------------------------------------------------
# Models: one kernel each, in every layout family.
# ----------------------------------------------------------------------------------------------




@functools.lru_cache(maxsize=None)
def _case(name):
  """``(apply, params, x, path, layout, wrapped)`` for one model (shapes from ``eval_shape``,
  values from numpy: nothing compiled to make them)."""
  rng = np.random.default_rng(0)
  if name == "oi":
    apply, x, path, layout = oi_apply, np.ones((3, 8)), "lin/weight", "oi"
    shapes = {"lin": {"weight": jax.ShapeDtypeStruct((6, 8), jnp.float32)}}
  else:
    model, x, path, layout = {
        "dense": (nn.Dense(6), np.ones((3, 8)), "params/kernel", "io"),
        "dense_general": (nn.DenseGeneral((3, 4)), np.ones((3, 8)), "params/kernel", "ioo"),
        "scan": (Stack(), np.ones((3, 8)), "params/layers/mlp/kernel", "lio"),
        "conv": (nn.Conv(5, (3, 3)), np.ones((2, 6, 6, 3)), "params/kernel", "iiio"),
    }[name]
    apply = model.apply
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x, jnp.float32))
  x = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
  # A clearly graded spectrum, so that the top-r subspace is well defined (no near-ties at the cut).
  params = jax.tree_util.tree_map_with_path(lambda p, v: _graded(v, layout) if _is(p, path) else v, params)
  return apply, params, x, path, layout, jax.jit(lora_jax.wrap(apply))


def _is(keypath, path):
  return jax.tree_util.keystr(keypath, simple=True, separator="/") == path


def _graded(w, layout):
  """``w`` with singular values 1, 0.7, 0.49, ... per layer (the same singular vectors)."""
  m, undo = _np_matrices(np.asarray(w, np.float64), layout)
  u, s, vh = np.linalg.svd(m, full_matrices=False)
  s = 0.7 ** np.arange(s.shape[-1]) * np.ones_like(s)
  return jnp.asarray(undo(np.einsum("...ik,...k,...kj->...ij", u, s, vh)), w.dtype)


def _np_matrices(w, layout):
  """numpy: the kernel as (*L, fan_in, fan_out) matrices, and the function that undoes it."""
  order = [j for role in "lio" for j, c in enumerate(layout) if c == role]
  wt = np.transpose(w, order)
  n_l, n_i = layout.count("l"), layout.count("i")
  lead, ins, outs = wt.shape[:n_l], wt.shape[n_l : n_l + n_i], wt.shape[n_l + n_i :]
  m = wt.reshape(*lead, int(np.prod(ins)), int(np.prod(outs)))

  def undo(x):
    return np.transpose(np.reshape(x, wt.shape), np.argsort(order))

  return m, undo


def _leaf(tree, path):
  for p, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lora_jax.kinds.is_adapter):
    if _is(p, path):
      return v
  raise KeyError(path)


def _reference(init, w, layout, rank, scale):
  """float64 numpy ``(scale * a @ b, residual)`` per layer, in the kernel's layout."""
  m, undo = _np_matrices(np.asarray(w, np.float64), layout)
  prod = np.empty_like(m)
  for idx in np.ndindex(*m.shape[:-2]):
    if init == "olora":  # PEFT: on the torch (out, in) weight, W^T = Q R; delta^T = s Q_r R_r
      q, r = np.linalg.qr(m[idx].T)
      prod[idx] = scale * (q[:, :rank] @ r[:rank]).T
    else:
      u, s, vh = np.linalg.svd(m[idx], full_matrices=False)
      prod[idx] = (u[:, :rank] * s[:rank]) @ vh[:rank]
  return undo(prod), undo(m - prod)


SPEC = dict(rank=2, alpha=3.0)


def _spec(path, init, **kw):
  return lora_jax.LoraSpec(path, init=init, **{**SPEC, **kw})


# ----------------------------------------------------------------------------------------------
# Each init on each layout: output unchanged, against numpy, per layer.
# ----------------------------------------------------------------------------------------------


def _np_product(f, layout, like):
  """float64 numpy ``scale * a @ b`` per layer, in the kernel's layout (shape of ``like``)."""
  m, undo = _np_matrices(np.asarray(like, np.float64), layout)
  am = np.asarray(f.a, np.float64).reshape(*m.shape[:-2], -1, f.rank)
  bm = np.asarray(f.b, np.float64).reshape(*m.shape[:-2], f.rank, -1)
  return undo(f.scale * am @ bm), am, bm


CASES = [(c, i) for c in ("dense", "dense_general", "scan", "conv", "oi") for i in ("pissa", "olora")]
CASES += [("scan", "pissa_niter_4"), ("oi", "pissa_niter_4")]


@pytest.mark.parametrize("case,init", CASES)
def test_init_keeps_the_output_and_matches_numpy(case, init):
  apply, params, x, path, layout, wrapped = _case(case)
  base, ad = lora_jax.split(jax.random.key(2), params, _spec(path, init), apply, x)
  f = _leaf(ad, path)
  assert f.layout == layout and f.base_digest == lora_jax.kinds.inits.base_digest(_leaf(base, path))
  w, w_res = np.asarray(_leaf(params, path)), np.asarray(_leaf(base, path))
  assert w_res.dtype == w.dtype and w_res.shape == w.shape and f.a.dtype == jnp.float32
  # Output unchanged at step 0 (the residual base plus the adapter is the original kernel).
  want = jax.jit(apply)(params, x)
  assert_close(wrapped(base, ad, x), want, RTOL)
  assert_far(jax.jit(apply)(base, x), want, RTOL)  # the residual alone is another model
  prod_ours, am, bm = _np_product(f, layout, w)
  assert_close(w_res + prod_ours, w, RTOL)
  # The factors' product and the residual against float64 numpy SVD / QR, layer by layer.
  gram_a, gram_b = np.swapaxes(am, -1, -2) @ am, bm @ np.swapaxes(bm, -1, -2)
  if init == "pissa_niter_4":
    # A randomized SVD: not the exact top-r part, but a residual near the optimal one, and
    # factors that are U sqrt(S/s), sqrt(S/s) V^T of its own orthonormal U, V (the algorithm
    # itself is checked against numpy in test_randomized_svd_against_numpy_and_keyed).
    _, res = _reference("pissa", w, layout, f.rank, f.scale)
    best = np.linalg.norm(_np_matrices(res, layout)[0], axis=(-2, -1))
    ours = np.linalg.norm(_np_matrices(np.asarray(w_res, np.float64), layout)[0], axis=(-2, -1))
    # (PEFT's q = r, without oversampling, has a heavy tail: an unlucky draw can miss by 20%.)
    assert np.all(ours <= 1.25 * best) and np.all(ours >= best * (1 - 1e-6)), (ours, best)
    assert_close(gram_a, gram_b, 1e-5)
    assert_close(gram_a, gram_a * np.eye(f.rank), 1e-5)  # diagonal
    return
  prod, res = _reference(init, w, layout, f.rank, f.scale)
  assert_close(prod_ours, prod, RTOL, scale=np.abs(w).max())
  assert_close(w_res, res, RTOL, scale=np.abs(w).max())
  if init == "pissa":
    # a = U_r sqrt(S_r/s), b = sqrt(S_r/s) V_r^T: a^T a = b b^T = diag(S_r / s) per layer,
    # which (unlike U and V) does not depend on the SVD's signs.
    m, _ = _np_matrices(np.asarray(w, np.float64), layout)
    diag = (np.linalg.svd(m, compute_uv=False)[..., : f.rank] / f.scale)[..., None] * np.eye(f.rank)
    assert_close(gram_a, diag, RTOL)
    assert_close(gram_b, diag, RTOL)


@pytest.mark.parametrize("case,inits", [("scan", INITS), ("conv", ("pissa",))])
def test_split_under_jit_and_a_gradient_step(case, inits):
  apply, params, x, path, layout, wrapped = _case(case)
  for init in inits:
    spec = _spec(path, init)
    base, ad = lora_jax.split(jax.random.key(2), params, spec, apply, x)
    jbase, jad = jax.jit(lambda p: lora_jax.split(jax.random.key(2), p, spec, apply, x))(params)
    assert _leaf(jad, path).base_digest == DIGEST_PENDING  # no digest of a tracer
    assert_close(_leaf(jbase, path), _leaf(base, path), 1e-5)
    assert_close(_np_product(_leaf(jad, path), layout, _leaf(base, path))[0], _np_product(_leaf(ad, path), layout, _leaf(base, path))[0], 1e-5)
  # One optimizer step on the residual base trains both factors.
  y = jnp.asarray(np.random.default_rng(3).standard_normal(jax.eval_shape(apply, params, x).shape), jnp.float32)
  tx = optax.sgd(1e-2)

  @jax.jit
  def step(ad):
    loss, grads = jax.value_and_grad(lambda ad: jnp.mean((lora_jax.wrap(apply)(jbase, ad, x) - y) ** 2))(ad)
    return loss, grads, optax.apply_updates(ad, tx.update(grads, tx.init(ad))[0])

  loss0, grads, new = step(jad)
  g = _leaf(grads, path)
  assert float(jnp.abs(g.a).max()) > 0 and float(jnp.abs(g.b).max()) > 0
  assert _leaf(new, path).base_digest == DIGEST_PENDING  # static fields survive training
  assert float(step(new)[0]) < float(loss0)


def test_dora_with_pissa_keeps_the_output():
  apply, params, x, path, _, wrapped = _case("dense")
  base, ad = lora_jax.split(jax.random.key(2), params, _spec(path, "pissa", kind="dora"), apply, x)
  f = _leaf(ad, path)
  assert isinstance(f, lora_jax.DoraFactors) and f.base_digest is not None
  assert_close(wrapped(base, ad, x), jax.jit(apply)(params, x), RTOL)
  jbase, jad = jax.jit(lambda p: lora_jax.split(jax.random.key(2), p, _spec(path, "pissa", kind="dora"), apply, x))(params)
  assert_close(wrapped(jbase, jad, x), jax.jit(apply)(params, x), RTOL)


def test_gaussian_statistics():
  params = {"d": {"kernel": jnp.zeros((512, 64))}}
  ad = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["d"], rank=16, init="gaussian"))
  f = ad["d"]["kernel"]
  assert abs(float(jnp.std(f.a)) * 16 - 1) < 0.05 and abs(float(jnp.mean(f.a))) < 0.01
  assert not np.any(np.asarray(f.b)) and f.base_digest is None


def _np_svd_lowrank(m, r, niter):
  """torch.svd_lowrank's algorithm in float64 numpy, from the random matrix ``r``."""
  wide = m.shape[-2] < m.shape[-1]
  a = np.swapaxes(m, -1, -2) if wide else m
  basis = np.linalg.qr(a @ r)[0]
  for _ in range(niter):
    basis = np.linalg.qr(np.swapaxes(a, -1, -2) @ basis)[0]
    basis = np.linalg.qr(a @ basis)[0]
  return basis @ (np.swapaxes(basis, -1, -2) @ a), wide  # the rank-q approximation Q Q^T A


def test_randomized_svd_against_numpy_and_keyed():
  key = jax.random.key(2)
  m = np.random.default_rng(0).standard_normal((2, 9, 5))
  for x in (m, np.swapaxes(m, -1, -2)):  # tall and wide
    u, s, v = (np.asarray(z, np.float64) for z in svd_lowrank(jnp.asarray(x, jnp.float32), 3, 2, key))
    wide = x.shape[-2] < x.shape[-1]
    n = x.shape[-2] if wide else x.shape[-1]
    r = np.asarray(jax.random.normal(key, (2, n, 3), jnp.float32), np.float64)  # the draws it made
    approx, _ = _np_svd_lowrank(x, r, 2)
    assert_close(np.einsum("...ik,...k,...jk->...ij", u, s, v), np.swapaxes(approx, -1, -2) if wide else approx, 1e-5)
  params = {"d": {"kernel": jnp.asarray(np.random.default_rng(3).standard_normal((30, 20)), jnp.float32)}}
  spec = lora_jax.LoraSpec(["d"], rank=2, init="pissa_niter_0")
  one, two, again = (np.asarray(lora_jax.split(jax.random.key(k), params, spec)[0]["d"]["kernel"]) for k in (4, 5, 4))
  np.testing.assert_array_equal(one, again)
  assert np.abs(one - two).max() > 1e-3


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_property_any_layout_keeps_the_kernel(data):
  roles = data.draw(st.sampled_from(["io", "oi", "lio", "ilo", "iio", "oio", "lioo", "oiil"]))
  shape = tuple(data.draw(st.integers(1, 3)) if c == "l" else data.draw(st.integers(1, 5)) for c in roles)
  fan_in = int(np.prod([d for d, c in zip(shape, roles) if c == "i"]))
  fan_out = int(np.prod([d for d, c in zip(shape, roles) if c == "o"]))
  rank = data.draw(st.integers(1, min(fan_in, fan_out)))
  init = data.draw(st.sampled_from(["pissa", "olora"]))
  w = _graded(np.random.default_rng(data.draw(st.integers(0, 99))).standard_normal(shape).astype(np.float32), roles)
  spec = lora_jax.LoraSpec("w", rank=rank, alpha=2.0, layout={"w": roles}, init=init)
  base, ad = lora_jax.split(jax.random.key(0), {"w": w}, spec)
  f = ad["w"]
  assert f.a.shape[-1] == rank and tuple(f.kernel_shape) == shape
  prod_ours = _np_product(f, roles, w)[0]
  assert_close(np.asarray(base["w"]) + prod_ours, w, RTOL)
  prod, res = _reference(init, w, roles, rank, f.scale)
  assert_close(prod_ours, prod, 1e-4, scale=float(np.abs(w).max()))
  assert_close(base["w"], res, 1e-4, scale=float(np.abs(w).max()))


# ----------------------------------------------------------------------------------------------
# Refusals.
# ----------------------------------------------------------------------------------------------


def test_bad_options_are_refused_naming_the_path():
  with pytest.raises(ValueError, match=r"LoraSpec\(init='pisa'\): no such init; expected one of"):
    lora_jax.LoraSpec(["d"], init="pisa")
  with pytest.raises(TypeError, match=r"LoraSpec\(init=3\): init must be one of"):
    lora_jax.LoraSpec(["d"], init=3)
  params = {"d": {"kernel": jnp.ones((4, 3))}}
  with pytest.raises(ValueError, match=r"'d/kernel': rank 4 exceeds min\(fan_in, fan_out\) = min\(4, 3\) = 3"):
    lora_jax.split(jax.random.key(0), params, lora_jax.LoraSpec(["d"], rank=4, init="pissa"))
  with pytest.raises(ValueError, match=r"lora_jax.init: LoraSpec\(init='olora'\) replaces each adapted kernel .* lora_jax.split"):
    lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["d"], rank=2, init="olora"))
  with pytest.raises(ValueError, match=r"'d/kernel': init='pissa' divides the singular values by the scale alpha/r = -1.0"):
    lora_jax.split(jax.random.key(0), params, lora_jax.LoraSpec(["d"], rank=2, alpha=-2, init="pissa"))
  abstract = {"d": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32)}}
  with pytest.raises(ValueError, match=r"'d/kernel': init='pissa_niter_2' starts the factors from the kernel's values"):
    lora_jax.split(jax.random.key(0), abstract, lora_jax.LoraSpec(["d"], rank=2, init="pissa_niter_2"))
  with pytest.raises(TypeError, match=r"'d/kernel': targeted kernel has dtype int32"):
    lora_jax.split(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3), jnp.int32)}}, lora_jax.LoraSpec(["d"], init="pissa"))
  embed = nn.Embed(10, 4)
  ids = jnp.array([[1, 2]])
  v = embed.init(jax.random.key(0), ids)
  with pytest.raises(ValueError, match=r"'params/embedding': init='pissa' is for matmul and convolution kernels, not embeddings"):
    lora_jax.split(jax.random.key(0), v, lora_jax.LoraSpec(["params"], rank=2, init="pissa"), embed.apply, ids)


def test_a_quantized_base_is_refused_before_any_svd():
  from test_kinds import Int8Kernel

  q = {"d": {"kernel": Int8Kernel(jnp.ones((4, 3), jnp.int8), jnp.full((3,), 0.1))}}
  with pytest.raises(ValueError, match=r"'d/kernel': init='pissa' replaces the base kernel, which here is a Int8Kernel; start from a dense kernel \(quantize after split\)"):
    lora_jax.split(jax.random.key(0), q, lora_jax.LoraSpec(["d"], rank=2, init="pissa"))


# ----------------------------------------------------------------------------------------------
# Shardings.
# ----------------------------------------------------------------------------------------------


def test_the_residual_keeps_the_kernel_sharding():
  dev = jax.devices()[0]
  mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
  for sharding in (SingleDeviceSharding(dev), NamedSharding(mesh, P(None, "tp"))):
    params = {"d": {"kernel": jax.device_put(jax.random.normal(jax.random.key(0), (8, 6)), sharding)}}
    base, _ = lora_jax.split(jax.random.key(1), params, lora_jax.LoraSpec(["d"], rank=2, init="olora"))
    assert base["d"]["kernel"].sharding == sharding


# ----------------------------------------------------------------------------------------------
# Files: the digest round trip and refusal.
# ----------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_the_digest_refusal(tmp_path):
  apply, params, x, path, _, wrapped = _case("scan")
  spec = _spec(path, "pissa")
  base, ad = lora_jax.split(jax.random.key(2), params, spec, apply, x)
  f = _leaf(ad, path)
  lora_jax.save(tmp_path / "ad", ad, spec, params=base)
  assert lora_jax.load_config(tmp_path / "ad")["adapters"][path]["static"]["base_digest"] == f.base_digest
  lora_jax.save_params(tmp_path / "base.safetensors", base)
  base_back = lora_jax.load_params(tmp_path / "base.safetensors")
  back = lora_jax.load(tmp_path / "ad", base_back)
  g = _leaf(back, path)
  assert (g.base_digest, g.scale, g.layout) == (f.base_digest, f.scale, f.layout)
  np.testing.assert_array_equal(g.a, f.a)
  np.testing.assert_array_equal(g.b, f.b)
  np.testing.assert_array_equal(wrapped(base_back, back, x), wrapped(base, ad, x))
  with pytest.raises(lora_jax.AdapterFileError, match=(
      rf"adapters\['{path}'\] were made by a base-changing init \(PiSSA/OLoRA/LoftQ\) for a base kernel with digest "
      rf"'{f.base_digest}'; these params hold one .* lora_jax.save_params.* lora_jax.to_original_base")):
    lora_jax.load(tmp_path / "ad", params)
  assert _leaf(lora_jax.load(tmp_path / "ad", params=jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)), path) is not None
  with pytest.raises(ValueError, match=rf"'{path}': these adapters were made by a base-changing init .* Save them with params=the residual base"):
    lora_jax.save(tmp_path / "bad", ad, params=params)
  # Made under jit: the digest is filled in at save from params=, and refused without them.
  jbase, jad = jax.jit(lambda p: lora_jax.split(jax.random.key(2), p, spec, apply, x))(params)
  with pytest.raises(ValueError, match=rf"'{path}': these adapters were made under a trace .* params=base"):
    lora_jax.save(tmp_path / "j", jad)
  lora_jax.save(tmp_path / "j", jad, params=jbase)
  assert _leaf(lora_jax.load(tmp_path / "j", jbase), path).base_digest == lora_jax.kinds.inits.base_digest(_leaf(jbase, path))
  with pytest.raises(lora_jax.AdapterFileError, match="to_original_base"):
    lora_jax.load(tmp_path / "j", params)


# ----------------------------------------------------------------------------------------------
# to_original_base.
# ----------------------------------------------------------------------------------------------


def _trained(ad, seed=0):
  """Stands for training: every factor moved by a random amount."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda z: z + jnp.asarray(0.3 * rng.standard_normal(z.shape), z.dtype), ad)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_to_original_base_in_float64(init):
  prev = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    apply, params, x, path, _, wrapped = _case("scan")
    params, x = jax.tree.map(lambda v: v.astype(jnp.float64), (params, x))
    spec = _spec(path, init, dtype=jnp.float64, rslora=True)
    base, ad0 = lora_jax.split(jax.random.key(2), params, spec, apply, x)
    ad = _trained(ad0)
    plain = lora_jax.to_original_base(ad, ad0)
    f, f0 = _leaf(plain, path), _leaf(ad0, path)
    assert (f.rank, f.scale, f.rslora, f.base_digest) == (2 * f0.rank, f0.scale, True, None)
    assert_close(_leaf(lora_jax.merge(params, plain), path), _leaf(lora_jax.merge(base, ad), path), 1e-12)
    assert_close(wrapped(params, plain, x), wrapped(base, ad, x), 1e-12)
  finally:
    jax.config.update("jax_enable_x64", prev)


def test_to_original_base_refusals():
  apply, params, x, path, _, wrapped = _case("dense")
  base, ad0 = lora_jax.split(jax.random.key(2), params, _spec(path, "pissa"), apply, x)
  plain_ad = lora_jax.init(jax.random.key(2), params, _spec(path, "peft"), apply, x)
  with pytest.raises(ValueError, match=rf"to_original_base: the initial adapter at '{path}' was not made by a base-changing init"):
    lora_jax.to_original_base(ad0, plain_ad)
  with pytest.raises(ValueError, match=rf"to_original_base: the trained adapter at '{path}' has no base_digest: it was already converted"):
    lora_jax.to_original_base(lora_jax.to_original_base(ad0, ad0), ad0)
  other = lora_jax.split(jax.random.key(2), params, _spec(path, "pissa", alpha=5.0), apply, x)[1]
  with pytest.raises(ValueError, match=rf"to_original_base: '{path}': the trained adapter \(layout, scale, rslora, a, b shapes\)"):
    lora_jax.to_original_base(ad0, other)
  moved = jax.tree.map(lambda v: v + 1, params)
  on_other_base = lora_jax.split(jax.random.key(2), moved, _spec(path, "pissa"), apply, x)[1]
  with pytest.raises(ValueError, match=rf"to_original_base: '{path}': the trained and initial adapters belong to different bases"):
    lora_jax.to_original_base(ad0, on_other_base)
  with pytest.raises(ValueError, match=r"to_original_base\(adapters, initial_adapters\): the two trees have different structures \(first difference at 'params/bias'\)"):
    lora_jax.to_original_base(ad0, {"params": {"kernel": _leaf(ad0, path)}})
  dora = lora_jax.split(jax.random.key(2), params, _spec(path, "pissa", kind="dora"), apply, x)[1]
  with pytest.raises(ValueError, match=rf"to_original_base: '{path}' holds a DoraFactors \(kind 'dora'\); only plain LoRA .* DoRA's rescale .* not an additive"):
    lora_jax.to_original_base(dora, dora)


# ----------------------------------------------------------------------------------------------
# Against PEFT: its PiSSA/OLoRA on the same Hugging Face weights, and its weight conversion.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_llama():
  pytest.importorskip("peft")
  from test_interop import MODULES, TOKENS

  from lora_jax.models import llama

  hf_config, torch_model, sd = tiny_hf_llama()
  config = llama.llama_config_from_hf(hf_config, remat=False, scan_layers=True)
  params = llama.load_hf_llama(sd, config)
  apply = jax.jit(lora_jax.wrap(llama.LlamaForCausalLM(config).apply))
  return torch_model, params, apply, llama.lora_layout(config), MODULES, TOKENS


def _torch_logits(model, tokens):
  import torch

  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _by_torch_name(tree):
  """{torch module name: (in, out) array} of each stacked llama kernel (or adapter's
  ``scale * a @ b``), layer by layer."""
  from lora_jax.interop import LLAMA

  out = {}
  for p, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lora_jax.kinds.is_adapter):
    path = jax.tree_util.keystr(p, simple=True, separator="/")
    x = np.asarray(v.delta() if lora_jax.kinds.is_adapter(v) else v)
    for i in range(x.shape[0]):
      name = LLAMA(path, i) if x.ndim == 3 else None
      if name is not None:
        out[name] = x[i]
  return out


@pytest.mark.interop
@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_against_peft_inits(hf_llama, init):
  import peft

  torch_model, params, _, layout, modules, _ = hf_llama
  rank, alpha = 4, 8
  spec = lora_jax.LoraSpec(modules, rank=rank, alpha=alpha, layout=layout, init=init)
  base, ad = lora_jax.split(jax.random.key(0), params, spec)
  ours_res, ours_prod = _by_torch_name(base), _by_torch_name(ad)
  cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, init_lora_weights=init)
  import torch

  torch.manual_seed(0)  # PEFT's randomized SVD draws from torch's global generator: not from test order
  pm = peft.get_peft_model(copy.deepcopy(torch_model), cfg)
  scale = alpha / rank
  n = 0
  for name, mod in pm.base_model.model.named_modules():
    if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
      continue
    n += 1
    w_res = mod.base_layer.weight.detach().numpy().T  # (in, out), as ours
    prod = scale * (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach().numpy().T
    w = w_res + prod
    if init == "pissa_niter_4":  # both randomized: each within a little of the exact rank-r residual
      exact = np.linalg.svd(w.astype(np.float64), compute_uv=False)[rank:]
      best = float(np.sqrt(np.sum(exact**2)))
      assert np.linalg.norm(ours_res[name]) <= 1.02 * best, name
      assert np.linalg.norm(w_res) <= 1.02 * best, name
      assert_close(ours_res[name] + ours_prod[name], w, 1e-5)
    else:
      assert_close(ours_res[name], w_res, 1e-4, scale=np.abs(w).max(), err_msg=name)
      assert_close(ours_prod[name], prod, 1e-4, scale=np.abs(w).max(), err_msg=name)
  assert n == len(ours_res) == 14


@pytest.mark.interop
def test_trained_pissa_converted_loads_in_peft_on_the_original_model(hf_llama, tmp_path):
  import peft

  torch_model, params, apply, layout, modules, tokens = hf_llama
  spec = lora_jax.LoraSpec(modules, rank=4, alpha=8, layout=layout, init="pissa")
  base, ad0 = lora_jax.split(jax.random.key(0), params, spec)
  ad = _trained(ad0)
  want = np.asarray(apply(base, ad, tokens))
  assert_far(want, _torch_logits(torch_model, tokens), 1e-4)
  lora_jax.export_peft(tmp_path, lora_jax.to_original_base(ad, ad0), "llama")
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  # What PEFT's own conversion (save_pretrained(path_initial_model_for_weight_conversion=))
  # writes: r and lora_alpha doubled, init_lora_weights=True.
  assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"], cfg["init_lora_weights"]) == (8, 16, {}, {}, True)
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
  assert_close(_torch_logits(peft_model, tokens), want, 1e-4)
