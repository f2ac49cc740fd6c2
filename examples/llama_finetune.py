"""Causal-LM LoRA fine-tuning of a Llama-style model on Python source, entirely offline.

1. Build a small Llama (random init, bfloat16 params) or load a local Hugging Face checkpoint
   directory (``config.json`` + ``*.safetensors``) with ``--checkpoint``.
2. Tokenise a corpus that is always available: the Python standard library's own source
   files, as bytes (vocabulary 256), or with the checkpoint's ``tokenizer.json`` if it has one.
3. Train LoRA adapters only (optax AdamW over the adapters tree; the base params are frozen
   by construction), under ``jit``, with a chunked cross-entropy so the ``(B, T, V)`` logits
   are never formed.
4. Save the adapters, merge them into plain params, check that the unchanged model with the
   merged params computes what the wrapped model computes, and sample a few bytes.

Runs on CPU in about a minute with the defaults:

    python examples/llama_finetune.py
    python examples/llama_finetune.py --steps 400 --hidden 256 --layers 6   # bigger
    python examples/llama_finetune.py --checkpoint ~/models/tiny-llama --seq 256
"""

from __future__ import annotations

import argparse
import functools
import glob
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


def stdlib_corpus(max_bytes: int) -> bytes:
  """Up to ``max_bytes`` of the standard library's top-level ``*.py`` files, in sorted order."""
  root = sysconfig.get_paths()["stdlib"]
  chunks, total = [], 0
  for path in sorted(glob.glob(os.path.join(root, "*.py"))):
    with open(path, "rb") as f:
      data = f.read()
    chunks.append(data)
    total += len(data)
    if total >= max_bytes:
      break
  if not chunks:
    sys.exit(f"no Python sources found under {root!r}")
  return b"".join(chunks)[:max_bytes]


def make_tokenizer(checkpoint: str | None, vocab_size: int) -> tuple[Callable[[bytes], np.ndarray], Callable[[list[int]], str]]:
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


def build_model(args: argparse.Namespace) -> tuple[llama.LlamaConfig, dict[str, Any]]:
  dtype = jnp.dtype(args.dtype)
  common = dict(dtype=dtype, param_dtype=dtype, remat=not args.no_remat, remat_policy=args.remat_policy)
  if args.checkpoint:
    config = llama.llama_config_from_hf(args.checkpoint, **common)
    params = llama.load_hf_llama(args.checkpoint, config)
    print(f"loaded {args.checkpoint}: {config.num_hidden_layers} layers, width {config.hidden_size}")
    return config, params
  config = llama.LlamaConfig(
      vocab_size=256,
      hidden_size=args.hidden,
      intermediate_size=args.intermediate or int(8 * args.hidden / 3 / 32 + 1) * 32,
      num_hidden_layers=args.layers,
      num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads,
      max_position_embeddings=max(args.seq, 256),
      **common,
  )
  model = llama.LlamaForCausalLM(config)
  params = jax.jit(model.init)(jax.random.key(args.seed), jnp.zeros((1, args.seq), jnp.int32))
  return config, params


def batches(tokens: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
  """Random windows of ``seq`` tokens, forever."""
  while True:
    starts = rng.integers(0, len(tokens) - seq, batch)
    yield np.stack([tokens[s : s + seq] for s in starts])


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", help="local Hugging Face Llama directory (safetensors)")
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--intermediate", type=int, default=None, help="default: ~8/3 * hidden")
  p.add_argument("--dtype", default="bfloat16", help="params and compute dtype")
  p.add_argument("--no-remat", action="store_true")
  p.add_argument("--remat-policy", default=None, choices=llama.REMAT_POLICIES)
  p.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated module names")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32)
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--chunk-size", type=int, default=512, help="tokens per cross-entropy chunk")
  p.add_argument("--corpus-bytes", type=int, default=2_000_000)
  p.add_argument("--log-every", type=int, default=25)
  p.add_argument("--sample-tokens", type=int, default=60, help="greedy continuation length (0: none)")
  p.add_argument("--out", default="/tmp/lora_jax_llama", help="where the adapters are saved")
  p.add_argument("--export-hf", action="store_true", help="also save the merged model as HF safetensors")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  config, params = build_model(args)
  model = llama.LlamaForCausalLM(config)
  encode, decode = make_tokenizer(args.checkpoint, config.vocab_size)
  data = encode(stdlib_corpus(args.corpus_bytes))
  split = int(0.95 * len(data))
  train, val = data[:split], data[split:]
  print(f"corpus: {len(data):,} tokens of Python stdlib source ({len(train):,} train / {len(val):,} held out)")

  targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
  spec = lora_jax.LoraSpec(targets, rank=args.rank, alpha=args.alpha, layout=llama.lora_layout(config))
  adapters = lora_jax.init(jax.random.key(args.seed + 1), params, spec)
  print(lora_jax.count(adapters, params))

  # The frozen params are an argument, never differentiated: only adapters get gradients and
  # optimizer state.
  loss_fn = lora_jax.wrap(functools.partial(model.apply, method="loss", chunk_size=args.chunk_size))
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(20, args.steps // 10 + 1), args.steps)
  tx = optax.adamw(schedule, weight_decay=0.0)
  opt_state = tx.init(adapters)

  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def step(params, adapters, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda ad: loss_fn(params, ad, tokens))(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  eval_loss = jax.jit(loss_fn)
  val_rng = np.random.default_rng(1234)
  val_batches = [b for b, _ in zip(batches(val, args.batch, args.seq, val_rng), range(4))]

  def evaluate(adapters) -> float:
    return float(np.mean([eval_loss(params, adapters, b) for b in val_batches]))

  print(f"held-out loss before: {evaluate(adapters):.4f} (uniform over bytes: {np.log(256):.4f})")
  it = batches(train, args.batch, args.seq, np.random.default_rng(args.seed))
  t0, seen = time.perf_counter(), 0
  for i in range(1, args.steps + 1):
    adapters, opt_state, loss = step(params, adapters, opt_state, next(it))
    seen += args.batch * args.seq
    if i == 1 or i % args.log_every == 0 or i == args.steps:
      loss = float(loss)
      dt = time.perf_counter() - t0
      print(f"step {i:4d}  loss {loss:.4f}  {seen / dt:,.0f} tok/s  ({dt:.1f}s)")
  print(f"held-out loss after:  {evaluate(adapters):.4f}")

  if hasattr(lora_jax, "save"):
    where = lora_jax.save(os.path.join(args.out, "adapters"), adapters, spec, {"steps": args.steps}, params=params)
  else:  # older lora_jax: plain safetensors of the factors
    from safetensors.numpy import save_file

    flat = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: isinstance(x, lora_jax.LoraFactors))[0]
    tensors = {}
    for path, f in flat:
      if isinstance(f, lora_jax.LoraFactors):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        tensors[f"{name}/a"], tensors[f"{name}/b"] = np.asarray(f.a), np.asarray(f.b)
    os.makedirs(args.out, exist_ok=True)
    where = os.path.join(args.out, "adapters.safetensors")
    save_file(tensors, where)
  print(f"saved adapters to {where}")

  # Merge: plain params for the unchanged model code. The merged kernels are rounded to the
  # params dtype, so in bfloat16 they agree with the wrapped model to bfloat16 precision.
  merged = jax.jit(lora_jax.merge)(params, adapters)
  probe = jnp.asarray(val_batches[0][:4])
  wrapped_logits = jax.jit(lora_jax.wrap(model.apply))(params, adapters, probe)
  merged_logits = jax.jit(model.apply)(merged, probe)
  diff = float(jnp.max(jnp.abs(wrapped_logits - merged_logits)))
  scale = float(jnp.max(jnp.abs(wrapped_logits)))
  agree = float(jnp.mean(jnp.argmax(wrapped_logits, -1) == jnp.argmax(merged_logits, -1)))
  tol = 1e-4 if config.param_dtype == jnp.float32 else 0.03
  print(f"merged vs wrapped logits: max |diff| {diff:.2e} (max |logit| {scale:.1f}), argmax agreement {agree:.1%}")
  if diff > tol * max(scale, 1.0):
    sys.exit(f"merged and wrapped logits differ by {diff:.3g}, more than {tol} * {max(scale, 1.0):.3g}")

  if args.export_hf:
    out = llama.save_hf_llama(merged, config, os.path.join(args.out, "merged_hf"))
    print(f"saved the merged model in Hugging Face format to {out}")

  if args.sample_tokens:
    prompt = encode(b"def ")
    n = min(len(prompt) + args.sample_tokens, args.seq)
    buf = jnp.zeros((1, n), jnp.int32).at[0, : len(prompt)].set(prompt)
    forward = jax.jit(model.apply)
    for pos in range(len(prompt), n):  # no KV cache: a fixed-length buffer, one compile
      nxt = jnp.argmax(forward(merged, buf)[0, pos - 1])
      buf = buf.at[0, pos].set(nxt)
    print("greedy sample:\n" + decode([int(t) for t in buf[0]]))


if __name__ == "__main__":
  main()
