"""Shared pieces of the benchmark scripts: configs, environment record, timing, FLOP counts.

Every script prints a table and writes one JSON file holding ``env`` (device, versions, date),
``config`` (the shapes), and ``rows`` (one dict per measured variant). A variant that fails
records ``error`` (the exception's last line) instead of numbers, so one broken variant never
loses the others.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:  # run as `python benchmarks/x.py` from anywhere
  sys.path.insert(0, ROOT)

# H100 SXM dense bf16 peak by the datasheet (TFLOP/s); reported beside the measured peak.
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """Model shapes and measurement settings of one named configuration."""

  name: str
  vocab: int
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  mlp: int
  batch: int
  seq: int
  dtype: str
  attention: str | None  # LlamaConfig.attention_implementation ('cudnn' on GPU)
  warmup: int
  iters: int
  matmul_n: int  # size of the square bf16 matmul that measures the peak
  chunk: int  # chunked cross-entropy: tokens per chunk in the tuned configs
  # train_step's memory cap: 'best' is the fastest lora_jax all-linear tune whose peak fits
  mem_cap_gib: float = 4.0

  @property
  def tokens(self) -> int:
    return self.batch * self.seq

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads


CONFIGS = {
    # Runs in seconds on a laptop CPU: the CI smoke test.
    "cpu-small": BenchConfig(
        "cpu-small", vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, batch=2,
        seq=32, dtype="bfloat16", attention=None, warmup=1, iters=3, matmul_n=256, chunk=32,
    ),
    # TinyLlama-1.1B shapes; the GPU configuration.
    "tinyllama": BenchConfig(
        "tinyllama", vocab=32000, hidden=2048, layers=22, heads=32, kv_heads=4, mlp=5632,
        batch=4, seq=1024, dtype="bfloat16", attention="cudnn", warmup=3, iters=10,
        matmul_n=8192, chunk=1024,
    ),
    # Llama-2-7B shapes (hidden 4096, 32 layers, 32 heads = 32 KV heads, MLP 11008, vocab
    # 32000), random weights: the QLoRA stage's large model (NF4 base; a bf16 base of these
    # shapes is 13.5 GB). Fewer steps: each is ~10x a TinyLlama step.
    "llama7b": BenchConfig(
        "llama7b", vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=32, mlp=11008,
        batch=4, seq=1024, dtype="bfloat16", attention="cudnn", warmup=2, iters=5,
        matmul_n=8192, chunk=1024, mem_cap_gib=18.0,
    ),
    # cpu-small with as many KV heads as heads (7B's multi-head attention): the CPU smoke
    # test's stand-in for llama7b.
    "cpu-small-mha": BenchConfig(
        "cpu-small-mha", vocab=256, hidden=64, layers=2, heads=4, kv_heads=4, mlp=128, batch=2,
        seq=32, dtype="bfloat16", attention=None, warmup=1, iters=2, matmul_n=256, chunk=32,
    ),
}


def add_runner_args(p: Any, timeout_s: float) -> None:
  """The arguments of a script that runs variants, each optionally in its own subprocess."""
  import argparse

  p.add_argument("--isolate", action="store_true", help="one subprocess per variant (default on GPU configs)")
  p.add_argument("--inprocess", action="store_true", help="run variants in this process (default on CPU configs)")
  p.add_argument("--budget-s", type=float, default=1e9, help="start no variant after this many seconds")
  p.add_argument("--timeout-s", type=float, default=timeout_s, help="per-variant subprocess limit")
  p.add_argument("--end-s", type=float, default=None,
                 help="end the run this many seconds after it started: each subprocess's limit is cut to "
                      "what is left (one cut short records a timeout error), and no variant starts with less "
                      "than --min-start-s left")
  p.add_argument("--min-start-s", type=float, default=30.0, help="with --end-s: skip variants with less time left")
  p.add_argument("--warmup", type=int, default=None)
  p.add_argument("--iters", type=int, default=None)
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--peak-tflops", type=float, default=None, help=argparse.SUPPRESS)
  p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)


def over_budget(args: Any, elapsed: float) -> bool:
  """Whether a variant may no longer start: past ``--budget-s``, or too close to ``--end-s``."""
  if elapsed > args.budget_s:
    return True
  return args.end_s is not None and args.end_s - elapsed < args.min_start_s


def worker_timeout(args: Any, elapsed: float) -> float:
  """``--timeout-s``, cut to the time left before ``--end-s``."""
  return args.timeout_s if args.end_s is None else max(1.0, min(args.timeout_s, args.end_s - elapsed))


def runner_config(args: Any) -> BenchConfig:
  """The config named by ``--config``, with ``--warmup`` / ``--iters`` applied when given."""
  over = {k: v for k, v in (("warmup", args.warmup), ("iters", args.iters)) if v is not None}
  return get_config(args.config, **over)


def finish(payload: dict[str, Any], out: str, t_start: float, rows: list[dict[str, Any]],
           cols: list[tuple[str, str, str]]) -> dict[str, Any]:
  """Records the run's wall time, writes ``out``, prints the table of ``rows`` and the path."""
  payload["wall_s"] = round(time.perf_counter() - t_start, 1)
  write_json(out, payload)
  print()
  print_table(rows, cols)
  print(f"wrote {out}")
  return payload


def get_config(name: str, **overrides: Any) -> BenchConfig:
  if name not in CONFIGS:
    raise SystemExit(f"unknown --config {name!r}; choose from {sorted(CONFIGS)}")
  return dataclasses.replace(CONFIGS[name], **overrides)


def llama_config(cfg: BenchConfig, **overrides: Any):
  """The lora_jax Llama config for ``cfg`` (bf16 params and compute)."""
  import jax.numpy as jnp

  from lora_jax.models import llama

  kw = dict(
      vocab_size=cfg.vocab,
      hidden_size=cfg.hidden,
      intermediate_size=cfg.mlp,
      num_hidden_layers=cfg.layers,
      num_attention_heads=cfg.heads,
      num_key_value_heads=cfg.kv_heads,
      max_position_embeddings=max(cfg.seq, 2048),
      dtype=jnp.dtype(cfg.dtype),
      param_dtype=jnp.dtype(cfg.dtype),
      attention_implementation=cfg.attention,
  )
  kw.update(overrides)
  return llama.LlamaConfig(**kw)


# ----------------------------------------------------------------------------------------------
# Environment record
# ----------------------------------------------------------------------------------------------


def _version(name: str) -> str | None:
  try:
    from importlib import metadata

    return metadata.version(name)
  except Exception:  # noqa: BLE001 - not installed
    return None


def git_commit() -> str | None:
  """The commit: ``$LORA_JAX_COMMIT`` when set (the device machine's copy of the tree may carry a
  stale ``.git``), else ``git rev-parse`` (+``dirty``)."""
  if os.environ.get("LORA_JAX_COMMIT"):
    return os.environ["LORA_JAX_COMMIT"]
  try:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
    )
    if out.returncode:
      return os.environ.get("LORA_JAX_COMMIT")
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
        text=True, timeout=10,
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")
  except Exception:  # noqa: BLE001 - no git on the device machine
    return os.environ.get("LORA_JAX_COMMIT")


def source_hash() -> str:
  """sha256 (first 12 hex digits) of lora_jax/**/*.py: which library code ran, also where
  there is no git checkout (the device machine gets a copy of the working tree)."""
  import hashlib

  h = hashlib.sha256()
  pkg = os.path.join(ROOT, "lora_jax")
  for dirpath, _, files in sorted(os.walk(pkg)):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        h.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
          h.update(f.read())
  return h.hexdigest()[:12]


def env_info(framework: str = "jax") -> dict[str, Any]:
  """Device name, library versions, date, host: recorded in every JSON."""
  info: dict[str, Any] = {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": platform.python_version(),
      "host": platform.node(),
      "lora_jax_commit": git_commit(),
      "lora_jax_source_sha256": source_hash(),
      # run_gpu.sh sets it once per invocation: rows of several scripts from one run share it.
      "run_id": os.environ.get("LORA_BENCH_RUN_ID"),
      "versions": {
          n: _version(n)
          for n in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft", "qwix", "jax-lorax")
      },
  }
  try:
    import lora_jax

    info["versions"]["lora_jax"] = lora_jax.__version__
  except Exception:  # noqa: BLE001
    pass
  if framework == "jax":
    import jax

    d = jax.devices()[0]
    info["device"] = getattr(d, "device_kind", str(d))
    info["platform"] = d.platform
    info["device_count"] = jax.device_count()
  else:
    import torch

    if torch.cuda.is_available():
      info["device"] = torch.cuda.get_device_name(0)
      info["platform"] = "gpu"
    else:
      info["device"] = platform.processor() or "cpu"
      info["platform"] = "cpu"
  return info


def datasheet_tflops(device: str) -> float | None:
  for key, value in DATASHEET_BF16_TFLOPS.items():
    if key in device:
      return value
  return None


def write_json(path: str, payload: dict[str, Any]) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=False, default=str)
  os.replace(tmp, path)
  return path


def default_out(script: str, cfg: BenchConfig) -> str:
  return os.path.join(RESULTS, f"{script}_{cfg.name}.json")


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def time_calls(fn: Callable[[], Any], sync: Callable[[Any], Any], warmup: int, iters: int) -> list[float]:
  """Seconds per call of ``fn`` (``sync(out)`` waits for the device), after ``warmup`` calls."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return times


def jax_peak_bytes() -> int | None:
  import jax

  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def jax_bytes_in_use() -> int | None:
  """``memory_stats()["bytes_in_use"]`` of the first device (None where the backend has no
  allocator statistics, e.g. the CPU)."""
  import jax

  stats = jax.devices()[0].memory_stats()
  return None if not stats or "bytes_in_use" not in stats else int(stats["bytes_in_use"])


def jax_memory_analysis(compiled) -> dict[str, int] | None:
  """XLA's static memory plan of a compiled program (bytes), where the backend gives one."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if m is None:
    return None
  out = {}
  for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes"):
    v = getattr(m, k, None)
    if v is not None:
      out[k.replace("_in_bytes", "")] = int(v)
  if {"argument_size", "output_size", "alias_size", "temp_size"} <= set(out):
    out["total"] = out["argument_size"] + out["output_size"] - out["alias_size"] + out["temp_size"]
  return out


def _warm(fn: Callable[[], Any], sync: Callable[[Any], Any], seconds: float) -> None:
  """Runs ``fn`` for about ``seconds`` so that the GPU clocks have ramped up."""
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    sync(fn())


def jax_matmul_tflops(n: int, iters: int = 30) -> float:
  """Measured bf16 matmul rate (TFLOP/s): an ``n x n x n`` jnp.dot on random data, median of
  ``iters`` calls after about a second of warm-up (clock ramp)."""
  import jax
  import jax.numpy as jnp

  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  f = jax.jit(jnp.dot)
  sync = lambda x: x.block_until_ready()
  _warm(lambda: f(a, b), sync, 1.0 if n >= 4096 else 0.05)
  times = time_calls(lambda: f(a, b), sync, 0, iters)
  return 2 * n**3 / median(times) / 1e12


def torch_matmul_tflops(n: int, iters: int = 30) -> float:
  import torch

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  g = torch.Generator(device=dev).manual_seed(0)
  a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
  b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
  sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
  _warm(lambda: a @ b, sync, 1.0 if n >= 4096 else 0.05)
  times = time_calls(lambda: a @ b, sync, 0, iters)
  return 2 * n**3 / median(times) / 1e12


# ----------------------------------------------------------------------------------------------
# FLOP counts (model FLOPs: remat recomputation is not counted)
# ----------------------------------------------------------------------------------------------


def llama_param_counts(cfg: BenchConfig) -> dict[str, int]:
  """Parameter counts: matmul weights (layers + lm_head), embedding, norms."""
  d, f, hd = cfg.hidden, cfg.mlp, cfg.head_dim
  q, kv = cfg.heads * hd, cfg.kv_heads * hd
  per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
  layers = cfg.layers * per_layer
  head = d * cfg.vocab
  embed = cfg.vocab * d
  norms = cfg.layers * 2 * d + d
  return {"layer_matmul": layers, "lm_head": head, "embedding": embed, "norms": norms,
          "matmul": layers + head, "total": layers + head + embed + norms}


def _kernel_shapes(cfg: BenchConfig, targets: str) -> list[tuple[int, int]]:
  """(fan_in, fan_out) of each adapted kernel of one layer."""
  d, f, hd = cfg.hidden, cfg.mlp, cfg.head_dim
  q, kv = cfg.heads * hd, cfg.kv_heads * hd
  shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
  names = shapes if targets == "all" else ["q_proj", "v_proj"]
  return [shapes[n] for n in names]


def lora_param_count(cfg: BenchConfig, rank: int, targets: str) -> int:
  """The ``a``, ``b`` factors' parameter count (DoRA adds one magnitude per output feature)."""
  return cfg.layers * sum(rank * (i + o) for i, o in _kernel_shapes(cfg, targets))


def dora_magnitude_count(cfg: BenchConfig, targets: str) -> int:
  return cfg.layers * sum(o for _, o in _kernel_shapes(cfg, targets))


def dora_norm_flops(cfg: BenchConfig, rank: int, targets: str) -> float:
  """FLOPs of DoRA's column norm ``||W + s*a@b||`` per step, computed from the factors (as
  lora_jax does, once per step, forward only: the norm is detached): per kernel ``||W||^2``
  (``2 N``), ``a^T W`` (``2 r N``), the Gram ``a^T a`` (``2 r^2 fan_in``) and ``b^T G b``
  (``2 r^2 fan_out``). Per step, not per token: ~0.2% of a TinyLlama LoRA step."""
  r = rank
  return float(cfg.layers * sum(2 * i * o * (1 + r) + 2 * r * r * (i + o) for i, o in _kernel_shapes(cfg, targets)))


def attention_flops_per_token(cfg: BenchConfig) -> float:
  """Forward attention FLOPs per token, causal (half of ``QK^T`` and ``PV``): ``2*T*d*L``."""
  return 2.0 * cfg.seq * cfg.heads * cfg.head_dim * cfg.layers


def train_flops(cfg: BenchConfig, kind: str, n_adapter: int = 0, *, rank: int | None = None,
                targets: str = "all") -> float:
  """Model FLOPs of one training step.

  Full fine-tuning: ``6 * N * tokens`` (forward 2N, input gradient 2N, weight gradient 2N).
  LoRA: ``(4 * N + 6 * N_adapter) * tokens``: the frozen weights need no weight gradient, the
  adapters need all three. ``N`` counts matmul weights (layers + lm_head, no embedding lookup).
  Attention adds ``3 x`` its causal forward FLOPs in both cases. DoRA (``kind="dora"``, with
  ``N_adapter`` the ``a``, ``b`` count): LoRA's count plus :func:`dora_norm_flops` once per
  step; the output rescale by ``m / norm`` and ``m``'s gradient are elementwise (not counted,
  like every elementwise op here).
  """
  n = llama_param_counts(cfg)["matmul"]
  attn = 3 * attention_flops_per_token(cfg)
  if kind == "full":
    per_token = 6 * n + attn
  else:
    per_token = 4 * n + 6 * n_adapter + attn
  extra = dora_norm_flops(cfg, rank, targets) if kind == "dora" else 0.0
  return per_token * cfg.tokens + extra


def forward_flops(cfg: BenchConfig, n_adapter: int = 0) -> float:
  n = llama_param_counts(cfg)["matmul"]
  return (2 * n + 2 * n_adapter + attention_flops_per_token(cfg)) * cfg.tokens


FLOP_NOTE = (
    "MFU = model FLOPs / step time / measured bf16 matmul peak. Model FLOPs: full FT 6*N*tokens; "
    "LoRA (4*N + 6*N_adapter)*tokens (no weight gradient for frozen weights); N = matmul "
    "weights incl. lm_head, no embedding; + 3x causal attention forward (2*T*d*L per token). "
    "Remat recomputation is not counted. DoRA: LoRA's count (a, b) + the column norm from the "
    "factors once per step (2(r+1)N_adapted + 2r^2(fan_in+fan_out) per kernel), the same count "
    "for lora_jax and PEFT; elementwise rescale not counted."
)


# ----------------------------------------------------------------------------------------------
# Subprocess workers
# ----------------------------------------------------------------------------------------------


def step_record(
    cfg: BenchConfig,
    times: Sequence[float],
    losses: Sequence[float],
    *,
    flops: float,
    peak_bytes: int | None,
    peak_tflops: float | None,
    trainable: int | None,
) -> dict[str, Any]:
  """The measured fields of one training-step row (JAX and PyTorch scripts alike)."""
  losses = [float(x) for x in losses]
  if not all(math.isfinite(v) for v in losses):
    raise FloatingPointError(f"non-finite loss: {losses}")
  med = median(times)
  return dict(
      trainable_params=trainable,
      step_ms=round(med * 1e3, 2),
      step_ms_min=round(min(times) * 1e3, 2),
      step_ms_all=[round(t * 1e3, 2) for t in times],
      tokens_per_s=round(cfg.tokens / med, 1),
      model_tflop=round(flops / 1e12, 3),
      achieved_tflops=round(flops / med / 1e12, 1),
      mfu=None if not peak_tflops else round(flops / med / 1e12 / peak_tflops, 4),
      peak_gib=None if peak_bytes is None else round(peak_bytes / 2**30, 3),
      loss_first=round(losses[0], 4),
      loss_last=round(losses[-1], 4),
  )


def error_record(exc: BaseException) -> dict[str, Any]:
  tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
  last = str(exc).strip().splitlines()
  return {
      "error": f"{type(exc).__name__}: {last[-1] if last else ''}"[:500],
      "traceback_tail": "".join(tb)[-2000:],
  }


def run_worker(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs ``python argv...`` that writes one JSON dict to the file named by ``--result-file``."""
  import tempfile

  fd, path = tempfile.mkstemp(suffix=".json")
  os.close(fd)
  full_env = dict(os.environ, **(env or {}))
  full_env.setdefault("PYTHONUNBUFFERED", "1")
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(
        [sys.executable, *argv, "--result-file", path], capture_output=True, text=True,
        timeout=max(timeout, 1), env=full_env,
    )
    rc, out, err = proc.returncode, proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    rc, out, err = "timeout", _text(e.stdout), _text(e.stderr)
  wall = time.perf_counter() - t0
  try:
    with open(path) as f:
      rec = json.load(f)
  except Exception:  # noqa: BLE001 - the worker died before writing
    tail = (err or out or "").strip().splitlines()[-15:]
    rec = {"error": f"worker exited with {rc} after {wall:.0f}s without a result", "stderr_tail": "\n".join(tail)}
  finally:
    os.unlink(path)
  rec["worker_wall_s"] = round(wall, 1)
  if rc != 0 and "error" not in rec:
    rec["error"] = f"worker exited with {rc}"
  return rec


def _text(x: Any) -> str:
  if x is None:
    return ""
  return x.decode(errors="replace") if isinstance(x, bytes) else str(x)


def fmt(x: Any, spec: str = ".1f") -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return format(x, spec)


def gib(x: int | None) -> float | None:
  return None if x is None else x / 2**30


def print_table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
  """Prints rows as a fixed-width table; cols are (key, header, format spec)."""
  cells = [[h for _, h, _ in cols]]
  for r in rows:
    line = []
    for key, _, spec in cols:
      v = r.get(key)
      line.append(fmt(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else ("-" if v is None else str(v)))
    cells.append(line)
  widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
  text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells)
  print(text, flush=True)
  return text


def import_optional(name: str):
  try:
    return importlib.import_module(name), None
  except Exception as e:  # noqa: BLE001 - record why it did not import
    return None, e


def extra_site() -> None:
  """Adds ``$LORA_BENCH_EXTRA_SITE`` (wheels installed with --target) to ``sys.path``."""
  site = os.environ.get("LORA_BENCH_EXTRA_SITE")
  if site and os.path.isdir(site) and site not in sys.path:
    sys.path.append(site)
