"""Sharding: factor specs follow the kernel; training under sharded jit and pmap on 8 devices."""

import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lora_jax
from lora_jax.sharding import factor_specs


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


def test_sharded_jit_and_pmap_on_8_host_devices():
  script = os.path.join(os.path.dirname(__file__), "multidevice", "sharded_training.py")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "MULTIDEVICE OK" in proc.stdout
