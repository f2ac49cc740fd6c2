"""Turns the benchmark JSON files into ``benchmarks/results/README.md`` and PNG plots.

    python benchmarks/report.py                    # tinyllama results
    python benchmarks/report.py --config cpu-small --results /tmp/res
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

TARGETS = dict(vs_peft_all=1.5, vs_hand=1.15, mem_gib=4.0, vs_peft_qv=1.1, vs_qwix=1.0, mfu=0.45)
# DoRA (run_gpu.sh stage `dora`): step time and peak memory of DoRA over LoRA's, same tune, same run.
DORA_TARGETS = dict(step=1.10, mem=1.10, peft_step_issue=1.26)


def _load(results: str, name: str, config: str) -> dict[str, Any] | None:
  path = os.path.join(results, f"{name}_{config}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _ok(rows: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
  return [r for r in rows or [] if "error" not in r and "skipped" not in r]


def _find(rows, **kw) -> dict[str, Any] | None:
  for r in _ok(rows):
    if all(r.get(k) == v for k, v in kw.items()):
      return r
  return None


def _v(x: Any, spec: str) -> str:
  return common.fmt(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else ("-" if x is None else str(x))


def md_table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
  lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_v(r.get(k), s).replace("|", "/") for k, _, s in cols) + " |")
  return "\n".join(lines)


def _ratio(a: dict | None, b: dict | None, key: str = "tokens_per_s") -> float | None:
  if not a or not b or not a.get(key) or not b.get(key):
    return None
  return a[key] / b[key]


def _env_line(payload: dict[str, Any] | None) -> str:
  if not payload:
    return "not run"
  e = payload["env"]
  v = {k: x for k, x in e.get("versions", {}).items() if x}
  vers = ", ".join(f"{k} {x}" for k, x in v.items())
  peak = e.get("matmul_peak_tflops")
  extra = f"; measured bf16 matmul peak {peak:.0f} TFLOP/s" if peak else ""
  return f"{e.get('device')} ({e.get('platform')}), {e.get('date_utc')}{extra}; {vers}; commit {e.get('lora_jax_commit')}"


def targets_table(train: dict | None, peft: dict | None) -> tuple[str, list[dict[str, Any]]]:
  trows = (train or {}).get("rows", [])
  prows = (peft or {}).get("rows", [])
  best = (train or {}).get("best_tune", "default")
  out = []
  for label, tune in (("best", best), ("default", "default")):
    la = _find(trows, impl="lora_jax", targets="all", tune=tune)
    lq = _find(trows, impl="lora_jax", targets="qv", tune=tune)
    hand = _find(trows, impl="handwritten", targets="all", tune=tune)
    qw = _find(trows, impl="qwix", targets="all", tune=tune)
    pa = _find(prows, impl="peft_lora", targets="all", mode="compile")
    pq = _find(prows, impl="peft_lora", targets="qv", mode="compile")
    checks = [
        ("all-linear tokens/s vs PEFT+compile", _ratio(la, pa), TARGETS["vs_peft_all"], "x"),
        ("all-linear tokens/s vs hand-written JAX (same tune)", _ratio(la, hand), TARGETS["vs_hand"], "x"),
        ("all-linear peak memory (GiB)", la and la.get("peak_gib"), TARGETS["mem_gib"], "<="),
        ("q,v tokens/s vs PEFT+compile", _ratio(lq, pq), TARGETS["vs_peft_qv"], "x"),
        ("all-linear tokens/s vs qwix (same tune)", _ratio(la, qw), TARGETS["vs_qwix"], "x"),
        ("all-linear MFU", la and la.get("mfu"), TARGETS["mfu"], "x"),
        ("(info) all-linear tokens/s vs hand-written JAX at `default` (the issue's yardstick)",
         _ratio(la, _find(trows, impl="handwritten", targets="all", tune="default")), None, "x"),
        ("(info) all-linear tokens/s, group=True vs group=False (same tune)",
         _ratio(la, _find(trows, impl="lora_jax_nogroup", targets="all", tune=tune)), None, "x"),
        ("(info) q,v tokens/s vs PEFT eager", _ratio(lq, _find(prows, impl="peft_lora", targets="qv", mode="eager")), None, "x"),
        ("(info) all-linear tokens/s vs PEFT eager", _ratio(la, _find(prows, impl="peft_lora", targets="all", mode="eager")), None, "x"),
    ]
    for what, got, want, how in checks:
      if want is None:
        verdict = "no target" if got is not None else "not measured"
      elif got is None:
        verdict = "not measured"
      elif how == "<=":
        verdict = "meets" if got <= want else "MISSES"
      else:
        verdict = "meets" if got >= want else "MISSES"
      goal = "-" if want is None else (f"<= {want}" if how == "<=" else f">= {want}")
      out.append(dict(config=f"{label} ({tune})", what=what, measured=got, target=goal, verdict=verdict))
  text = md_table(out, [("config", "lora_jax tune", ""), ("what", "target", ""), ("measured", "measured", ".3f"),
                        ("target", "goal", ""), ("verdict", "verdict", "")])
  return text, out


def _inv_ratio(a: dict | None, b: dict | None, key: str) -> float | None:
  """``a[key] / b[key]`` (step time or memory of a over b), None where either is missing."""
  if not a or not b or not a.get(key) or not b.get(key):
    return None
  return a[key] / b[key]


def _verdict(got: float | None, want: float | None, how: str) -> str:
  if want is None:
    return "no target" if got is not None else "not measured"
  if got is None:
    return "not measured"
  ok = got <= want if how == "<=" else got >= want
  return "meets" if ok else "MISSES"


def _check_adder(checks: list[dict[str, Any]]):
  """``add(what, got, want=None, how="<=", a=None, b=None, note="")``: appends one ratio row
  (its goal, verdict, and whether rows ``a`` and ``b`` come from one run) to ``checks``."""

  def add(what, got, want=None, how="<=", a=None, b=None, note=""):
    goal = "-" if want is None else (f"<= {want}" if how == "<=" else f">= {want}")
    checks.append(dict(what=what, measured=got, target=goal, verdict=_verdict(got, want, how) + note,
                       same_run=_same_run(a, b)))

  return add


def _same_run(a: dict | None, b: dict | None) -> str:
  if not a or not b:
    return "-"
  if a.get("run_id") or b.get("run_id"):  # one run_gpu.sh invocation (several scripts)
    return "yes" if a.get("run_id") == b.get("run_id") else "NO (different runs)"
  return "yes" if a.get("run_utc") and a.get("run_utc") == b.get("run_utc") else "NO (different runs)"


def _with_key_fields(r: dict[str, Any], last: str) -> dict[str, Any]:
  """``r`` with impl / targets / tune (or mode) read off its variant key where it lacks them
  (rows of workers that died, skipped rows of older runs)."""
  if r.get("impl") and r.get("targets") and r.get(last) or "@" not in str(r.get("variant", "")):
    return r
  rest, setting = r["variant"].split("@", 1)
  impl, _, targets = rest.partition("/")
  if last == "mode":
    impl = f"peft_{impl}" if impl in ("lora", "dora", "qlora") else "torch_full"
  return {"impl": impl, "targets": targets, last: setting, **{k: v for k, v in r.items() if v is not None}}


def dora_section(train: dict | None, peft: dict | None, source: str) -> list[str]:
  """The "DoRA vs LoRA" table: for each tune / mode where a DoRA row was measured, its step
  time and peak memory over the LoRA row's of the same tune / mode (lora_jax and PEFT), and
  whether the goals are met (lora_jax DoRA <= 1.10x LoRA's step and memory)."""
  all_t = [_with_key_fields(r, "tune") for r in (train or {}).get("rows", [])]
  all_p = [_with_key_fields(r, "mode") for r in (peft or {}).get("rows", [])]
  trows, prows = _ok(all_t), _ok(all_p)
  tunes = [r["tune"] for r in all_t if r.get("impl") == "lora_jax_dora" and r.get("targets") == "all"]
  modes = [r["mode"] for r in all_p if r.get("impl") == "peft_dora" and r.get("targets") == "all"]
  if not tunes and not modes:
    return []
  checks: list[dict[str, Any]] = []
  add = _check_adder(checks)

  for tune in dict.fromkeys(tunes):
    lo = _find(trows, impl="lora_jax", targets="all", tune=tune)
    do = _find(trows, impl="lora_jax_dora", targets="all", tune=tune)
    dr = _find(trows, impl="lora_jax_dropout", targets="all", tune=tune)
    add(f"lora_jax @{tune}: DoRA / LoRA step time", _inv_ratio(do, lo, "step_ms"), DORA_TARGETS["step"], a=do, b=lo)
    add(f"lora_jax @{tune}: DoRA / LoRA peak memory", _inv_ratio(do, lo, "peak_gib"), DORA_TARGETS["mem"], a=do, b=lo)
    add(f"(info) lora_jax @{tune}: DoRA / LoRA XLA memory plan", _inv_ratio(do, lo, "xla_mem_gib"), a=do, b=lo)
    add(f"(info) lora_jax @{tune}: LoRA+dropout / LoRA step time", _inv_ratio(dr, lo, "step_ms"), a=dr, b=lo)
    add(f"(info) lora_jax @{tune}: LoRA+dropout / LoRA peak memory", _inv_ratio(dr, lo, "peak_gib"), a=dr, b=lo)
    for mode in dict.fromkeys(modes):
      pd = _find(prows, impl="peft_dora", targets="all", mode=mode)
      add(f"(info) lora_jax DoRA @{tune} tokens/s vs PEFT DoRA {mode}", _ratio(do, pd), how=">=", a=do, b=pd)
  for mode in dict.fromkeys(modes):
    lo = _find(prows, impl="peft_lora", targets="all", mode=mode)
    do = _find(prows, impl="peft_dora", targets="all", mode=mode)
    issue = f" (the issue: >= {DORA_TARGETS['peft_step_issue']})" if mode == "compile" else ""
    add(f"(info) PEFT {mode}: DoRA / LoRA step time", _inv_ratio(do, lo, "step_ms"), a=do, b=lo, note=issue)
    add(f"(info) PEFT {mode}: DoRA / LoRA peak memory", _inv_ratio(do, lo, "peak_gib"), a=do, b=lo)
  rows = []
  ref = {("lora_jax", r["tune"]): r for r in trows if r.get("impl") == "lora_jax" and r.get("targets") == "all"}
  ref.update({("peft", r["mode"]): r for r in prows if r.get("impl") == "peft_lora" and r.get("targets") == "all"})
  for r in all_t:
    if r.get("targets") == "all" and r.get("impl") in ("lora_jax", "lora_jax_dora", "lora_jax_dropout") and r.get("tune") in tunes:
      lo = ref.get(("lora_jax", r.get("tune")))
      rows.append(dict(r, framework="JAX", setting=r.get("tune"), x_step=_inv_ratio(r, lo, "step_ms"),
                       x_mem=_inv_ratio(r, lo, "peak_gib"), status=r.get("error") or r.get("skipped") or "ok"))
  for r in all_p:
    if r.get("targets") == "all" and r.get("impl") in ("peft_lora", "peft_dora"):
      lo = ref.get(("peft", r.get("mode")))
      rows.append(dict(r, framework="PyTorch", setting=r.get("mode"), x_step=_inv_ratio(r, lo, "step_ms"),
                       x_mem=_inv_ratio(r, lo, "peak_gib"), status=r.get("error") or r.get("skipped") or "ok"))
  return [
      "## DoRA vs LoRA", "",
      f"All-linear, r={RANK_NOTE}; DoRA and LoRA at the same tune (lora_jax) or mode (PEFT), from {source}. "
      "Ratios are DoRA's step time (ms) and peak memory over LoRA's (lower is better); `LoRA+dropout` is "
      "LoRA with dropout 0.05 and a fresh `lora_dropout_rng` every step (its thin `x @ a` matmuls are not "
      "grouped). DoRA model FLOPs: LoRA's plus the column norm once per step (see the FLOP note).", "",
      md_table(checks, [("what", "ratio", ""), ("measured", "measured", ".3f"), ("target", "goal", ""),
                        ("verdict", "verdict", ""), ("same_run", "same run", "")]), "",
      md_table(rows, [("framework", "framework", ""), ("impl", "implementation", ""), ("setting", "config", ""),
                      ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"),
                      ("peak_gib", "peak GiB", ".2f"), ("x_step", "step x LoRA", ".3f"), ("x_mem", "memory x LoRA", ".3f"),
                      ("trainable_params", "trainable", ",d"), ("compile_s", "compile s", ".1f"),
                      ("first_step_s", "1st step s", ".1f"), ("status", "status", "")]), "",
  ]


RANK_NOTE = "16, alpha 32"

# QLoRA (run_gpu.sh stage `qlora`): NF4-base step over the bf16-base step at 1.1B, same tune, same
# run; at 7B shapes lora_jax NF4 at least as fast as PEFT + bitsandbytes and at most its peak.
QLORA_TARGETS = dict(nf4_step=1.15, vs_peft_7b=1.0, mem_vs_peft_7b=1.0, nf4_bytes_issue=0.28, int8_bytes_issue=0.5)
PEFT_QLORA_MODE = "eager+ckpt+amp"  # the PEFT rows the goals compare with


def _bytes_ratio(q: dict | None, b: dict | None, part: str) -> float | None:
  """Base bytes of row ``q`` over row ``b`` from the device measurement: ``whole`` (all frozen
  params) or ``linear`` (the all-linear kernels: the measured bytes minus the dense rest)."""
  if not q or not b or not q.get("base_bytes_device") or not b.get("base_bytes_device"):
    return None
  if part == "whole":
    return q["base_bytes_device"] / b["base_bytes_device"]
  num, den = q["base_bytes_device"] - (q.get("other_bytes") or 0), b["base_bytes_device"] - (b.get("other_bytes") or 0)
  return num / den if den > 0 else None


def _stored_ratio(q: dict | None, part: str) -> float | None:
  """The same from the stored bytes and the kernels' dense bytes (shapes x dtype), one row."""
  if not q or not q.get("linear_bytes_dense"):
    return None
  if part == "linear":
    return q["linear_bytes_stored"] / q["linear_bytes_dense"]
  return q["base_bytes_stored"] / (q["linear_bytes_dense"] + q["other_bytes"])


def qlora_section(small: dict[str, Any], big: dict[str, Any], names: tuple[str, str]) -> list[str]:
  """The "Quantized base (QLoRA)" section from the stage's files: ``small`` / ``big`` hold the
  ``train`` / ``peft`` / ``profile`` payloads of the 1.1B config and the 7B config."""
  t1 = [_with_key_fields(r, "tune") for r in (small.get("train") or {}).get("rows", [])]
  t7 = [_with_key_fields(r, "tune") for r in (big.get("train") or {}).get("rows", [])]
  p1 = [_with_key_fields(r, "mode") for r in (small.get("peft") or {}).get("rows", [])]
  p7 = [_with_key_fields(r, "mode") for r in (big.get("peft") or {}).get("rows", [])]
  if not (t1 or t7 or p1 or p7):
    return []
  checks: list[dict[str, Any]] = []
  add = _check_adder(checks)

  n1, n7 = names
  tunes = list(dict.fromkeys(r["tune"] for r in t1 if r.get("impl") in ("lora_jax_nf4", "lora_jax_int8")))
  for tune in tunes:
    bf = _find(t1, impl="lora_jax", targets="all", tune=tune)
    nf = _find(t1, impl="lora_jax_nf4", targets="all", tune=tune)
    i8 = _find(t1, impl="lora_jax_int8", targets="all", tune=tune)
    add(f"{n1} @{tune}: NF4-base / bf16-base step time", _inv_ratio(nf, bf, "step_ms"), QLORA_TARGETS["nf4_step"], a=nf, b=bf)
    add(f"(info) {n1} @{tune}: int8-base / bf16-base step time", _inv_ratio(i8, bf, "step_ms"), a=i8, b=bf)
    add(f"(info) {n1} @{tune}: NF4-base / bf16-base peak memory", _inv_ratio(nf, bf, "peak_gib"), a=nf, b=bf)
    add(f"(info) {n1} @{tune}: int8-base / bf16-base peak memory", _inv_ratio(i8, bf, "peak_gib"), a=i8, b=bf)
    for fmt, row in (("NF4", nf), ("int8", i8)):
      issue = QLORA_TARGETS["nf4_bytes_issue" if fmt == "NF4" else "int8_bytes_issue"]
      add(f"(info) {n1}: {fmt} / bf16 base bytes, device, whole base (stored: {common.fmt(_stored_ratio(row, 'whole'), '.3f')})",
          _bytes_ratio(row, bf, "whole"), a=row, b=bf, note=f" (issue: ~{issue}, at 7B shapes)")
      add(f"(info) {n1}: {fmt} / bf16 base bytes, device, all-linear kernels (stored: {common.fmt(_stored_ratio(row, 'linear'), '.3f')})",
          _bytes_ratio(row, bf, "linear"), a=row, b=bf)
  nf7 = next((r for r in _ok(t7) if r.get("impl") == "lora_jax_nf4"), None)
  pq7 = _find(p7, impl="peft_qlora", targets="all", mode=PEFT_QLORA_MODE)
  if nf7 or pq7:
    add(f"{n7}: lora_jax NF4 tokens/s / PEFT+bnb QLoRA ({PEFT_QLORA_MODE})", _ratio(nf7, pq7), QLORA_TARGETS["vs_peft_7b"],
        how=">=", a=nf7, b=pq7)
    add(f"{n7}: lora_jax NF4 peak / PEFT+bnb QLoRA peak", _inv_ratio(nf7, pq7, "peak_gib"), QLORA_TARGETS["mem_vs_peft_7b"],
        a=nf7, b=pq7)
    if nf7 and nf7.get("linear_bytes_dense"):
      dense = nf7["linear_bytes_dense"] + nf7["other_bytes"]
      whole = nf7["base_bytes_device"] / dense if nf7.get("base_bytes_device") else None
      add(f"(info) {n7}: NF4 base bytes, device / bf16 base bytes from the shapes (stored: "
          f"{common.fmt(_stored_ratio(nf7, 'whole'), '.3f')})", whole, a=nf7, b=nf7,
          note=f" (issue: ~{QLORA_TARGETS['nf4_bytes_issue']})")
    for r in _ok(p7):
      if r.get("impl") == "peft_qlora" and r.get("mode") != PEFT_QLORA_MODE:
        add(f"(info) {n7}: lora_jax NF4 tokens/s / PEFT+bnb QLoRA ({r['mode']})", _ratio(nf7, r), how=">=", a=nf7, b=r)
  nf1 = next((r for r in _ok(t1) if r.get("impl") == "lora_jax_nf4"), None)
  pq1 = _find(p1, impl="peft_qlora", targets="all", mode=PEFT_QLORA_MODE)
  pl1 = _find(p1, impl="peft_lora", targets="all", mode=PEFT_QLORA_MODE)
  if pq1 or pl1:
    add(f"(info) {n1}: lora_jax NF4 tokens/s / PEFT+bnb QLoRA ({PEFT_QLORA_MODE})", _ratio(nf1, pq1), how=">=", a=nf1, b=pq1)
    add(f"(info) {n1}: lora_jax NF4 peak / PEFT+bnb QLoRA peak", _inv_ratio(nf1, pq1, "peak_gib"), a=nf1, b=pq1)
    add(f"(info) {n1}: PEFT QLoRA / PEFT bf16-base LoRA step time ({PEFT_QLORA_MODE})", _inv_ratio(pq1, pl1, "step_ms"),
        a=pq1, b=pl1)
  rows = []
  for name, tr, pr in ((n1, t1, p1), (n7, t7, p7)):
    for r in tr:
      rows.append(dict(r, size=name, framework="JAX", setting=r.get("tune"), **_gib_fields(r),
                       status=r.get("error") or r.get("skipped") or "ok"))
    for r in pr:
      rows.append(dict(r, size=name, framework="PyTorch", setting=r.get("mode"), **_gib_fields(r),
                       status=r.get("error") or r.get("skipped") or "ok"))
  out = [
      "## Quantized base (QLoRA)", "",
      "All-linear adapters (r=16, alpha 32) on a frozen base whose all-linear kernels are stored quantized "
      "(lora_jax: `lora_jax.quantize` NF4, blocks of 64 with double-quantized scales, or int8 per output channel; "
      "PEFT: bitsandbytes `Linear4bit` as `load_in_4bit=True, nf4, double quant, compute bf16` builds it), "
      "embeddings / `lm_head` / norms bf16; random weights; bf16 compute. lora_jax builds the quantized base "
      "layer by layer on the device (the dense model never exists); base bytes are `bytes_in_use` after minus "
      "before building it (`stored`: the arrays' own bytes). PEFT: eager, gradient checkpointing per layer "
      "(lora_jax remats each layer), `torch.autocast(bf16)`, `torch.optim.AdamW` (fused), peak from after the "
      f"model is built. From run_gpu.sh stage `qlora` ({', '.join(f'`{f}`' for f in small.get('files', []) + big.get('files', []))}).", "",
      "Shapes: " + "; ".join(_shapes_line(n, part) for n, part in ((n1, small), (n7, big)) if _shapes_line(n, part)) + ".", "",
      md_table(checks, [("what", "ratio", ""), ("measured", "measured", ".3f"), ("target", "goal", ""),
                        ("verdict", "verdict", ""), ("same_run", "same run", "")]), "",
      md_table(rows, [("size", "shapes", ""), ("framework", "framework", ""), ("impl", "implementation", ""),
                      ("setting", "config", ""), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"),
                      ("mfu", "MFU", ".1%"), ("peak_gib", "peak GiB", ".2f"), ("peak_setup_gib", "peak before step GiB", ".2f"),
                      ("xla_mem_gib", "XLA plan GiB", ".2f"), ("base_gib", "base GiB (device)", ".3f"),
                      ("base_stored_gib", "base GiB (stored)", ".3f"), ("trainable_params", "trainable", ",d"),
                      ("compile_s", "compile s", ".1f"), ("first_step_s", "1st step s", ".1f"), ("status", "status", "")]), "",
  ]
  errs = [r for r in rows if r.get("error")]
  if errs:
    out += ["QLoRA-run errors, as recorded:", ""] + [f"- `{r['size']}` `{r.get('variant')}`: {r['error']}" for r in errs] + [""]
  prof = small.get("profile")
  q = (prof or {}).get("quantized_base")
  if q:
    total = prof["total_op_ms_per_step"]
    prow = [dict(what=k, ms=v, share=q["share_of_device_time"].get(k)) for k, v in q["ms_per_step"].items()]
    out += [f"Profile of `{prof['variant']}` ({n1}; device time {total:.1f} ms / step; "
            f"{q['matched_share']:.0%} of it matched to HLO instructions): {q['hlo_counts']['dequant']} dequantize "
            f"fusions in the HLO, {q['dequant_feeding_gemm']} of them feeding a GEMM (the dense kernel goes through "
            f"HBM: {q['dequant_feeding_gemm_ms_per_step']:.2f} ms / step, "
            f"{q['dequant_out_bytes_per_step'] / 2**30:.2f} GiB written per step); "
            f"{q['hlo_counts']['gemm_fused_dequant']} GEMMs read the codes themselves.", "",
            md_table(prow, [("what", "kernels", ""), ("ms", "ms / step", ".2f"), ("share", "share", ".1%")]), ""]
  return out


# Many adapters, decode (run_gpu.sh stage `decode`, issue 12): a mixed batch of N adapters at least
# 0.8x the tokens/s of one merged adapter and 4x the sequential loop; one factored adapter at most
# 1.05x the merged step time; a hot swap recompiles nothing.
DECODE_TARGETS = dict(mixed_vs_merged=0.8, mixed_vs_loop=4.0, factored_step=1.05, swap_recompiles=0)


def _decode_ref(rows: list[dict[str, Any]], impl: str, case_prefix: str, mode: str | None) -> dict[str, Any] | None:
  """The first measured row of ``impl`` whose case starts with ``case_prefix`` (``loop``: any
  loop), in ``mode`` where one has it, else in any mode."""
  ok = [r for r in _ok(rows) if r.get("impl") == impl and str(r.get("case", "")).startswith(case_prefix)]
  return next((r for r in ok if (r.get("mode") or None) == (mode or None)), None) or (ok[0] if ok else None)


def decode_section(jax_p: dict | None, peft_p: dict | None, source: str) -> list[str]:
  """The "Many adapters: decode" section: the issue's ratios (mixed vs merged, mixed vs the loop,
  factored vs merged, lora_jax vs PEFT), every row, and the hot swaps."""
  jrows = (jax_p or {}).get("rows", [])
  prows = (peft_p or {}).get("rows", [])
  if not jrows and not prows:
    return []
  checks: list[dict[str, Any]] = []
  add = _check_adder(checks)
  T = DECODE_TARGETS
  jm = _decode_ref(jrows, "lora_jax", "merged", None)
  jf = _decode_ref(jrows, "lora_jax", "factored", None)
  jl = _decode_ref(jrows, "lora_jax", "loop", None)
  add("lora_jax: factored / merged step time (one adapter)", _inv_ratio(jf, jm, "step_ms"), T["factored_step"], a=jf, b=jm)
  add("(info) lora_jax: factored / merged prefill time", _inv_ratio(jf, jm, "prefill_ms"), a=jf, b=jm)
  mixed = [r for r in _ok(jrows) if str(r.get("case", "")).startswith("mixed") and r.get("mode") != "lib"]
  ns = sorted({r["adapters"] for r in mixed})
  peft_modes = list(dict.fromkeys(r.get("mode") for r in _ok(prows) if str(r.get("case", "")).startswith("mixed")))
  for n in ns:
    for r in sorted((r for r in mixed if r["adapters"] == n), key=lambda r: BANK_ORDER.index(r["mode"]) if r["mode"] in BANK_ORDER else 9):
      goal = r["mode"] == "auto"  # the default a user gets; the other modes are (info)
      tag = "" if goal else "(info) "
      used = f"{r.get('adapters_used')} in the batch"
      add(f"{tag}lora_jax mixed{n}@{r['mode']} ({used}) / merged tokens/s", _ratio(r, jm),
          T["mixed_vs_merged"] if goal else None, how=">=", a=r, b=jm)
      if goal:
        add(f"(info) lora_jax mixed{n}@auto / merged decode steps only (merged step ms / mixed step ms)",
            _inv_ratio(jm, r, "step_ms"), a=r, b=jm)
        add(f"lora_jax mixed{n}@auto / sequential loop ({jl.get('case') if jl else 'loop'}) tokens/s", _ratio(r, jl),
            T["mixed_vs_loop"], how=">=", a=r, b=jl)
        for mode in peft_modes:
          pr = _find(prows, impl="peft", case=f"mixed{n}", mode=mode)
          add(f"(info) lora_jax mixed{n}@auto / PEFT mixed{n}@{mode} tokens/s", _ratio(r, pr), how=">=", a=r, b=pr)
  swaps = [r for r in _ok(jrows) if r.get("lowerings_after_swap") is not None]
  if swaps:
    worst = max(max(r.get("lowerings_after_swap") or 0, r.get("compiles_after_swap") or 0, r.get("traces_after_swap") or 0)
                for r in swaps)
    add(f"lora_jax hot swap: traces / lowerings / compiles after replace_adapter + the next call (worst of {len(swaps)} rows)",
        worst, T["swap_recompiles"], a=swaps[0], b=swaps[-1])
  for mode in dict.fromkeys(r.get("mode") for r in _ok(prows)):  # PEFT's own ratios, within one mode
    pm, pf = _find(prows, impl="peft", case="merged", mode=mode), _find(prows, impl="peft", case="factored", mode=mode)
    pl = next((r for r in _ok(prows) if r.get("mode") == mode and str(r.get("case", "")).startswith("loop")), None)
    if pm and pf:
      add(f"(info) PEFT {mode}: factored / merged step time", _inv_ratio(pf, pm, "step_ms"), a=pf, b=pm)
    for r in (r for r in _ok(prows) if r.get("mode") == mode and str(r.get("case", "")).startswith("mixed")):
      if pm:
        add(f"(info) PEFT {mode}: {r['case']} ({r.get('adapters_used')} in the batch) / merged tokens/s", _ratio(r, pm), a=r, b=pm)
      if pl:
        add(f"(info) PEFT {mode}: {r['case']} / {pl['case']} tokens/s", _ratio(r, pl), a=r, b=pl)
  rows = []
  for fw, payload, rs in (("JAX", jax_p, jrows), ("PyTorch", peft_p, prows)):
    for r in rs:
      r = dict(r, **{k: v for k, v in zip(("impl", "case", "mode"), _decode_key(r.get("variant", ""))) if not r.get(k)})
      ref = jm if fw == "JAX" else (_decode_ref(prows, "peft", "merged", r.get("mode")))
      agree = [f"{k[len('prefix_agree_vs_'):]} {r[k]:.3f}" for k in sorted(r) if k.startswith("prefix_agree_vs_")]
      if fw == "JAX":
        how = "library generate" if r.get("mode") == "lib" else "driver"
        how += f", bank {r['bank_mode']}" if r.get("bank_mode") else ""
        how += ", bf16 adapters" if r.get("adapter_dtype") == "bfloat16" else ""
        how += ", in-process (peak: the process's so far)" if r.get("peak_scope", "").startswith("process") else ""
      else:
        how = f"{r.get('attention') or '?'}, {r.get('cache') or '?'} cache" + (", compiled" if r.get("compiled_forward") else "")
      rows.append(dict(r, framework=fw, how=how, x_merged=_ratio(r, ref) if r is not ref else None,
                       agree=", ".join(agree) or None, status=r.get("error") or r.get("skipped") or "ok"))
  c = (jax_p or peft_p)["config"]
  shapes = (f"Llama, hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads / {c['kv_heads']} KV heads, MLP {c['mlp']}, "
            f"vocab {c['vocab']}, bf16; {c.get('batch')} requests x {c.get('prompt')} prompt tokens, {c.get('new')} new tokens "
            f"(greedy); LoRA all-linear r={c.get('rank')}, alpha {c.get('alpha')}; {c.get('weights', 'random weights')}")
  out = [
      "## Many adapters: decode", "",
      f"{shapes}. From {source}. lora_jax: the benchmark's driver on the KV cache (`model.apply(..., method=\"extend\")`: "
      "a jitted prefill, then the other tokens in one jitted `lax.scan`), adapters factored through `lora_jax.wrap` "
      "(a bank: `wrap(..., in_axes=0, out_axes=0, bank_mode=...)` with `adapter_ids`, row i using adapter i % N); "
      "`@lib`: the same through `lora_jax.models.generation.generate`. PEFT: `model.generate(..., adapter_names=[...], "
      "min_new_tokens=new, do_sample=False)` on transformers' `LlamaForCausalLM` (SDPA), eager (dynamic cache) or "
      "`compile` (static cache, transformers' torch.compile of the decode step). `ms / step`: one decode step of the "
      "whole batch, (total - prefill) / (new - 1); `prefill ms`: the prompt and the first token; tokens/s: all "
      "generated tokens over the whole call. The loop: sequential calls, one adapter each, summed. Peak: the "
      "variant's own process.", "",
      md_table(checks, [("what", "ratio", ""), ("measured", "measured", ".3f"), ("target", "goal", ""),
                        ("verdict", "verdict", ""), ("same_run", "same run", "")]), "",
      md_table(rows, [("framework", "framework", ""), ("variant", "variant", ""), ("how", "how", ""),
                      ("adapters_used", "adapters in batch", "d"),
                      ("calls", "calls", "d"), ("tokens_per_s", "tokens/s", ",.0f"), ("step_ms", "ms / step", ".2f"),
                      ("prefill_ms", "prefill ms", ".1f"), ("total_ms", "total ms", ",.0f"), ("x_merged", "x merged tokens/s", ".3f"),
                      ("peak_gib", "peak GiB", ".2f"), ("agree", "greedy tokens agree", ""), ("iters", "timed calls", "d"),
                      ("status", "status", "")]), "",
  ]
  if swaps:
    out += ["Hot swap (`lora_jax.replace_adapter` of one member of the live bank, new weights, same shapes; then the "
            "next prefill + decode): `swap ms` eager, `jit ms` jitted with the bank donated; traces / lowerings / compiles "
            "counted by `jax.monitoring` over the jitted swap and the next call; the swapped member's rows should "
            "change, every other row's tokens stay bitwise equal.", "",
            md_table(swaps, [("variant", "variant", ""), ("swap_ms", "swap ms", ".2f"), ("swap_jit_ms", "jit ms", ".2f"),
                             ("traces_after_swap", "traces", "d"), ("lowerings_after_swap", "lowerings", "d"),
                             ("compiles_after_swap", "compiles", "d"), ("swapped_rows_changed", "swapped rows changed", ".2f"),
                             ("other_rows_equal", "other rows equal", ""), ("peak_after_swap_gib", "peak after GiB", ".2f")]), ""]
  errs = [r for r in rows if r.get("error")]
  if errs:
    out += ["Decode-run errors, as recorded:", ""] + [f"- `{r.get('variant')}`: {r['error']}" for r in errs] + [""]
  return out


BANK_ORDER = ("auto", "dense", "gather", "lib")


def _decode_key(key: str) -> tuple[str, str, str]:
  rest, _, mode = key.partition("@")
  impl, _, case = rest.partition("/")
  return impl, case, mode


def _shapes_line(name: str, part: dict[str, Any]) -> str:
  c = ((part.get("train") or part.get("peft")) or {}).get("config")
  if not c:
    return ""
  return (f"`{name}`: hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads / {c['kv_heads']} KV heads, "
          f"MLP {c['mlp']}, vocab {c['vocab']}, batch {c['batch']} x {c['seq']}, median of {c['iters']} steps after "
          f"{c['warmup']}")


def _gib_fields(r: dict[str, Any]) -> dict[str, Any]:
  return dict(base_gib=r["base_bytes_device"] / 2**30 if r.get("base_bytes_device") else None,
              base_stored_gib=r["base_bytes_stored"] / 2**30 if r.get("base_bytes_stored") else None)


def _ds(r: dict[str, Any], payload: dict | None) -> float | None:
  peak = ((payload or {}).get("env") or {}).get("datasheet_bf16_tflops")
  return r["achieved_tflops"] / peak if peak and r.get("achieved_tflops") else None


def _session(r: dict[str, Any]) -> str | None:
  """When the row was measured, and against which matmul peak (rows of one JSON may come
  from several runs on different machines of the same kind)."""
  when = (r.get("run_utc") or "")[11:16]
  peak = r["achieved_tflops"] / r["mfu"] if r.get("achieved_tflops") and r.get("mfu") else None
  return f"{when} UTC, peak {peak:.0f}" if when and peak else (f"{when} UTC" if when else None)


def train_rows(train: dict | None, peft: dict | None) -> list[dict[str, Any]]:
  rows = []
  pa = _find((peft or {}).get("rows"), impl="peft_lora", targets="all", mode="compile")
  pq = _find((peft or {}).get("rows"), impl="peft_lora", targets="qv", mode="compile")
  for r in (train or {}).get("rows", []):
    ref = pq if r.get("targets") == "qv" else pa
    rows.append(dict(r, framework="JAX", setting=r.get("tune"), mfu_ds=_ds(r, train), session=_session(r),
                     vs_peft=_ratio(r, ref) if r.get("impl") != "full" else None,
                     status=r.get("error") or r.get("skipped") or "ok"))
  for r in (peft or {}).get("rows", []):
    rows.append(dict(r, framework="PyTorch", impl=r.get("impl") or ("peft_lora" if r.get("kind") == "lora" else r.get("kind")),
                     targets=r.get("targets"), setting=r.get("mode"), mfu_ds=_ds(r, peft), session=_session(r),
                     vs_peft=_ratio(r, pq if r.get("targets") == "qv" else pa) if r.get("impl") == "peft_lora" else None,
                     status=r.get("error") or r.get("skipped") or "ok"))
  return rows


def profile_section(profile: dict[str, Any]) -> list[str]:
  """Where the device time of one training step goes (``profile_step.py``)."""
  from benchmarks.profile_step import category

  total = profile["total_op_ms_per_step"]
  cats = [dict(what=k, ms=v, share=v / total) for k, v in profile["categories_ms_per_step"]]
  top = profile["top_ops_ms_per_step"] or profile["top_kernels_ms_per_step"]
  kern = [dict(what=f"`{k[:70]}`", cat=category(k), ms=v, share=v / total) for k, v in top[:15]]
  return [
      f"## Profile: `{profile['variant']}`", "",
      f"`jax.profiler` trace of {profile['steps']} steps, device time per step {total:.1f} ms "
      f"({_env_line(profile)}).", "",
      md_table(cats, [("what", "category", ""), ("ms", "ms / step", ".2f"), ("share", "share", ".1%")]), "",
      md_table(kern, [("what", "kernel", ""), ("cat", "category", ""), ("ms", "ms / step", ".2f"),
                      ("share", "share", ".1%")]), "",
  ]


def plot_train(rows: list[dict[str, Any]], path: str) -> bool:
  ok = [r for r in rows if r.get("tokens_per_s")]
  if not ok:
    return False
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ok.sort(key=lambda r: r["tokens_per_s"])
  labels = [f"{r['framework']}: {r['impl']}/{r.get('targets')} @{r['setting']}" for r in ok]
  colors = ["tab:blue" if r["impl"] == "lora_jax" else "tab:orange" if r["framework"] == "PyTorch" else "tab:gray" for r in ok]
  fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * len(ok) + 1.5), sharey=True)
  axes[0].barh(labels, [r["tokens_per_s"] for r in ok], color=colors)
  axes[0].set_xlabel("training tokens/s (higher is better)")
  axes[1].barh(labels, [r.get("peak_gib") or 0 for r in ok], color=colors)
  axes[1].set_xlabel("peak device memory, GiB (lower is better)")
  fig.suptitle("Llama at TinyLlama-1.1B shapes, batch 4 x 1024, bf16, AdamW")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_scaling(scaling: dict | None, path: str) -> bool:
  rows = _ok((scaling or {}).get("rows"))
  if not rows:
    return False
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  for ax, axis, xkey in ((axes[0], "rank", "rank"), (axes[1], "layers", "layers")):
    pts = sorted((r for r in rows if r["axis"] == axis), key=lambda r: r[xkey])
    if not pts:
      continue
    xs = [r[xkey] for r in pts]
    ax.plot(xs, [r["step_ms"] for r in pts], "o-", color="tab:blue", label="step ms")
    ax.set_xlabel(xkey + (" (log scale)" if axis == "rank" else ""))
    if axis == "rank":
      ax.set_xscale("log", base=2)
    ax.set_ylabel("step time, ms", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, [r.get("xla_mem_gib") or 0 for r in pts], "s--", color="tab:red", label="memory")
    ax2.set_ylabel("XLA memory plan, GiB", color="tab:red")
    ax.set_title(f"lora_jax all-linear step vs {axis}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(argv: list[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="tinyllama")
  p.add_argument("--big-config", default="llama7b", help="the QLoRA section's large model (qlora_*_<big>.json)")
  p.add_argument("--results", default=common.RESULTS)
  p.add_argument("--out", default=None, help="markdown path (default <results>/README.md)")
  args = p.parse_args(argv)
  res = args.results
  train = _load(res, "train_step", args.config)
  peft = _load(res, "peft_reference", args.config)
  inf = _load(res, "inference", args.config)
  scaling = _load(res, "scaling", args.config)
  over = _load(res, "overheads", args.config)
  dora_train = _load(res, "dora_train_step", args.config)
  dora_peft = _load(res, "dora_peft_reference", args.config)
  parts = [f"# Benchmark results ({args.config})", "",
           "Generated by `python benchmarks/report.py` from the JSON files beside this page; "
           "`benchmarks/README.md` says how to reproduce them.", ""]
  parts += ["## Environment", ""]
  for name, payload in (("train_step", train), ("peft_reference", peft), ("inference", inf), ("scaling", scaling), ("overheads", over)):
    parts.append(f"- **{name}**: {_env_line(payload)}")
  for name, payload in (("dora_train_step", dora_train), ("dora_peft_reference", dora_peft)):
    if payload:
      parts.append(f"- **{name}**: {_env_line(payload)}")
  for name in ("decode", "peft_decode"):
    payload = _load(res, name, args.config)
    if payload:
      parts.append(f"- **{name}**: {_env_line(payload)}")
  for name in ("qlora_train_step", "qlora_peft_reference"):
    for cfg_name in dict.fromkeys((args.config, args.big_config)):
      payload = _load(res, name, cfg_name)
      if payload:
        parts.append(f"- **{name}_{cfg_name}**: {_env_line(payload)}")
  parts.append("")
  if train:
    c = train["config"]
    parts += [f"Model: Llama, hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads / {c['kv_heads']} KV heads, "
              f"MLP {c['mlp']}, vocab {c['vocab']}; bf16 params and compute; batch {c['batch']} x {c['seq']} tokens; "
              f"AdamW; LoRA r={c['rank']}, alpha={c['alpha']:g}. Median of {c['iters']} steps after {c['warmup']} warm-up steps.", ""]
    parts += [f"{train.get('flop_note', common.FLOP_NOTE)} `MFU (datasheet)` uses the H100 SXM datasheet "
              "dense bf16 rate (989 TFLOP/s) for every row, so JAX and PyTorch rows compare directly.", ""]
    tunes = c.get("tunes", {})
    if tunes:
      parts.append("JAX tunes: " + "; ".join(
          f"`{k}` = remat {'off' if not v['remat'] else (v['remat_policy'] or 'nothing_saveable')}, "
          f"cross-entropy {'chunked ' + str(v['chunk']) if v['chunk'] else 'full logits'}"
          f"{'' if v.get('unroll', 1) == 1 else ', layer scan unrolled ' + (str(v['unroll']) if v['unroll'] else 'fully')}"
          for k, v in tunes.items()) + ".")
      parts.append(f"Best lora_jax all-linear tune (fastest with peak <= {train.get('mem_cap_gib', 4)} GiB): "
                   f"**{train.get('best_tune')}**.")
      parts.append("")
  notes = os.path.join(res, "notes.md")
  if os.path.exists(notes):
    with open(notes) as f:
      parts += ["## Notes", "", f.read().strip(), ""]
  pairs = [(n, _load(res, "compare", n)) for n in dict.fromkeys((args.config, args.big_config))]
  pairs = [(n, c) for n, c in pairs if c]
  if pairs:  # benchmarks/compare.py: the pairs of issue 17, each size from one machine
    from benchmarks import compare  # noqa: PLC0415

    parts += ["## lora_jax vs PyTorch: fastest and matched-memory pairs", ""]
    for n, c in pairs:
      files = ", ".join(f"`{os.path.basename(f)}`" for f in c.get("train_files", []) + c.get("peft_files", []))
      parts += [f"**{n}** on {', '.join(map(str, c.get('devices', [])))}, {', '.join(c.get('dates', []))} "
                f"(commit {', '.join(c.get('commits', []))}; from {files}):", "", "```", compare.print_report(c, echo=False), "```", ""]
  parts += ["## Targets", ""]
  ttext, _ = targets_table(train, peft)
  parts += [ttext, ""]
  rows = train_rows(train, peft)
  parts += ["## Training step", "",
            md_table(rows, [("framework", "framework", ""), ("impl", "implementation", ""), ("targets", "targets", ""),
                            ("setting", "config", ""), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"),
                            ("mfu", "MFU", ".1%"), ("mfu_ds", "MFU (datasheet)", ".1%"), ("peak_gib", "peak GiB", ".2f"),
                            ("vs_peft", "x PEFT+compile", ".2f"),
                            ("compile_s", "compile s", ".1f"), ("session", "measured (matmul peak TFLOP/s)", ""),
                            ("status", "status", "")]), ""]
  if plot_train(rows, os.path.join(res, f"train_step_{args.config}.png")):
    parts += [f"![training step](train_step_{args.config}.png)", ""]
  errors = [r for r in rows if r.get("error")]
  if errors:
    parts += ["Errors, as recorded:", ""]
    for r in errors:
      parts.append(f"- `{r.get('variant')}`: {r['error']}")
    parts.append("")
  if dora_train or dora_peft:  # run_gpu.sh stage `dora`: its own files, one run
    dtext = dora_section(dora_train, dora_peft, f"`dora_train_step_{args.config}.json` and "
                         f"`dora_peft_reference_{args.config}.json` (run_gpu.sh stage `dora`)")
  else:  # DoRA rows added to the main files (train2 / peft2)
    dtext = dora_section(train, peft, f"`train_step_{args.config}.json` and `peft_reference_{args.config}.json`")
  if dtext:
    parts += dtext
    derr = [r for r in (dora_train or {}).get("rows", []) + (dora_peft or {}).get("rows", []) if r.get("error")]
    if derr:
      parts += ["DoRA-run errors, as recorded:", ""] + [f"- `{r.get('variant')}`: {r['error']}" for r in derr] + [""]
  qfiles: dict[str, dict[str, Any]] = {"small": {"files": []}, "big": {"files": []}}
  for part, cfg_name in (("small", args.config), ("big", args.big_config)):
    for key, name in (("train", "qlora_train_step"), ("peft", "qlora_peft_reference"), ("profile", "qlora_profile")):
      qfiles[part][key] = _load(res, name, cfg_name)
      if qfiles[part][key]:
        qfiles[part]["files"].append(f"{name}_{cfg_name}.json")
  qtext = qlora_section(qfiles["small"], qfiles["big"], (args.config, args.big_config))
  if qtext:
    parts += qtext
  dec, pdec = _load(res, "decode", args.config), _load(res, "peft_decode", args.config)
  if dec or pdec:  # run_gpu.sh stage `decode`
    parts += decode_section(dec, pdec, f"`decode_{args.config}.json` and `peft_decode_{args.config}.json` (run_gpu.sh stage `decode`)")
  profile = _load(res, "profile", args.config)
  if profile:
    parts += profile_section(profile)
  if inf:
    parts += ["## Inference (forward, full logits)", "",
              md_table(inf["rows"], [("variant", "variant", ""), ("ms", "ms", ".2f"), ("vs_base", "x base", ".3f"),
                                     ("tokens_per_s", "tokens/s", ",.0f"), ("rel_l2_diff_vs_merged", "rel. L2 diff vs merged", ".2e"),
                                     ("argmax_agree_vs_merged", "argmax agreement", ".4f"), ("b0_equals_base", "b=0 equals base", ""),
                                     ("error", "error", "")]), ""]
  if scaling and train:
    c = scaling["config"]
    base = _find(train["rows"], impl="lora_jax", targets=c.get("targets"), tune=c.get("tune"))
    if base and base.get("rank") == c.get("base_rank"):
      for axis in ("rank", "layers"):
        if not _find(scaling["rows"], axis=axis, rank=base["rank"], layers=c.get("base_layers")):
          scaling["rows"] = [r for r in scaling["rows"] if not (r.get("axis") == axis and r.get("rank") == base["rank"]
                                                                  and r.get("layers") == c.get("base_layers"))]
          scaling["rows"].append(dict(base, axis=axis, layers=c.get("base_layers"), note="from train_step (own process)"))
      scaling["rows"].sort(key=lambda r: (r["axis"], r["rank"] if r["axis"] == "rank" else r["layers"]))
  if scaling:
    c = scaling["config"]
    parts += [f"## Scaling (lora_jax {c.get('targets')}, tune `{c.get('tune')}`)", "", scaling.get("memory_note", ""), "",
              md_table(scaling["rows"], [("axis", "axis", ""), ("rank", "rank", "d"), ("layers", "layers", "d"),
                                         ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"),
                                         ("xla_mem_gib", "XLA plan GiB", ".2f"), ("trainable_params", "trainable", ",d"),
                                         ("note", "note", ""), ("error", "error", ""), ("skipped", "skipped", "")]), ""]
    if plot_scaling(scaling, os.path.join(res, f"scaling_{args.config}.png")):
      parts += [f"![scaling](scaling_{args.config}.png)", ""]
  if over:
    parts += ["## Overheads", "",
              md_table(over["rows"], [("what", "what", ""), ("trace_s", "trace s", ".3f"), ("compile_s", "compile s", ".2f"),
                                      ("first_call_s", "first call s", ".4f"), ("median_s", "median s", ".4f"), ("error", "error", "")]), ""]
  text = "\n".join(parts)
  out = args.out or os.path.join(res, "README.md")
  with open(out, "w") as f:
    f.write(text)
  print(text)
  print(f"wrote {out}")
  return text


if __name__ == "__main__":
  main()
