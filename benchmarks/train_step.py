"""Training-step throughput and memory: lora_jax against full fine-tuning, a hand-written
factored LoRA step, qwix and jax-lorax, on a Llama at TinyLlama-1.1B shapes.

Each variant runs in its own subprocess (so that peak device memory is its own), builds the
model with random bf16 weights, compiles one AdamW step under ``jit`` (donating the trained
state), and times ``--iters`` steps after ``--warmup`` (``block_until_ready`` on each).

Variants (``impl/targets@tune``):

* ``full``: JAX full fine-tuning (gradient of every parameter).
* ``lora_jax``: ``lora_jax.wrap(model.apply)`` with ``method="loss"``, factored mode; r=16,
  alpha=32, targets ``all`` (all-linear) or ``qv`` (q_proj, v_proj).
* ``lora_jax_nogroup``: the same with ``wrap(..., group=False)`` (each adapter's ``x @ a`` alone).
* ``lora_jax_merged``: ``wrap(..., mode="merged")``: forms ``W + s*a@b`` every step.
* ``lora_jax_dora``: DoRA, ``LoraSpec(..., kind="dora")``, factored (the column norm from the
  factors once per step, the output rescaled by ``m / ||W + s*a@b||``); ``a``, ``b`` and the
  magnitude ``m`` train, the frozen ``base_norm`` leaf does not (``lora_jax.freeze_base`` over
  the adapters tree: no update, no optimizer state, no weight decay).
* ``lora_jax_dropout``: LoRA with ``LoraSpec(dropout=0.05)`` and ``lora_dropout_rng`` (a fresh
  key every step, carried in the donated state): each adapter's ``x @ a`` then reads its own
  dropped input, so the thin matmuls are not grouped.
* ``lora_jax_nf4`` / ``lora_jax_int8``: QLoRA: ``lora_jax`` (factored, all-linear adapters) on a
  quantized frozen base: every all-linear kernel a ``lora_jax.QuantizedKernel`` (NF4: blocks of
  64, double-quantized scales, as bitsandbytes' ``load_in_4bit``; int8: one scale per output
  channel), embeddings, ``lm_head`` and norms bf16; ``wrap`` dequantizes each kernel at its use
  inside the step. The base is built leaf by leaf and layer by layer on the device
  (:func:`init_params`: random bf16 layer, quantized, dropped), so the dense model never
  exists and the process peak is the quantized model's. Rows record the base's bytes
  (``base_bytes_device``: ``bytes_in_use`` after minus before building it; ``base_bytes_stored``:
  the leaves' own bytes, ``QuantizedKernel.nbytes`` for the quantized ones) and the peak before
  the step ran (``peak_setup_gib``); every lora_jax row records them, so the bf16 base's too.
* ``handwritten``: :mod:`benchmarks.handwritten`, the factored form written by hand.
* ``handwritten_grouped``: the same with ``h @ [a_q|a_k|a_v]`` and ``g @ [a_gate|a_up]`` as one
  thin GEMM each.
* ``qwix``: Google's qwix ``LoraProvider`` on the same linen model (if it imports).
* ``lorax``: jax-lorax (known to need JAX <= 0.4.35: the error is recorded).

Tunes: ``default`` (the model's defaults: remat of each layer saving nothing, full logits),
``remat+chunk`` (plus chunked cross-entropy), ``remat_dots+chunk`` (remat policy
``dots_with_no_batch_dims_saveable``), ``noremat+chunk``, ``unroll2`` / ``unroll_all`` (the
layer scan unrolled 2 layers per iteration / fully), ``unroll_all+chunk``, ``unroll2+keep_xa``
(``unroll2`` with ``lora_jax.remat_policy()``: remat keeps the thin ``x @ a`` products). The lora_jax all-linear variant is
swept over all tunes first; ``best`` is the fastest tune whose peak memory is <= 4 GiB (the
fastest overall when none fits), and the other variants run at ``default`` and/or ``best``.

    python benchmarks/train_step.py --config cpu-small          # seconds, CPU
    python benchmarks/train_step.py --config tinyllama          # GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

RANK, ALPHA = 16, 32.0
TARGETS = {
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qv": ("q_proj", "v_proj"),
}
DROPOUT = 0.05  # lora_jax_dropout
IMPLS = ("full", "lora_jax", "lora_jax_nogroup", "lora_jax_merged", "lora_jax_dora", "lora_jax_dropout", "lora_jax_nf4",
         "lora_jax_int8", "handwritten", "handwritten_grouped", "qwix", "lorax")
QUANT_IMPLS = {"lora_jax_nf4": "nf4", "lora_jax_int8": "int8"}  # impl -> lora_jax.quantize(format=)
LORA_JAX_IMPLS = ("lora_jax", "lora_jax_merged", "lora_jax_nogroup", "lora_jax_dora", "lora_jax_dropout", *QUANT_IMPLS)
# What the last build() measured about the frozen params (merged into the variant's row).
BUILD_INFO: dict[str, Any] = {}


# Tune tokens, joined by '+' (``unroll2+keep_xa+hf``); ``default`` is the model's defaults.
TUNE_TOKENS = {
    "default": {},
    "remat": dict(remat=True),
    "noremat": dict(remat=False, remat_policy=None),
    # remat saves the matmul outputs that have no batch dimension (the projections), recomputes the rest
    "remat_dots": dict(remat=True, remat_policy="dots_with_no_batch_dims_saveable"),
    # lora_jax.remat_policy(): remat saves each adapter's thin x @ a product (nothing else)
    "keep_xa": dict(remat=True, remat_policy="lora_jax.remat_policy()"),
    "chunk": dict(chunk="cfg"),
    "unroll2": dict(unroll=2),
    "unroll4": dict(unroll=4),
    "unroll_all": dict(unroll=0),
    "unscanned": dict(scan_layers=False),  # one module per layer (no layer scan, no stacked params)
    # Hugging Face's numerics: RoPE in the compute dtype, logits rounded to it before the float32 loss
    "hf": dict(rope_dtype=None, logits_dtype=None),
    # LlamaConfig(elementwise_remat=True): norms and SwiGLU save their bf16 inputs, recompute the rest
    "ewremat": dict(elementwise_remat=True),
    # XLA flags (set in the variant's own process; ignored when variants run in one process)
    "notriton": dict(xla_flags="--xla_gpu_enable_triton_gemm=false"),
}
_TUNE_DEFAULTS = dict(remat=True, remat_policy=None, chunk=None, unroll=1, scan_layers=True, rope_dtype="float32",
                      logits_dtype="float32", elementwise_remat=False, xla_flags="")


def tune_settings(name: str, cfg: common.BenchConfig) -> dict[str, Any]:
  """The settings a tune name stands for: its '+'-joined tokens (:data:`TUNE_TOKENS`) applied
  left to right over the model's defaults."""
  out = dict(_TUNE_DEFAULTS)
  for token in name.split("+"):
    if token not in TUNE_TOKENS:
      raise ValueError(f"unknown tune token {token!r} in {name!r}; expected tokens from {sorted(TUNE_TOKENS)}")
    for k, v in TUNE_TOKENS[token].items():
      out[k] = (f"{out[k]} {v}".strip() if k == "xla_flags" else cfg.chunk if v == "cfg" else v)
  return out


def tunes(cfg: common.BenchConfig) -> dict[str, dict[str, Any]]:
  """The settings of every tune in this config's sweep (recorded in the JSON)."""
  return {t: tune_settings(t, cfg) for t in sweep(cfg)}


def sweep(cfg: common.BenchConfig) -> tuple[str, ...]:
  """The lora_jax all-linear tunes measured first; ``best`` is picked among them."""
  return SWEEPS.get(cfg.name, SWEEPS["default"])


# unroll_all is left out: its compile took > 120 s on an H100 host (2026-11-23). The GPU sweeps
# start with the fastest tunes of the H200 runs of 2026-12-02 (issue 17): one module per layer
# without layer remat (no stacked residuals), the elementwise math recomputed, HF numerics.
_FAST = ("unscanned+noremat+hf+ewremat+chunk", "unroll2+keep_xa+hf", "unscanned+noremat+hf+ewremat",
         "noremat+hf+ewremat+chunk", "remat_dots+hf+ewremat+chunk", "unroll2+keep_xa", "default")
SWEEPS = {
    "default": ("default", "remat+chunk", "remat_dots+chunk", "noremat+chunk", "unroll2", "unroll2+keep_xa"),
    "tinyllama": _FAST,
    "llama7b": _FAST,
}
# the fastest full fine-tuning tune measured (cuBLAS for every GEMM: Triton's thin-GEMM wins do not apply)
FULL_FAST = "unscanned+noremat+hf+ewremat+notriton"


# ----------------------------------------------------------------------------------------------
# One variant (runs inside the worker process)
# ----------------------------------------------------------------------------------------------


def _lora_spec(targets: str, config, rank: int, **kw):
  import lora_jax
  from lora_jax.models import llama

  t = "all-linear" if targets == "all" else list(TARGETS[targets])
  return lora_jax.LoraSpec(t, rank=rank, alpha=ALPHA, layout=llama.lora_layout(config), **kw)


def _tokens(cfg: common.BenchConfig):
  import jax

  return jax.random.randint(jax.random.key(1), (cfg.batch, cfg.seq), 0, cfg.vocab, dtype="int32")


def base_bytes(model, params, x) -> dict[str, int]:
  """Bytes of the frozen params as stored (``base_bytes_stored``; a ``QuantizedKernel`` counts its
  packed arrays, ``nbytes``), of the all-linear kernels (what ``lora_jax.quantize(params,
  "all-linear", ...)`` quantizes: ``linear_bytes_stored``, quantized or dense, and
  ``linear_bytes_dense``, in the kernels' dtype) and of the rest (``other_bytes``: embeddings,
  ``lm_head``, norms)."""
  import jax

  import lora_jax

  is_q = lambda v: isinstance(v, lora_jax.QuantizedKernel)  # noqa: E731
  nbytes = lambda v: v.nbytes if is_q(v) else int(v.size * v.dtype.itemsize)  # noqa: E731
  leaves = jax.tree.leaves(params, is_leaf=is_q)
  if any(is_q(v) for v in leaves):
    linear = [is_q(v) for v in leaves]
  else:  # which dense kernels quantize would take
    shapes = jax.eval_shape(lambda p: lora_jax.quantize(p, "all-linear", model.apply, x), params)
    linear = [is_q(v) for v in jax.tree.leaves(shapes, is_leaf=is_q)]
  stored = sum(nbytes(v) for v in leaves)
  lin_stored = sum(nbytes(v) for v, m in zip(leaves, linear) if m)
  lin_dense = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v, m in zip(leaves, linear) if m)
  return dict(base_bytes_stored=stored, linear_bytes_stored=lin_stored, linear_bytes_dense=lin_dense,
              other_bytes=stored - lin_stored, qkernel_count=sum(is_q(v) for v in leaves), linear_count=sum(linear))


def _draw_layers(key, *, n: int, shape: tuple[int, ...], dtype, std: float, fmt: str | None, layout: str):
  """``n`` random layers of ``shape`` (``n = 0``: one kernel, no layer axis), each drawn and
  (``fmt``) quantized on its own under ``lax.map``: one jit per distinct shape."""
  return _draw_layers_fn()(key, n=n, shape=tuple(shape), dtype=np.dtype(dtype), std=std, fmt=fmt, layout=layout)


@functools.lru_cache(maxsize=None)
def _draw_layers_fn():
  import jax
  import jax.numpy as jnp

  from lora_jax.bases.quantized import quantize_kernel

  @functools.partial(jax.jit, static_argnames=("n", "shape", "dtype", "std", "fmt", "layout"))
  def f(key, *, n, shape, dtype, std, fmt, layout):
    def one(k):
      w = (jax.random.normal(k, shape, jnp.float32) * std).astype(dtype)
      return w if fmt is None else quantize_kernel(w, format=fmt, layout=layout)

    return jax.lax.map(one, jax.random.split(key, n)) if n else one(key)

  return f


def init_params(model, config, tokens, key, fmt: str | None = None, *, streamed: bool = True):
  """The model's params (``model.init``); with ``fmt`` (``"nf4"``, ``"int8"``) random params of
  the same shapes with all-linear kernels quantized, embeddings, ``lm_head`` and norms dense.

  The quantized tree has exactly the structure ``lora_jax.quantize(params, "all-linear",
  model.apply, x, format=fmt)`` gives (checked: same tree definition, shapes and dtypes; read
  off ``jax.eval_shape`` of that call). With ``streamed`` the dense kernels never exist: each
  targeted leaf is one jitted ``lax.map`` over its layers that draws a random bf16 layer
  (normal, ``initializer_range``) and quantizes it (``quantize_kernel``, what ``quantize`` does
  per kernel); the other leaves are drawn as ``model.init`` draws them (embeddings and
  ``lm_head`` normal, norm scales ones; not ``model.init`` itself: XLA keeps ~1.5 GB of its dead
  layer loop at TinyLlama shapes). Without ``streamed`` the same values are drawn densely, then
  ``quantize``d (the reference the smoke test compares against).
  """
  import dataclasses

  import jax
  import jax.numpy as jnp

  import lora_jax

  x = tokens[:1]
  if fmt is None:
    return jax.jit(model.init)(key, x)
  is_q = lambda v: isinstance(v, lora_jax.QuantizedKernel)  # noqa: E731
  qabs = jax.eval_shape(lambda p: lora_jax.quantize(p, "all-linear", model.apply, x, format=fmt),
                        jax.eval_shape(model.init, key, x))
  paths, treedef = jax.tree_util.tree_flatten_with_path(qabs, is_leaf=is_q)
  leaves = [v for _, v in paths]
  out: list[Any] = [None] * len(leaves)
  std = float(config.initializer_range)
  for i, (path, qa) in enumerate(paths):
    if not is_q(qa):  # embeddings and lm_head: normal(std), as model.init; norm scales: ones
      name = jax.tree_util.keystr(path)
      out[i] = (jax.jit(lambda: jnp.ones(qa.shape, qa.dtype))() if "scale" in name else
                _draw_layers(jax.random.fold_in(key, i), n=0, shape=qa.shape, dtype=qa.dtype, std=std, fmt=None, layout=""))
      continue
    stacked = len(qa.shape) == 3 and qa.layout[0] == "l" and 0 in qa.lead
    kw = dict(n=qa.shape[0] if stacked else 0, shape=qa.shape[1:] if stacked else qa.shape, dtype=np.dtype(qa.dtype),
              std=std, layout=qa.layout[1:] if stacked else qa.layout)
    k = jax.random.fold_in(key, 1000 + i)
    if not streamed:  # the dense kernel, quantized below with the rest of the tree
      out[i] = _draw_layers(k, fmt=None, **kw)
      continue
    q = _draw_layers(k, fmt=fmt, **kw)
    if stacked:
      q = dataclasses.replace(q, shape=qa.shape, axis=qa.axis, lead=qa.lead, layout=qa.layout)
    got, want = jax.tree.structure(q), jax.tree.structure(qa)
    if got != want or jax.tree.map(lambda a: (a.shape, a.dtype), jax.tree.leaves(q)) != jax.tree.map(
        lambda a: (a.shape, a.dtype), jax.tree.leaves(qa)):
      raise AssertionError(f"leaf {i}: streamed quantization gave {q!r}, lora_jax.quantize gives {qa!r}")
    out[i] = jax.block_until_ready(q)
  if not streamed:
    return lora_jax.quantize(jax.tree.unflatten(jax.tree.structure(jax.eval_shape(model.init, key, x)), out),
                             "all-linear", model.apply, x, format=fmt)
  return jax.tree.unflatten(treedef, out)


def check_quantized_init(cfg: common.BenchConfig, formats: list[str], out: str) -> dict[str, Any]:
  """Whether :func:`init_params` (layer by layer) gives exactly ``lora_jax.quantize(params,
  "all-linear", model.apply, x)`` of the same values drawn densely: tree definition (static
  fields included), dtypes and every stored array. Writes ``{format: {...}}`` to ``out``."""
  import jax

  from lora_jax.models import llama

  config = common.llama_config(cfg)
  model = llama.LlamaForCausalLM(config)
  tokens = _tokens(cfg)
  rows = []
  for fmt in formats:
    t0 = time.perf_counter()
    a = init_params(model, config, tokens, jax.random.key(0), fmt)
    b = init_params(model, config, tokens, jax.random.key(0), fmt, streamed=False)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    rows.append(dict(format=fmt, same_tree=jax.tree.structure(a) == jax.tree.structure(b), arrays=len(la),
                     equal=len(la) == len(lb) and all(x.dtype == y.dtype and bool((x == y).all()) for x, y in zip(la, lb)),
                     wall_s=round(time.perf_counter() - t0, 2)))
  payload = dict(benchmark="quantized_init", env=common.env_info("jax"), config=vars(cfg), rows=rows)
  common.write_json(out, payload)
  common.print_table(rows, [("format", "format", ""), ("same_tree", "same tree", ""), ("equal", "equal arrays", ""),
                            ("arrays", "arrays", "d"), ("wall_s", "s", ".1f")])
  print(f"wrote {out}")
  return payload


def llama_config(cfg: common.BenchConfig, tune: dict[str, Any], **overrides: Any):
  """The model config a tune's settings give (:func:`tune_settings`)."""
  kw = dict(remat=tune["remat"], remat_policy=tune["remat_policy"], scan_unroll=tune.get("unroll", 1),
            scan_layers=tune.get("scan_layers", True), rope_dtype=tune.get("rope_dtype", "float32"),
            logits_dtype=tune.get("logits_dtype", "float32"), elementwise_remat=tune.get("elementwise_remat", False))
  kw.update(overrides)
  return common.llama_config(cfg, **kw)


def build(impl: str, targets: str, tune: dict[str, Any], cfg: common.BenchConfig, rank: int = RANK):
  """Returns ``(step, frozen, state, n_trainable, kind, tokens)``:
  ``step(*frozen, *state, tokens) -> (*state', loss)``, with ``state`` donated. ``kind`` is
  ``"full"``, ``"lora"`` or ``"dora"`` (which FLOP count applies)."""
  import jax
  import optax

  from lora_jax.models import llama

  policy = tune["remat_policy"]
  if policy == "lora_jax.remat_policy()":
    import lora_jax

    policy = lora_jax.remat_policy()
  config = llama_config(cfg, tune, remat_policy=policy)
  if impl == "lorax":
    config = config.replace(scan_layers=False)  # lorax adapts 2-D kernels only
  model = llama.LlamaForCausalLM(config)
  tokens = _tokens(cfg)
  chunk = tune["chunk"]
  tx = optax.adamw(1e-4, weight_decay=0.01)
  key = jax.random.key(0)
  n_params = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))

  if impl == "qwix":
    common.extra_site()
    import qwix

    names = "|".join(TARGETS[targets])
    provider = qwix.LoraProvider(module_path=rf".*({names})", rank=rank, alpha=ALPHA)
    qmodel = qwix.apply_lora_to_model(model, provider, methods=("loss",))
    variables = jax.jit(functools.partial(qmodel.init, method="loss", chunk_size=chunk))(key, tokens[:1])
    from flax import traverse_util

    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    trainable = {k: v for k, v in flat.items() if k.endswith(("_lora_a", "_lora_b"))}
    frozen = {k: v for k, v in flat.items() if k not in trainable}

    def loss_fn(trainable, frozen, tokens):
      p = traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")
      return qmodel.apply({"params": p}, tokens, method="loss", chunk_size=chunk)

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def step(frozen, trainable, opt_state, tokens):
      loss, g = jax.value_and_grad(loss_fn)(trainable, frozen, tokens)
      updates, opt_state = tx.update(g, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, loss

    return step, [frozen], [trainable, tx.init(trainable)], n_params(trainable), "lora", tokens

  BUILD_INFO.clear()
  before = common.jax_bytes_in_use()
  fmt = QUANT_IMPLS.get(impl)
  params = jax.block_until_ready(init_params(model, config, tokens, key, fmt))
  after = common.jax_bytes_in_use()
  if impl in LORA_JAX_IMPLS:  # the frozen base's bytes (measured on the device, and as stored)
    BUILD_INFO.update(base_format=fmt or np.dtype(config.param_dtype).name,
                      base_bytes_device=None if before is None or after is None else after - before,
                      **base_bytes(model, params, tokens[:1]))
  loss_kw = dict(method="loss", chunk_size=chunk)

  if impl == "full":

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens):
      loss, g = jax.value_and_grad(lambda p: model.apply(p, tokens, **loss_kw))(params)
      updates, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    return step, [], [params, tx.init(params)], n_params(params), "full", tokens

  if impl in ("handwritten", "handwritten_grouped"):
    from benchmarks import handwritten

    if not config.scan_layers:
      raise ValueError(f"{impl}: the hand-written step scans stacked layers; 'unscanned' tunes are not supported")

    adapters = handwritten.init_adapters(jax.random.key(2), params, TARGETS[targets], rank)
    loss_fn = functools.partial(handwritten.loss, config=config, scale=ALPHA / rank, chunk_size=chunk,
                                group=impl == "handwritten_grouped")
    n_train, kind = n_params(adapters), "lora"
  elif impl in LORA_JAX_IMPLS:
    import lora_jax

    kw = dict(kind="dora") if impl == "lora_jax_dora" else dict(dropout=DROPOUT) if impl == "lora_jax_dropout" else {}
    adapters = lora_jax.init(jax.random.key(2), params, _lora_spec(targets, config, rank, **kw))
    mode = "merged" if impl == "lora_jax_merged" else "factored"
    loss_fn = lora_jax.wrap(functools.partial(model.apply, **loss_kw), mode=mode, fallback="error",
                            group=impl != "lora_jax_nogroup")
    if impl == "lora_jax_dora":
      # DoRA's base_norm leaf is frozen: freeze_base gives it no update and no AdamW state
      # (plain tx over the adapters tree would weight-decay it); a, b and m train.
      tx = lora_jax.freeze_base(tx)
      n_train = n_params(jax.tree.map(lambda x, t: x if t else None, adapters, lora_jax.trainable_mask(adapters)))
      kind = "dora"
    else:
      n_train, kind = n_params(adapters), "lora"
    if impl == "lora_jax_dropout":

      @functools.partial(jax.jit, donate_argnums=(1, 2, 3))
      def step(params, adapters, opt_state, rng, tokens):
        rng, sub = jax.random.split(rng)
        loss, g = jax.value_and_grad(lambda ad: loss_fn(params, ad, tokens, lora_dropout_rng=sub))(adapters)
        updates, opt_state = tx.update(g, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, rng, loss

      return step, [params], [adapters, tx.init(adapters), jax.random.key(3)], n_train, kind, tokens
  elif impl == "lorax":
    common.extra_site()
    import lorax

    names = TARGETS[targets]

    def decide(path, arr):
      keys = [getattr(k, "key", str(k)) for k in path]
      return rank if any(n in keys for n in names) and keys[-1] == "kernel" else lorax.LORA_FREEZE

    spec = lorax.simple_spec(params, decision_fn=decide, tune_vectors=False)
    lora_params = lorax.init_lora(params, spec, jax.random.key(2), alpha=ALPHA)
    frozen_fn = lorax.lora(functools.partial(model.apply, **loss_kw))
    tx = lorax.wrap_optimizer(tx, spec)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(lp, opt_state, tokens):
      loss, g = jax.value_and_grad(lambda p: frozen_fn(p, tokens))(lp)
      updates, opt_state = tx.update(g, opt_state, lp)
      return optax.apply_updates(lp, updates), opt_state, loss

    return step, [], [lora_params, tx.init(lora_params)], None, "lora", tokens
  else:
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")

  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def step(params, adapters, opt_state, tokens):
    loss, g = jax.value_and_grad(lambda ad: loss_fn(params, ad, tokens))(adapters)
    updates, opt_state = tx.update(g, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  return step, [params], [adapters, tx.init(adapters)], n_train, kind, tokens


def measure(impl: str, targets: str, tune_name: str, cfg: common.BenchConfig, peak_tflops: float | None,
            rank: int = RANK) -> dict[str, Any]:
  """Builds, compiles and times one variant; returns its row."""
  import jax

  tune = tune_settings(tune_name, cfg)
  row: dict[str, Any] = dict(impl=impl, targets=targets, tune=tune_name, rank=None if impl == "full" else rank, **tune)
  try:
    t0 = time.perf_counter()
    step, frozen, state, n_trainable, kind, tokens = build(impl, targets, tune, cfg, rank)
    jax.block_until_ready((frozen, state))
    row["setup_s"] = round(time.perf_counter() - t0, 2)
    row.update(BUILD_INFO)
    peak_setup = common.jax_peak_bytes()
    row["peak_setup_gib"] = None if peak_setup is None else round(peak_setup / 2**30, 3)
    t0 = time.perf_counter()
    lowered = step.lower(*frozen, *state, tokens)
    row["trace_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    mem = common.jax_memory_analysis(compiled)
    row["xla_mem_gib"] = None if not mem or "total" not in mem else round(mem["total"] / 2**30, 3)
    losses = []
    box = [state]

    def one():
      *new, loss = compiled(*frozen, *box[0], tokens)
      box[0] = new
      losses.append(loss)
      return loss

    times = common.time_calls(one, lambda x: x.block_until_ready(), cfg.warmup, cfg.iters)
    n_ad = n_trainable if kind == "lora" and n_trainable is not None else 0
    if kind == "dora":  # a, b (m is elementwise): see common.train_flops
      n_ad = common.lora_param_count(cfg, rank, targets)
    row.update(common.step_record(
        cfg, times, losses, flops=common.train_flops(cfg, kind, n_ad, rank=rank, targets=targets),
        peak_bytes=common.jax_peak_bytes(), peak_tflops=peak_tflops, trainable=n_trainable))
  except Exception as e:  # noqa: BLE001 - a failed variant is a result too
    row.update(common.error_record(e))
  return row


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _key(impl: str, targets: str, tune: str) -> str:
  return f"{impl}/{targets}@{tune}"


def _parse_key(key: str) -> tuple[str, str, str]:
  rest, tune = key.split("@")
  impl, targets = rest.split("/")
  return impl, targets, tune


def pick_best(rows: list[dict[str, Any]], cap_gib: float) -> str:
  """The fastest tune among ``rows`` whose peak memory is at most ``cap_gib`` (the fastest
  overall when none fits; ``default`` when none ran)."""
  ok = [r for r in rows if "error" not in r and r.get("tokens_per_s")]
  if not ok:
    return "default"
  fits = [r for r in ok if r.get("peak_gib") is None or r["peak_gib"] <= cap_gib]
  pool = fits or ok
  return max(pool, key=lambda r: r["tokens_per_s"])["tune"]


def default_plan() -> list[str]:
  """The variants, most important first: the lora_jax all-linear sweep, then the rest
  (``@best`` is resolved to the sweep's best tune when the variant runs)."""
  return [
      "sweep",
      _key("lora_jax", "qv", "best"),
      _key("lora_jax", "qv", "unscanned+noremat+hf+ewremat"),
      _key("full", "all", FULL_FAST),
      _key("handwritten", "all", "default"),
      _key("handwritten", "all", "best"),
      _key("handwritten_grouped", "all", "best"),
      _key("lora_jax_nogroup", "all", "best"),
      _key("qwix", "all", "best"),
      _key("qwix", "all", "default"),
      _key("full", "all", "default"),
      _key("lorax", "all", "best"),
      _key("lora_jax", "qv", "default"),
      _key("lora_jax_merged", "all", "best"),
  ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="cpu-small", choices=sorted(common.CONFIGS))
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step_<config>.json)")
  p.add_argument("--variants", default=None,
                 help="comma-separated impl/targets@tune keys; 'sweep' = lora_jax/all at every tune; "
                      "'@best' = the best lora_jax/all tune so far (default: the plan)")
  p.add_argument("--append", action="store_true",
                 help="keep the rows already in --out; keys measured there are not run again, failed ones are")
  p.add_argument("--rank", type=int, default=RANK)
  p.add_argument("--check-quantized-init", default=None, metavar="FORMATS",
                 help="only check init_params: for each format (comma-separated, e.g. nf4,int8), the base built "
                      "layer by layer equals lora_jax.quantize of the same values drawn densely; writes --out")
  common.add_runner_args(p, timeout_s=180)
  args = p.parse_args(argv)
  cfg = common.runner_config(args)

  if args.check_quantized_init:
    return check_quantized_init(cfg, args.check_quantized_init.split(","), args.out or common.default_out("quantized_init", cfg))
  if args.worker:  # one variant in this (fresh) process
    import jax  # noqa: F401

    peak = args.peak_tflops or common.jax_matmul_tflops(cfg.matmul_n)
    row = measure(*_parse_key(args.worker), cfg, peak, args.rank)
    common.write_json(args.result_file, row)
    return row

  import jax  # noqa: F401

  t_start = time.perf_counter()
  inprocess = args.inprocess or (cfg.name.startswith("cpu") and not args.isolate)
  out = args.out or common.default_out("train_step", cfg)
  old_rows: list[dict[str, Any]] = []
  if args.append and os.path.exists(out):
    with open(out) as f:
      old_rows = json.load(f).get("rows", [])
  env = common.env_info("jax")
  peak_tflops = common.jax_matmul_tflops(cfg.matmul_n)
  env["matmul_peak_tflops"] = round(peak_tflops, 3)
  env["datasheet_bf16_tflops"] = common.datasheet_tflops(env["device"])
  print(f"device: {env['device']}  measured bf16 matmul peak: {peak_tflops:.0f} TFLOP/s", flush=True)

  rows: list[dict[str, Any]] = list(old_rows)
  payload = dict(
      benchmark="train_step", env=env, config=vars(cfg) | {"rank": args.rank, "alpha": ALPHA, "tunes": tunes(cfg)},
      flop_note=common.FLOP_NOTE, mem_cap_gib=cfg.mem_cap_gib, rows=rows,
  )
  if old_rows:
    payload["appended_to_rows_of_earlier_run"] = True

  def best() -> str:
    return pick_best([r for r in rows if r.get("impl") == "lora_jax" and r.get("targets") == "all"], cfg.mem_cap_gib)

  def run(key: str) -> dict[str, Any]:
    impl, targets, tune = _parse_key(key)
    if tune == "best":
      tune = best()
      key = _key(impl, targets, tune)
    done = [r for r in rows if r.get("variant") == key and "error" not in r and "skipped" not in r]
    if done:  # already measured (e.g. '@best' resolved to a tune that ran before)
      print(f"  {key:36s} kept from {done[0].get('run_utc')}", flush=True)
      return done[0]
    if common.over_budget(args, time.perf_counter() - t_start):
      row = dict(impl=impl, targets=targets, tune=tune, skipped="time budget")
    elif inprocess:
      row = measure(impl, targets, tune, cfg, peak_tflops, args.rank)
      if tune_settings(tune, cfg)["xla_flags"]:
        row["xla_flags_ignored"] = "variants ran in one process"
    else:
      argv = [os.path.abspath(__file__), "--config", cfg.name, "--worker", key, "--rank", str(args.rank),
              "--peak-tflops", str(peak_tflops), "--warmup", str(cfg.warmup), "--iters", str(cfg.iters)]
      flags = tune_settings(tune, cfg)["xla_flags"]
      wenv = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()} if flags else None
      row = common.run_worker(argv, common.worker_timeout(args, time.perf_counter() - t_start), env=wenv)
    for k, v in (("impl", impl), ("targets", targets), ("tune", tune)):  # a worker that died wrote none
      row.setdefault(k, v)
    row["variant"] = key
    row["run_utc"] = env["date_utc"]
    row["run_id"] = env.get("run_id")
    rows[:] = [r for r in rows if r.get("variant") != key] + [row]
    payload["best_tune"] = best()
    common.write_json(out, payload)
    status = row.get("error") or row.get("skipped") or (
        f"{row['step_ms']:.1f} ms  {row['tokens_per_s']:,.0f} tok/s  peak {common.fmt(row.get('peak_gib'), '.2f')} GiB")
    print(f"  {key:36s} {status}", flush=True)
    return row

  keys = [k.strip() for k in args.variants.split(",")] if args.variants else default_plan()
  for key in keys:
    if key == "sweep":
      for t in sweep(cfg):
        run(_key("lora_jax", "all", t))
    else:
      run(key)
  payload["best_tune"] = best()
  payload["wall_s"] = round(time.perf_counter() - t_start, 1)
  common.write_json(out, payload)
  print()
  print_rows(rows)
  print(f"best lora_jax all-linear tune (peak <= {cfg.mem_cap_gib} GiB): {payload['best_tune']}")
  print(f"wrote {out}")
  return payload


def print_rows(rows: list[dict[str, Any]]) -> str:
  return common.print_table(
      rows,
      [("variant", "variant", ""), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"),
       ("mfu", "MFU", ".1%"), ("peak_gib", "peak GiB", ".2f"), ("xla_mem_gib", "XLA plan GiB", ".2f"),
       ("compile_s", "compile s", ".1f"), ("trainable_params", "trainable", ",d"), ("error", "error", "")],
  )


if __name__ == "__main__":
  main()
