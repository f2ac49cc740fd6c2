"""Fixed costs of lora_jax: trace and compile time of ``wrap`` against the bare model, and the
time of ``init`` / ``merge`` / ``unmerge`` / ``count`` on the full-size (1.1B) params.

Trace time is ``jax.jit(f).lower(...)`` (for ``wrap`` it includes the jaxpr interpreter);
compile time is ``Lowered.compile()``. The persistent compilation cache is switched off so
that every compile is a cold one.

    python benchmarks/overheads.py --config cpu-small
    python benchmarks/overheads.py --config tinyllama
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, train_step  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="cpu-small", choices=sorted(common.CONFIGS))
  p.add_argument("--out", default=None)
  p.add_argument("--tune", default="remat+chunk")
  p.add_argument("--no-train", action="store_true", help="skip the training-step programs")
  p.add_argument("--repeats", type=int, default=3, help="timed calls of init/merge/unmerge/count")
  args = p.parse_args(argv)
  cfg = common.get_config(args.config)

  import jax
  import jax.numpy as jnp
  import optax

  jax.config.update("jax_enable_compilation_cache", False)
  import lora_jax
  from benchmarks import handwritten
  from lora_jax.models import llama

  t_start = time.perf_counter()
  env = common.env_info("jax")
  tune = train_step.tune_settings(args.tune, cfg)
  config = common.llama_config(cfg, remat=tune["remat"], remat_policy=tune["remat_policy"])
  model = llama.LlamaForCausalLM(config)
  tokens = jax.random.randint(jax.random.key(1), (cfg.batch, cfg.seq), 0, cfg.vocab, dtype=jnp.int32)
  jax.jit(lambda x: x + 1).lower(1.0).compile()  # backend start-up stays out of the numbers
  params = jax.block_until_ready(jax.jit(model.init)(jax.random.key(0), tokens[:1]))
  spec = train_step._lora_spec("all", config, train_step.RANK)
  rows: list[dict[str, Any]] = []
  payload = dict(benchmark="overheads", env=env, config=vars(cfg) | {"tune": args.tune, "rank": train_step.RANK}, rows=rows)
  out = args.out or common.default_out("overheads", cfg)

  def record(row: dict[str, Any]) -> None:
    rows.append(row)
    common.write_json(out, payload)
    what = row.get("error") or "  ".join(f"{k}={v}" for k, v in row.items() if k.endswith("_s"))
    print(f"  {row['what']:34s} {what}", flush=True)

  # --- fixed costs of the pure functions, on the full params ---------------------------------
  def timed(what: str, fn, jit_fn=None) -> None:
    row: dict[str, Any] = {"what": what}
    try:
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      row["first_call_s"] = round(time.perf_counter() - t0, 4)
      ts = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
      row["median_s"] = round(common.median(ts), 4)
    except Exception as e:  # noqa: BLE001
      row.update(common.error_record(e))
    record(row)

  key = jax.random.key(2)
  timed("LoraSpec.resolve (all-linear)", lambda: spec.resolve(params) and 0)
  timed("init (eager)", lambda: lora_jax.init(key, params, spec))
  timed("init (jit)", functools.partial(jax.jit(lambda k, p: lora_jax.init(k, p, spec)), key, params))
  adapters = lora_jax.init(key, params, spec)
  adapters = jax.tree.map(
      lambda f: lora_jax.LoraFactors(a=f.a, b=0.01 * jnp.ones_like(f.b), scale=f.scale, layout=f.layout),
      adapters, is_leaf=lambda x: isinstance(x, lora_jax.LoraFactors),
  )
  timed("merge (eager)", lambda: lora_jax.merge(params, adapters))
  timed("merge (jit)", functools.partial(jax.jit(lora_jax.merge), params, adapters))
  timed("unmerge (jit)", functools.partial(jax.jit(lora_jax.unmerge), params, adapters))
  timed("count", lambda: lora_jax.count(adapters, params) and 0)
  payload["lora_params"] = lora_jax.count(adapters, params).trainable

  # --- trace and compile: wrap against the bare model ----------------------------------------
  chunk = tune["chunk"]
  loss_kw = dict(method="loss", chunk_size=chunk)
  bare_loss = functools.partial(model.apply, **loss_kw)
  tx = optax.adamw(1e-4)

  def lower_compile(what: str, fn, *xs) -> None:
    row: dict[str, Any] = {"what": what}
    try:
      t0 = time.perf_counter()
      lowered = jax.jit(fn).lower(*xs)
      row["trace_s"] = round(time.perf_counter() - t0, 3)
      t0 = time.perf_counter()
      lowered.compile()
      row["compile_s"] = round(time.perf_counter() - t0, 3)
      row["total_s"] = round(row["trace_s"] + row["compile_s"], 3)
    except Exception as e:  # noqa: BLE001
      row.update(common.error_record(e))
    record(row)

  t0 = time.perf_counter()
  jaxpr = jax.make_jaxpr(bare_loss)(params, tokens)
  bare_jaxpr_s = time.perf_counter() - t0
  payload["bare_jaxpr_eqns"] = len(jaxpr.jaxpr.eqns)
  payload["bare_make_jaxpr_s"] = round(bare_jaxpr_s, 3)
  lower_compile("forward loss: bare model", bare_loss, params, tokens)
  lower_compile("forward loss: wrap (factored)", lora_jax.wrap(bare_loss), params, adapters, tokens)
  if not args.no_train:
    def full_step(p, s, t):
      loss, g = jax.value_and_grad(lambda p: bare_loss(p, t))(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    def lora_step(loss_fn):
      def step(p, ad, s, t):
        loss, g = jax.value_and_grad(lambda ad: loss_fn(p, ad, t))(ad)
        u, s = tx.update(g, s, ad)
        return optax.apply_updates(ad, u), s, loss
      return step

    hand = handwritten.init_adapters(key, params, train_step.TARGETS["all"], train_step.RANK)
    hand_loss = functools.partial(handwritten.loss, config=config, scale=train_step.ALPHA / train_step.RANK, chunk_size=chunk)
    lower_compile("train step: bare model, full FT", full_step, params, tx.init(params), tokens)
    lower_compile("train step: hand-written LoRA", lora_step(hand_loss), params, hand, tx.init(hand), tokens)
    lower_compile("train step: wrap (factored) LoRA", lora_step(lora_jax.wrap(bare_loss)), params, adapters, tx.init(adapters), tokens)
  return common.finish(
      payload, out, t_start, rows,
      [("what", "what", ""), ("trace_s", "trace s", ".3f"), ("compile_s", "compile s", ".3f"),
       ("first_call_s", "first call s", ".4f"), ("median_s", "median s", ".4f"), ("error", "error", "")],
  )


if __name__ == "__main__":
  main()
