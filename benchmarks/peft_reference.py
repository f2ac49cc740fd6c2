"""The PyTorch reference: transformers + PEFT LoRA on the same Llama shapes, batch and GPU.

``transformers.LlamaForCausalLM`` built from a config (random weights, bf16, SDPA attention),
wrapped with ``peft.get_peft_model`` (r=16, alpha=32, dropout 0; ``all-linear`` or q_proj and
v_proj), or trained in full; eager or ``torch.compile`` (the model; the optimizer step stays
eager); ``torch.optim.AdamW`` (fused on CUDA) over the trainable parameters. Each variant runs
in its own subprocess; peak memory is ``torch.cuda.max_memory_allocated()`` over the process.

DoRA (key ``dora/...``): the same with ``LoraConfig(use_dora=True)`` (PEFT computes the column
norm ``||W + s*B@A||`` densely at every forward; the magnitude vectors train). Its model FLOPs
are counted as lora_jax's DoRA rows count them (``common.train_flops(kind="dora")``).

PEFT's defaults are kept: adapter weights are float32 (``autocast_adapter_dtype=True``), no
gradient checkpointing, the loss from the model's full logits (``labels=tokens``).

    python benchmarks/peft_reference.py --config cpu-small
    python benchmarks/peft_reference.py --config tinyllama
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

RANK, ALPHA = 16, 32
TARGETS = {"all": "all-linear", "qv": ["q_proj", "v_proj"]}
PLAN = (
    "lora/all@compile", "lora/qv@compile", "lora/all@eager", "lora/qv@eager",
    "full/all@eager", "full/all@compile", "lora/all@compile+ckpt",
)
KINDS = ("lora", "dora", "full")  # the key's first part


def build(kind: str, targets: str, cfg: common.BenchConfig, device: str, grad_ckpt: bool):
  import torch
  import transformers

  hf = transformers.LlamaConfig(
      vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.mlp,
      num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
      max_position_embeddings=max(cfg.seq, 2048), rms_norm_eps=1e-6, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False,
  )
  hf._attn_implementation = "sdpa"
  torch.manual_seed(0)
  old = torch.get_default_dtype()
  torch.set_default_dtype(torch.bfloat16)
  try:
    with torch.device(device):
      model = transformers.LlamaForCausalLM(hf)
  finally:
    torch.set_default_dtype(old)
  model = model.to(device=device, dtype=torch.bfloat16)
  if grad_ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
  if kind in ("lora", "dora"):
    import peft

    lc = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS[targets], bias="none",
                         use_dora=kind == "dora")
    model = peft.get_peft_model(model, lc)
  model.train()
  return model


def measure(kind: str, targets: str, mode: str, cfg: common.BenchConfig, peak_tflops: float | None) -> dict[str, Any]:
  import torch

  adapted = kind in ("lora", "dora")
  row: dict[str, Any] = dict(impl=f"peft_{kind}" if adapted else "torch_full", targets=targets, mode=mode,
                             rank=RANK if adapted else None)
  try:
    if kind not in KINDS:
      raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    model = build(kind, targets, cfg, device, grad_ckpt="ckpt" in mode)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=device == "cuda")
    fwd = torch.compile(model) if mode.startswith("compile") else model
    g = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=device, generator=g)
    sync()
    row["setup_s"] = round(time.perf_counter() - t0, 2)
    losses = []

    def one():
      out = fwd(input_ids=tokens, labels=tokens)
      out.loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
      losses.append(out.loss.detach())
      return None

    t0 = time.perf_counter()
    one()
    sync()
    row["first_step_s"] = round(time.perf_counter() - t0, 2)  # includes torch.compile
    times = common.time_calls(one, lambda _: sync(), cfg.warmup, cfg.iters)
    # DoRA: a, b only (the magnitudes are elementwise), plus the column norm (common.train_flops).
    n_ad = n_trainable if kind == "lora" else common.lora_param_count(cfg, RANK, targets) if kind == "dora" else 0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    row.update(common.step_record(
        cfg, times, losses, flops=common.train_flops(cfg, kind, n_ad, rank=RANK, targets=targets),
        peak_bytes=peak, peak_tflops=peak_tflops, trainable=n_trainable))
  except Exception as e:  # noqa: BLE001
    row.update(common.error_record(e))
  return row


def _parse(key: str) -> tuple[str, str, str]:
  rest, mode = key.split("@")
  kind, targets = rest.split("/")
  return kind, targets, mode


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="cpu-small", choices=sorted(common.CONFIGS))
  p.add_argument("--out", default=None)
  p.add_argument("--variants", default=None, help=f"comma-separated keys (default: {','.join(PLAN)})")
  p.add_argument("--append", action="store_true", help="keep the rows already in --out (re-run keys replace theirs)")
  common.add_runner_args(p, timeout_s=240)
  args = p.parse_args(argv)
  cfg = common.runner_config(args)

  if args.worker:
    row = measure(*_parse(args.worker), cfg, args.peak_tflops)
    common.write_json(args.result_file, row)
    return row

  t_start = time.perf_counter()
  env = common.env_info("torch")
  peak_tflops = common.torch_matmul_tflops(cfg.matmul_n)
  env["matmul_peak_tflops"] = round(peak_tflops, 3)
  env["datasheet_bf16_tflops"] = common.datasheet_tflops(env["device"])
  print(f"device: {env['device']}  measured bf16 matmul peak (torch): {peak_tflops:.0f} TFLOP/s", flush=True)
  inprocess = args.inprocess or (cfg.name.startswith("cpu") and not args.isolate)
  out = args.out or common.default_out("peft_reference", cfg)
  rows: list[dict[str, Any]] = []
  if args.append and os.path.exists(out):
    with open(out) as f:
      rows = json.load(f).get("rows", [])
  payload = dict(benchmark="peft_reference", env=env, config=vars(cfg) | {"rank": RANK, "alpha": ALPHA},
                 flop_note=common.FLOP_NOTE, rows=rows)
  keys = args.variants.split(",") if args.variants else list(PLAN)
  for key in keys:
    key = key.strip()
    if common.over_budget(args, time.perf_counter() - t_start):
      row = dict(skipped="time budget")
    elif inprocess:
      row = measure(*_parse(key), cfg, peak_tflops)
    else:
      row = common.run_worker(
          [os.path.abspath(__file__), "--config", cfg.name, "--worker", key, "--peak-tflops", str(peak_tflops),
           "--warmup", str(cfg.warmup), "--iters", str(cfg.iters)],
          common.worker_timeout(args, time.perf_counter() - t_start),
      )
    kind, targets, mode = _parse(key)  # a skipped variant, or a worker that died, wrote none of these
    row.setdefault("impl", f"peft_{kind}" if kind in ("lora", "dora") else "torch_full")
    row.setdefault("targets", targets)
    row.setdefault("mode", mode)
    row["variant"] = key
    row["run_utc"] = env["date_utc"]
    row["run_id"] = env.get("run_id")
    rows[:] = [r for r in rows if r.get("variant") != key] + [row]
    common.write_json(out, payload)
    status = row.get("error") or row.get("skipped") or f"{row['step_ms']:.1f} ms  {row['tokens_per_s']:,.0f} tok/s  peak {common.fmt(row.get('peak_gib'), '.2f')} GiB"
    print(f"  {key:28s} {status}", flush=True)
  return common.finish(
      payload, out, t_start, rows,
      [("variant", "variant", ""), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"),
       ("mfu", "MFU", ".1%"), ("peak_gib", "peak GiB", ".2f"), ("first_step_s", "1st step s", ".1f"),
       ("trainable_params", "trainable", ",d"), ("error", "error", "")],
  )


if __name__ == "__main__":
  main()
