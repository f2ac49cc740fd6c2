"""Run in its own process with 8 host devices (see tests/test_sharding.py)."""

import os
import sys

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import lora_jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _util import assert_close, assert_trees_close  # noqa: E402

RTOL = 1e-4  # sharded / pmapped training vs one device: reductions split across devices


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="up")(x))
    return nn.Dense(8, name="down")(x)


def loss_fn(apply, params, adapters, x, y):
  return jnp.mean((apply(params, adapters, x) - y) ** 2)


def train(params, adapters, x, y, steps=5, pmap=False):
  apply = lora_jax.wrap(MLP().apply)
  tx = optax.adam(1e-2)
  opt = tx.init(adapters)

  def step(adapters, opt, x, y):
    loss, g = jax.value_and_grad(lambda ad: loss_fn(apply, params, ad, x, y))(adapters)
    if pmap:
      g = jax.lax.pmean(g, "d")
      loss = jax.lax.pmean(loss, "d")
    upd, opt = tx.update(g, opt, adapters)
    return optax.apply_updates(adapters, upd), opt, loss

  if pmap:
    n = jax.device_count()
    rep = lambda t: jax.tree.map(lambda z: jnp.broadcast_to(z, (n, *z.shape)), t)  # noqa: E731
    f = jax.pmap(step, axis_name="d")
    adapters, opt = rep(adapters), rep(opt)
    xs, ys = x.reshape(n, -1, x.shape[-1]), y.reshape(n, -1, y.shape[-1])
    for _ in range(steps):
      adapters, opt, loss = f(adapters, opt, xs, ys)
    return jax.tree.map(lambda z: z[0], adapters), loss[0]
  f = jax.jit(step)
  for _ in range(steps):
    adapters, opt, loss = f(adapters, opt, x, y)
  return adapters, loss


def main():
  assert jax.device_count() == 8
  x = jax.random.normal(jax.random.key(0), (64, 16))
  y = jax.random.normal(jax.random.key(1), (64, 8))
  params = MLP().init(jax.random.key(2), x)
  spec = lora_jax.LoraSpec(["up", "down"], rank=4)
  adapters = lora_jax.init(jax.random.key(3), params, spec)
  ref_ad, ref_loss = train(params, adapters, x, y)

  # Sharded jit: data parallel over 'data', tensor parallel over 'model'.
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  kernel_specs = {"up": P(None, "model"), "down": P("model", None)}
  sharded = jax.tree_util.tree_map_with_path(
      lambda path, v: jax.device_put(
          v,
          NamedSharding(
              mesh,
              kernel_specs[path[1].key] if path[-1].key == "kernel" else P(),
          ),
      ),
      params,
  )
  ad_sharded = lora_jax.shard_like(adapters, sharded)
  up, down = ad_sharded["params"]["up"]["kernel"], ad_sharded["params"]["down"]["kernel"]
  assert up.a.sharding.spec == P(None, None) and up.b.sharding.spec == P(None, "model"), (up.a.sharding, up.b.sharding)
  assert down.a.sharding.spec == P("model", None) and down.b.sharding.spec == P(None, None)
  xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  ys = jax.device_put(y, NamedSharding(mesh, P("data", None)))
  sh_ad, sh_loss = train(sharded, ad_sharded, xs, ys)
  np.testing.assert_allclose(float(sh_loss), float(ref_loss), rtol=1e-5)
  assert_trees_close(sh_ad, ref_ad, RTOL, err_msg="sharded jit")
  # The factors keep their shardings through training.
  assert sh_ad["params"]["up"]["kernel"].b.sharding.spec == P(None, "model")

  # pmap data parallel: same result as one device.
  pm_ad, pm_loss = train(params, adapters, x, y, pmap=True)
  np.testing.assert_allclose(float(pm_loss), float(ref_loss), rtol=1e-5)
  assert_trees_close(pm_ad, ref_ad, RTOL, err_msg="pmap")
  # PiSSA on the sharded kernels: the residual base keeps each kernel's sharding, eagerly and
  # under jit, and the output is unchanged at step 0.
  pissa = lora_jax.LoraSpec(["up", "down"], rank=4, init="pissa")
  apply = lora_jax.wrap(MLP().apply)
  want = MLP().apply(params, x)
  for res, ad in (
      lora_jax.split(jax.random.key(3), sharded, pissa),
      jax.jit(lambda p: lora_jax.split(jax.random.key(3), p, pissa), out_shardings=(
          jax.tree.map(lambda v: v.sharding, sharded), None))(sharded),
  ):
    for name in ("up", "down"):
      assert res["params"][name]["kernel"].sharding == sharded["params"][name]["kernel"].sharding, name
    assert_close(apply(res, ad, x), want, RTOL)
  # QLoRA on the sharded kernels: the quantized leaves store their arrays sharded like the
  # kernels they replace (block scales too where the mesh divides them), adapters derive
  # their shardings from them, and the sharded step equals the one-device step.
  for fmt in ("nf4", "int8"):
    q = lora_jax.quantize(params, ["up", "down"], format=fmt, block_size=16)
    q_sh = lora_jax.quantize(sharded, ["up", "down"], format=fmt, block_size=16)
    up_q, down_q = q_sh["params"]["up"]["kernel"], q_sh["params"]["down"]["kernel"]
    assert up_q.codes.sharding.spec == P(None, "model") and up_q.absmax.sharding.spec == P(None, "model"), up_q.codes.sharding
    assert down_q.codes.sharding.spec == P("model", None), down_q.codes.sharding
    assert down_q.absmax.sharding.spec == P(None, None)  # 2 blocks do not split 4 ways
    ad_q = lora_jax.shard_like(adapters, q_sh)
    assert ad_q["params"]["up"]["kernel"].b.sharding.spec == P(None, "model")
    ref_q_ad, ref_q_loss = train(q, adapters, x, y)
    sh_q_ad, sh_q_loss = train(q_sh, ad_q, xs, ys)
    np.testing.assert_allclose(float(sh_q_loss), float(ref_q_loss), rtol=1e-5)
    assert_trees_close(sh_q_ad, ref_q_ad, RTOL, err_msg=fmt)
    assert sh_q_ad["params"]["up"]["kernel"].b.sharding.spec == P(None, "model")
  print("MULTIDEVICE OK", float(ref_loss))


if __name__ == "__main__":
  main()
