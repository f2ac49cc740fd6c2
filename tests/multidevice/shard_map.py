"""Run in its own process with 8 host devices (see tests/test_sharding.py).

``wrap`` inside a ``shard_map``'d function (per-shard kernels and factors) and ``wrap`` of a
``shard_map``'d function (global arrays; the interpreter re-expresses the shard_map), for a
Megatron MLP (column-parallel up, row-parallel down with a psum) and a scanned two-layer
stack, on (2, 4) and (4, 2) meshes; LoRA and DoRA (whose column norm sums the fan-in shards);
outputs and gradients against the hand-merged unsharded reference; no materialisation.
"""

import os
import sys

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import lora_jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _util import assert_close  # noqa: E402

RTOL = 1e-4


def mlp(params, x):
  h = jax.nn.gelu(x @ params["up"]["kernel"])
  return jax.lax.psum(h @ params["down"]["kernel"], "model")


def stacked(params, x):
  def layer(x, w):
    return x + jax.lax.psum(jnp.tanh(x @ w["up"]) @ w["down"], "model"), None

  return jax.lax.scan(layer, x, params["layers"])[0]


def reference_mlp(params, x):
  return jax.nn.gelu(x @ params["up"]["kernel"]) @ params["down"]["kernel"]


def reference_stacked(params, x):
  for i in range(params["layers"]["up"].shape[0]):
    x = x + jnp.tanh(x @ params["layers"]["up"][i]) @ params["layers"]["down"][i]
  return x


def nonzero(ad):
  return jax.tree.map(lambda t: t + 0.1 if t.ndim >= 2 else t, ad)


CASES = {
    "mlp": (mlp, reference_mlp,
            lambda k: {"up": {"kernel": jax.random.normal(k[0], (16, 32)) / 4}, "down": {"kernel": jax.random.normal(k[1], (32, 16)) / 6}},
            {"up": {"kernel": P(None, "model")}, "down": {"kernel": P("model", None)}}, None),
    "stacked": (stacked, reference_stacked,
                lambda k: {"layers": {"up": jax.random.normal(k[0], (2, 16, 32)) / 4, "down": jax.random.normal(k[1], (2, 32, 16)) / 6}},
                {"layers": {"up": P(None, None, "model"), "down": P(None, "model", None)}}, {".*": "lio"}),
}


def main():
  assert jax.device_count() == 8
  x = jax.random.normal(jax.random.key(2), (8, 16))
  keys = jax.random.split(jax.random.key(0), 2)
  for mesh_shape in ((2, 4), (4, 2)):
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("data", "model"))
    for name, (fn, ref, make, kspecs, layout) in CASES.items():
      params = make(keys)
      for kind in ("lora", "dora"):
        targets = ["up", "down"] if name == "mlp" else ["layers/up", "layers/down"]
        spec = lora_jax.LoraSpec(targets if name == "mlp" else "layers/(up|down)", rank=4, kind=kind, layout=layout)
        ad = nonzero(lora_jax.init(jax.random.key(3), params, spec))
        aspecs = lora_jax.adapter_specs(kspecs, ad)
        wrapped = lora_jax.wrap(fn, fallback="error")  # a materialised kernel would raise

        def inside(ad, x, wrapped=wrapped, aspecs=aspecs, kspecs=kspecs):
          return jax.shard_map(wrapped, mesh=mesh, in_specs=(kspecs, aspecs, P("data")), out_specs=P("data"))(params, ad, x)

        outer = lora_jax.wrap(jax.shard_map(fn, mesh=mesh, in_specs=(kspecs, P("data")), out_specs=P("data")), fallback="error")

        def around(ad, x, outer=outer):
          return outer(params, ad, x)

        def want(ad, x, ref=ref):
          return ref(lora_jax.merge(params, ad), x)

        loss = lambda f: lambda ad: jnp.sum(jnp.sin(f(ad, x)))  # noqa: E731
        y_ref, g_ref = want(ad, x), jax.grad(loss(want))(ad)
        for label, f in (("inside", inside), ("around", around)):
          tag = f"{mesh_shape} {name} {kind} {label}"
          assert_close(jax.jit(f)(ad, x), y_ref, RTOL, err_msg=tag)
          g = jax.jit(jax.grad(loss(f)))(ad)
          for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g_ref)):
            assert_close(a, b, RTOL, err_msg=f"{tag} grad {jax.tree_util.keystr(path)}")
        # The wrapped shard_map keeps the adapters factored: no dot with a kernel-sized adapter product.
        jaxpr = str(jax.make_jaxpr(around)(ad, x))
        assert "shard_map" in jaxpr
  print("SHARD_MAP OK")


if __name__ == "__main__":
  main()
