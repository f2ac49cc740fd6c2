"""What ``decode.py`` (lora_jax) and ``peft_decode.py`` (PyTorch + PEFT) share: the batch and
generation shape, the variant keys, the timing record, token agreement and the table.

Variant keys read ``impl/case[@mode]``: ``impl`` is ``lora_jax`` or ``peft``; ``case`` one of
``base`` (no adapters), ``merged`` (one adapter merged into the params), ``factored`` (one adapter,
unmerged), ``mixed<N>`` (``N`` adapters, row ``i`` uses adapter ``i % N``) and ``loop<C>x<R>``
(``C`` sequential calls of ``R`` requests, one adapter per call: call ``j`` holds the rows that
``mixed<C>`` gives adapter ``j``); ``mode`` is the script's own setting (PEFT: ``eager``,
``static``, ``compile``; lora_jax: how a bank's thin products are computed, where there is a
choice).

Both scripts time a whole generation call the same way: ``total_ms`` (``new`` tokens per row),
``prefill_ms`` (the same call with one new token: the prompt's forward and the first token),
``step_ms = (total_ms - prefill_ms) / (new - 1)`` (one decode step of the whole batch) and
``tokens_per_s = batch * new / total``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any, Sequence

from benchmarks import common

# Per-config defaults of the decode shape (the GPU run is the issue's: 64 requests, a prompt of
# 128 tokens, 128 new tokens, r=16, 8 / 32 / 128 adapters, the loop 8 calls of 8 requests).
DEFAULTS = {
    "gpu": dict(batch=64, prompt=128, new=128, rank=16, adapters="8,32,128", loop=8, warmup=2, iters=5),
    "cpu": dict(batch=8, prompt=16, new=8, rank=16, adapters="2,4,16", loop=2, warmup=1, iters=2),
}


@dataclasses.dataclass(frozen=True)
class DecodeShape:
  batch: int
  prompt: int
  new: int
  rank: int
  adapters: list[int]
  loop: tuple[int, int]  # (calls, requests per call)
  warmup: int  # untimed calls (>= 1: the first compiles)
  iters: int  # timed calls (at most; at least one, within --variant-s)


def add_decode_args(p: Any) -> None:
  p.add_argument("--config", default="cpu-small", choices=sorted(common.CONFIGS))
  p.add_argument("--out", default=None)
  p.add_argument("--batch", type=int, default=None, help="requests per batch (default 64; CPU configs 8)")
  p.add_argument("--prompt", type=int, default=None, help="prompt tokens per request (default 128; CPU 16)")
  p.add_argument("--new", type=int, default=None, help="new tokens per request, greedy (default 128; CPU 8)")
  p.add_argument("--rank", type=int, default=None, help="LoRA rank (alpha = 2 x rank; default 16)")
  p.add_argument("--adapters", default=None, help="adapter counts of the mixed-batch variants (default 8,32,128; CPU 2,4,16)")
  p.add_argument("--loop", type=int, default=None, help="calls of the sequential loop (default 8, of batch/8 requests; CPU 2)")
  p.add_argument("--variants", default=None, help="comma-separated keys (default: the script's plan)")
  p.add_argument("--only", default=None,
                 help="comma-separated filters of the variant keys: glob patterns (e.g. '*mixed*') or substrings")
  p.add_argument("--variant-s", type=float, default=None,
                 help="stop timing a variant's calls after this many seconds (at least one timed call; default 20, PEFT 45)")
  p.add_argument("--append", action="store_true", help="keep the rows already in --out (re-run keys replace theirs)")


def shape_from_args(args: Any) -> tuple[common.BenchConfig, DecodeShape]:
  cfg = common.get_config(args.config)
  d = DEFAULTS["cpu" if cfg.name.startswith("cpu") else "gpu"]
  get = lambda k: d[k] if getattr(args, k, None) is None else getattr(args, k)
  batch, calls = get("batch"), get("loop")
  if batch % calls:
    raise SystemExit(f"--batch {batch} is not a multiple of --loop {calls}")
  shape = DecodeShape(
      batch=batch, prompt=get("prompt"), new=get("new"), rank=get("rank"),
      adapters=[int(n) for n in str(get("adapters")).split(",") if n.strip()],
      loop=(calls, batch // calls), warmup=max(1, get("warmup")), iters=max(1, get("iters")),
  )
  return cfg, shape


def model_config(cfg: common.BenchConfig) -> dict[str, Any]:
  """The config's model shapes (its training batch, sequence and chunk do not apply here)."""
  return {k: v for k, v in vars(cfg).items() if k not in ("batch", "seq", "chunk", "matmul_n", "warmup", "iters")}


def shape_config(shape: DecodeShape) -> dict[str, Any]:
  return dict(dataclasses.asdict(shape), alpha=2 * shape.rank, targets="all-linear", greedy=True,
              weights="random (base and adapters)")


def worker_argv(args: Any, extra: Sequence[str] = ()) -> list[str]:
  """The command line of one variant's worker process: the decode arguments of this run."""
  argv = ["--config", args.config]
  for k in ("batch", "prompt", "new", "rank", "adapters", "loop", "warmup", "iters", "variant_s"):
    v = getattr(args, k, None)
    if v is not None:
      argv += [f"--{k.replace('_', '-')}", str(v)]
  return argv + list(extra)


def parse_key(key: str) -> tuple[str, str, str]:
  """``"impl/case@mode"`` -> ``(impl, case, mode)`` (``mode`` is ``""`` when absent)."""
  rest, _, mode = key.partition("@")
  impl, _, case = rest.partition("/")
  if not impl or not case:
    raise ValueError(f"variant key {key!r}: expected 'impl/case[@mode]', e.g. 'lora_jax/mixed32'")
  return impl, case, mode


def adapter_ids(batch: int, n: int) -> list[int]:
  """The adapter of each row in a mixed batch of ``n`` adapters: ``i % n``."""
  return [i % n for i in range(batch)]


def case_fields(case: str, shape: DecodeShape) -> dict[str, Any]:
  """``adapters`` (how many exist), ``adapters_used`` (distinct ones in the batch), ``calls`` and
  ``rows_per_call`` of a case; raises ValueError for an unknown case."""
  if case == "base":
    return dict(adapters=0, adapters_used=0, calls=1, rows_per_call=shape.batch)
  if case in ("merged", "factored"):
    return dict(adapters=1, adapters_used=1, calls=1, rows_per_call=shape.batch)
  m = re.fullmatch(r"mixed(\d+)", case)
  if m:
    n = int(m.group(1))
    return dict(adapters=n, adapters_used=len(set(adapter_ids(shape.batch, n))), calls=1, rows_per_call=shape.batch)
  m = re.fullmatch(r"loop(\d+)x(\d+)", case)
  if m:
    c, r = int(m.group(1)), int(m.group(2))
    if c * r != shape.batch:
      raise ValueError(f"case {case!r}: {c} calls x {r} requests != batch {shape.batch}")
    return dict(adapters=c, adapters_used=c, calls=c, rows_per_call=r)
  raise ValueError(f"unknown case {case!r}; expected base, merged, factored, mixed<N> or loop<C>x<R>")


def select(keys: list[str], only: str | None) -> list[str]:
  """``keys`` that match a filter of ``--only`` (a glob pattern or a substring); all without one."""
  keys = [k.strip() for k in keys if k.strip()]
  if not only:
    return keys
  pats = [p.strip() for p in only.split(",") if p.strip()]
  return [k for k in keys if any(fnmatch.fnmatchcase(k, p) or p in k for p in pats)]


def decode_record(shape: DecodeShape, totals: Sequence[float], prefills: Sequence[float],
                  peak_bytes: int | None) -> dict[str, Any]:
  """The measured fields of one row from the timed calls (seconds): ``totals`` generate ``new``
  tokens per row, ``prefills`` one."""
  total, pre = common.median(totals), common.median(prefills)
  step = (total - pre) / (shape.new - 1) if shape.new > 1 else None
  return dict(
      total_ms=round(total * 1e3, 2),
      total_ms_all=[round(t * 1e3, 2) for t in totals],
      prefill_ms=round(pre * 1e3, 2),
      prefill_ms_all=[round(t * 1e3, 2) for t in prefills],
      step_ms=None if step is None else round(step * 1e3, 3),
      tokens_per_s=round(shape.batch * shape.new / total, 1),
      decode_tokens_per_s=None if not step or step <= 0 else round(shape.batch / step, 1),
      iters=len(totals),
      peak_gib=None if peak_bytes is None else round(peak_bytes / 2**30, 3),
  )


def finish_row(row: dict[str, Any], key: str, env: dict[str, Any], shape: DecodeShape, tokens: dict[str, Any]) -> None:
  """Fills what a skipped or dead worker's row lacks, stamps the run, and moves the generated
  tokens (``_tokens``, kept out of the JSON) into ``tokens``."""
  impl, case, mode = parse_key(key)
  row.setdefault("impl", impl)
  row.setdefault("case", case)
  row.setdefault("mode", mode)
  try:
    for k, v in case_fields(case, shape).items():
      row.setdefault(k, v)
  except ValueError:
    pass
  row["variant"] = key
  row["run_utc"] = env["date_utc"]
  row["run_id"] = env.get("run_id")
  toks = row.pop("_tokens", None)
  if toks is not None:
    tokens[key] = toks


def prefix_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
  """Mean over rows of the share of tokens before the first difference (greedy decoding: after a
  token differs, the two continuations differ)."""
  total = 0.0
  for x, y in zip(a, b):
    n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    total += n / max(1, len(x))
  return total / max(1, len(a))


BANK_FLAGS = frozenset({"auto", "dense", "gather"})  # lora_jax's bank modes: how, not what, is computed


def _what(mode: str) -> frozenset[str]:
  """The flags of a mode that change what is computed (adapter dtypes, attention, ...), not how."""
  return frozenset(mode.split("+")) - BANK_FLAGS - {"", "lib", "eager", "static", "compile"}


def agreement(rows: list[dict[str, Any]], tokens: dict[str, Any]) -> None:
  """Greedy-token agreement between variants that compute the same thing: ``factored`` vs
  ``merged`` (one adapter), ``mixed<C>`` vs ``loop<C>x<R>`` (the same adapter for every row), and
  ``<case>@lib`` vs the driver's ``<case>`` (``@auto``), of the same impl; the reference is one with
  the same dtype flags (``bf16``, ...), preferably the same mode. Floating-point rounding differs
  between them, so a near-tie may flip a token."""
  by = {r["variant"]: r for r in rows}
  for key, toks in tokens.items():
    impl, case, mode = parse_key(key)
    same = lambda k: parse_key(k)[0] == impl and _what(parse_key(k)[2]) == _what(mode)  # noqa: E731
    refs = []
    if "lib" in mode.split("+"):  # the library's generate vs the benchmark's driver (lora_jax)
      refs.append(("driver", [k for k in tokens if same(k) and parse_key(k)[1] == case and "lib" not in parse_key(k)[2]
                              and parse_key(k)[2].split("+")[0] in ("", "auto")]))
    if case == "factored":
      refs.append(("merged", [k for k in tokens if same(k) and parse_key(k)[1] == "merged"]))
    m = re.fullmatch(r"mixed(\d+)", case)
    if m:
      refs.append(("loop", [k for k in tokens if same(k) and re.fullmatch(rf"loop{m.group(1)}x\d+", parse_key(k)[1])]))
    for name, cands in refs:
      cands.sort(key=lambda k: (("lib" in parse_key(k)[2]) != ("lib" in mode), parse_key(k)[2] != mode))
      if cands and key in by:
        by[key][f"prefix_agree_vs_{name}"] = round(prefix_agreement(toks, tokens[cands[0]]), 4)
        by[key][f"agree_ref_{name}"] = cands[0]


def status(row: dict[str, Any]) -> str:
  if row.get("error") or row.get("skipped"):
    return str(row.get("error") or row.get("skipped"))
  return (f"{row['tokens_per_s']:,.0f} tok/s  step {common.fmt(row.get('step_ms'), '.2f')} ms  "
          f"prefill {row['prefill_ms']:.1f} ms  peak {common.fmt(row.get('peak_gib'), '.2f')} GiB")


TABLE_COLS = [
    ("variant", "variant", ""), ("adapters_used", "adapters in batch", "d"), ("calls", "calls", "d"),
    ("tokens_per_s", "tokens/s", ",.0f"), ("step_ms", "ms / step", ".2f"), ("prefill_ms", "prefill ms", ".1f"),
    ("total_ms", "total ms", ".0f"), ("peak_gib", "peak GiB", ".2f"), ("first_call_s", "1st call s", ".1f"),
    ("error", "error", ""), ("skipped", "skipped", ""),
]
