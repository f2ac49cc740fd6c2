"""The PyTorch reference of ``decode.py``: batched greedy decoding with PEFT LoRA adapters.

``transformers.LlamaForCausalLM`` built from a config (random weights, bf16, SDPA attention
unless the mode says ``eagerattn``) at the same shapes as ``decode.py``'s Llama, then:

- ``peft/base``: the bare model (no PEFT);
- ``peft/factored``: one adapter (``peft.get_peft_model``, all-linear, r=16, alpha=32, ``lora_B``
  drawn at random so that the adapter changes the output), unmerged;
- ``peft/merged``: the same adapter merged (``merge_and_unload()``);
- ``peft/mixed<N>``: ``N`` adapters (``add_adapter``), row ``i`` of the batch using adapter
  ``i % N`` through ``model.generate(..., adapter_names=[...])`` (PEFT's mixed-batch forward: one
  sub-batch per distinct adapter in every adapted layer); ``adapters_used`` counts the distinct
  adapters the batch actually uses (``min(N, batch)``);
- ``peft/loop<C>x<R>``: ``C`` sequential ``generate`` calls of ``R`` requests each, one adapter per
  call (``set_adapter``; call ``j`` holds the rows ``i`` with ``i % C == j``, the rows that
  ``mixed<C>`` gives adapter ``j``).

Modes (after ``@``, joined by ``+``): ``eager`` (the dynamic KV cache, no compile); ``static``
(``cache_implementation="static"``, ``disable_compile=True``); ``compile`` (the static cache and
transformers' own compile of the decode step: ``generate`` compiles the forward with
``torch.compile(mode="reduce-overhead")`` on CUDA when the cache is static; ``compiled_forward``
records whether it did); ``eagerattn``: ``attn_implementation="eager"`` instead of SDPA;
``bf16ad``: bf16 adapter weights (``autocast_adapter_dtype=False``; PEFT's default keeps them in
float32 and runs the LoRA matmuls in float32). A variant that fails (e.g. ``adapter_names``
under compile) records its error, not numbers.

Every call is ``model.generate(input_ids, attention_mask, max_new_tokens=new,
min_new_tokens=new, do_sample=False)`` on random prompts of ``prompt`` tokens (no padding), so
exactly ``new`` tokens are generated per row. Timing: ``total_ms`` is the median wall time of the
whole call (ended by ``torch.cuda.synchronize``), ``prefill_ms`` the median of the same call with
``max_new_tokens=1`` (the prompt's forward and the first token), ``step_ms`` =
``(total_ms - prefill_ms) / (new - 1)`` (one decode step of the whole batch), ``tokens_per_s`` =
``batch * new / total``. ``peak_gib`` is ``torch.cuda.max_memory_allocated()`` after a reset
once the model and its adapters are built (so it counts them; ``model_gib`` is what they hold).
Each variant runs in its own process on the GPU.

    python benchmarks/peft_decode.py --config cpu-small
    python benchmarks/peft_decode.py --config tinyllama --out /tmp/peft_decode_tinyllama.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks import decode_common as dc  # noqa: E402

MODES = ("eager", "static", "compile", "eagerattn", "bf16ad")


def plan(adapters: list[int], loop: tuple[int, int]) -> list[str]:
  """The default variant keys, most wanted first (a time budget cuts the tail)."""
  c, r = loop
  cases = ["factored", "merged", *[f"mixed{n}" for n in adapters], f"loop{c}x{r}"]
  return ([f"peft/{k}@eager" for k in cases] + [f"peft/{k}@compile" for k in ["factored", "merged", *[f"mixed{n}" for n in adapters]]]
          + ["peft/base@eager", "peft/base@compile"])


def build_model(cfg: common.BenchConfig, device: str, attn: str):
  """The random bf16 Hugging Face Llama of ``cfg``'s shapes, in eval mode."""
  from benchmarks import peft_reference

  model = peft_reference.build("full", "all", cfg, device, False)
  if attn != "sdpa":
    if hasattr(model, "set_attn_implementation"):  # transformers 5
      model.set_attn_implementation(attn)
    else:
      model.config._attn_implementation = attn
  model.eval()
  model.generation_config.pad_token_id = 0
  return model


def add_adapters(model, n: int, rank: int, seed: int = 0, autocast: bool = True):
  """``model`` with ``n`` LoRA adapters ``a0 .. a{n-1}`` (all-linear), each ``lora_B`` drawn at
  random (``0.02 * N(0, 1)``, as ``decode.py`` draws ``b``): a non-zero update. ``autocast``:
  PEFT's ``autocast_adapter_dtype`` (float32 adapters on a bf16 base)."""
  import peft
  import torch

  lc = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", bias="none")
  kw = {} if autocast else dict(autocast_adapter_dtype=False)
  model = peft.get_peft_model(model, lc, adapter_name="a0", **kw)
  for k in range(1, n):
    model.add_adapter(f"a{k}", lc, **kw)
  g = torch.Generator(device=model.device).manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".lora_B." in name:
        p.copy_(0.02 * torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype))
  model.eval()
  return model


def measure(key: str, cfg: common.BenchConfig, shape: dc.DecodeShape, args: Any) -> dict[str, Any]:
  import torch

  impl, case, mode = dc.parse_key(key)
  flags = set(mode.split("+"))
  row: dict[str, Any] = dict(impl="peft", case=case, mode=mode, **dc.case_fields(case, shape))
  try:
    if impl != "peft":
      raise ValueError(f"{key}: expected impl 'peft'")
    if not flags <= set(MODES) or len(flags & {"eager", "static", "compile"}) != 1:
      raise ValueError(f"{key}: mode {mode!r}: one of eager / static / compile, optionally +eagerattn, +bf16ad")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    attn = "eager" if "eagerattn" in flags else "sdpa"
    static = bool(flags & {"static", "compile"})
    row.update(attention=attn, cache="static" if static else "dynamic",
               compile=("transformers auto-compile (torch.compile mode=reduce-overhead) of the decode step"
                        if "compile" in flags else None))
    t0 = time.perf_counter()
    model = build_model(cfg, device, attn)
    n_ad = row["adapters"]
    if case != "base":
      model = add_adapters(model, n_ad, shape.rank, autocast="bf16ad" not in flags)
      row["adapter_dtype"] = str(next(p.dtype for n, p in model.named_parameters() if "lora_A" in n))
      row["adapter_params_each"] = sum(p.numel() for n, p in model.named_parameters() if ".lora_A.a0." in n or ".lora_B.a0." in n)
    if case == "merged":
      model = model.merge_and_unload()
    g = torch.Generator(device=device).manual_seed(1)
    prompts = torch.randint(3, cfg.vocab, (shape.batch, shape.prompt), device=device, generator=g)
    mask = torch.ones_like(prompts)
    sync()
    row["setup_s"] = round(time.perf_counter() - t0, 2)
    if device == "cuda":
      row["peak_setup_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
      row["model_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
      torch.cuda.reset_peak_memory_stats()

    gen_kw: dict[str, Any] = dict(do_sample=False, pad_token_id=0)
    if static:
      gen_kw["cache_implementation"] = "static"
      if "compile" not in flags:
        gen_kw["disable_compile"] = True

    def call(rows: list[int], new: int, names: list[str] | None = None, adapter: str | None = None):
      if adapter is not None:
        model.set_adapter(adapter)
      kw = dict(gen_kw)
      if names is not None:
        kw["adapter_names"] = names
      with torch.inference_mode():
        out = model.generate(input_ids=prompts[rows], attention_mask=mask[rows], max_new_tokens=new,
                             min_new_tokens=new, **kw)
      return out[:, shape.prompt:]

    everyone = list(range(shape.batch))
    if case.startswith("mixed"):
      names = [f"a{i}" for i in dc.adapter_ids(shape.batch, n_ad)]
      calls = [(everyone, names, None)]
    elif case.startswith("loop"):
      c = row["calls"]
      calls = [([i for i in everyone if i % c == j], None, f"a{j}") for j in range(c)]
    else:
      calls = [(everyone, None, "a0" if case == "factored" else None)]

    def run(new: int):
      outs = [call(rows, new, names, ad) for rows, names, ad in calls]
      sync()
      return outs

    def timed(new: int, cap_s: float) -> tuple[float, list[float], Any]:
      # Warm-up: cuBLAS, the static cache, torch.compile (twice: the compile, then the CUDA graph
      # recording of mode="reduce-overhead"). Without compile two new tokens exercise every
      # kernel: a full warm-up of a slow eager variant (PEFT mixed) would cost a whole call.
      warm = max(2, shape.warmup) if "compile" in flags else shape.warmup
      t0 = time.perf_counter()
      out = run(new if "compile" in flags else min(new, 2))
      first = time.perf_counter() - t0
      for _ in range(warm - 1):
        run(new if "compile" in flags else min(new, 2))
      times = []
      t_end = time.perf_counter() + cap_s
      while len(times) < shape.iters and (not times or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        out = run(new)
        times.append(time.perf_counter() - t0)
      return first, times, out

    first, totals, outs = timed(shape.new, args.variant_s)
    row["first_call_s"] = round(first, 2)
    row["first_call_new_tokens"] = shape.new if "compile" in flags else min(shape.new, 2)
    tokens = torch.zeros((shape.batch, shape.new), dtype=torch.long)
    for (rows, _, _), out in zip(calls, outs):
      if out.shape[1] != shape.new:
        raise AssertionError(f"generated {out.shape[1]} tokens, expected {shape.new}")
      tokens[rows] = out.cpu()
    # Whether transformers did compile the decode step (it skips it off CUDA, or when its criteria fail).
    row["compiled_forward"] = any(getattr(m, "_compiled_call", None) is not None for m in model.modules())
    _, prefills, _ = timed(1, args.variant_s / 4)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    row.update(dc.decode_record(shape, totals, prefills, peak))
    row["_tokens"] = tokens.tolist()
  except Exception as e:  # noqa: BLE001
    row.update(common.error_record(e))
  return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  dc.add_decode_args(p)
  common.add_runner_args(p, timeout_s=300)
  args = p.parse_args(argv)
  cfg, shape = dc.shape_from_args(args)
  args.variant_s = 45.0 if args.variant_s is None else args.variant_s

  if args.worker:
    row = measure(args.worker, cfg, shape, args)
    common.write_json(args.result_file, row)
    return row

  t_start = time.perf_counter()
  env = common.env_info("torch")
  out = args.out or common.default_out("peft_decode", cfg)
  keys = dc.select(args.variants.split(",") if args.variants else plan(shape.adapters, shape.loop), args.only)
  inprocess = args.inprocess or (cfg.name.startswith("cpu") and not args.isolate)
  rows: list[dict[str, Any]] = []
  if args.append and os.path.exists(out):
    with open(out) as f:
      rows = json.load(f).get("rows", [])
  payload = dict(benchmark="peft_decode", env=env, config=dc.model_config(cfg) | dc.shape_config(shape), rows=rows)
  tokens: dict[str, Any] = {}
  for key in keys:
    if common.over_budget(args, time.perf_counter() - t_start):
      row = dict(skipped="time budget")
    elif inprocess:
      row = measure(key, cfg, shape, args)
    else:
      row = common.run_worker(
          [os.path.abspath(__file__), "--worker", key, *dc.worker_argv(args)],
          common.worker_timeout(args, time.perf_counter() - t_start),
      )
    dc.finish_row(row, key, env, shape, tokens)
    rows[:] = [r for r in rows if r.get("variant") != key] + [row]
    dc.agreement(rows, tokens)
    common.write_json(out, payload)
    print(f"  {key:28s} {dc.status(row)}", flush=True)
  return common.finish(payload, out, t_start, rows, dc.TABLE_COLS)


if __name__ == "__main__":
  main()
