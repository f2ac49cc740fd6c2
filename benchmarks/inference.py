"""Forward latency: the base model, merged LoRA, and unmerged (factored) LoRA at several ranks.

Merged adapters are plain params for the unchanged model, so a merged forward runs the very
executable the base forward runs and must cost the same; the factored forward (``wrap``) adds
two thin matmuls per adapted kernel. Numerics: the factored logits are compared with the
merged ones (adapters with non-zero ``b``), and with ``b = 0`` the factored forward must equal
the base forward exactly.

    python benchmarks/inference.py --config cpu-small
    python benchmarks/inference.py --config tinyllama
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

RANKS = {"tinyllama": (8, 16, 64), "cpu-small": (2, 4, 8)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="cpu-small", choices=sorted(common.CONFIGS))
  p.add_argument("--out", default=None)
  p.add_argument("--ranks", default=None, help="comma-separated (default: 8,16,64; cpu-small 2,4,8)")
  p.add_argument("--iters", type=int, default=None, help="timed calls per variant (default: 2x the config's)")
  args = p.parse_args(argv)
  cfg = common.get_config(args.config)
  iters = args.iters or 2 * cfg.iters
  ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else list(RANKS[cfg.name])

  import jax
  import jax.numpy as jnp
  import numpy as np

  import lora_jax
  from lora_jax.models import llama

  t_start = time.perf_counter()
  env = common.env_info("jax")
  config = common.llama_config(cfg, remat=False)
  model = llama.LlamaForCausalLM(config)
  tokens = jax.random.randint(jax.random.key(1), (cfg.batch, cfg.seq), 0, cfg.vocab, dtype=jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens[:1])
  forward = jax.jit(model.apply)
  sync = lambda x: x.block_until_ready()
  rows: list[dict[str, Any]] = []
  payload = dict(benchmark="inference", env=env, config=vars(cfg) | {"ranks": ranks, "targets": "all-linear"}, rows=rows)
  out = args.out or common.default_out("inference", cfg)

  def timed(name: str, fn, **extra) -> dict[str, Any]:
    row: dict[str, Any] = dict(variant=name, **extra)
    try:
      t0 = time.perf_counter()
      sync(fn())
      row["first_call_s"] = round(time.perf_counter() - t0, 2)
      times = common.time_calls(fn, sync, cfg.warmup, iters)
      med = common.median(times)
      row.update(ms=round(med * 1e3, 3), ms_min=round(min(times) * 1e3, 3), tokens_per_s=round(cfg.tokens / med, 1))
    except Exception as e:  # noqa: BLE001
      row.update(common.error_record(e))
    rows.append(row)
    common.write_json(out, payload)
    status = row.get("error") or f"{row['ms']:.2f} ms"
    print(f"  {name:16s} {status}", flush=True)
    return row

  base = timed("base", lambda: forward(params, tokens), rank=None)
  base_logits = forward(params, tokens)
  factored_fn = jax.jit(lora_jax.wrap(model.apply, fallback="error"))
  for r in ranks:
    spec = lora_jax.LoraSpec("all-linear", rank=r, alpha=2 * r, layout=llama.lora_layout(config))
    fresh = lora_jax.init(jax.random.key(2), params, spec)
    # Trained-looking adapters: b drawn at random, sized so that the update is a few percent.
    adapters = jax.tree.map(
        lambda f: lora_jax.LoraFactors(
            a=f.a, b=0.02 * jax.random.normal(jax.random.key(3), f.b.shape, f.b.dtype), scale=f.scale, layout=f.layout
        ),
        fresh,
        is_leaf=lambda x: isinstance(x, lora_jax.LoraFactors),
    )
    merged = jax.block_until_ready(jax.jit(lora_jax.merge)(params, adapters))
    m = timed(f"merged r={r}", lambda merged=merged: forward(merged, tokens), rank=r)
    f = timed(f"factored r={r}", lambda adapters=adapters: factored_fn(params, adapters, tokens), rank=r)
    try:
      lm = np.asarray(forward(merged, tokens), np.float32)
      lf = np.asarray(factored_fn(params, adapters, tokens), np.float32)
      lb = np.asarray(base_logits, np.float32)
      f["max_abs_diff_vs_merged"] = float(np.max(np.abs(lf - lm)))
      f["rel_l2_diff_vs_merged"] = float(np.linalg.norm(lf - lm) / np.linalg.norm(lm))
      f["argmax_agree_vs_merged"] = float(np.mean(lf.argmax(-1) == lm.argmax(-1)))
      f["rel_l2_update"] = float(np.linalg.norm(lm - lb) / np.linalg.norm(lb))  # how large the adapters are
      zero = np.asarray(factored_fn(params, fresh, tokens), np.float32)
      f["b0_equals_base"] = bool(np.array_equal(zero, lb))  # bitwise
      f["b0_max_abs_diff_vs_base"] = float(np.max(np.abs(zero - lb)))
      f["b0_rel_l2_diff_vs_base"] = float(np.linalg.norm(zero - lb) / np.linalg.norm(lb))
    except Exception as e:  # noqa: BLE001
      f.update(common.error_record(e))
    if base.get("ms") and m.get("ms"):
      m["vs_base"] = round(m["ms"] / base["ms"], 3)
    if base.get("ms") and f.get("ms"):
      f["vs_base"] = round(f["ms"] / base["ms"], 3)
    common.write_json(out, payload)
  return common.finish(
      payload, out, t_start, rows,
      [("variant", "variant", ""), ("ms", "ms", ".2f"), ("vs_base", "x base", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"),
       ("rel_l2_diff_vs_merged", "rel diff vs merged", ".2e"), ("argmax_agree_vs_merged", "argmax agree", ".4f"),
       ("b0_equals_base", "b=0 == base", ""), ("error", "error", "")],
  )


if __name__ == "__main__":
  main()
