"""One process of a multi-process JAX program on CPU (see tests/test_multihost.py).

``python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=K``: joins the others through
``jax.distributed.initialize`` (coordinator on 127.0.0.1:PORT), builds one ("data", "model")
mesh over all processes' devices, trains LoRA adapters on a tiny MLP whose kernels are
sharded over it, checkpoints the training state with orbax into OUT_DIR/ckpt, and saves /
loads adapters, a merged export and a set with lora_jax's own files. It checks what one
process can check itself (bit-equality after a restore, shardings, who wrote) and writes
what it computed, gathered to the host, to OUT_DIR/out_<PROCESS_ID>.npz for the test to
compare with a single-process reference. Exits 77 when this JAX cannot run computations
across CPU processes.
"""

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP = 77  # the exit status that tells the test to skip

# The model, data and the training step: shared with the test's single-process reference.
STEPS = 2
SHAPES = {"up": (16, 32), "down": (32, 8)}
KERNEL_SPECS = {"up": ("data", "model"), "down": ("model", "data")}
BATCH = 16


def setup():
  """``(params, adapters, x, y, spec)`` as numpy-drawn host arrays (the same on every process)."""
  import flax.linen as nn
  import jax.numpy as jnp

  import lora_jax

  sys.path.insert(0, os.path.dirname(HERE))
  from _util import random_adapters

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(32, name="up")(x))
      return nn.Dense(8, name="down")(x)

  rng = np.random.default_rng(0)
  params = {"params": {
      name: {"kernel": jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32),
             "bias": jnp.asarray(rng.standard_normal(shape[1]) * 0.1, jnp.float32)}
      for name, shape in SHAPES.items()
  }}
  spec = lora_jax.LoraSpec(["up", "down"], rank=4, alpha=8.0)
  adapters = random_adapters(params, spec, seed=1, std=0.3)
  x = jnp.asarray(rng.standard_normal((BATCH, 16)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((BATCH, 8)), jnp.float32)
  return MLP, params, adapters, x, y, spec


def make_step(MLP, constrain=None):
  """A jitted Adam step on the adapters; ``constrain(adapters)`` pins their shardings. The
  params are an argument: a jit cannot close over arrays that span other processes."""
  import jax
  import jax.numpy as jnp
  import optax

  import lora_jax

  apply = lora_jax.wrap(MLP().apply)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, adapters, opt, x, y):
    loss, g = jax.value_and_grad(lambda ad: jnp.mean((apply(params, ad, x) - y) ** 2))(adapters)
    upd, opt = tx.update(g, opt, adapters)
    adapters = optax.apply_updates(adapters, upd)
    return (adapters if constrain is None else constrain(adapters)), opt, loss

  return tx, step


def flat_arrays(tree, prefix):
  """``{prefix/path: numpy}`` of every array leaf (gathered to the host)."""
  import jax

  from lora_jax._multihost import to_host

  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[prefix + jax.tree_util.keystr(path)] = np.asarray(to_host(leaf))
  return out


def main():
  pid, n, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  t0 = time.time()
  import jax

  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, KeyError, ValueError) as e:  # no such option in this JAX
    print(f"SKIP: no gloo CPU collectives in jax {jax.__version__}: {e}", flush=True)
    sys.exit(SKIP)
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid, initialization_timeout=60
  )
  import orbax.checkpoint as ocp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import lora_jax
  from lora_jax._multihost import place, to_host
  from lora_jax.kinds import is_adapter_or_none

  assert jax.process_count() == n and jax.process_index() == pid
  k = jax.local_device_count()
  mesh = Mesh(np.array(jax.devices()).reshape(n, k), ("data", "model"))  # "data" across processes
  try:
    jax.jit(lambda z: z.sum())(place(np.ones((n, k), np.float32), NamedSharding(mesh, P("data", "model"))))
  except Exception as e:  # noqa: BLE001 - reported to the test, which skips
    if "implemented" in str(e) or "collectives" in str(e).lower():
      print(f"SKIP: this JAX runs no computations across CPU processes: {e}", flush=True)
      sys.exit(SKIP)
    raise

  MLP, params_host, adapters_host, x_host, y_host, spec = setup()
  glob = lambda v, s: place(v, NamedSharding(mesh, s))  # noqa: E731
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: glob(v, P(*KERNEL_SPECS[path[1].key]) if path[-1].key == "kernel" else P()), params_host
  )
  assert not params["params"]["up"]["kernel"].is_fully_addressable
  x, y = glob(x_host, P("data", None)), glob(y_host, P("data", None))
  result = {}
  stages = {"start": time.time() - t0}

  # Adapters sharded like their kernels. shard_like's jax.device_put cannot place an array
  # committed to one local device on a mesh over several processes; a host-local value can be.
  try:
    adapters = lora_jax.shard_like(adapters_host, params)
    result["shard_like_direct"] = np.array(True)
  except ValueError as e:
    print(f"shard_like failed across processes ({e}); placing with _multihost.place", flush=True)
    result["shard_like_direct"] = np.array(False)
    shardings = lora_jax.adapter_shardings(params, adapters_host)
    adapters = jax.tree.map(lambda f, s: None if f is None else jax.tree.map(place, f, s),
                            adapters_host, shardings, is_leaf=is_adapter_or_none)
  # Adapters committed to one local device (e.g. made by a jit on host-local params):
  # jax.device_put, hence today's shard_like, refuses them; _multihost.place takes them.
  committed = jax.tree.map(lambda v: jax.device_put(v, jax.local_devices()[0]), adapters_host)
  try:
    lora_jax.shard_like(committed, params)
    result["shard_like_committed"] = np.array(True)
  except ValueError:
    result["shard_like_committed"] = np.array(False)
  f, sh = committed["params"]["up"]["kernel"], lora_jax.adapter_shardings(params, committed)["params"]["up"]["kernel"]
  placed = place(f.a, sh.a)
  assert placed.sharding == sh.a and not placed.is_fully_addressable
  np.testing.assert_array_equal(to_host(placed), np.asarray(f.a))
  want_sh = lora_jax.adapter_shardings(params, adapters)
  up, down = adapters["params"]["up"]["kernel"], adapters["params"]["down"]["kernel"]
  assert up.a.sharding.spec == P("data", None) and up.b.sharding.spec == P(None, "model"), up.a.sharding
  assert down.a.sharding.spec == P("model", None) and down.b.sharding.spec == P(None, "data"), down.b.sharding
  assert not up.a.is_fully_addressable and not down.b.is_fully_addressable
  constrain = lambda ad: jax.lax.with_sharding_constraint(ad, want_sh)  # noqa: E731
  tx, step = make_step(MLP, constrain)

  stages["setup"] = time.time() - t0
  # --- Training state with orbax, across processes -------------------------------------------
  opt = tx.init(adapters)
  losses = []
  for _ in range(STEPS):
    adapters, opt, loss = step(params, adapters, opt, x, y)
    losses.append(float(to_host(loss)))
  state = {"adapters": adapters, "opt_state": opt, "step": glob(np.int32(STEPS), P())}
  ckpt = os.path.join(out_dir, "ckpt")
  if not isinstance(getattr(jax.sharding, "set_mesh", None), type):
    # orbax 0.12 slices replicated shards among their replicas inside `with
    # jax.sharding.set_mesh(...)`, a context manager (a class) only from JAX 0.7; before,
    # it is a function returning None and the save fails: write whole shards instead.
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    result["orbax_replica_parallel"] = np.array(False)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, state)
    ckptr.wait_until_finished()
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding), state)
    restored = ckptr.restore(ckpt, target)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(restored)):
    assert b.sharding.is_equivalent_to(a.sharding, a.ndim), (jax.tree_util.keystr(path), a.sharding, b.sharding)
    np.testing.assert_array_equal(to_host(b), to_host(a), err_msg=jax.tree_util.keystr(path))
  assert int(to_host(restored["step"])) == STEPS
  stages["orbax"] = time.time() - t0
  # One more step after the restore equals one more step without it, bit for bit.
  cont, _, loss_a = step(params, restored["adapters"], restored["opt_state"], x, y)
  more, _, loss_b = step(params, adapters, opt, x, y)
  for a, b in zip(jax.tree.leaves(cont), jax.tree.leaves(more)):
    np.testing.assert_array_equal(to_host(a), to_host(b))
  assert float(to_host(loss_a)) == float(to_host(loss_b))
  result.update(flat_arrays(adapters, "trained"), **flat_arrays(more, "continued"))
  result["losses"] = np.array(losses + [float(to_host(loss_b))])

  # --- lora_jax's own files: written once, by process 0; read by every process --------------
  import lora_jax.files.adapters as fa
  import lora_jax.files.params as fp
  import lora_jax.files.sets as fs

  writes = {"atomic": 0, "set": 0}

  def counting(fn, key):
    def wrapped(*args, **kwargs):
      writes[key] += 1
      return fn(*args, **kwargs)
    return wrapped

  fa.atomic_write = counting(fa.atomic_write, "atomic")  # observe who writes; behaviour unchanged
  fp.atomic_write = counting(fp.atomic_write, "atomic")
  fs._replace_dir = counting(fs._replace_dir, "set")

  stages["trained"] = time.time() - t0
  d = os.path.join(out_dir, "adapters")
  assert lora_jax.save(d, adapters, spec, {"step": STEPS}, params=params) == d
  assert os.path.isfile(os.path.join(d, "adapters.safetensors"))  # already in place on every process
  loaded = lora_jax.shard_like(lora_jax.load(d, params), params)
  for a, b, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapters), jax.tree.leaves(want_sh)):
    assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
    np.testing.assert_array_equal(to_host(a), to_host(b))
  assert lora_jax.load_config(d)["metadata"] == {"step": STEPS}

  stages["save"] = time.time() - t0
  m = os.path.join(out_dir, "merged.safetensors")
  lora_jax.save_merged(m, params, adapters)
  merged = jax.jit(lora_jax.merge)(params, adapters)
  back = lora_jax.load_params(m, like=params_host)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(merged)):
    np.testing.assert_allclose(np.asarray(a), to_host(b), rtol=1e-6, atol=1e-6)
  result.update(flat_arrays(back, "merged"))

  p = os.path.join(out_dir, "base.safetensors")
  lora_jax.save_params(p, params)
  for a, b in zip(jax.tree.leaves(lora_jax.load_params(p, like=params_host)), jax.tree.leaves(params_host)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  stages["merged"] = time.time() - t0
  s = os.path.join(out_dir, "set")
  lora_jax.save_set(s, {"default": adapters, "first": restored["adapters"], "more": more}, params, spec=spec)
  got = lora_jax.load_set(s, params)
  assert list(got) == ["default", "first", "more"]
  for name, ref in (("default", adapters), ("first", adapters), ("more", more)):
    placed = lora_jax.shard_like(got[name], params)
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(to_host(a), to_host(b))

  # A write that fails on process 0 raises on every process; none is left waiting.
  blocked = os.path.join(out_dir, "blocked")
  if pid == 0:
    open(blocked, "w").close()
  raised = None
  try:
    lora_jax.save(os.path.join(blocked, "x.safetensors"), adapters, spec)
  except OSError as e:
    raised = type(e).__name__
  assert raised is not None, "a failed write did not raise"
  result["failed_write_raised"] = np.array(raised)
  result["writes_atomic"] = np.array(writes["atomic"])
  result["writes_set"] = np.array(writes["set"])
  result["devices"] = np.array([jax.process_count(), jax.local_device_count(), jax.device_count()])
  stages["end"] = time.time() - t0
  result["seconds"] = np.array(time.time() - t0)
  print("stages (s since start):", {k: round(v, 1) for k, v in stages.items()}, flush=True)
  np.savez(os.path.join(out_dir, f"out_{pid}.npz"), **result)
  print(f"WORKER OK {pid}/{n} {time.time() - t0:.1f}s", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
