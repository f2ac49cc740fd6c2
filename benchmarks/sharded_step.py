"""Sharded LoRA training step (issue 14): step time and per-device memory against device count.

A Llama with FSDP x tensor-parallel placement on a ``("fsdp", "model")`` mesh (q/k/v/gate/up
kernels: fan-in on ``"fsdp"``, fan-out on ``"model"``; o/down the other way round; embedding
and ``lm_head`` vocabulary on ``"model"``, hidden on ``"fsdp"``; the batch on ``"fsdp"``),
all-linear LoRA adapters placed by ``lora_jax.shard_like``, one jitted AdamW step on the
adapters (donated). Each device count runs in its own subprocess:

* on a CPU (default), ``N`` host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``)
  that share the machine's cores: the figures show how memory per device falls and what the
  partitioned program costs, not a speed-up;
* with ``--platform gpu``, the first ``N`` GPUs of the machine (``--devices 1``: the one-GPU
  figure, ``run_gpu.sh sharded``).

Per row: mesh, step ms (median of ``--iters`` after ``--warmup``), tokens/s, compile s, XLA's
static memory plan of the compiled step per device (``compiled.memory_analysis()``: argument,
output, alias, temp bytes, and their total), ``device.memory_stats()`` peak where the backend
has it (GPU), the bytes of the params and adapters on device 0, and the bytes the step's
collectives produce per call (benchmarks/hlo_collectives.py over ``compiled.as_text()``).

    python benchmarks/sharded_step.py --config cpu-small                   # 1, 2, 4, 8 CPU devices
    python benchmarks/sharded_step.py --config tinyllama --platform gpu --devices 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

RANK, ALPHA = 16, 32.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # fan-out on "model"
MESHES = {1: (1, 1), 2: (2, 1), 4: (2, 2), 8: (4, 2)}  # devices -> (fsdp, model)
CPU_BATCH = 8  # global batch at the CPU configs: divisible by every fsdp size above


def kernel_spec(path: str, ndim: int):
  """The placement of one parameter (a '/'-joined path) on the ``("fsdp", "model")`` mesh."""
  from jax.sharding import PartitionSpec as P

  module = path.split("/")[-2]
  if module == "embed_tokens":
    return P("model", "fsdp")
  if module == "lm_head":
    return P("fsdp", "model")
  if module in TARGETS:
    io = ("fsdp", "model") if module in COLS else ("model", "fsdp")
    return P(*([None] * (ndim - 2)), *io)
  return P()  # norm scales


def _collective_bytes(text: str) -> dict[str, Any] | None:
  try:
    from benchmarks import hlo_collectives as _collectives

    colls = _collectives.collectives(text)
    return dict(total=_collectives.total_bytes(colls), by_op=_collectives.summary(colls))
  except Exception as e:  # noqa: BLE001 - a parser surprise must not lose the timing
    return dict(error=f"{type(e).__name__}: {e}"[:300])


def measure(cfg: common.BenchConfig, n: int, batch: int, warmup: int, iters: int) -> dict[str, Any]:
  """One device count, in this process."""
  import jax
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import lora_jax
  from lora_jax.models import llama

  devices = jax.devices()[:n]
  assert len(devices) == n, f"asked for {n} devices, found {len(jax.devices())}"
  fsdp, tp = MESHES[n]
  mesh = Mesh(np.array(devices).reshape(fsdp, tp), ("fsdp", "model"))
  config = common.llama_config(cfg)
  model = llama.LlamaForCausalLM(config)
  tokens = jax.random.randint(jax.random.key(1), (batch, cfg.seq), 0, cfg.vocab, dtype="int32")
  tokens = jax.device_put(tokens, NamedSharding(mesh, P("fsdp", None)))

  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens[:1])
  shardings = jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, kernel_spec(jax.tree_util.keystr(p, simple=True, separator="/"), x.ndim)), abstract)
  t0 = time.perf_counter()
  params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), tokens[:1])  # built sharded
  spec = lora_jax.LoraSpec(list(TARGETS), rank=RANK, alpha=ALPHA, layout=llama.lora_layout(config))
  ad_abstract = jax.eval_shape(lambda p: lora_jax.init(jax.random.key(2), p, spec), params)
  ad_shardings = lora_jax.adapter_shardings(params, ad_abstract)
  adapters = jax.jit(lambda p: lora_jax.init(jax.random.key(2), p, spec), out_shardings=ad_shardings)(params)
  jax.block_until_ready((params, adapters))
  setup_s = time.perf_counter() - t0

  apply = lora_jax.wrap(model.apply)
  tx = optax.adamw(1e-4, weight_decay=0.01)
  opt = jax.jit(tx.init)(adapters)

  def step(params, adapters, opt, tokens):
    loss, g = jax.value_and_grad(lambda ad: apply(params, ad, tokens, method="loss"))(adapters)
    upd, opt = tx.update(g, opt, adapters)
    return optax.apply_updates(adapters, upd), opt, loss

  t0 = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(1, 2)).lower(params, adapters, opt, tokens)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  state = [adapters, opt]
  losses = []

  def one():
    state[0], state[1], loss = compiled(params, state[0], state[1], tokens)
    losses.append(loss)
    return loss

  times = common.time_calls(one, jax.block_until_ready, warmup, iters)
  # Every leaf stays where adapter_shardings put it, through the donated steps.
  kept = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(state[0]), jax.tree.leaves(ad_shardings)))

  def dev0_bytes(tree) -> int:
    return int(sum(sh.data.nbytes for x in jax.tree.leaves(tree) for sh in x.addressable_shards if sh.device == devices[0]))

  med = common.median(times)
  stats = devices[0].memory_stats() or {}
  return dict(
      devices=n,
      mesh=f"fsdp{fsdp} x model{tp}",
      platform=devices[0].platform,
      batch=batch,
      seq=cfg.seq,
      step_ms=round(med * 1e3, 2),
      step_ms_all=[round(t * 1e3, 2) for t in times],
      tokens_per_s=round(batch * cfg.seq / med, 1),
      compile_s=round(compile_s, 2),
      setup_s=round(setup_s, 2),
      memory_per_device=common.jax_memory_analysis(compiled),
      peak_bytes_in_use=stats.get("peak_bytes_in_use"),
      bytes_in_use=stats.get("bytes_in_use"),
      params_bytes_device0=dev0_bytes(params),
      adapter_bytes_device0=dev0_bytes(state[0]),
      params_bytes_total=int(sum(x.nbytes for x in jax.tree.leaves(params))),
      collective_bytes=_collective_bytes(compiled.as_text()),
      shardings_kept=kept,
      loss_first=round(float(losses[0]), 4),
      loss_last=round(float(losses[-1]), 4),
  )


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="cpu-small")
  p.add_argument("--devices", default=None, help="comma-separated device counts (default: 1,2,4,8 on CPU, 1 on GPU)")
  p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's; at least 8 on CPU)")
  p.add_argument("--warmup", type=int, default=None)
  p.add_argument("--iters", type=int, default=None)
  p.add_argument("--timeout-s", type=float, default=300)
  p.add_argument("--out", default=None)
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  cfg = common.get_config(args.config)
  warmup = cfg.warmup if args.warmup is None else args.warmup
  iters = cfg.iters if args.iters is None else args.iters
  batch = args.batch or (max(cfg.batch, CPU_BATCH) if args.platform == "cpu" else cfg.batch)

  if args.worker is not None:  # one device count, in this fresh process
    try:
      row = measure(cfg, args.worker, batch, warmup, iters)
    except Exception as e:  # noqa: BLE001 - recorded in the JSON
      row = dict(devices=args.worker, **common.error_record(e))
    common.write_json(args.result_file, row)
    return row

  counts = [int(c) for c in (args.devices or ("1,2,4,8" if args.platform == "cpu" else "1")).split(",")]
  for c in counts:
    if c not in MESHES:
      p.error(f"--devices: {c} has no mesh; choose from {sorted(MESHES)}")
  out = args.out or os.path.join(common.RESULTS, f"sharded_step_{args.platform if args.platform == 'cpu' else cfg.name}.json")
  t_start = time.perf_counter()
  rows = []
  for n in counts:
    env = {}
    if args.platform == "cpu":
      flags = os.environ.get("XLA_FLAGS", "")
      env = dict(JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={n}".strip())
    argv_w = [os.path.abspath(__file__), "--config", cfg.name, "--platform", args.platform, "--batch", str(batch),
              "--warmup", str(warmup), "--iters", str(iters), "--worker", str(n)]
    row = common.run_worker(argv_w, args.timeout_s, env)
    row.setdefault("devices", n)
    mem = row.get("memory_per_device") or {}
    row["plan_mib_per_device"] = None if "total" not in mem else round(mem["total"] / 2**20, 3)
    row["args_mib_per_device"] = None if "argument_size" not in mem else round(mem["argument_size"] / 2**20, 3)
    row["temp_mib_per_device"] = None if "temp_size" not in mem else round(mem["temp_size"] / 2**20, 3)
    cb = row.get("collective_bytes") or {}
    row["collective_kib"] = None if "total" not in cb else round(cb["total"] / 2**10, 1)
    rows.append(row)
    print(f"  {n} devices: {row.get('error') or str(row.get('step_ms')) + ' ms'}", flush=True)
  base = next((r for r in rows if r.get("devices") == 1 and "error" not in r), None)
  for r in rows:  # the scaling shape: relative to one device
    if base and "error" not in r:
      r["step_vs_1"] = round(r["step_ms"] / base["step_ms"], 3)
      if base.get("plan_mib_per_device") and r.get("plan_mib_per_device"):
        r["plan_vs_1"] = round(r["plan_mib_per_device"] / base["plan_mib_per_device"], 3)
      if base.get("args_mib_per_device") and r.get("args_mib_per_device"):
        r["args_vs_1"] = round(r["args_mib_per_device"] / base["args_mib_per_device"], 3)
  payload = dict(
      benchmark="sharded_step",
      env=common.env_info("jax"),
      config=dict(vars(cfg), batch=batch, rank=RANK, alpha=ALPHA, targets=list(TARGETS), meshes={str(k): v for k, v in MESHES.items()},
                  platform=args.platform, placement="FSDP x Megatron TP: q/k/v/gate/up P(fsdp, model), o/down P(model, fsdp), "
                  "embed P(model, fsdp), lm_head P(fsdp, model), batch on fsdp"),
      rows=rows,
      wall_s=round(time.perf_counter() - t_start, 1),
  )
  common.write_json(out, payload)
  common.print_table(rows, [
      ("devices", "devices", "d"), ("mesh", "mesh", ""), ("step_ms", "step ms", ".1f"), ("step_vs_1", "x 1-dev", ".2f"),
      ("tokens_per_s", "tokens/s", ".0f"), ("args_mib_per_device", "args MiB/dev", ".3f"),
      ("temp_mib_per_device", "temp MiB/dev", ".3f"), ("plan_mib_per_device", "plan MiB/dev", ".3f"),
      ("plan_vs_1", "plan x 1-dev", ".2f"), ("collective_kib", "collectives KiB", ".1f"), ("compile_s", "compile s", ".1f"),
      ("shardings_kept", "kept", ""), ("error", "error", ""),
  ])
  print(f"wrote {out}")
  return payload


if __name__ == "__main__":
  main()
