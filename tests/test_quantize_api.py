"""A quantized base through the rest of the API: count, merge, files, serving without adapters,
DoRA and dropout on top, layouts read off a trace of quantized params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from _util import assert_close, assert_far, random_adapters


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16, name="out")(nn.relu(nn.Dense(128, name="hidden")(x)))


@pytest.fixture(scope="module")
def model():
  m = MLP()
  x = jax.random.normal(jax.random.key(0), (4, 64))
  v = m.init(jax.random.key(1), x)
  v = jax.tree.map(lambda z: z.astype(jnp.bfloat16), v)
  return m, x, v


def test_count_reports_packed_bytes(model):
  m, x, v = model
  q = lora_jax.quantize(v, ["hidden", "out"], format="nf4", block_size=32, double_quant=False)
  spec = lora_jax.LoraSpec(["hidden"], rank=4)
  dense_count = lora_jax.count(lora_jax.init(jax.random.key(0), v, spec), v)
  c = lora_jax.count(lora_jax.init(jax.random.key(0), q, spec), q)
  assert c.base == dense_count.base  # the parameters the kernels stand for
  kernels = [v["params"]["hidden"]["kernel"], v["params"]["out"]["kernel"]]
  n_kernel = sum(k.size for k in kernels)
  # 4 bits per entry plus one float32 scale per 32 entries, against 16 bits.
  packed = n_kernel // 2 + 4 * (n_kernel // 32)
  assert c.base_bytes == dense_count.base_bytes - 2 * n_kernel + packed
  assert c.base_bytes == sum(x.nbytes for x in jax.tree.leaves(q))


def test_merge_dequantizes_every_base_leaf_in_its_or_a_named_dtype(model):
  m, x, v = model
  q = lora_jax.quantize(v, ["hidden", "out"], format="int8")
  ad = random_adapters(q, lora_jax.LoraSpec(["hidden"], rank=4), std=0.1)
  merged = lora_jax.merge(q, ad)
  assert jax.tree.structure(merged) == jax.tree.structure(v)
  assert merged["params"]["out"]["kernel"].dtype == jnp.bfloat16  # not adapted, dequantized
  np.testing.assert_array_equal(merged["params"]["out"]["kernel"], lora_jax.dequantize(q)["params"]["out"]["kernel"])
  want = ad["params"]["hidden"]["kernel"].merge(q["params"]["hidden"]["kernel"].materialize())
  np.testing.assert_array_equal(merged["params"]["hidden"]["kernel"], want)
  as_f32 = lora_jax.merge(q, ad, dtype=jnp.float32)
  assert as_f32["params"]["hidden"]["kernel"].dtype == jnp.float32
  assert as_f32["params"]["hidden"]["bias"].dtype == jnp.bfloat16  # only base leaves change dtype


def test_save_merged_and_save_params(tmp_path, model):
  m, x, v = model
  q = lora_jax.quantize(v, ["hidden", "out"])
  ad = random_adapters(q, lora_jax.LoraSpec(["hidden", "out"], rank=4), std=0.1)
  path = lora_jax.save_merged(tmp_path / "merged.safetensors", q, ad)
  loaded = lora_jax.load_params(path)
  assert_close(m.apply(loaded, x), lora_jax.wrap(m.apply)(q, ad, x), 2e-2)  # bf16 params
  with pytest.raises(TypeError, match="'params/hidden/kernel'.*QuantizedKernel"):
    lora_jax.save_params(tmp_path / "q.safetensors", q)
  assert not (tmp_path / "q.safetensors").exists()
  lora_jax.save(tmp_path / "ad", ad)  # adapters of a quantized base are plain adapters
  back = lora_jax.load(tmp_path / "ad", q)
  np.testing.assert_array_equal(back["params"]["out"]["kernel"].b, ad["params"]["out"]["kernel"].b)


def test_a_quantized_base_serves_without_adapters(model):
  m, x, v = model
  q = lora_jax.quantize(v, ["hidden", "out"])
  y = jax.jit(lora_jax.wrap(m.apply))(q, None, x)
  np.testing.assert_array_equal(y, m.apply(lora_jax.dequantize(q), x))
  assert_far(y, m.apply(v, x), 1e-4)  # NF4 really changed the kernels


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_kinds_and_dropout_on_a_quantized_base(model, kind):
  m, x, v = model
  v32 = jax.tree.map(lambda z: z.astype(jnp.float32), v)
  q = lora_jax.quantize(v32, ["hidden", "out"], block_size=32)
  ad = lora_jax.init(jax.random.key(2), q, lora_jax.LoraSpec(["hidden", "out"], rank=4, kind=kind, dropout=0.1))
  ad = jax.tree.map(
      lambda f: f if f is None else f.replace(b=jax.random.normal(jax.random.key(3), f.b.shape) * 0.1),
      ad, is_leaf=lambda z: z is None or isinstance(z, lora_jax.kinds.Adapter),
  )
  apply = lora_jax.wrap(m.apply)
  ref = lambda ad: m.apply(lora_jax.merge(q, ad), x)  # noqa: E731
  assert_close(apply(q, ad, x), ref(ad), 1e-5)
  g = jax.grad(lambda ad: jnp.sum(apply(q, ad, x) ** 2))(ad)
  g_ref = jax.grad(lambda ad: jnp.sum(ref(ad) ** 2))(ad)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert_close(a, b, 1e-4)
  # Dropout on a quantized base: the mask changes the adapter path only.
  key = jax.random.key(7)
  y1, y2 = apply(q, ad, x, lora_dropout_rng=key), apply(q, ad, x, lora_dropout_rng=jax.random.key(8))
  assert_far(y1, y2, 1e-6)
  np.testing.assert_array_equal(y1, apply(q, ad, x, lora_dropout_rng=key))


def test_layouts_are_read_off_a_trace_of_quantized_params():
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      def body(mdl, h, _):
        return h + nn.Dense(32, name="mix")(h), None

      s = nn.scan(nn.remat(lambda mdl, h, z: body(mdl, h, z)), variable_axes={"params": 0},
                  split_rngs={"params": True}, length=3)
      h, _ = s(self, x, None)
      return h

  m = Stack()
  x = jnp.ones((2, 32))
  v = m.init(jax.random.key(0), x)
  q = lora_jax.quantize(v, ["mix"], m.apply, x, block_size=32)
  qs = [z for z in jax.tree.leaves(q, is_leaf=lambda z: isinstance(z, lora_jax.QuantizedKernel))
        if isinstance(z, lora_jax.QuantizedKernel)]
  assert len(qs) == 1 and qs[0].shape == (3, 32, 32) and (qs[0].layout, qs[0].lead, qs[0].axis) == ("lio", (0,), 1)
  ad = lora_jax.init(jax.random.key(1), q, lora_jax.LoraSpec(["mix"], rank=2), m.apply, x)
  f = jax.tree.leaves(ad, is_leaf=lambda z: isinstance(z, lora_jax.LoraFactors))[0]
  assert f.layout == "lio" and f.a.shape == (3, 32, 2)
  report = lora_jax.explain(m.apply, q, ad, x)
  assert not report.fallbacks and all(u.factored for u in report.uses), str(report)


def test_fused_nf4_matmul_equals_xla_path(monkeypatch):
  """The fused kernel (Pallas, in its interpreter here) where wrap dispatches it on a GPU:
  same values as XLA's dequantize-then-matmul, and gradients through it."""
  from lora_jax.bases import nf4_matmul

  w = (jax.random.normal(jax.random.key(0), (1024, 96)) * 0.05).astype(jnp.bfloat16)
  q = lora_jax.quantize({"w": {"kernel": w}}, ["w"])["w"]["kernel"]
  x = jax.random.normal(jax.random.key(1), (3, 1024), jnp.bfloat16)
  want = jnp.dot(x, q.materialize(), preferred_element_type=jnp.float32)
  for splits in (1, 4):
    got = nf4_matmul._fused(x, q.codes, q.scales(), block=64, out_dtype=jnp.float32, interpret=True, splits=splits)
    assert_close(got, want, 1e-5)
  # Through wrap: force the dispatch (CPU) and run the kernel in the interpreter.
  original, calls = nf4_matmul.nf4_dot, []

  def interpreted(x, q, dtype):
    calls.append(x.shape)
    return original(x, q, dtype, interpret=True)

  monkeypatch.setattr(nf4_matmul, "use_fused", lambda q, rows: rows <= nf4_matmul.MAX_ROWS)
  monkeypatch.setattr(nf4_matmul, "nf4_dot", interpreted)

  class D(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(96, use_bias=False, dtype=jnp.bfloat16, name="d")(x)

  m = D()
  params = {"params": {"d": {"kernel": w}}}
  qp = lora_jax.quantize(params, ["d"])
  ad = random_adapters(qp, lora_jax.LoraSpec(["d"], rank=4), std=0.1, dtype=jnp.bfloat16)
  ref = lambda ad, x: m.apply(lora_jax.merge(qp, ad), x)  # noqa: E731
  apply = lora_jax.wrap(m.apply)
  assert_close(apply(qp, ad, x).astype(jnp.float32), ref(ad, x).astype(jnp.float32), 1e-2)
  assert_close(apply(qp, None, x).astype(jnp.float32), want, 1e-2)
  loss = lambda f: lambda ad, x: jnp.sum(f(ad, x).astype(jnp.float32) ** 2)  # noqa: E731
  g = jax.grad(loss(lambda ad, x: apply(qp, ad, x)), argnums=(0, 1))(ad, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(ad, x)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert_close(a.astype(jnp.float32), b.astype(jnp.float32), 2e-2)
  assert calls and all(s == (3, 1024) for s in calls)  # the fused kernel ran, and only there
