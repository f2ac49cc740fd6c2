"""Run in its own process with 8 host devices (see tests/test_sharding.py).

``wrap`` inside a ``shard_map``'d function (per-shard kernels and factors) and ``wrap`` of a
``shard_map``'d function (global arrays; the interpreter re-expresses the shard_map), for a
Megatron MLP (column-parallel up, row-parallel down with a psum) and a scanned two-layer
stack, on (2, 4) and (4, 2) meshes; LoRA and DoRA (whose column norm sums the fan-in shards);
outputs and gradients against the hand-merged unsharded reference; no materialisation.
DoRA's unmerge inside a body sums its fan-in norms too. With ``check_vma=False``: a
wrapped shard_map keeps DoRA exact (its norms are computed on the whole kernels), and DoRA
inside such a body (or ``jax.pmap``'s) raises ``ShardedNormError``.
"""

import os
import re
import sys

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax.kinds.dora import ShardedNormError  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _util import assert_close, assert_trees_close  # noqa: E402

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


def loss(f, x):
  return lambda ad: jnp.sum(jnp.sin(f(ad, x)))


def check(fns, ad, x, y_ref, g_ref, tag):
  """Outputs and gradients of every ``fns[label](ad, x)`` against the reference, one compile."""
  got = jax.jit(lambda ad: {k: (f(ad, x), jax.grad(loss(f, x))(ad)) for k, f in fns.items()})(ad)
  for label, (y, g) in got.items():
    assert_close(y, y_ref, RTOL, err_msg=f"{tag} {label}")
    assert_trees_close(g, g_ref, RTOL, err_msg=f"{tag} {label} grad")


def check_vma_off(mesh, x, keys):
  """``check_vma=False``: DoRA around the shard_map is exact; inside it (and in pmap) it raises."""
  fn, ref, make, kspecs, _ = CASES["mlp"]
  params = make(keys)
  ad = nonzero(lora_jax.init(jax.random.key(3), params, lora_jax.LoraSpec(["up", "down"], rank=4, kind="dora")))
  aspecs = lora_jax.adapter_specs(kspecs, ad)
  outer = lora_jax.wrap(jax.shard_map(fn, mesh=mesh, in_specs=(kspecs, P("data")), out_specs=P("data"), check_vma=False),
                        fallback="error")

  def want(ad, x):
    return ref(lora_jax.merge(params, ad), x)

  check({"around, check_vma=False": lambda ad, x: outer(params, ad, x)}, ad, x, want(ad, x), jax.grad(loss(want, x))(ad),
        f"{mesh.devices.shape} mlp dora")

  # Inside: 'up' (its fan-out split) comes first; a split or a whole fan-in cannot be told apart.
  inside = jax.shard_map(lora_jax.wrap(fn), mesh=mesh, in_specs=(kspecs, aspecs, P("data")), out_specs=P("data"), check_vma=False)
  blind = r"'up/kernel': DoRA's column norm .* check_vma=False \(manual mesh axes \('data', 'model'\); .* check_vma=True"
  raises(blind, lambda: jax.eval_shape(inside, params, ad, x))
  merged = jax.shard_map(lambda p, ad: lora_jax.merge(p, ad), mesh=mesh, in_specs=(kspecs, aspecs), out_specs=kspecs, check_vma=False)
  # merge names the path (and raises it as a ValueError).
  raises(r"'down/kernel': DoRA's column norm \|\|W \+ s\*a@b\|\| \(here of a kernel shard of shape \(8, 16\)\)",
         lambda: jax.eval_shape(merged, params, ad), ValueError)
  n = jax.device_count()
  pmapped = jax.pmap(lora_jax.wrap(fn), axis_name="model", in_axes=(None, None, 0))
  try:  # JAX >= 0.9 traces pmap as a check_vma=False shard_map: the same refusal
    got = pmapped(params, ad, x.reshape(n, -1, 16))
  except ShardedNormError as e:
    assert re.search(r"'up/kernel': .*\(manual mesh axes \('model',\); jax.pmap", str(e)), str(e)
  else:  # an older JAX's own pmap primitive: every device holds the whole kernels, so it is exact
    plain = jax.pmap(fn, axis_name="model", in_axes=(None, 0))(lora_jax.merge(params, ad), x.reshape(n, -1, 16))
    assert_trees_close(got, plain, RTOL, err_msg="DoRA inside pmap vs the merged model inside pmap")


def unmerge_in_body(mesh, keys):
  """DoRA's unmerge inside a (check_vma=True) body sums its fan-in norms over the split shards
  of 'down': the merged shards unmerge to the base shards."""
  _, _, make, kspecs, _ = CASES["mlp"]
  params = make(keys)
  ad = lora_jax.init(jax.random.key(3), params, lora_jax.LoraSpec(["up", "down"], rank=4, kind="dora"))
  ad = jax.tree.map(lambda t: t + 0.03 if t.ndim >= 2 else t, ad)  # ||s*a@b|| < ||W||: unmerge is unique
  aspecs = lora_jax.adapter_specs(kspecs, ad)
  body = jax.shard_map(lambda p, ad: lora_jax.unmerge(lora_jax.merge(p, ad), ad), mesh=mesh, in_specs=(kspecs, aspecs), out_specs=kspecs)
  assert_trees_close(jax.jit(body)(params, ad), params, RTOL, err_msg="unmerge in the body")


def raises(pattern, thunk, cls=ShardedNormError):
  try:
    thunk()
  except cls as e:
    assert re.search(pattern, str(e)), (pattern, str(e))
    return
  raise AssertionError(f"no {cls.__name__} matching {pattern!r}")


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

        check({"inside": inside, "around": around}, ad, x, want(ad, x), jax.grad(loss(want, x))(ad), f"{mesh_shape} {name} {kind}")
        # The wrapped shard_map keeps the adapters factored: no dot with a kernel-sized adapter product.
        jaxpr = str(jax.make_jaxpr(around)(ad, x))
        assert "shard_map" in jaxpr
    if mesh_shape == (2, 4):
      check_vma_off(mesh, x, keys)
      unmerge_in_body(mesh, keys)
  print("SHARD_MAP OK")


if __name__ == "__main__":
  main()
