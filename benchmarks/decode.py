"""Decode throughput with many LoRA adapters: one batch of requests, each with its own adapter.

A Llama of the config's shapes (TinyLlama-1.1B for ``--config tinyllama``; random weights, bf16
params and compute) generates ``new`` tokens greedily for ``batch`` requests of ``prompt`` tokens
(no padding) with all-linear LoRA adapters (r=16, alpha=32; random ``a`` and ``b``, so every
adapter changes the output), in these variants (keys ``lora_jax/<case>[@<bank mode>]``):

- ``base``: the model alone; ``merged``: one adapter merged into the params
  (``lora_jax.merge``: the same executable as ``base``, the upper bound);
- ``factored``: the same adapter unmerged (``lora_jax.wrap(model.apply)``);
- ``mixed<N>@<mode>``: a bank of ``N`` adapters (``lora_jax.stack``), row ``i`` using adapter
  ``i % N`` (``wrap(model.apply, in_axes=0, out_axes=0, bank_mode=mode)``, ``adapter_ids=``);
  ``adapters_used`` counts the distinct adapters in the batch (``min(N, batch)``); ``mode`` is
  ``auto``, ``dense`` (one masked matmul over the whole bank) or ``gather`` (each row's factors
  gathered, then batched matmuls);
- ``<case>@lib``: the same through the library's ``lora_jax.models.generation.generate``
  instead of the benchmark's driver (below): its tokens must equal the driver's
  (``prefix_agree_vs_driver``); its prefill is timed as a call with one new token;
- ``...+bf16`` (e.g. ``mixed128@auto+bf16``, ``factored@bf16``): the adapters' factors in bf16
  instead of ``lora_jax.init``'s float32 (a bank read per step is half the bytes);
- ``loop<C>x<R>``: the naive loop, ``C`` sequential calls of ``R`` requests with one factored
  adapter per call (call ``j`` holds the rows ``i % C == j``, the rows ``mixed<C>`` gives adapter
  ``j``: the tokens must agree, ``prefix_agree_vs_loop``).

Each mixed row also hot-swaps one member of the live bank (``lora_jax.replace_adapter``: new
weights, same shapes) and calls again: ``swap_ms`` (eager call), ``swap_jit_ms`` (the same
jitted, the bank donated: in place), ``lowerings_after_swap`` / ``compiles_after_swap`` /
``traces_after_swap`` (``jax.monitoring`` events during the jitted swap and the next prefill and
decode: 0 = no recompile; ``compile_counter_control`` counts a new function's, which must not be
0), ``swapped_rows_changed`` (share of the swapped member's rows whose
tokens changed) and ``other_rows_equal`` (every other row's tokens bitwise unchanged).

Generation is a minimal greedy driver on the model's KV cache (``llama.init_cache``,
``model.apply(..., method="extend")``): one jitted prefill (the prompt into the cache, the
first token), one jitted decode of ``new - 1`` steps (``lax.scan``, the cache donated). Each
timed call runs both, synchronised after each: ``prefill_ms``, ``step_ms`` = decode time /
``(new - 1)``, ``total_ms`` their sum, ``tokens_per_s = batch * new / total`` (as
``peft_decode.py`` counts them). Each variant runs in its own process on the GPU, so
``peak_gib`` (``peak_bytes_in_use``) is its own: params, adapters, cache and temporaries;
``peak_setup_gib`` is the peak before the first call, ``live_gib`` what is held then.

    python benchmarks/decode.py --config cpu-small
    python benchmarks/decode.py --config tinyllama --out /tmp/decode_tinyllama.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks import decode_common as dc  # noqa: E402

BANK_MODES = ("auto", "gather", "dense")
B_STD = 0.02  # b ~ B_STD * N(0, 1): an update of a few percent, as inference.py draws it


def plan(adapters: list[int], loop: tuple[int, int]) -> list[str]:
  """The default variant keys, most wanted first (a time budget cuts the tail)."""
  c, r = loop
  keys = ["lora_jax/merged", "lora_jax/factored", *[f"lora_jax/mixed{n}@auto" for n in adapters], f"lora_jax/loop{c}x{r}"]
  keys += [f"lora_jax/mixed{n}@{m}" for m in BANK_MODES[1:] for n in adapters]
  mid = adapters[len(adapters) // 2] if adapters else None
  big = max(adapters) if adapters else None
  keys += ["lora_jax/base", "lora_jax/factored@lib"] + ([f"lora_jax/mixed{mid}@lib"] if mid else [])
  return keys + ([f"lora_jax/mixed{big}@auto+bf16", f"lora_jax/mixed{big}@gather+bf16"] if big else [])


# ----------------------------------------------------------------------------------------------
# Model, adapters, generation
# ----------------------------------------------------------------------------------------------


def build_model(cfg: common.BenchConfig, shape: dc.DecodeShape):
  import jax
  import jax.numpy as jnp

  from lora_jax.models import llama

  # DECODE_SCAN_UNROLL: layers per iteration of the layer scan (0: all, no loop); recorded per row.
  unroll = int(os.environ.get("DECODE_SCAN_UNROLL", "1"))
  config = common.llama_config(cfg, remat=False, max_position_embeddings=max(2048, shape.prompt + shape.new),
                               scan_unroll=unroll)
  model = llama.LlamaForCausalLM(config)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return config, model, params


def bank_maker(params, config, rank: int, dtype: Any = None):
  """``make(n, seed)``: a bank of ``n`` random all-linear adapters ``a0 .. a{n-1}`` (r = rank,
  alpha = 2 x rank): ``lora_jax.stack`` of ``n`` references to one ``lora_jax.init`` tree (one
  member's memory), then every ``a`` and ``b`` redrawn in place (a jitted function, the bank
  donated): ``a`` with the spread ``lora_jax.init`` gives it, ``b ~ 0.02 N(0, 1)``. So the bank
  never exists twice, and neither compile nor memory grows with ``n`` beyond the bank itself.
  Single adapters are members of such a bank (``lora_jax.unstack``). ``dtype``: of the factors
  (default ``lora_jax.init``'s, float32)."""
  import jax
  import jax.numpy as jnp

  import lora_jax
  from lora_jax.models import llama

  spec = lora_jax.LoraSpec("all-linear", rank=rank, alpha=2 * rank, layout=llama.lora_layout(config))
  template = lora_jax.init(jax.random.key(2), params, spec)
  if dtype is not None:
    is_f = lambda x: isinstance(x, lora_jax.LoraFactors)  # noqa: E731
    template = jax.tree.map(lambda f: dataclasses.replace(f, a=f.a.astype(dtype), b=f.b.astype(dtype)) if is_f(f) else f,
                            template, is_leaf=is_f)
  is_bank = lambda x: isinstance(x, lora_jax.LoraBank)  # noqa: E731

  @functools.partial(jax.jit, donate_argnums=0)
  def redraw(bank, key):
    flat, tree = jax.tree.flatten(bank, is_leaf=is_bank)
    keys = jax.random.split(key, 2 * len(flat))
    out = []
    for i, x in enumerate(flat):
      if is_bank(x):
        a_std = jnp.std(x.a.astype(jnp.float32))
        x = dataclasses.replace(
            x, a=(a_std * jax.random.normal(keys[2 * i], x.a.shape, jnp.float32)).astype(x.a.dtype),
            b=(B_STD * jax.random.normal(keys[2 * i + 1], x.b.shape, jnp.float32)).astype(x.b.dtype))
      out.append(x)
    return jax.tree.unflatten(tree, out)

  def make(n: int, seed: int = 3):
    return redraw(lora_jax.stack({f"a{j}": template for j in range(n)}), jax.random.key(seed))

  return make


def members(make, n: int, seed: int = 3) -> list[Any]:
  """The ``n`` members of ``make(n, seed)`` as plain adapter trees (the same values)."""
  import lora_jax

  got = lora_jax.unstack(make(n, seed))
  return [got[f"a{j}"] for j in range(n)]


class Driver:
  """Greedy generation for one variant: ``run(params, adapters, ids, prompts, mask)`` ->
  ``(tokens (B, new), s_prefill, s_decode)``; ``adapters`` / ``ids`` are ``None`` where unused.

  ``prefill`` (jitted): the prompts into an empty cache of ``prompt + new - 1`` slots (the last
  token is never fed), the first token; ``decode`` (jitted, the cache donated): ``new - 1``
  steps in one ``lax.scan``. ``how``: ``plain`` (``model.apply``), ``factored``
  (``lora_jax.wrap(model.apply)``), ``mixed`` (``wrap(..., in_axes=0, out_axes=0,
  bank_mode=...)`` with ``adapter_ids``)."""

  def __init__(self, model, config, batch: int, shape: dc.DecodeShape, how: str, bank_mode: str = "auto"):
    import jax
    import jax.numpy as jnp

    import lora_jax
    from lora_jax.models import llama

    if how == "plain":
      fwd = lambda p, ad, ids, *a, **k: model.apply(p, *a, **k)  # noqa: E731
    elif how == "factored":
      wrapped = lora_jax.wrap(model.apply, fallback="error")
      fwd = lambda p, ad, ids, *a, **k: wrapped(p, ad, *a, **k)  # noqa: E731
    elif how == "mixed":
      wrapped = lora_jax.wrap(model.apply, fallback="error", in_axes=0, out_axes=0, bank_mode=bank_mode)
      fwd = lambda p, ad, ids, *a, **k: wrapped(p, ad, *a, adapter_ids=ids, **k)  # noqa: E731
    else:
      raise ValueError(how)
    new, slots = shape.new, shape.prompt + shape.new - 1

    def extend(params, adapters, ids, tokens, cache, mask):
      logits, cache = fwd(params, adapters, ids, tokens, cache, mask, method="extend", last_only=True)
      return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    def prefill(params, adapters, ids, prompts, mask):
      return extend(params, adapters, ids, prompts, llama.init_cache(config, batch, slots, config.dtype), mask)

    def decode(params, adapters, ids, token, cache):
      ones = jnp.ones((batch, 1), bool)

      def body(carry, _):
        tok, cache = carry
        nxt, cache = extend(params, adapters, ids, tok[:, None], cache, ones)
        return (nxt, cache), nxt

      (_, cache), toks = jax.lax.scan(body, (token, cache), None, length=new - 1)
      return toks.T, cache  # the cache returned, so that the donated one is updated in place

    self.prefill = jax.jit(prefill)
    self.decode = jax.jit(decode, donate_argnums=4)

  def run(self, params, adapters, ids, prompts, mask):
    import jax
    import numpy as np

    t0 = time.perf_counter()
    tok, cache = jax.block_until_ready(self.prefill(params, adapters, ids, prompts, mask))
    t1 = time.perf_counter()
    rest, _ = jax.block_until_ready(self.decode(params, adapters, ids, tok, cache))
    t2 = time.perf_counter()
    return np.concatenate([np.asarray(tok)[:, None], np.asarray(rest)], axis=1), t1 - t0, t2 - t1


class LibDriver:
  """The same through the library's ``lora_jax.models.generation.generate`` (greedy, no EOS):
  ``s_prefill`` is a call with ``max_new_tokens=1``, ``s_decode`` the full call's time minus it
  (as ``peft_decode.py`` splits ``model.generate``); the bank mode is the library's (auto)."""

  def __init__(self, model, shape: dc.DecodeShape):
    from lora_jax.models import generation  # ImportError: the row records it

    self.model, self.new, self.generate = model, shape.new, generation.generate

  def run(self, params, adapters, ids, prompts, mask):
    import jax
    import numpy as np

    gen = lambda n: self.generate(self.model, params, prompts, mask, n, adapters=adapters, adapter_ids=ids).tokens  # noqa: E731
    t0 = time.perf_counter()
    jax.block_until_ready(gen(1))
    t1 = time.perf_counter()
    out = jax.block_until_ready(gen(self.new))
    t2 = time.perf_counter()
    return np.asarray(out), t1 - t0, (t2 - t1) - (t1 - t0)


class CompileCounter:
  """Counts traces, lowerings and backend compiles (``jax.monitoring`` events) while on."""

  EVENTS = {
      "/jax/core/compile/jaxpr_trace_duration": "traces",
      "/jax/core/compile/jaxpr_to_mlir_module_duration": "lowerings",
      "/jax/core/compile/backend_compile_duration": "compiles",
  }
  _instance = None

  def __init__(self):
    import jax

    self.on = False
    self.counts = dict.fromkeys(self.EVENTS.values(), 0)
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  @classmethod
  def get(cls) -> "CompileCounter":
    if cls._instance is None:  # listeners cannot be removed: one per process
      cls._instance = cls()
    return cls._instance

  def _listen(self, event: str, duration: float, **_: Any) -> None:
    if self.on and event in self.EVENTS:
      self.counts[self.EVENTS[event]] += 1

  def start(self) -> None:
    self.counts = dict.fromkeys(self.EVENTS.values(), 0)
    self.on = True

  def stop(self) -> dict[str, int]:
    self.on = False
    return dict(self.counts)


# ----------------------------------------------------------------------------------------------
# One variant
# ----------------------------------------------------------------------------------------------


def _time(run, shape: dc.DecodeShape, cap_s: float):
  """``run()`` -> ``(tokens, s_prefill, s_decode)``: ``shape.warmup`` untimed calls (the first
  compiles), then up to ``shape.iters`` timed ones within ``cap_s`` (at least one)."""
  t0 = time.perf_counter()
  out = run()
  first = time.perf_counter() - t0
  for _ in range(shape.warmup - 1):
    out = run()
  totals, prefills = [], []
  t_end = time.perf_counter() + cap_s
  while len(totals) < shape.iters and (not totals or time.perf_counter() < t_end):
    out = run()
    prefills.append(out[1])
    totals.append(out[1] + out[2])
  return first, totals, prefills, out[0]


def _hot_swap(row, driver, params, bank, ids, prompts, mask, make, tokens_before) -> None:
  """Replaces member ``a1`` of the live bank (new weights, same shapes), calls again and records
  the swap's time, the compiles it caused and which rows' tokens changed."""
  import jax
  import numpy as np

  import lora_jax

  names = lora_jax.bank_names(bank)
  k = 1 % len(names)
  name = names[k]
  (new1,), (new2,) = members(make, 1, seed=101), members(make, 1, seed=102)
  eager = []
  for _ in range(3):
    t0 = time.perf_counter()
    swapped = jax.block_until_ready(lora_jax.replace_adapter(bank, name, new1))
    eager.append(time.perf_counter() - t0)
    del swapped
  row["swap_ms"] = round(common.median(eager) * 1e3, 3)
  row["swapped_member"] = name
  swap = jax.jit(lambda b, a: lora_jax.replace_adapter(b, name, a), donate_argnums=0)
  live = jax.block_until_ready(swap(bank, new1))  # compiles the swap; the old bank is donated
  counter = CompileCounter.get()
  counter.start()  # a positive control: a new function must show up as a trace and a lowering
  jax.block_until_ready(jax.jit(lambda x: x * 3 + len(names))(np.zeros(3, np.float32)))
  control = counter.stop()
  row["compile_counter_control"] = control
  counter.start()
  t0 = time.perf_counter()
  live = jax.block_until_ready(swap(live, new2))
  row["swap_jit_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
  after, _, _ = driver.run(params, live, ids, prompts, mask)
  counts = counter.stop()
  if not (control["traces"] and control["lowerings"]):  # the events were renamed: the counts mean nothing
    counts = dict.fromkeys(counts)
    row["compile_counter_error"] = f"jax.monitoring gave no trace / lowering events for a new function: {control}"
  row.update({f"{what}_after_swap": v for what, v in counts.items()})
  mine = np.asarray(ids) == k
  changed = np.any(after != tokens_before, axis=1)
  row["swapped_rows_changed"] = round(float(changed[mine].mean()), 4) if mine.any() else None
  row["other_rows_equal"] = bool(np.array_equal(after[~mine], tokens_before[~mine]))
  row["peak_after_swap_gib"] = _gib(common.jax_peak_bytes())


def _gib(x: int | None) -> float | None:
  return None if x is None else round(x / 2**30, 3)


_MODEL_CACHE: dict[Any, Any] = {}


def measure(key: str, cfg: common.BenchConfig, shape: dc.DecodeShape, args: Any) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import lora_jax

  impl, case, mode = dc.parse_key(key)
  row: dict[str, Any] = dict(impl=impl, case=case, mode=mode or None)
  try:
    row.update(dc.case_fields(case, shape))
    if impl != "lora_jax":
      raise ValueError(f"{key}: expected impl 'lora_jax'")
    flags = set(mode.split("+")) - {""}
    mixed, lib, bf16 = case.startswith("mixed"), "lib" in flags, "bf16" in flags
    bank_mode = flags & set(BANK_MODES)
    if flags - {*BANK_MODES, "lib", "bf16"} or len(bank_mode) > 1 or (bank_mode and (lib or not mixed)):
      raise ValueError(f"{key}: mode {mode!r}: a bank mode ({'/'.join(BANK_MODES)}, mixed cases) or lib, "
                       "optionally +bf16")
    if mixed and not (bank_mode or lib):
      raise ValueError(f"{key}: a mixed case needs @<bank mode> (one of {BANK_MODES}) or @lib")
    bank_mode = next(iter(bank_mode), "auto")
    row["driver"] = "lora_jax.models.generation.generate" if lib else "benchmark (extend: jitted prefill + lax.scan decode)"
    row["bank_mode"] = bank_mode if mixed else None
    row["scan_unroll"] = int(os.environ.get("DECODE_SCAN_UNROLL", "1"))
    row["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    t0 = time.perf_counter()
    if cfg.name not in _MODEL_CACHE:  # in-process runs share the model
      _MODEL_CACHE.clear()
      _MODEL_CACHE[cfg.name] = build_model(cfg, shape)
    config, model, params = _MODEL_CACHE[cfg.name]
    make = bank_maker(params, config, shape.rank, jnp.bfloat16 if bf16 else None)
    prompts = jax.random.randint(jax.random.key(1), (shape.batch, shape.prompt), 3, cfg.vocab, dtype=jnp.int32)
    mask = jnp.ones((shape.batch, shape.prompt), bool)
    n, b = row["adapters"], row["rows_per_call"]
    ids, p, adapters = None, params, None
    how = "plain"
    if case == "merged":
      p = jax.jit(lora_jax.merge)(params, members(make, 1)[0])
    elif case == "factored":
      how, adapters = "factored", members(make, 1)[0]
    elif mixed:
      how, adapters = "mixed", make(n)
      ids = jnp.asarray(dc.adapter_ids(shape.batch, n), jnp.int32)
    elif case.startswith("loop"):  # the same members as mixed<C>'s bank
      how, adapters = "factored", members(make, n)
    driver = LibDriver(model, shape) if lib else Driver(model, config, b, shape, how, bank_mode=bank_mode)
    jax.block_until_ready((p, adapters, prompts))
    row["setup_s"] = round(time.perf_counter() - t0, 2)
    row["peak_setup_gib"] = _gib(common.jax_peak_bytes())
    row["live_gib"] = _gib(common.jax_bytes_in_use())
    if adapters is not None:
      leaves = jax.tree.leaves(adapters)
      row["adapter_bytes"] = int(sum(x.nbytes for x in leaves))
      row["adapter_dtype"] = str(leaves[0].dtype)

    if case.startswith("loop"):
      rows_of = [np.arange(j, shape.batch, n) for j in range(n)]
      sub = [(prompts[rj], mask[rj]) for rj in rows_of]

      def run():
        toks = np.zeros((shape.batch, shape.new), np.int32)
        s_pre = s_dec = 0.0
        for j, (pr, mk) in enumerate(sub):
          t, s1, s2 = driver.run(p, adapters[j], None, pr, mk)
          toks[rows_of[j]] = t
          s_pre, s_dec = s_pre + s1, s_dec + s2
        return toks, s_pre, s_dec
    else:
      run = lambda: driver.run(p, adapters, ids, prompts, mask)  # noqa: E731

    first, totals, prefills, tokens = _time(run, shape, args.variant_s)
    row["first_call_s"] = round(first, 2)
    row.update(dc.decode_record(shape, totals, prefills, common.jax_peak_bytes()))
    row["_tokens"] = tokens.tolist()
    if args.xla_plan and not lib:  # XLA's plan of the decode (arguments: params, bank, cache; temporaries)
      row.update(_decode_plan(driver, p, adapters[0] if case.startswith("loop") else adapters, ids, prompts[:b], mask[:b]))
    if mixed:
      _hot_swap(row, driver, p, adapters, ids, prompts, mask, make, tokens)
  except Exception as e:  # noqa: BLE001
    row.update(common.error_record(e))
  return row


def _decode_plan(driver, p, adapters, ids, prompts, mask) -> dict[str, Any]:
  """XLA's memory plan of the decode (compiles it once more, ahead of time)."""
  import jax
  import jax.numpy as jnp

  try:
    tok = jax.ShapeDtypeStruct((prompts.shape[0],), jnp.int32)
    cache = jax.eval_shape(driver.prefill, p, adapters, ids, prompts, mask)[1]
    plan = common.jax_memory_analysis(driver.decode.lower(p, adapters, ids, tok, cache).compile()) or {}
    return dict(xla_decode_temp_gib=_gib(plan.get("temp_size")), xla_decode_total_gib=_gib(plan.get("total")))
  except Exception as e:  # noqa: BLE001 - the plan is informational
    return dict(xla_plan_error=f"{type(e).__name__}: {str(e)[:200]}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  dc.add_decode_args(p)
  p.add_argument("--xla-plan", action="store_true",
                 help="also record XLA's memory plan of each decode (compiles it a second time)")
  common.add_runner_args(p, timeout_s=180)
  args = p.parse_args(argv)
  cfg, shape = dc.shape_from_args(args)
  args.variant_s = 20.0 if args.variant_s is None else args.variant_s

  if args.worker:
    row = measure(args.worker, cfg, shape, args)
    common.write_json(args.result_file, row)
    return row

  t_start = time.perf_counter()
  env = common.env_info("jax")
  out = args.out or common.default_out("decode", cfg)
  keys = dc.select(args.variants.split(",") if args.variants else plan(shape.adapters, shape.loop), args.only)
  inprocess = args.inprocess or (cfg.name.startswith("cpu") and not args.isolate)
  rows: list[dict[str, Any]] = []
  if args.append and os.path.exists(out):
    with open(out) as f:
      rows = json.load(f).get("rows", [])
  payload = dict(benchmark="decode", env=env, config=dc.model_config(cfg) | dc.shape_config(shape) | {
      "isolated": not inprocess, "attention": "XLA einsums over the KV cache (llama extend: prefill and decode)"},
                 rows=rows)
  tokens: dict[str, Any] = {}
  for key in keys:
    if common.over_budget(args, time.perf_counter() - t_start):
      row = dict(skipped="time budget")
    elif inprocess:
      row = measure(key, cfg, shape, args)
      row["peak_scope"] = "process (in-process run: the peak of every variant so far)"
    else:
      row = common.run_worker(
          [os.path.abspath(__file__), "--worker", key, *dc.worker_argv(args, ["--xla-plan"] if args.xla_plan else [])],
          common.worker_timeout(args, time.perf_counter() - t_start),
      )
    dc.finish_row(row, key, env, shape, tokens)
    rows[:] = [r for r in rows if r.get("variant") != key] + [row]
    dc.agreement(rows, tokens)
    common.write_json(out, payload)
    print(f"  {key:28s} {dc.status(row)}", flush=True)
  return common.finish(payload, out, t_start, rows, dc.TABLE_COLS + [("swap_ms", "swap ms", ".2f"),
                                                                      ("lowerings_after_swap", "recompiles after swap", "d")])


if __name__ == "__main__":
  main()
