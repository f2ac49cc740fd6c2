"""The PyTorch reference: transformers + PEFT LoRA on the same Llama shapes, batch and GPU.

``transformers.LlamaForCausalLM`` built from a config (random weights, bf16, SDPA attention),
wrapped with ``peft.get_peft_model`` (r=16, alpha=32, dropout 0; ``all-linear`` or q_proj and
v_proj), or trained in full; eager or ``torch.compile`` (the model; the optimizer step stays
eager); ``torch.optim.AdamW`` (fused on CUDA) over the trainable parameters. Each variant runs
in its own subprocess; peak memory is ``torch.cuda.max_memory_allocated()`` over the process.

DoRA (key ``dora/...``): the same with ``LoraConfig(use_dora=True)`` (PEFT computes the column
norm ``||W + s*B@A||`` densely at every forward; the magnitude vectors train). Its model FLOPs
are counted as lora_jax's DoRA rows count them (``common.train_flops(kind="dora")``).

QLoRA (key ``qlora/...``): the same random bf16 model with every linear layer but ``lm_head``
replaced by ``bitsandbytes.nn.Linear4bit`` as ``from_pretrained(..., quantization_config=
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.bfloat16))`` builds it (:func:`quantize_bnb_4bit`:
every ``nn.Linear`` but the output layer replaced by ``Linear4bit``, each weight
quantized by ``Params4bit(...).to(device)`` as the loader's ``create_quantized_param`` does;
``model.is_loaded_in_4bit`` set, so that PEFT puts its ``lora.bnb.Linear4bit`` on them),
embeddings, norms and ``lm_head`` bf16 (``torch_dtype=torch.bfloat16``; no
``prepare_model_for_kbit_training``, which would upcast them to float32). The row's ``bnb``
field records what was checked: 4-bit layer count, quant type, double quant, compute dtype,
block size, ``lm_head``'s class and dtype. bitsandbytes is not a dependency: wheels in ``.whl/``
are installed by ``run_gpu.sh`` into ``$LORA_BENCH_EXTRA_SITE``, which only this kind puts on its
path. A failure (no bitsandbytes, no 4-bit kernel for the device) records an error row.

Modes (after ``@``, joined by ``+``): ``eager`` or ``compile``; ``ckpt``: gradient checkpointing
(non-reentrant, per decoder layer, as lora_jax's remat); ``amp``: the forward under
``torch.autocast("cuda", torch.bfloat16)`` (what QLoRA training with ``bf16=True`` does). Peak
memory is ``max_memory_allocated()`` from after the model and optimizer are built (the peak of
building it, e.g. the dense model a QLoRA base is quantized from, is ``peak_setup_gib``).

PEFT's defaults are kept: adapter weights are float32 (``autocast_adapter_dtype=True``), no
gradient checkpointing (unless ``ckpt``), the loss from the model's full logits (``labels=tokens``).

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
KINDS = ("lora", "dora", "qlora", "full")  # the key's first part
ADAPTED = ("lora", "dora", "qlora")
BNB_BLOCK = 64  # bitsandbytes' 4-bit block size (Params4bit's default, what load_in_4bit uses)


def _impl(kind: str) -> str:
  return f"peft_{kind}" if kind in ADAPTED else "torch_full"


def quantize_bnb_4bit(model, device: str) -> dict[str, Any]:
  """Turns ``model``'s linear layers into bitsandbytes NF4 ``Linear4bit`` in place, as
  ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4,
  double quant, compute bf16))`` would load them, and returns what it checked and the bytes."""
  import bitsandbytes as bnb
  import torch
  import transformers
  qc = transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=torch.bfloat16,
  )
  # Every nn.Linear but the output layer becomes a Linear4bit (the loader's choice: it keeps
  # lm_head dense), its weight quantized by Params4bit(...).to(device) as the loader's
  # create_quantized_param does. Written out rather than through transformers' helpers
  # (get_keys_to_not_convert / replace_with_bnb_linear), which differ between 4.x and 5.x.
  head = model.get_output_embeddings()
  keep = [n for n, m in model.named_modules() if m is head]
  for name, m in list(model.named_modules()):
    if not isinstance(m, torch.nn.Linear) or m is head:
      continue
    q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=torch.bfloat16,
                          compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
    q.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                 blocksize=BNB_BLOCK, quant_storage=torch.uint8).to(device)
    if m.bias is not None:
      q.bias = torch.nn.Parameter(m.bias.data.to(device), requires_grad=False)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, q)
    del m
  model.is_loaded_in_4bit = True
  model.config.quantization_config = qc
  if device == "cuda":
    torch.cuda.empty_cache()
  lin4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
  head = model.get_output_embeddings()
  check = dict(
      linear4bit=len(lin4), kept=keep,
      quant_type=sorted({m.weight.quant_type for m in lin4}),
      double_quant=sorted({bool(m.weight.compress_statistics) for m in lin4}),
      compute_dtype=sorted({str(m.compute_dtype) for m in lin4}),
      blocksize=sorted({int(m.weight.blocksize) for m in lin4}),
      quant_storage=sorted({str(m.weight.dtype) for m in lin4}),
      quantized=all(m.weight.bnb_quantized for m in lin4),
      lm_head=f"{type(head).__name__} {head.weight.dtype}",
  )
  want = dict(quant_type=["nf4"], double_quant=[True], compute_dtype=["torch.bfloat16"], blocksize=[BNB_BLOCK],
              quant_storage=["torch.uint8"], quantized=True, lm_head="Linear torch.bfloat16")
  bad = {k: (check[k], v) for k, v in want.items() if check[k] != v}
  if bad or not lin4 or isinstance(head, bnb.nn.Linear4bit):
    raise AssertionError(f"the bitsandbytes model is not what load_in_4bit gives: {bad or check}")

  def qbytes(m) -> int:
    qs = m.weight.quant_state
    ts = [m.weight.data, qs.absmax, qs.code, qs.offset]
    if qs.state2 is not None:
      ts += [qs.state2.absmax, qs.state2.code]
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

  lin_stored = sum(qbytes(m) for m in lin4)
  lin_dense = sum(m.in_features * m.out_features * 2 for m in lin4)
  q_ids = {id(m.weight) for m in lin4}
  other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in q_ids)
  return dict(bnb=check, base_format="bnb-nf4", base_bytes_stored=lin_stored + other, linear_bytes_stored=lin_stored,
              linear_bytes_dense=lin_dense, other_bytes=other, linear_count=len(lin4)), model


def check_bnb(cfg: common.BenchConfig, out: str) -> dict[str, Any]:
  """Whether :func:`quantize_bnb_4bit` (in place) gives what ``from_pretrained(...,
  quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, compute bf16),
  dtype=torch.bfloat16)`` gives for the same weights saved to a directory: the same module
  classes, and for each ``Linear4bit`` the same packed weight, scales (both levels), offset,
  block size, quant type, dtype and compute dtype; the other parameters bf16. CPU."""
  import tempfile

  common.extra_site()
  import bitsandbytes as bnb
  import torch
  import transformers

  t0 = time.perf_counter()
  model = build("full", "all", cfg, "cpu", False)
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16)
    ref = transformers.LlamaForCausalLM.from_pretrained(d, quantization_config=qc, dtype=torch.bfloat16, device_map="cpu")
  info, mine = quantize_bnb_4bit(model, "cpu")
  got, want = dict(mine.named_modules()), dict(ref.named_modules())
  diffs = [] if got.keys() == want.keys() else [f"modules differ: {sorted(set(got) ^ set(want))[:5]}"]
  n = 0
  for name, m in want.items():
    g = got.get(name)
    if g is None:
      continue
    if type(g) is not type(m):
      diffs.append(f"{name}: {type(g).__name__} vs {type(m).__name__}")
    elif isinstance(m, bnb.nn.Linear4bit):
      n += 1
      qa, qb = g.weight.quant_state, m.weight.quant_state
      same = (torch.equal(g.weight.data, m.weight.data) and torch.equal(qa.absmax, qb.absmax)
              and torch.equal(qa.state2.absmax, qb.state2.absmax) and torch.equal(qa.offset, qb.offset)
              and (qa.blocksize, qa.quant_type, qa.dtype, g.compute_dtype) == (qb.blocksize, qb.quant_type, qb.dtype, m.compute_dtype))
      if not same:
        diffs.append(f"{name}: quantized weight or state differs")
  dense_dtypes = sorted({str(p.dtype) for nme, p in mine.named_parameters() if "proj" not in nme})
  row = dict(linear4bit_compared=n, equal=not diffs, diffs=diffs[:10], dense_dtypes=dense_dtypes,
             reference_loaded_in_4bit=bool(getattr(ref, "is_loaded_in_4bit", False)), bnb=info["bnb"],
             wall_s=round(time.perf_counter() - t0, 2))
  payload = dict(benchmark="bnb_check", env=common.env_info("torch"), config=vars(cfg), rows=[row])
  payload["env"]["versions"]["bitsandbytes"] = common._version("bitsandbytes")
  common.write_json(out, payload)
  common.print_table([row], [("linear4bit_compared", "Linear4bit compared", "d"), ("equal", "equal", ""),
                             ("dense_dtypes", "other params", ""), ("wall_s", "s", ".1f")])
  print(f"wrote {out}")
  return payload


def build(kind: str, targets: str, cfg: common.BenchConfig, device: str, grad_ckpt: bool,
          info: dict[str, Any] | None = None):
  """The model to train; ``info`` gets what the QLoRA quantization checked and measured."""
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
  if kind == "qlora":
    q_info, model = quantize_bnb_4bit(model, device)
    if info is not None:
      info.update(q_info)
  if grad_ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
  if kind in ADAPTED:
    import peft

    lc = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS[targets], bias="none",
                         use_dora=kind == "dora")
    model = peft.get_peft_model(model, lc)
  model.train()
  return model


def measure(kind: str, targets: str, mode: str, cfg: common.BenchConfig, peak_tflops: float | None) -> dict[str, Any]:
  import torch

  adapted = kind in ADAPTED
  flags = set(mode.split("+"))
  row: dict[str, Any] = dict(impl=_impl(kind), targets=targets, mode=mode, rank=RANK if adapted else None,
                             grad_ckpt="ckpt" in flags, autocast_bf16="amp" in flags)
  try:
    if kind not in KINDS:
      raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if kind == "qlora":  # bitsandbytes from the side directory, before transformers looks for it
      common.extra_site()
      row["versions"] = {"bitsandbytes": common._version("bitsandbytes")}
      import bitsandbytes  # noqa: F401 - fail here, with its own message, when it is missing
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    model = build(kind, targets, cfg, device, grad_ckpt="ckpt" in flags, info=info)
    row.update(info)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=device == "cuda")
    fwd = torch.compile(model) if "compile" in flags else model
    g = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=device, generator=g)
    sync()
    row["setup_s"] = round(time.perf_counter() - t0, 2)
    if device == "cuda":  # the peak of training, not of building (a QLoRA base starts dense)
      row["peak_setup_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
      row["model_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
      torch.cuda.reset_peak_memory_stats()
    amp = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled="amp" in flags)
    losses = []

    def one():
      with amp:
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
    n_ad = n_trainable if kind in ("lora", "qlora") else common.lora_param_count(cfg, RANK, targets) if kind == "dora" else 0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    row.update(common.step_record(
        cfg, times, losses, flops=common.train_flops(cfg, "lora" if kind == "qlora" else kind, n_ad, rank=RANK, targets=targets),
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
  p.add_argument("--check-bnb", action="store_true",
                 help="only check quantize_bnb_4bit against from_pretrained(load_in_4bit=True) of the same "
                      "weights saved to a temporary directory (on the CPU); writes --out")
  common.add_runner_args(p, timeout_s=240)
  args = p.parse_args(argv)
  cfg = common.runner_config(args)

  if args.check_bnb:
    return check_bnb(cfg, args.out or common.default_out("bnb_check", cfg))
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
    row.setdefault("impl", _impl(kind))
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
