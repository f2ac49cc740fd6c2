"""Sharding: factor specs follow the kernel; training under sharded jit and pmap on 8 devices."""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lora_jax
from lora_jax.kinds import LoraFactors, register_kind
from lora_jax.sharding import factor_specs

from _util import assert_close


@pytest.mark.parametrize(
    "spec,layout,want_a,want_b",
    [
        (P("fsdp", "tp"), "io", P("fsdp", None), P(None, "tp")),
        (P(None, "tp", None), "lio", P(None, "tp", None), P(None, None, None)),
        (P(None, None, "tp", None), "iioo", P(None, None, None), P(None, "tp", None)),
        (P(), "iio", P(None, None, None), P(None, None)),
    ],
)
def test_factor_specs(spec, layout, want_a, want_b):
  assert factor_specs(spec, layout) == (want_a, want_b)


def test_adapter_shardings_needs_named_sharding():
  params = {"w": jax.numpy.ones((4, 4))}
  ad = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec("w", rank=2))
  with pytest.raises(ValueError, match="'w': the kernel has sharding .* need a NamedSharding"):
    lora_jax.adapter_shardings({"w": jax.ShapeDtypeStruct((4, 4), "float32")}, ad)
  mesh = Mesh(jax.devices()[:1], ("tp",))
  placed = {"w": jax.device_put(params["w"], NamedSharding(mesh, P(None, "tp")))}
  shard = lora_jax.adapter_shardings(placed, ad)
  assert shard["w"].b.spec == P(None, "tp")


def _run_8_devices(name, marker):
  script = os.path.join(os.path.dirname(__file__), "multidevice", name)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
  assert marker in proc.stdout
  return proc.stdout


def test_sharded_jit_and_pmap_on_8_host_devices():
  _run_8_devices("sharded_training.py", "MULTIDEVICE OK")


def test_fsdp_and_tensor_parallel_meshes_on_8_host_devices():
  """Meshes (8,), (2, 4), (4, 2) with logical-axis rules: see tests/multidevice/scale_out.py."""
  out = _run_8_devices("scale_out.py", "SCALE OUT OK")
  assert out.count("collectives LoRA step") == 3


def test_adapter_specs_logical_names_and_rank_axis():
  params = {"q": {"kernel": jax.numpy.ones((4, 6))}, "n": {"scale": jax.numpy.ones(6)}}
  ad = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["q"], rank=2))
  specs = {"q": {"kernel": P("embed", "heads")}, "n": {"scale": P()}}
  got = lora_jax.adapter_specs(specs, ad)["q"]["kernel"]
  assert (got.a, got.b) == (P("embed", None), P(None, "heads"))
  got = lora_jax.adapter_specs(specs, ad, rank_axis="lora")["q"]["kernel"]
  assert (got.a, got.b) == (P("embed", "lora"), P("lora", "heads"))
  with pytest.raises(ValueError, match="'q/kernel': rank_axis='embed' is already used"):
    lora_jax.adapter_specs(specs, ad, rank_axis="embed")
  with pytest.raises(ValueError, match="'q/kernel': adapted here, but `specs` has no entry"):
    lora_jax.adapter_specs({"n": {"scale": P()}}, ad)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("embed", "heads"))
  named = lora_jax.adapter_specs(specs, ad, mesh=mesh)["q"]["kernel"]
  assert isinstance(named.b, NamedSharding) and named.b.spec == P(None, "heads")
  with pytest.raises(ValueError, match="'q/kernel': the kernel has sharding None; adapter shardings need"):
    lora_jax.adapter_shardings(params | {"q": {"kernel": jax.ShapeDtypeStruct((4, 6), "float32")}}, ad)


def test_adapter_shardings_from_linen_logical_boxes():
  import flax.linen as nn

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      return nn.Dense(8, name="up", kernel_init=init)(x)

  x = jax.numpy.ones((2, 4))
  boxed = M().init(jax.random.key(0), x)
  ad = lora_jax.init(jax.random.key(1), boxed, lora_jax.LoraSpec(["up"], rank=2))
  mesh = Mesh(jax.devices()[:1], ("model",))
  sh = nn.unbox(lora_jax.adapter_shardings(boxed, ad, mesh=mesh, rules=(("mlp", "model"),)))
  f = sh["params"]["up"]["kernel"]
  assert f.a.spec == P(None, None) and f.b.spec == P(None, "model")
  with pytest.raises(ValueError, match="'params/up/kernel': the kernel's sharding is the PartitionSpec"):
    lora_jax.adapter_shardings(boxed, ad, rules=(("mlp", "model"),))  # no mesh
  # The wrapped apply takes the boxed variables as model.apply does.
  np.testing.assert_allclose(lora_jax.wrap(M().apply)(boxed, ad, x), M().apply(boxed, x), rtol=1e-6)


def test_eager_merge_keeps_the_kernel_sharding():
  mesh = Mesh(jax.devices()[:1], ("model",))
  s = NamedSharding(mesh, P(None, "model"))
  params = {"q": {"kernel": jax.device_put(jax.numpy.ones((4, 6)), s)}}
  ad = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["q"], rank=2))
  assert lora_jax.merge(params, ad)["q"]["kernel"].sharding == s


@pytest.mark.skipif(not hasattr(jax, "shard_map"), reason="jax.shard_map (JAX >= 0.7); older JAX materialises the kernels a shard_map takes")
def test_shard_map_both_ways_on_8_host_devices():
  """wrap inside a shard_map and wrap of a shard_map'd function, LoRA and DoRA, grads: see
  tests/multidevice/shard_map.py."""
  _run_8_devices("shard_map.py", "SHARD_MAP OK")


@pytest.mark.skipif(not hasattr(jax, "shard_map"), reason="jax.shard_map (JAX >= 0.7)")
def test_wrapped_shard_map_is_factored_on_one_device():
  mesh = Mesh(jax.devices()[:1], ("model",))
  params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (8, 16))}}
  ad = lora_jax.init(jax.random.key(1), params, lora_jax.LoraSpec(["up"], rank=2))
  ad = jax.tree.map(lambda t: t + 0.5, ad)
  kspecs = {"up": {"kernel": P(None, "model")}}

  def f(p, x):
    return x @ p["up"]["kernel"]

  x = jax.random.normal(jax.random.key(2), (4, 8))
  outer = lora_jax.wrap(jax.shard_map(f, mesh=mesh, in_specs=(kspecs, P()), out_specs=P(None, "model")), fallback="error")
  want = x @ lora_jax.merge(params, ad)["up"]["kernel"]
  np.testing.assert_allclose(outer(params, ad, x), want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))))
  report = lora_jax.explain(jax.shard_map(f, mesh=mesh, in_specs=(kspecs, P()), out_specs=P(None, "model")), params, ad, x)
  assert "up/kernel  io      dot_general: factored" in str(report), str(report)


@register_kind
@dataclasses.dataclass(frozen=True)
class _WholeFanInLora(LoraFactors):
  """Test-only kind: plain LoRA that declines shards of a split fan-in inside shard_map."""

  KIND = "test_whole_fan_in_lora"

  def shard_map_safe(self, split, tracked):
    return "i" not in split


@pytest.mark.skipif(not hasattr(jax, "shard_map"), reason="jax.shard_map (JAX >= 0.7)")
def test_wrapped_shard_map_asks_the_kind_about_its_shards():
  """The shard_map rule asks the kind (Adapter.shard_map_safe): a kind that declines a split
  fan-in is materialised for the call, exactly; others (plain and prepared DoRA, also with
  check_vma=False) stay factored. DoRA inside a check_vma=False body over a size-1 axis (which
  cannot split the fan-in) does not raise."""
  mesh = Mesh(jax.devices()[:1], ("model",))
  params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (8, 16))}}
  kspecs = {"up": {"kernel": P("model", None)}}  # the fan-in split (over one device)
  x = jax.random.normal(jax.random.key(2), (4, 8))

  def f(p, x):
    return jax.lax.psum(x @ p["up"]["kernel"], "model")

  g = jax.shard_map(f, mesh=mesh, in_specs=(kspecs, P(None, "model")), out_specs=P(), check_vma=False)
  for kind in ("lora", "dora", "whole"):
    ad = lora_jax.init(jax.random.key(1), params, lora_jax.LoraSpec(["up"], rank=2, kind="lora" if kind == "whole" else kind))
    ad = jax.tree.map(lambda t: t + 0.5 if t.ndim == 2 else t, ad)
    if kind == "whole":
      ad = {"up": {"kernel": _WholeFanInLora(**vars(ad["up"]["kernel"]))}}
    want = x @ lora_jax.merge(params, ad)["up"]["kernel"]
    assert_close(lora_jax.wrap(g, fallback="allow")(params, ad, x), want, 1e-5, err_msg=kind)
    (use,) = lora_jax.explain(g, params, ad, x).for_path("up/kernel")
    assert (use.primitive, use.factored) == (("shard_map", False) if kind == "whole" else ("dot_general", True)), (kind, use)
    if kind == "dora":
      aspecs = lora_jax.adapter_specs(kspecs, ad)
      inside = jax.shard_map(lora_jax.wrap(f, fallback="error"), mesh=mesh, in_specs=(kspecs, aspecs, P(None, "model")),
                             out_specs=P(), check_vma=False)
      assert_close(inside(params, ad, x), want, 1e-5, err_msg="dora inside, check_vma=False, one device")


def test_adapter_specs_from_nnx_sharding_metadata():
  import contextlib

  from flax import nnx

  lazy = getattr(nnx, "use_eager_sharding", None)  # flax >= 0.12 shards eagerly (needs a mesh)
  with lazy(False) if lazy is not None else contextlib.nullcontext():
    layer = nnx.Linear(4, 6, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                       rngs=nnx.Rngs(0))
  apply_fn, params, _ = lora_jax.from_nnx(layer)
  ad = lora_jax.init(jax.random.key(1), params, lora_jax.LoraSpec("kernel", rank=2))
  got = lora_jax.adapter_specs(nnx.get_partition_spec(params), ad)["kernel"]
  if not hasattr(got, "a"):  # flax 0.10's states hold VariableState wrappers
    got = got.value
  assert (got.a, got.b) == (P("embed", None), P(None, "mlp"))
