"""Run in its own process with 8 host devices (see tests/test_sharding.py).

A linen model whose kernels carry logical axis names (``nn.with_logical_partitioning``), with a
scanned stack (a layer axis), trained with LoRA on the meshes FSDP and tensor-parallel users
run: (8,) data, (2, 4) data x model, (4, 2) fsdp x model. Each mesh: the params are created in
place from the logical rules; adapter shardings from the rules equal those derived from the
placed arrays and a hand-written expectation; adapters are created in place (jit with
out_shardings: per-shard outputs, no collectives); a few AdamW steps equal the one-device run
and keep every sharding; the compiled step gathers no more than the frozen model's
forward + backward does (collectives read by benchmarks/hlo_collectives.py: each produced
array, counted once per run, loop trip counts included); merge keeps the base's shardings.
DoRA, an NF4 base and a bank of adapters (mixed batch) run on the fsdp x model mesh.
"""

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

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # tests/ (for _util) and the repository root (for benchmarks/)
from _util import assert_close, assert_trees_close  # noqa: E402
from benchmarks.hlo_collectives import collectives, multiset, total_bytes  # noqa: E402

RTOL = 2e-4  # sharded vs one device: reductions split across devices, float32
D, F, LAYERS, BATCH, FEAT = 64, 128, 2, 16, 32


def logical(init, *names):
  return nn.with_logical_partitioning(init, names)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(F, name="up", kernel_init=logical(nn.initializers.lecun_normal(), "embed", "mlp"))(x)
    x = x + nn.Dense(D, name="down", kernel_init=logical(nn.initializers.lecun_normal(), "mlp", "embed"))(nn.gelu(h))
    return x, None


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="inp", kernel_init=logical(nn.initializers.lecun_normal(), "feat", "embed"))(x)
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(4, name="head", kernel_init=logical(nn.initializers.lecun_normal(), "embed", "out"))(x)


MESHES = {
    "data8": ((8,), ("data",), (("batch", "data"),)),
    "data2xmodel4": ((2, 4), ("data", "model"), (("batch", "data"), ("mlp", "model"))),
    "fsdp4xmodel2": ((4, 2), ("fsdp", "model"), (("batch", "fsdp"), ("embed", "fsdp"), ("mlp", "model"))),
}
# What the rule gives for the stacked 'up' kernel (layers, embed, mlp) on each mesh, by hand.
WANT_UP = {
    "data8": (P(None, None, None), P(None, None, None)),
    "data2xmodel4": (P(None, None, None), P(None, None, "model")),
    "fsdp4xmodel2": (P(None, "fsdp", None), P(None, None, "model")),
}
LAYOUT = {r".*layers/.*": "lio"}  # the stacked kernels: (layers, in, out)
SPEC = lora_jax.LoraSpec(["up", "down", "inp"], rank=4, alpha=8, layout=LAYOUT)


def data(n=BATCH):
  x = jax.random.normal(jax.random.key(0), (n, FEAT))
  y = jax.random.normal(jax.random.key(1), (n, 4))
  return x, y


def make_step(kind_apply, tx):
  def loss_fn(ad, params, x, y):
    return jnp.mean((kind_apply(params, ad, x) - y) ** 2)

  def step(ad, opt, params, x, y):
    loss, g = jax.value_and_grad(loss_fn)(ad, params, x, y)
    upd, opt = tx.update(g, opt, ad)
    return optax.apply_updates(ad, upd), opt, loss

  return step


def run(step, ad, opt, params, x, y, n=3):
  f = jax.jit(step)  # one trace: jit caches on `step`
  for _ in range(n):
    ad, opt, loss = f(ad, opt, params, x, y)
  return ad, opt, loss


def same_sharding(a, b, ndim):
  return a.is_equivalent_to(b, ndim)


def check_tree_shardings(tree, want, what):
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(want)):
    assert same_sharding(x.sharding, s, x.ndim), (what, jax.tree_util.keystr(path), x.sharding, s)


def described(colls):
  runs = sum(c.count for c in colls)
  return f"{len(colls)} ops, {runs} runs, {total_bytes(colls)} B"


def main():
  assert jax.device_count() == 8
  model = Model()
  x, y = data()
  abstract = jax.eval_shape(model.init, jax.random.key(2), x)
  logical_specs = nn.get_partition_spec(abstract)
  host_params = nn.unbox(jax.jit(model.init)(jax.random.key(2), x))
  apply = lora_jax.wrap(model.apply)
  tx = optax.adamw(1e-2)
  step = make_step(apply, tx)
  host_init = jax.jit(lambda p: lora_jax.init(jax.random.key(3), p, SPEC))(host_params)
  ref_ad0 = jax.tree.map(lambda t: t + 0.05 if t.ndim and t.shape[-1] != 4 else t, host_init)  # b != 0: the update matters
  ref_ad, ref_opt, ref_loss = run(step, ref_ad0, tx.init(ref_ad0), host_params, x, y)
  # "Big": at least one (fan-in x fan-out) slice of the smallest adapted kernel; every adapter
  # (and its gradient) is smaller than that here.
  p = host_params["params"]
  min_kernel = min(p["inp"]["kernel"].size, p["layers"]["up"]["kernel"][0].size)
  assert all(v.size < min_kernel for v in jax.tree.leaves(ref_ad0))
  # The model on the merged params and the wrapped model, side by side in one program.
  merged_and_wrapped = jax.jit(lambda params, ad, x: (model.apply(lora_jax.merge(params, ad), x), apply(params, ad, x)))
  placed = {}

  for name, (shape, axes, rules) in MESHES.items():
    mesh = Mesh(np.array(jax.devices()).reshape(shape), axes)
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
    # The params, created in place.
    params = placed[name] = nn.unbox(jax.jit(model.init, out_shardings=shardings)(jax.random.key(2), x))
    # Adapter shardings: from the logical boxes + rules, from the placed arrays, by hand.
    abstract_ad = jax.eval_shape(lambda p: lora_jax.init(jax.random.key(3), p, SPEC), host_params)
    from_rules = lora_jax.adapter_shardings(abstract, jax.eval_shape(lambda p: lora_jax.init(jax.random.key(3), p, SPEC), abstract),
                                            mesh=mesh, rules=rules)
    from_rules = nn.unbox(from_rules)
    from_arrays = lora_jax.adapter_shardings(params, abstract_ad)
    logical_out = lora_jax.adapter_specs(logical_specs, abstract_ad)  # logical names in, logical out
    from_logical = nn.logical_to_mesh_sharding(logical_out, mesh, rules)
    for t in (from_rules, from_logical):
      for s, w in zip(jax.tree.leaves(t), jax.tree.leaves(from_arrays)):
        assert s.spec == w.spec, (name, s, w)
    up = from_arrays["params"]["layers"]["up"]["kernel"]
    assert (up.a.spec, up.b.spec) == WANT_UP[name], (name, up.a.spec, up.b.spec)
    assert logical_out["params"]["layers"]["up"]["kernel"].a == P("layers", "embed", None)

    # Adapters created in place: the compiled init's outputs are per-shard and it communicates nothing.
    init_fn = jax.jit(lambda p: lora_jax.init(jax.random.key(3), p, SPEC), out_shardings=from_arrays)
    compiled = init_fn.lower(params).compile()
    assert not collectives(compiled.as_text()), (name, collectives(compiled.as_text()))
    ad0 = compiled(params)
    check_tree_shardings(ad0, from_arrays, name + " init")
    per_device = sum(int(np.prod(s.shard_shape(l.shape))) * l.dtype.itemsize for l, s in zip(jax.tree.leaves(ad0), jax.tree.leaves(from_arrays)))
    mem = compiled.memory_analysis()
    if mem is not None:
      # Per-device output bytes: the shards, plus the tuple's pointer table (8 B per output).
      n_out = len(jax.tree.leaves(ad0))
      assert per_device <= mem.output_size_in_bytes <= per_device + 8 * n_out, (name, mem.output_size_in_bytes, per_device)
    for got, want in zip(jax.tree.leaves(ad0), jax.tree.leaves(host_init)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # partitionable RNG: same values

    # Training: equals one device, keeps the shardings (adapters and optimizer state).
    ad0 = jax.device_put(ref_ad0, from_arrays)
    batch_sh = NamedSharding(mesh, P(axes[0]))
    xs, ys = jax.device_put(x, batch_sh), jax.device_put(y, batch_sh)
    opt0 = tx.init(ad0)
    ad, opt, loss = run(step, ad0, opt0, params, xs, ys)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert_trees_close(ad, ref_ad, RTOL, err_msg=name)
    check_tree_shardings(ad, from_arrays, name + " trained adapters")
    mu = opt[0].mu
    check_tree_shardings(mu, from_arrays, name + " adam mu")

    # Collectives: every array of at least one kernel slice that the LoRA step's collectives
    # produce, the frozen forward + backward produces as often per call (a multiset subset:
    # combined collectives count each array, a collective in a scan's loop once per layer), so
    # the step never gathers a kernel more than the frozen model does, nor moves W + s*a@b or
    # a kernel-sized gradient. Smaller traffic (activations, the adapters' gradients) is free.
    lora_ops = collectives(jax.jit(step).lower(ad0, opt0, params, xs, ys).compile().as_text())

    def frozen(params, x, y):
      return jax.grad(lambda x: jnp.mean((model.apply(params, x) - y) ** 2))(x)

    frozen_ops = collectives(jax.jit(frozen).lower(params, xs, ys).compile().as_text())
    assert all(c.trips_known for c in lora_ops + frozen_ops), (name, lora_ops, frozen_ops)
    big_frozen = multiset(frozen_ops, min_elements=min_kernel)
    extra = multiset(lora_ops, min_elements=min_kernel) - big_frozen
    assert not extra, (name, extra, big_frozen)
    print(f"{name}: collectives LoRA step {described(lora_ops)}; frozen fwd+bwd {described(frozen_ops)}")

    # merge keeps the base's shardings, eagerly and under jit.
    for merged in (lora_jax.merge(params, ad), jax.jit(lora_jax.merge)(params, ad)):
      for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
        assert same_sharding(m.sharding, p.sharding, p.ndim), (name, m.sharding, p.sharding)
    assert_close(*merged_and_wrapped(params, ad, xs), RTOL)

  # Other kinds on fsdp x model: DoRA, an NF4 base, a mixed batch over a bank.
  shape, axes, _ = MESHES["fsdp4xmodel2"]
  mesh = Mesh(np.array(jax.devices()).reshape(shape), axes)
  params = placed["fsdp4xmodel2"]
  batch_sh = NamedSharding(mesh, P("fsdp"))
  xs, ys = jax.device_put(x, batch_sh), jax.device_put(y, batch_sh)
  dora = lora_jax.LoraSpec(["up", "down"], rank=4, kind="dora", layout=LAYOUT)
  d_host = jax.jit(lambda p: lora_jax.init(jax.random.key(4), p, dora))(host_params)
  d_host = jax.tree.map(lambda t: t + 0.05 if t.ndim >= 2 else t, d_host)
  d_ref, _, d_loss = run(step, d_host, tx.init(d_host), host_params, x, y)
  d_sh = lora_jax.adapter_shardings(params, d_host)
  m_spec = d_sh["params"]["layers"]["down"]["kernel"].m.spec
  assert m_spec == P(None, "fsdp"), m_spec  # the magnitude follows the layer and fan-out axes
  d0 = jax.device_put(d_host, d_sh)
  d_ad, _, d_loss_sh = run(step, d0, tx.init(d0), params, xs, ys)
  np.testing.assert_allclose(float(d_loss_sh), float(d_loss), rtol=1e-5)
  assert_trees_close(d_ad, d_ref, RTOL, err_msg="dora")
  check_tree_shardings(d_ad, d_sh, "dora")

  q_host = lora_jax.quantize(host_params, ["up", "down"], model.apply, x, format="nf4", block_size=16)
  q_sh = lora_jax.quantize(params, ["up", "down"], model.apply, x, format="nf4", block_size=16)
  qa = lora_jax.init(jax.random.key(5), host_params, lora_jax.LoraSpec(["up", "down"], rank=4, layout=LAYOUT))
  qa = jax.tree.map(lambda t: t + 0.05, qa)
  q_ref, _, q_loss = run(step, qa, tx.init(qa), q_host, x, y)
  qa_sh = lora_jax.shard_like(qa, q_sh)
  assert qa_sh["params"]["layers"]["up"]["kernel"].b.sharding.spec == P(None, None, "model")
  q_ad, _, q_loss_sh = run(step, qa_sh, tx.init(qa_sh), q_sh, xs, ys)
  np.testing.assert_allclose(float(q_loss_sh), float(q_loss), rtol=1e-5)
  assert_trees_close(q_ad, q_ref, RTOL, err_msg="nf4")

  members = {k: jax.tree.map(lambda t: t + 0.1 * (i + 1), lora_jax.init(jax.random.key(6 + i), host_params, SPEC))
             for i, k in enumerate(("p", "q"))}
  bank = lora_jax.stack(members)
  bank_sh = lora_jax.adapter_shardings(params, bank)
  ba = bank_sh["params"]["layers"]["up"]["kernel"]
  assert ba.a.spec == P(None, "fsdp", None, None) and ba.b.spec == P(None, None, None, "model"), (ba.a.spec, ba.b.spec)
  ids = np.array([0, 1, -1, 0] * (BATCH // 4), np.int32)
  ids_sh = jax.device_put(ids, batch_sh)

  def mixed_loss(bank, params, x, ids):
    return jnp.mean(apply(params, bank, x, adapter_ids=ids) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(mixed_loss))
  ref_l, ref_g = value_and_grad(bank, host_params, x, ids)
  b0 = jax.device_put(bank, bank_sh)
  l, g = value_and_grad(b0, params, xs, ids_sh)
  np.testing.assert_allclose(float(l), float(ref_l), rtol=1e-5)
  assert_trees_close(g, ref_g, RTOL, err_msg="mixed batch grad")
  print("SCALE OUT OK", float(ref_loss))


if __name__ == "__main__":
  main()
