"""LoftQ (LoraSpec(init="loftq"...)): a quantized base plus factors closer to the full-precision
weights than plain QLoRA; per layer; end to end through split / wrap / training / files; PEFT.

References are independent: the reconstruction error and the top-r SVD in float64 numpy, the
quantizer called on its own (``quantize_kernel``), and PEFT's ``loftq_init``."""

import __future__
import ast
import functools
import importlib.util
import pathlib
import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from _util import assert_close
from _models import Stack, oi_apply
from lora_jax.bases import dense as _dense
from lora_jax.bases.quantized import quantize_kernel
from lora_jax.kinds import loftq
from lora_jax.kinds.inits import DIGEST_PENDING, base_digest

dense = jax.jit(_dense)  # one compiled dequantization per kernel, not one per operation
INITS = {"nf4": ("loftq", "loftq_iter_2", "loftq_iter_5"), "int8": ("loftq_int8", "loftq_int8_iter_2", "loftq_int8_iter_5")}


def real_looking(shape, seed=0, strong=4):
  """A weight whose spectrum decays like a trained one: heavy-tailed noise (Student-t, so
  blocks hold outliers that set their absmax) plus a few strong rank-1 directions."""
  rng = np.random.default_rng(seed)
  *lead, fan_in, fan_out = shape
  w = 0.02 * rng.standard_t(4, size=shape)
  for k in range(strong):
    u = rng.standard_normal((*lead, fan_in, 1))
    v = rng.standard_normal((*lead, 1, fan_out))
    w = w + (0.6**k) * 0.25 * u * v / np.sqrt(max(fan_in, fan_out)) * 4
  return w.astype(np.float32)


def _f64(x):
  return np.asarray(x, np.float64)


def _product(f):
  """``scale * a @ b`` in float64 numpy for an 'io' (or 'lio') adapter."""
  return f.scale * _f64(f.a) @ _f64(f.b)


def _error(w, q, f):
  """``||W - (dequant(Q) + scale * a @ b)||_F`` (per layer for a stack), float64."""
  return np.linalg.norm(_f64(w) - _f64(dense(q)) - _product(f), axis=(-2, -1))


def _top_r(m, r):
  u, s, vh = np.linalg.svd(m, full_matrices=False)
  return (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]


# ----------------------------------------------------------------------------------------------
# The reconstruction: below QLoRA's, non-increasing in the iterations, for any alpha.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_error_below_qlora_and_non_increasing_with_iterations(fmt):
  w = real_looking((256, 128))
  params = {"d": {"kernel": jnp.asarray(w)}}
  qlora = float(np.linalg.norm(_f64(w) - _f64(quantize_kernel(w, format=fmt).materialize())))
  errors = []
  for init in INITS[fmt]:
    base, ad = lora_jax.split(jax.random.key(0), params, lora_jax.LoraSpec(["d"], rank=8, alpha=3.0, init=init))
    q, f = base["d"]["kernel"], ad["d"]["kernel"]
    assert isinstance(q, lora_jax.QuantizedKernel) and (q.format, q.shape, q.axis, q.layout) == (fmt, (256, 128), 0, "io")
    assert (q.block_size, q.double_quant) == ((64, True) if fmt == "nf4" else (256, False))  # PEFT's formats
    assert f.scale == 3.0 / 8 and f.base_digest == base_digest(dense(q)) != base_digest(w)
    # The factors are the top-r part of W - dequant(Q), divided by the scale (float64 SVD).
    res = _f64(w) - _f64(dense(q))
    assert_close(_product(f), _top_r(res, 8), 1e-4, scale=np.abs(res).max())
    errors.append(float(_error(w, q, f)))
    if init in ("loftq", "loftq_int8"):  # one iteration: Q is plain QLoRA's quantization of W
      np.testing.assert_array_equal(q.codes, quantize_kernel(w, format=fmt).codes)
  assert errors[0] < 0.93 * qlora, (errors, qlora)
  assert errors[0] >= errors[1] >= errors[2], errors
  assert errors[2] < 0.97 * errors[0], errors  # more iterations do help on such weights
  # Any alpha (including a negative one): the same quantized base and the same scale * a @ b.
  for alpha in (16.0, -5.0):
    base, ad = lora_jax.split(jax.random.key(0), params, lora_jax.LoraSpec(["d"], rank=8, alpha=alpha, init=INITS[fmt][1]))
    assert ad["d"]["kernel"].scale == alpha / 8
    assert_close(_error(w, base["d"]["kernel"], ad["d"]["kernel"]), errors[1], 1e-4)


# ----------------------------------------------------------------------------------------------
# Per layer, any layout.
# ----------------------------------------------------------------------------------------------




def test_per_layer_on_a_scan_stack_and_a_torch_layout():
  x = jnp.ones((2, 64))
  w = real_looking((3, 64, 64), seed=1)
  params = {"params": {"layers": {"mlp": {"kernel": jnp.asarray(w), "bias": jnp.zeros((3, 64))}}}}
  spec = lora_jax.LoraSpec(["mlp"], rank=4, alpha=8.0, init="loftq_iter_2")
  base, ad = lora_jax.split(jax.random.key(0), params, spec, Stack(64).apply, x)
  q, f = base["params"]["layers"]["mlp"]["kernel"], ad["params"]["layers"]["mlp"]["kernel"]
  assert (q.layout, q.axis, q.lead, f.layout, f.a.shape) == ("lio", 1, (0,), "lio", (3, 64, 4))
  for layer in range(3):
    b1, a1 = lora_jax.split(jax.random.key(0), {"w": jnp.asarray(w[layer])}, lora_jax.LoraSpec("w", rank=4, alpha=8.0, init="loftq_iter_2"))
    for name in ("codes", "absmax", "absmax2", "offset"):  # the same quantized layer, bit for bit
      np.testing.assert_array_equal(getattr(q, name)[layer], getattr(b1["w"], name), err_msg=name)
    assert_close(_product(f)[layer], _product(a1["w"]), 1e-5)
  # A torch-style (out, in) weight: blocked along its fan-in (axis 1); the same as on W^T.
  wt = jnp.asarray(w[0].T)
  base, ad = lora_jax.split(jax.random.key(0), {"lin": {"weight": wt}}, lora_jax.LoraSpec(["lin"], rank=4, alpha=8.0, init="loftq_iter_2"), oi_apply, x)
  q, f = base["lin"]["weight"], ad["lin"]["weight"]
  assert (q.layout, q.axis, f.layout) == ("oi", 1, "oi")
  b1, a1 = lora_jax.split(jax.random.key(0), {"w": jnp.asarray(w[0])}, lora_jax.LoraSpec("w", rank=4, alpha=8.0, init="loftq_iter_2"))
  np.testing.assert_array_equal(dense(q), dense(b1["w"]).T)
  assert_close(f.delta(), a1["w"].delta().T, 1e-5)


# ----------------------------------------------------------------------------------------------
# End to end: split, wrap, DoRA, jit, training, files.
# ----------------------------------------------------------------------------------------------


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(128, name="up")(x))
    h = nn.gelu(nn.Dense(64, name="down")(h))
    return nn.Dense(10, name="head")(h)


@functools.lru_cache(maxsize=None)
def _mlp():
  """``(apply, variables, x)``: shapes from ``eval_shape``, values from numpy (nothing compiled)."""
  model = MLP()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(1)
  v = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
  for i, name in enumerate(("up", "down")):
    v["params"][name]["kernel"] = jnp.asarray(real_looking(shapes["params"][name]["kernel"].shape, seed=10 + i))
  return model.apply, v, x


def test_end_to_end_split_wrap_train_and_files(tmp_path):
  apply, v, x = _mlp()
  spec = lora_jax.LoraSpec(["up", "down"], rank=8, alpha=16.0, init="loftq")
  base, ad = lora_jax.split(jax.random.key(1), v, spec, apply, x)
  assert isinstance(base["params"]["up"]["kernel"], lora_jax.QuantizedKernel)
  assert isinstance(base["params"]["head"]["kernel"], jax.Array)  # not targeted: as it was
  wrapped = jax.jit(lora_jax.wrap(apply))
  want = np.asarray(jax.jit(apply)(v, x), np.float64)
  # Plain QLoRA: the same quantizer, zero-b adapters (the same structure: one compiled call).
  qv = lora_jax.quantize(v, ["up", "down"], apply, x)
  zero_b = jax.tree.map(lambda f: f.replace(b=jnp.zeros_like(f.b)), ad, is_leaf=lora_jax.kinds.is_adapter)
  err_qlora = np.linalg.norm(np.asarray(wrapped(qv, zero_b, x)) - want)
  err_loftq = np.linalg.norm(np.asarray(wrapped(base, ad, x)) - want)
  assert err_loftq < 0.9 * err_qlora, (err_loftq, err_qlora)
  # DoRA on the LoftQ base: m starts at the column norm of the new kernel, so the same output.
  dbase, dad = lora_jax.split(jax.random.key(1), v, lora_jax.LoraSpec(["up", "down"], rank=8, alpha=16.0, init="loftq", kind="dora"), apply, x)
  np.testing.assert_array_equal(dbase["params"]["up"]["kernel"].codes, base["params"]["up"]["kernel"].codes)
  assert_close(wrapped(dbase, dad, x), wrapped(base, ad, x), 1e-5)
  # Under jit: the same base and factors; the digest is pending.
  jbase, jad = jax.jit(lambda p: lora_jax.split(jax.random.key(1), p, spec, apply, x))(v)
  assert jad["params"]["up"]["kernel"].base_digest == DIGEST_PENDING
  np.testing.assert_array_equal(jbase["params"]["up"]["kernel"].codes, base["params"]["up"]["kernel"].codes)
  assert_close(jad["params"]["up"]["kernel"].delta(), ad["params"]["up"]["kernel"].delta(), 1e-5)
  # Training under jit on the quantized base: the loss falls.
  y = jnp.asarray(np.random.default_rng(2).standard_normal(want.shape), jnp.float32)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(ad, opt):
    loss, g = jax.value_and_grad(lambda ad: jnp.mean((lora_jax.wrap(apply)(base, ad, x) - y) ** 2))(ad)
    upd, opt = tx.update(g, opt, ad)
    return optax.apply_updates(ad, upd), opt, loss

  trained, opt = ad, tx.init(ad)
  losses = []
  for _ in range(5):
    trained, opt, loss = step(trained, opt)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  # Files: loads onto the quantized base; refused on the full-precision params it came from.
  lora_jax.save(tmp_path / "ad", trained, spec, params=base)
  back = lora_jax.load(tmp_path / "ad", base)
  np.testing.assert_array_equal(back["params"]["up"]["kernel"].a, trained["params"]["up"]["kernel"].a)
  with pytest.raises(lora_jax.AdapterFileError, match=r"adapters\['params/(up|down)/kernel'\] were made by a base-changing init"):
    lora_jax.load(tmp_path / "ad", v)
  # Made under jit: the pending digest is filled in from the quantized base at save time.
  lora_jax.save(tmp_path / "jad", jad, spec, params=jbase)
  assert lora_jax.load(tmp_path / "jad", jbase)["params"]["up"]["kernel"].base_digest == ad["params"]["up"]["kernel"].base_digest
  with pytest.raises(lora_jax.AdapterFileError, match="base-changing init"):
    lora_jax.load(tmp_path / "jad", v)


# ----------------------------------------------------------------------------------------------
# Against PEFT's loftq_init on the same torch weight.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _peft_loftq_init():
  """PEFT's ``loftq_init`` (and its ``_low_rank_decomposition``) as written in the installed
  ``peft/utils/loftq_utils.py``, run on the CPU: PEFT moves the weight to ``"cuda"`` (or xpu)
  for the computation, and only that device name is changed (bitsandbytes quantizes on the
  CPU). The two functions are read from the file rather than imported, because importing
  ``peft`` imports ``transformers`` (about 13 s); they need only torch and bitsandbytes."""
  torch = pytest.importorskip("torch")
  bnb = pytest.importorskip("bitsandbytes")
  found = importlib.util.find_spec("peft")  # locates the package without importing it
  if found is None or not found.submodule_search_locations:
    pytest.skip("peft is not installed")
  path = pathlib.Path(found.submodule_search_locations[0]) / "utils" / "loftq_utils.py"
  lines = path.read_text().splitlines()
  defs = {  # each function's source, decorators included
      n.name: "\n".join(lines[min([n.lineno] + [d.lineno for d in n.decorator_list]) - 1 : n.end_lineno])
      for n in ast.parse("\n".join(lines)).body if isinstance(n, ast.FunctionDef)
  }
  line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
  if "loftq_init" not in defs or "_low_rank_decomposition" not in defs or defs["loftq_init"].count(line) != 1:
    pytest.skip(f"{path} no longer defines loftq_init as this test expects")
  sources = [defs["loftq_init"].replace(line, 'compute_device = "cpu"'), defs["_low_rank_decomposition"]]
  ns = dict(torch=torch, bnb=bnb, Union=typing.Union, is_bnb_available=lambda: True, is_bnb_4bit_available=lambda: True,
            is_xpu_available=lambda: False, clear_device_cache=lambda: None)
  code = compile("\n\n".join(sources), str(path), "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
  exec(code, ns)
  return ns["loftq_init"]


@pytest.mark.interop
@pytest.mark.parametrize("fmt,bits,iters", [("nf4", 4, 1), ("nf4", 4, 3), ("int8", 8, 1), ("int8", 8, 3)])
def test_against_peft_loftq_init(fmt, bits, iters):
  torch = pytest.importorskip("torch")
  peft_loftq = _peft_loftq_init()
  w = real_looking((256, 128), seed=3)  # (in, out); PEFT's weight is the transpose
  rank, alpha = 8, 4.0
  dq, lora_a, lora_b = peft_loftq(torch.tensor(w.T.copy()), num_bits=bits, reduced_rank=rank, num_iter=iters)
  dq, peft_low = _f64(dq.numpy()).T, _f64((lora_b @ lora_a).numpy()).T
  peft_err = np.linalg.norm(_f64(w) - dq - peft_low)  # what PEFT's factors approximate
  init = INITS[fmt][0] + ("" if iters == 1 else f"_iter_{iters}")
  base, ad = lora_jax.split(jax.random.key(0), {"w": jnp.asarray(w)}, lora_jax.LoraSpec("w", rank=rank, alpha=alpha, init=init))
  ours = float(_error(w, base["w"], ad["w"]))
  qlora = np.linalg.norm(_f64(w) - _f64(quantize_kernel(w, format=fmt).materialize()))
  # NF4: ours also double-quantizes the block scales (as stored); PEFT's loop does not.
  assert ours <= (1.01 if fmt == "nf4" else 1.001) * peft_err, (ours, peft_err, qlora)
  assert peft_err < qlora and ours < qlora
  if (fmt, iters) == ("nf4", 3):
    # Without double quantization (PEFT's NF4 inside its loop) the alternation is PEFT's own.
    a_shape, b_shape = ad["w"].a.shape, ad["w"].b.shape
    _, _, q = loftq._loftq(jnp.asarray(w), alpha / rank, iters, fmt="nf4", double_quant=False, layout="io",
                           rank=rank, dtype=jnp.dtype(jnp.float32), a_shape=a_shape, b_shape=b_shape)
    assert_close(dense(q), dq, 1e-6)
  # PEFT stores lora_B @ lora_A = L, the top-r part of E = W - W_q itself, and ignores
  # scaling = alpha / r (huggingface/peft#1982), so its forward W_q + scaling * B @ A has error
  # ||E - c L||^2 = ||E - L||^2 + (1 - c)^2 ||L||^2: a quarter of LoftQ's gain lost at c = 1/2.
  c, e2 = alpha / rank, np.linalg.norm(_f64(w) - dq) ** 2
  forward = np.linalg.norm(_f64(w) - dq - c * peft_low) ** 2
  assert_close(forward, peft_err**2 + (1 - c) ** 2 * (e2 - peft_err**2), 1e-4)
  assert np.sqrt(forward) > 1.01 * ours


# ----------------------------------------------------------------------------------------------
# Refusals.
# ----------------------------------------------------------------------------------------------


def test_refusals_name_the_cause_and_the_path():
  with pytest.raises(ValueError, match=r"LoraSpec\(init='loftq_iter_0'\): LoftQ needs 1 to 64 alternating iterations, got K = 0; e.g. 'loftq_iter_1'"):
    lora_jax.LoraSpec(["d"], init="loftq_iter_0")
  with pytest.raises(ValueError, match=r"LoraSpec\(init='loftq_int8_iter_65'\): LoftQ needs 1 to 64 .* e.g. 'loftq_int8_iter_1'"):
    lora_jax.LoraSpec(["d"], init="loftq_int8_iter_65")
  for bad in ("loftq_iter_x", "loftq_nf4", "loftq_iter_", "loftq_int4"):
    with pytest.raises(ValueError, match=rf"LoraSpec\(init='{bad}'\): no such LoftQ init; expected one of \['loftq', 'loftq_iter_K', 'loftq_int8', 'loftq_int8_iter_K'\]"):
      lora_jax.LoraSpec(["d"], init=bad)
  with pytest.raises(ValueError, match=r"LoraSpec\(init='loftg'\): no such init; expected one of .*'loftq_int8_iter_K'"):
    lora_jax.LoraSpec(["d"], init="loftg")
  w = jnp.asarray(real_looking((256, 128)))  # the shape compiled above
  with pytest.raises(ValueError, match=r"lora_jax.init: LoraSpec\(init='loftq'\) replaces each adapted kernel .* LoftQ's quantized kernel.* lora_jax.split"):
    lora_jax.init(jax.random.key(0), {"d": {"kernel": w}}, lora_jax.LoraSpec(["d"], rank=2, init="loftq"))
  # Already quantized: LoftQ needs the full-precision weight.
  q = lora_jax.quantize({"d": {"kernel": w}}, ["d"])
  with pytest.raises(ValueError, match=r"'d/kernel': init='loftq' quantizes the full-precision kernel itself, but this one is already a QuantizedKernel.*before lora_jax.quantize"):
    lora_jax.split(jax.random.key(0), q, lora_jax.LoraSpec(["d"], rank=2, init="loftq"))
  # NF4's block of 64 must divide the fan-in (axis 0 here, of 96); int8 has one block per channel.
  odd = {"d": {"kernel": jnp.asarray(real_looking((96, 16)))}}
  with pytest.raises(ValueError, match=r"'d/kernel': init='loftq_iter_2' quantizes to NF4 in blocks of 64 along the kernel's fan-in axis 0, of size 96 \(shape \(96, 16\), layout 'io'\), .* init='loftq_int8'"):
    lora_jax.split(jax.random.key(0), odd, lora_jax.LoraSpec(["d"], rank=2, init="loftq_iter_2"))
  with pytest.raises(ValueError, match=r"'lin/weight': .* fan-in axis 1, of size 96 \(shape \(16, 96\), layout 'oi'\)"):
    lora_jax.split(jax.random.key(0), {"lin": {"weight": odd["d"]["kernel"].T}}, lora_jax.LoraSpec(["lin"], rank=2, init="loftq"), oi_apply, jnp.ones((1, 96)))
  with pytest.raises(ValueError, match=r"'d/kernel': init='loftq' divides the low-rank part by the scale alpha/r = 0.0, which must not be zero"):
    lora_jax.split(jax.random.key(0), {"d": {"kernel": w}}, lora_jax.LoraSpec(["d"], rank=2, alpha=0, init="loftq"))
  embed = nn.Embed(10, 64)
  ids = jnp.array([[1, 2]])
  ev = {"params": {"embedding": jnp.ones((10, 64))}}
  with pytest.raises(ValueError, match=r"'params/embedding': init='loftq_int8' quantizes the base kernel, which lora_jax.quantize does not do for embeddings"):
    lora_jax.split(jax.random.key(0), ev, lora_jax.LoraSpec(["params"], rank=2, init="loftq_int8"), embed.apply, ids)
