"""lora_jax against PyTorch + PEFT from train_step / peft_reference JSON files: the pairs issue 17 asks for.

For each size, from the rows of ``train_step.py`` (JAX) and ``peft_reference.py`` (PyTorch)
measured on one machine:

* **fastest vs fastest**: per family (LoRA all-linear, LoRA q,v, full fine-tuning), each side's
  fastest row, whatever its memory; the JAX side is only counted if its peak is at most the
  PyTorch side's (otherwise the pair is reported as ``more_memory``).
* **matched memory**: for every PyTorch row, the fastest JAX row of the same family whose peak
  memory is at most that row's peak (e.g. PEFT with gradient checkpointing against our tunes that
  fit in its memory).
* **best under the cap**: the fastest lora_jax all-linear tune whose peak fits the config's
  ``mem_cap_gib`` (the memory cap is stated per size).
* **LoRA / full**: the fastest LoRA step over the fastest JAX full fine-tuning step (and the pairs
  measured at the same tune).
* **MFU** of the fastest rows, against the matmul peak measured in the row's own process and
  against the datasheet.

    python benchmarks/compare.py --train results/h200_train_step_tinyllama.json \\
        --peft results/h200_peft_reference_tinyllama.json --out results/compare_tinyllama.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# family of a row: (kind, targets); JAX impls counted as lora_jax's LoRA
_JAX_LORA = ("lora_jax",)


def family(row: dict[str, Any], side: str) -> tuple[str, str] | None:
  """``("lora", targets)`` or ``("full", "all")`` for the rows compared, else ``None``."""
  impl = row.get("impl")
  if side == "jax":
    if impl in _JAX_LORA:
      return ("lora", row.get("targets"))
    return ("full", "all") if impl == "full" else None
  if impl in ("peft_lora", "torch_full"):  # peft_reference: plain LoRA and full fine-tuning (not DoRA/QLoRA)
    if row.get("autocast_bf16"):
      return None
    return ("lora", row.get("targets")) if impl == "peft_lora" else ("full", "all")
  return None


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  return [r for r in rows if "error" not in r and "skipped" not in r and r.get("step_ms")]


def _brief(r: dict[str, Any] | None) -> dict[str, Any] | None:
  if r is None:
    return None
  return {k: r.get(k) for k in ("variant", "step_ms", "tokens_per_s", "peak_gib", "mfu", "run_id")}


def compare(jax_rows: list[dict[str, Any]], torch_rows: list[dict[str, Any]], *, cap_gib: float,
            datasheet_tflops: float | None = None) -> dict[str, Any]:
  """The pairs (see the module docstring). Rows that failed or were skipped are left out."""
  jr, tr = _ok(jax_rows), _ok(torch_rows)
  fams = sorted({f for r in jr if (f := family(r, "jax"))} | {f for r in tr if (f := family(r, "torch"))})

  def of(rows, side, fam):
    return [r for r in rows if family(r, side) == fam]

  def fastest(rows):
    return min(rows, key=lambda r: r["step_ms"]) if rows else None

  fastest_pairs, matched = [], []
  for fam in fams:
    js, ts = of(jr, "jax", fam), of(tr, "torch", fam)
    j, t = fastest(js), fastest(ts)
    if j and t:
      fastest_pairs.append(dict(family="/".join(fam), jax=_brief(j), torch=_brief(t),
                                speedup=round(t["step_ms"] / j["step_ms"], 3),
                                memory_ratio=None if not (j.get("peak_gib") and t.get("peak_gib")) else
                                round(j["peak_gib"] / t["peak_gib"], 3),
                                more_memory=bool(j.get("peak_gib") and t.get("peak_gib") and j["peak_gib"] > t["peak_gib"])))
    for t in sorted(ts, key=lambda r: r["step_ms"]):
      fit = [r for r in js if r.get("peak_gib") is not None and t.get("peak_gib") is not None and r["peak_gib"] <= t["peak_gib"]]
      j = fastest(fit)
      matched.append(dict(family="/".join(fam), torch=_brief(t), jax=_brief(j),
                          speedup=None if j is None else round(t["step_ms"] / j["step_ms"], 3)))
  lora_all = of(jr, "jax", ("lora", "all"))
  under_cap = fastest([r for r in lora_all if r.get("peak_gib") is not None and r["peak_gib"] <= cap_gib])
  full = of(jr, "jax", ("full", "all"))
  lora_full = None
  if lora_all and full:
    lf, ff = fastest(lora_all), fastest(full)
    same = []
    for r in lora_all:
      twin = [f for f in full if f.get("tune") == r.get("tune")]
      if twin:
        same.append(dict(tune=r["tune"], ratio=round(r["step_ms"] / twin[0]["step_ms"], 3)))
    lora_full = dict(lora=_brief(lf), full=_brief(ff), ratio=round(lf["step_ms"] / ff["step_ms"], 3), same_tune=same)
  mfu = []
  for fam in fams:
    j = fastest(of(jr, "jax", fam))
    if j and j.get("model_tflop"):
      ds = None if not datasheet_tflops else round(j["model_tflop"] / (j["step_ms"] / 1e3) / datasheet_tflops, 4)
      mfu.append(dict(family="/".join(fam), variant=j["variant"], mfu_measured_peak=j.get("mfu"),
                      measured_peak_tflops=j.get("measured_matmul_peak_tflops"), mfu_datasheet=ds))
  return dict(cap_gib=cap_gib, fastest=fastest_pairs, matched_memory=matched, best_under_cap=_brief(under_cap),
              lora_over_full=lora_full, mfu=mfu)


def _load(paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  rows, envs = [], []
  for p in paths:
    with open(p) as f:
      d = json.load(f)
    envs.append(d.get("env", {}))
    peak = d.get("env", {}).get("matmul_peak_tflops")
    for r in d.get("rows", []):
      rows.append({"measured_matmul_peak_tflops": peak, **r})
  return rows, envs


def print_report(result: dict[str, Any], echo: bool = True) -> str:
  lines = []
  fmt = lambda r: "-" if r is None else f"{r['variant']} {r['step_ms']:.1f} ms, {common.fmt(r.get('peak_gib'), '.2f')} GiB"  # noqa: E731
  lines.append("fastest vs fastest (speedup = PyTorch step / lora_jax step):")
  for p in result["fastest"]:
    lines.append(f"  {p['family']:9s} {p['speedup']:.3f}x  jax {fmt(p['jax'])} | torch {fmt(p['torch'])}"
                 + ("  (jax uses MORE memory)" if p["more_memory"] else ""))
  lines.append("matched memory (fastest lora_jax row with peak <= the PyTorch row's):")
  for p in result["matched_memory"]:
    lines.append(f"  {p['family']:9s} {common.fmt(p['speedup'], '.3f')}x  torch {fmt(p['torch'])} | jax {fmt(p['jax'])}")
  lines.append(f"best lora_jax all-linear tune under {result['cap_gib']} GiB: {fmt(result['best_under_cap'])}")
  lf = result["lora_over_full"]
  if lf:
    lines.append(f"LoRA / full step: {lf['ratio']:.3f} ({fmt(lf['lora'])} / {fmt(lf['full'])}); same tune: {lf['same_tune'] or '-'}")
  for m in result["mfu"]:
    lines.append(f"MFU {m['family']:9s} {common.fmt(m['mfu_measured_peak'], '.1%')} of the measured peak "
                 f"({common.fmt(m['measured_peak_tflops'], '.0f')} TFLOP/s), {common.fmt(m['mfu_datasheet'], '.1%')} of the datasheet  [{m['variant']}]")
  text = "\n".join(lines)
  if echo:
    print(text)
  return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--train", nargs="+", required=True, help="train_step.py JSON files (one machine)")
  p.add_argument("--peft", nargs="+", required=True, help="peft_reference.py JSON files (the same machine)")
  p.add_argument("--config", default=None, help="config name for the memory cap (default: the train file's)")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  jax_rows, jenv = _load(args.train)
  torch_rows, tenv = _load(args.peft)
  with open(args.train[0]) as f:
    first = json.load(f)
  name = args.config or first.get("config", {}).get("name", "cpu-small")
  cfg = common.get_config(name)
  devices = sorted({e.get("device") for e in jenv + tenv})
  result = compare(jax_rows, torch_rows, cap_gib=cfg.mem_cap_gib,
                   datasheet_tflops=common.datasheet_tflops(devices[0]) if len(devices) == 1 and devices[0] else None)
  result.update(config=name, devices=devices, train_files=args.train, peft_files=args.peft,
                dates=sorted({e.get("date_utc", "")[:10] for e in jenv + tenv}),
                commits=sorted({str(e.get("lora_jax_commit")) for e in jenv + tenv}))
  print(f"{name} on {', '.join(map(str, devices))} ({', '.join(result['dates'])})")
  print_report(result)
  if args.out:
    common.write_json(args.out, result)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
