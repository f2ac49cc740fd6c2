"""Causal-LM LoRA fine-tuning of a Llama-style model, entirely offline.

1. A base model: a small Llama pretrained here for a few seconds on the Python standard
   library's own source (byte-level tokens, full-parameter AdamW in float32), or a local
   Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``) with
   ``--checkpoint`` (its ``tokenizer.json`` is used when present).
2. Freeze it in bfloat16 and train LoRA adapters only (optax AdamW over the adapters tree;
   the base params are an argument that is never differentiated) to adapt it to a new
   domain: the C headers that ship with Python (``Python.h`` and friends), under ``jit``, with
   a chunked cross-entropy so the ``(B, T, V)`` logits are never formed.
3. Save the adapters, merge them into plain params, check that the unchanged model given the
   merged params computes what the wrapped model computes, and sample a continuation.

With ``--quantize nf4`` (or ``int8``, or ``nf4,int8``) the run is QLoRA: after that bfloat16
run, the frozen base's linear kernels are quantized (``lora_jax.quantize``: the attention and
MLP projections; the embeddings and ``lm_head`` stay bfloat16, as with bitsandbytes) and the
same adapters are trained again from the same start on the same batches on the quantized
base, which the wrapped step dequantizes kernel by kernel inside the jit. It prints the
base's stored bytes, the eval losses and step times next to the bfloat16 base's, and checks
wrapped (quantized base, factored adapters) against the unchanged model on merged params.

Runs on CPU in one to two minutes with the defaults:

    python examples/llama_finetune.py
    python examples/llama_finetune.py --quantize nf4          # QLoRA, next to the bf16 base
    python examples/llama_finetune.py --hidden 256 --layers 6 --steps 300   # bigger
    python examples/llama_finetune.py --checkpoint ~/models/tiny-llama --seq 256
"""

from __future__ import annotations

import argparse
import functools
import glob
import math
import os
import sys
import sysconfig
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.models import llama


def read_files(pattern: str, max_bytes: int) -> bytes:
  """Up to ``max_bytes`` of the files matching ``pattern`` (recursive glob), in sorted order."""
  chunks, total = [], 0
  for path in sorted(glob.glob(pattern, recursive=True)):
    with open(path, "rb") as f:
      chunks.append(f.read())
    total += len(chunks[-1])
    if total >= max_bytes:
      break
  return b"".join(chunks)[:max_bytes]


def corpora(max_bytes: int) -> tuple[bytes, bytes, str]:
  """``(python, target, target_name)``: stdlib Python source, and C headers to adapt to."""
  paths = sysconfig.get_paths()
  python = read_files(os.path.join(paths["stdlib"], "*.py"), max_bytes)
  if not python:
    sys.exit(f"no Python sources found under {paths['stdlib']!r}")
  headers = read_files(os.path.join(paths["include"], "**", "*.h"), max_bytes)
  if len(headers) > 100_000:
    return python, headers, "CPython C headers"
  # Python built without its headers: adapt to the stdlib's packages instead.
  return python, read_files(os.path.join(paths["stdlib"], "*", "*.py"), max_bytes), "stdlib packages"


Encode = Callable[[bytes], np.ndarray]
Decode = Callable[[list[int]], str]


def make_tokenizer(checkpoint: str | None, vocab_size: int) -> tuple[Encode, Decode]:
  """``(encode, decode)``: the checkpoint's ``tokenizer.json`` if present, else raw bytes."""
  path = checkpoint and os.path.join(checkpoint, "tokenizer.json")
  if path and os.path.exists(path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    return (
        lambda data: np.asarray(tok.encode(data.decode("utf-8", "replace")).ids, np.int32),
        lambda ids: tok.decode(ids),
    )
  if vocab_size < 256:
    sys.exit(f"byte-level tokens need vocab_size >= 256, the model has {vocab_size}")
  return (
      lambda data: np.frombuffer(data, np.uint8).astype(np.int32),
      lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", "replace"),
  )


def build_config(args: argparse.Namespace, dtype: Any) -> llama.LlamaConfig:
  common = dict(dtype=dtype, param_dtype=dtype, remat=args.remat, remat_policy=args.remat_policy)
  if args.checkpoint:
    return llama.llama_config_from_hf(args.checkpoint, **common)
  return llama.LlamaConfig(
      vocab_size=256,
      hidden_size=args.hidden,
      intermediate_size=args.intermediate or int(8 * args.hidden / 3 / 32 + 1) * 32,
      num_hidden_layers=args.layers,
      num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads,
      max_position_embeddings=max(args.seq, 256),
      **common,
  )


def pretrain(config: llama.LlamaConfig, tokens: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
  """A quick full-parameter pretraining run, so that the LoRA stage starts from a real model."""
  model = llama.LlamaForCausalLM(config)
  params = jax.jit(model.init)(jax.random.key(args.seed), jnp.zeros((1, args.seq), jnp.int32))
  warmup = min(20, args.pretrain_steps // 5)
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.pretrain_lr, warmup, args.pretrain_steps)
  tx = optax.adamw(schedule, weight_decay=0.01)
  loss_fn = functools.partial(model.apply, method="loss", chunk_size=args.chunk_size)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  it = batches(tokens, args.batch, args.seq, np.random.default_rng(args.seed))
  t0 = time.perf_counter()
  for i in range(1, args.pretrain_steps + 1):
    params, opt_state, loss = step(params, opt_state, next(it))
    if i == 1 or i % args.log_every == 0 or i == args.pretrain_steps:
      print(f"  pretrain step {i:4d}  loss {float(loss):.4f}  ({time.perf_counter() - t0:.1f}s)")
  return params


def batches(tokens: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
  """Random windows of ``seq`` tokens, forever."""
  while True:
    starts = rng.integers(0, len(tokens) - seq, batch)
    yield np.stack([tokens[s : s + seq] for s in starts])


def nf4_block_size(config: llama.LlamaConfig) -> int:
  """QLoRA's 64 entries per scale, or the largest power of two below it that divides every
  linear kernel's fan-in (blocks run along fan-in, so they must tile it: this example's
  default MLP width, 352, is not a multiple of 64)."""
  fan_ins = math.gcd(config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size)
  block = 64
  while fan_ins % block:
    block //= 2
  return block


def is_quantized(x: Any) -> bool:
  return isinstance(x, lora_jax.QuantizedKernel)


def stored_bytes(params: Any) -> int:
  """Bytes the base takes as stored: packed codes and scales for a quantized kernel."""
  leaves = jax.tree.leaves(params, is_leaf=is_quantized)
  return sum(x.nbytes if is_quantized(x) else x.size * x.dtype.itemsize for x in leaves)


def describe_quantized(qparams: Any, dense: Any) -> None:
  """Prints what was quantized (its bytes and relative error), what was not, and the totals."""
  flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_quantized)[0]
  leaves = zip(flat, jax.tree.leaves(dense), jax.tree.leaves(jax.jit(lora_jax.dequantize)(qparams)))
  rows = [(jax.tree_util.keystr(k, simple=True, separator="/"), q, w, d) for (k, q), w, d in leaves if is_quantized(q)]
  width = max(len(r[0]) for r in rows)
  print(f"  {'quantized kernel':<{width}}  {'shape':>14}  {'bf16 bytes':>10}  {'stored':>9}  bits/weight  error")
  for path, q, w, d in rows:
    w32, d32 = np.asarray(w, np.float32), np.asarray(d, np.float32)
    print(
        f"  {path:<{width}}  {str(q.shape):>14}  {w.nbytes:>10,}  {q.nbytes:>9,}  "
        f"{8 * q.nbytes / w.size:>11.3f}  {np.linalg.norm(d32 - w32) / np.linalg.norm(w32):.1%}"
    )
  print("  (error: |dequantized - bf16| / |bf16|, Frobenius norms)")
  kept = [jax.tree_util.keystr(k, simple=True, separator="/") for k, q in flat if not is_quantized(q)]
  print(f"  left as they are: {', '.join(kept)}")
  before, after = stored_bytes(dense), stored_bytes(qparams)
  print(f"  base stored: {after / 2**20:.2f} MiB vs {before / 2**20:.2f} MiB dense ({after / before:.1%})")


def to_float32(params: Any) -> Any:
  """Dense leaves upcast to float32; quantized kernels kept (they dequantize to their dtype)."""
  return jax.tree.map(lambda x: x if is_quantized(x) else x.astype(jnp.float32), params, is_leaf=is_quantized)


def check_merged(model, config, base, adapters, probe, label: str) -> tuple[Any, dict[str, float]]:
  """Merged params for the unchanged model, checked against the wrapped (factored) model.

  First the identity itself, in float32 (the base upcast), where merged and wrapped must agree
  to rounding; then the deployable merge in the params dtype, whose kernels are rounded to it.
  A quantized base merges to dense kernels: the dequantized ones plus the update.
  """
  model32 = llama.LlamaForCausalLM(config.replace(dtype=jnp.float32, param_dtype=jnp.float32))
  base32 = to_float32(base)
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs for this check
    wrapped32 = jax.jit(lora_jax.wrap(model32.apply))(base32, adapters, probe)
    # The float32 reference: dequantize to float32 first, then merge there (merge(base,
    # adapters, dtype=float32) would round the sum to the kernel's bfloat16 first).
    merged32 = jax.jit(lambda b, ad: model32.apply(lora_jax.merge(lora_jax.dequantize(b, jnp.float32), ad), probe))(
        base32, adapters
    )
  scale = float(jnp.max(jnp.abs(merged32)))
  err = float(jnp.max(jnp.abs(wrapped32 - merged32)))
  print(f"{label} base, float32: merged vs wrapped logits, max |diff| {err:.1e} (max |logit| {scale:.1f})")
  if err > 1e-4 * max(scale, 1.0):
    sys.exit(f"{label}: merged and wrapped logits differ by {err:.3g} in float32 (max |logit| {scale:.3g})")

  merged = jax.jit(lora_jax.merge)(base, adapters)
  wrapped_logits = jax.jit(lora_jax.wrap(model.apply))(base, adapters, probe)
  merged_logits = jax.jit(model.apply)(merged, probe)
  diff = float(jnp.max(jnp.abs(wrapped_logits - merged_logits)))
  agree = float(jnp.mean(jnp.argmax(wrapped_logits, -1) == jnp.argmax(merged_logits, -1)))
  top = float(jnp.max(jnp.abs(wrapped_logits)))
  print(
      f"{label} base, {np.dtype(config.dtype).name}: merged vs wrapped logits, max |diff| {diff:.1e} "
      f"(max |logit| {top:.1f}), argmax agreement {agree:.1%}"
  )
  return merged, {"f32_err": err, "f32_scale": scale, "diff": diff, "max_logit": top, "argmax_agree": agree}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", help="local Hugging Face Llama directory (safetensors)")
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--intermediate", type=int, default=None, help="default: ~8/3 * hidden")
  p.add_argument("--dtype", default="bfloat16", help="params and compute dtype")
  p.add_argument("--remat", action="store_true", help="rematerialise layers (saves memory, costs time)")
  p.add_argument("--remat-policy", default=None, choices=llama.REMAT_POLICIES)
  p.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated module names")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32)
  p.add_argument(
      "--quantize", default="none",
      help="'nf4', 'int8' or 'nf4,int8': also train on the base with its linear kernels quantized (QLoRA)",
  )
  p.add_argument("--block-size", type=int, default=None, help="entries per quantization scale (default: see nf4_block_size)")
  p.add_argument("--pretrain-steps", type=int, default=120, help="base model steps (no --checkpoint)")
  p.add_argument("--pretrain-lr", type=float, default=3e-3)
  p.add_argument("--steps", type=int, default=80, help="LoRA steps")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--chunk-size", type=int, default=512, help="tokens per cross-entropy chunk")
  p.add_argument("--corpus-bytes", type=int, default=1_000_000)
  p.add_argument("--log-every", type=int, default=20)
  p.add_argument("--sample-tokens", type=int, default=80, help="sampled continuation length (0: none)")
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--out", default="/tmp/lora_jax_llama", help="where the adapters are saved")
  p.add_argument("--export-hf", action="store_true", help="also save the merged model as HF safetensors")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  formats = [] if args.quantize == "none" else args.quantize.split(",")
  if any(f not in ("nf4", "int8") for f in formats):
    p.error(f"--quantize {args.quantize}: expected none, nf4, int8 or nf4,int8")

  dtype = jnp.dtype(args.dtype)
  config = build_config(args, dtype)
  model = llama.LlamaForCausalLM(config)
  encode, decode = make_tokenizer(args.checkpoint, config.vocab_size)
  python, target, target_name = corpora(args.corpus_bytes)
  python, target = encode(python), encode(target)
  hold = len(target) // 20
  train, val = target[:-hold], target[-hold:]
  python, python_val = python[:-hold], python[-hold:]
  print(f"data: {len(python):,} tokens of stdlib Python; {len(target):,} of {target_name} to adapt to")

  if args.checkpoint:
    params = llama.load_hf_llama(args.checkpoint, config)
    print(f"base model: {args.checkpoint} ({config.num_hidden_layers} layers, width {config.hidden_size})")
  else:
    print(f"base model: pretraining {args.pretrain_steps} steps on stdlib Python (float32, all params)")
    params32 = pretrain(config.replace(dtype=jnp.float32, param_dtype=jnp.float32), python, args)
    params = jax.tree.map(lambda x: x.astype(dtype), params32)  # frozen from here on
    del params32

  targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
  spec = lora_jax.LoraSpec(targets, rank=args.rank, alpha=args.alpha, layout=llama.lora_layout(config))
  adapters0 = lora_jax.init(jax.random.key(args.seed + 1), params, spec)
  print(lora_jax.count(adapters0, params))

  # The frozen params are an argument, never differentiated: only adapters get gradients and
  # optimizer state. A quantized base is the same argument with other leaves (one more compile).
  loss_fn = lora_jax.wrap(functools.partial(model.apply, method="loss", chunk_size=args.chunk_size))
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(20, args.steps // 10 + 1), args.steps)
  tx = optax.adamw(schedule, weight_decay=0.0)

  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def step(params, adapters, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda ad: loss_fn(params, ad, tokens))(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  eval_loss = jax.jit(loss_fn)

  def held_out(tokens: np.ndarray) -> list[np.ndarray]:
    return [b for b, _ in zip(batches(tokens, args.batch, args.seq, np.random.default_rng(1234)), range(4))]

  val_batches, python_batches = held_out(val), held_out(python_val)
  probe = jnp.asarray(val_batches[0][:4])

  def evaluate(base, adapters, batches_) -> float:
    return float(np.mean([eval_loss(base, adapters, b) for b in batches_]))

  def finetune(base, label: str) -> dict[str, Any]:
    """Trains fresh adapters (the same start and batches for every base) on ``base``."""
    adapters = jax.tree.map(jnp.copy, adapters0)  # the step donates its adapters
    opt_state = tx.init(adapters)
    before = evaluate(base, adapters, val_batches), evaluate(base, adapters, python_batches)
    print(f"base model loss ({label} base): {target_name} {before[0]:.4f}, Python {before[1]:.4f}")
    print(f"LoRA: training {args.steps} steps on {target_name} ({label} frozen base, float32 adapters)")
    it = batches(train, args.batch, args.seq, np.random.default_rng(args.seed))
    t0, seen = time.perf_counter(), 0
    for i in range(1, args.steps + 1):
      adapters, opt_state, loss = step(base, adapters, opt_state, next(it))
      seen += args.batch * args.seq
      if i == 1 or i % args.log_every == 0 or i == args.steps:
        loss = float(loss)
        dt = time.perf_counter() - t0
        print(f"  LoRA step {i:4d}  loss {loss:.4f}  {seen / dt:,.0f} tok/s  ({dt:.1f}s)")
      if i == 1:
        t1 = time.perf_counter()  # step time from here on: the first step compiles
    step_s = (time.perf_counter() - t1) / max(args.steps - 1, 1)
    after = evaluate(base, adapters, val_batches), evaluate(base, adapters, python_batches)
    print(
        f"adapted model loss: {target_name} {before[0]:.4f} -> {after[0]:.4f}, "
        f"Python {before[1]:.4f} -> {after[1]:.4f}  ({1000 * step_s:.0f} ms/step after the first)"
    )
    return dict(adapters=adapters, before=before, after=after, step_s=step_s, stored_bytes=stored_bytes(base))

  results: dict[str, Any] = {}
  dense_label = np.dtype(dtype).name
  results[dense_label] = run = finetune(params, dense_label)
  where = lora_jax.save(
      os.path.join(args.out, "adapters"), run["adapters"], spec, {"steps": args.steps}, params=params
  )
  print(f"saved adapters to {where}")
  merged, run["merge"] = check_merged(model, config, params, run["adapters"], probe, dense_label)

  for fmt in formats:
    # QLoRA: the frozen base's linear kernels stored quantized. "all-linear" whatever the LoRA
    # targets: every attention and MLP projection; not the embedding nor lm_head.
    block = args.block_size if args.block_size or fmt != "nf4" else nf4_block_size(config)
    qparams = lora_jax.quantize(params, "all-linear", model.apply, probe, format=fmt, block_size=block)
    print(f"{fmt}: quantized the frozen base's linear kernels ({fmt}, block_size={block or 'fan-in'})")
    describe_quantized(qparams, params)
    results[fmt] = run = finetune(qparams, fmt)
    # Adapters trained on a quantized base are plain LoRA adapters, saved as any others.
    where = lora_jax.save(
        os.path.join(args.out, f"adapters_{fmt}"), run["adapters"], spec,
        {"steps": args.steps, "base": f"{fmt}-quantized"}, params=qparams,
    )
    print(f"saved adapters to {where}")
    merged, run["merge"] = check_merged(model, config, qparams, run["adapters"], probe, fmt)

  if formats:
    print(f"\n{'frozen base':<12} {'stored':>9} {'base loss':>9} {'adapted':>8} {'Python':>7} {'ms/step':>8}")
    for label, r in results.items():
      print(
          f"{label:<12} {r['stored_bytes'] / 2**20:>5.2f} MiB {r['before'][0]:>9.4f} {r['after'][0]:>8.4f} "
          f"{r['after'][1]:>7.4f} {1000 * r['step_s']:>8.0f}"
      )
    print(f"(eval loss on held-out {target_name}; Python: held-out stdlib source; same seed and batches)")

  if args.export_hf:
    out = llama.save_hf_llama(merged, config, os.path.join(args.out, "merged_hf"))
    print(f"saved the merged model in Hugging Face format to {out}")

  if args.sample_tokens:
    prompt = encode(b"#define Py" if target_name.startswith("CPython") else b"def ")
    n = min(len(prompt) + args.sample_tokens, args.seq)
    buf = jnp.zeros((1, n), jnp.int32).at[0, : len(prompt)].set(prompt)

    @jax.jit
    def next_token(buf, pos, key):  # no KV cache: a fixed-length buffer, one compile
      logits = jax.lax.dynamic_index_in_dim(model.apply(merged, buf)[0], pos - 1, keepdims=False)
      return jax.random.categorical(key, logits / args.temperature)

    keys = jax.random.split(jax.random.key(args.seed), n)
    for pos in range(len(prompt), n):
      buf = buf.at[0, pos].set(next_token(buf, pos, keys[pos]))
    print(f"sample (temperature {args.temperature}):\n" + decode([int(t) for t in buf[0]]))
  return results


if __name__ == "__main__":
  main()
