"""Where a training step's device time goes: a ``jax.profiler`` trace, summarised.

Builds one :mod:`benchmarks.train_step` variant, warms it up, traces ``--steps`` steps with
``jax.profiler`` and reads the trace back with ``jax.profiler.ProfileData`` (no TensorBoard
needed). Device events are grouped by XLA op (the "XLA Ops" line of each GPU plane) and by
category (large cuBLAS GEMMs, XLA/Triton GEMM fusions, copies, dynamic-update-slice, cuDNN
attention, other fusions), printed per step, and written as JSON together with the optimised
HLO text (to look up what a fusion computes).

With a quantized base (``lora_jax_nf4`` / ``lora_jax_int8``) it also sorts the step's kernels
into dequantize fusions, GEMMs that read the codes themselves, and other GEMMs
(:func:`dequant_summary`): whether each dequantized kernel is its own fusion, written to HBM
and read back by a cuBLAS / Triton GEMM, and the time spent there (``quantized_base``).

    python benchmarks/profile_step.py --config tinyllama --variant lora_jax/all@default
    python benchmarks/profile_step.py --config tinyllama --variant lora_jax_nf4/all@unroll2+keep_xa
    python benchmarks/profile_step.py --config cpu-small --variant lora_jax/all@default  # smoke
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, train_step  # noqa: E402

# (category, regex over "op name | kernel name"), first match wins.
CATEGORIES = (
    ("attention (cuDNN)", r"cudnn|fmha|flash|dot_product_attention|custom-call.*sdpa"),
    ("GEMM fusion (XLA/Triton)", r"gemm_fusion|triton_gemm|__triton_gemm|block_level_gemm"),
    ("GEMM (cuBLAS)", r"cublas|gemm|nvjet|sm90_xmma|cutlass|matmul|dot"),
    ("dynamic-update-slice", r"dynamic[-_]update[-_]slice"),
    ("copy / memcpy", r"copy|memcpy|transpose"),
    ("reduce / norm fusion", r"reduce|loop_reduce|input_reduce"),
    ("elementwise fusion", r"fusion|loop|convert|multiply|add|select"),
)


def category(name: str) -> str:
  low = name.lower()
  for cat, pattern in CATEGORIES:
    if re.search(pattern, low):
      return cat
  return "other"


# ----------------------------------------------------------------------------------------------
# Quantized base: which kernels dequantize, and whether the dense kernel goes through HBM
# ----------------------------------------------------------------------------------------------

_QTYPES = ("u8[", "s8[", "u4[", "s4[")  # packed NF4 codes, int8 codes, uint8 double-quant scales
_PASS = ("bitcast", "copy", "transpose", "get-tuple-element", "reshape", "tuple", "convert")  # follow to the user


def _split_instr(rest: str) -> tuple[str, str, list[str], str]:
  """``TYPE opcode(operands), attrs`` -> (type, opcode, operand names, attrs)."""
  if rest.startswith("("):  # a tuple type
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    typ, rest = rest[: i + 1], rest[i + 1 :].lstrip()
  else:
    typ, _, rest = rest.partition(" ")
  opcode, _, rest = rest.partition("(")
  depth, i = 1, 0
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      break
  return typ, opcode.strip(), re.findall(r"%([\w.\-]+)", rest[:i]), rest[i + 1 :]


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
  """The instructions of an HLO module's text: name -> type, opcode, operands, computation,
  ``calls`` (the fused / called computation), custom-call target."""
  instrs: dict[str, dict[str, Any]] = {}
  comp = None
  for line in text.splitlines():
    if line and not line[0].isspace():
      m = re.match(r"^(?:ENTRY\s+)?%?([^\s(]+)", line)
      comp = m.group(1) if m and line.rstrip().endswith("{") else None
      continue
    m = re.match(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$", line)
    if not m or comp is None:
      continue
    typ, opcode, operands, attrs = _split_instr(m.group(2))
    calls = re.search(r"calls=%([\w.\-]+)", attrs)
    target = re.search(r'custom_call_target="([^"]+)"', attrs)
    instrs[m.group(1)] = dict(type=typ, opcode=opcode, operands=operands, comp=comp,
                              calls=calls.group(1) if calls else None, target=target.group(1) if target else None,
                              triton_gemm="__triton_gemm" in attrs or "kCustom" in attrs and "gemm" in attrs)
  return instrs


def _elements(typ: str) -> int:
  n = 0
  for _, dims in re.findall(r"(\w+)\[([\d,]*)\]", typ):
    m = 1
    for d in filter(None, dims.split(",")):
      m *= int(d)
    n += m
  return n


def _type_bytes(typ: str) -> int:
  sizes = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
           "u32": 4, "f64": 8, "s64": 8, "u64": 8}
  total = 0
  for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", typ):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * sizes.get(dt, 4)
  return total


def dequant_summary(hlo_text: str, ops_ns: dict[str, int], counts: dict[str, int], steps: int) -> dict[str, Any] | None:
  """How a quantized base is computed with, from the optimised HLO and the trace's per-op times.

  Kernel-level instructions (not inside a fusion) are sorted into: ``dequant`` (a fusion that
  reads quantized codes or scales, ``u8``/``s8``, and does no matmul: the dequantized kernel is
  its output, written to memory); ``gemm_fused_dequant`` (a GEMM fusion, e.g. Triton, that reads
  the codes itself); ``gemm`` (cuBLAS custom-calls, dots, other GEMM fusions); ``other``. For
  each dequant fusion whose output reaches a GEMM (through bitcasts / copies / transposes) the
  dense kernel went through HBM before the matmul (also through a copy / transpose / convert
  of the whole kernel on the way). None when nothing reads quantized data.
  """
  instrs = parse_hlo(hlo_text)
  fused = {v["calls"] for v in instrs.values() if v["opcode"] == "fusion" and v["calls"]}
  by_comp: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
  for name, v in instrs.items():
    by_comp[v["comp"]].append(dict(v, name=name))
  users: dict[str, list[str]] = collections.defaultdict(list)
  for name, v in instrs.items():
    for o in v["operands"]:
      users[o].append(name)

  def reads_q(comp: str) -> bool:
    return any(i["opcode"] == "parameter" and i["type"].startswith(_QTYPES) for i in by_comp.get(comp, []))

  def has_dot(comp: str) -> bool:
    return any(i["opcode"] in ("dot", "convolution") or (i["opcode"] == "fusion" and i["calls"] and has_dot(i["calls"]))
               for i in by_comp.get(comp, []))

  def is_gemm(v: dict[str, Any]) -> bool:
    if v["opcode"] in ("dot", "convolution"):
      return True
    if v["opcode"] == "custom-call":
      return bool(v["target"] and re.search(r"gemm|cublas|matmul", v["target"], re.I))
    return v["opcode"] == "fusion" and bool(v["calls"]) and (v["triton_gemm"] or has_dot(v["calls"]))

  def relayout(v: dict[str, Any], src: str) -> bool:  # a copy / transpose / convert of the whole kernel
    return v["opcode"] in _PASS or (v["opcode"] == "fusion" and _elements(v["type"]) == _elements(instrs[src]["type"]))

  def feeds_gemm(name: str, depth: int = 0) -> bool:
    for u in users.get(name, []):
      v = instrs[u]
      if v["comp"] in fused:
        continue
      if is_gemm(v) or (depth < 4 and relayout(v, name) and feeds_gemm(u, depth + 1)):
        return True
    return False

  cls: dict[str, str] = {}
  out_bytes: dict[str, int] = {}
  materialised: set[str] = set()
  for name, v in instrs.items():
    if v["comp"] in fused or v["opcode"] in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
      continue
    q = (v["opcode"] == "fusion" and v["calls"] and reads_q(v["calls"])) or (
        v["opcode"] != "fusion" and any(instrs.get(o, {}).get("type", "").startswith(_QTYPES) for o in v["operands"]))
    if is_gemm(v):
      cls[name] = "gemm_fused_dequant" if q else "gemm"
    elif q and re.search(r"\b(bf16|f16|f32)\[", v["type"]) and v["opcode"] not in ("while", "call", "conditional"):
      # reads codes / scales and writes floats (a slice of the codes is not a dequantize)
      cls[name] = "dequant"
      out_bytes[name] = _type_bytes(v["type"])
      if feeds_gemm(name):
        materialised.add(name)
    else:
      cls[name] = "other"
  if not any(c in ("dequant", "gemm_fused_dequant") for c in cls.values()):
    return None
  norm = lambda k: k.lstrip("%").split(" ")[0].split(":")[0]  # noqa: E731 - trace names vs HLO names
  ms = collections.Counter()
  calls = collections.Counter()
  matched = 0
  per_op: dict[str, float] = {}
  for k, ns in ops_ns.items():
    name = norm(k)
    c = cls.get(name)
    if c is None:
      continue
    matched += ns
    ms[c] += ns
    calls[c] += counts.get(k, 0)
    per_op[name] = ns
  total = sum(ops_ns.values()) or 1
  step_ms = lambda ns: round(ns / 1e6 / steps, 3)  # noqa: E731
  dq = [n for n, c in cls.items() if c == "dequant"]
  dq_calls = {n: max(1, counts.get(n, 0) // steps) for n in dq}
  top = sorted(((n, per_op.get(n, 0)) for n in dq), key=lambda t: (-t[1], -out_bytes[t[0]]))[:15]
  return dict(
      note="dequant: fusions reading u8/s8 codes or scales without a matmul (their output, the dense kernel or "
           "scales, is written to memory); dequant_feeding_gemm: of those, the ones whose output reaches a GEMM "
           "(the dequantized kernel goes through HBM before the matmul); gemm_fused_dequant: GEMMs reading the "
           "codes themselves. Times from the trace, matched to HLO instruction names (matched_share).",
      matched_share=round(matched / total, 4),
      ms_per_step={c: step_ms(ms[c]) for c in ("dequant", "gemm", "gemm_fused_dequant", "other")},
      share_of_device_time={c: round(ms[c] / total, 4) for c in ("dequant", "gemm", "gemm_fused_dequant", "other")},
      calls_per_step={c: calls[c] // steps for c in ("dequant", "gemm", "gemm_fused_dequant")},
      hlo_counts={c: sum(1 for x in cls.values() if x == c) for c in ("dequant", "gemm", "gemm_fused_dequant", "other")},
      dequant_feeding_gemm=len(materialised),
      dequant_feeding_gemm_ms_per_step=step_ms(sum(per_op.get(n, 0) for n in materialised)),
      dequant_out_bytes_per_step=sum(out_bytes[n] * dq_calls[n] for n in dq if n in per_op),
      top_dequant_ms_per_step=[(n, step_ms(t), instrs[n]["type"][:60], n in materialised) for n, t in top],
  )


def summarise(xspace_path: str, steps: int) -> dict[str, Any]:
  """Totals per XLA op, per kernel and per category, in ms per step, from an ``.xplane.pb``."""
  from jax.profiler import ProfileData

  data = ProfileData.from_file(xspace_path)
  ops: collections.Counter[str] = collections.Counter()
  kernels: collections.Counter[str] = collections.Counter()
  counts: collections.Counter[str] = collections.Counter()
  lines_seen: dict[str, float] = {}
  device_planes = [p for p in data.planes if p.name.startswith("/device:")]
  for plane in device_planes:
    for line in plane.lines:
      events = list(line.events)
      total = sum(e.duration_ns for e in events)
      lines_seen[f"{plane.name} | {line.name}"] = total / 1e6 / steps
      if line.name == "XLA Ops":
        for e in events:
          ops[e.name] += e.duration_ns
          counts[e.name] += 1
      elif line.name.startswith("Stream") or "stream" in line.name.lower():
        for e in events:
          kernels[e.name] += e.duration_ns
  if not device_planes:  # CPU: XLA's thunks run on the host's "tf_XLA..." threads
    for plane in data.planes:
      for line in plane.lines:
        if line.name.startswith("tf_XLA"):
          for e in line.events:
            if not e.name.startswith(("ThunkExecutor", "while", "call", "conditional")):
              ops[e.name] += e.duration_ns
              counts[e.name] += 1
  source = ops if ops else kernels
  by_cat: collections.Counter[str] = collections.Counter()
  for name, ns in source.items():
    by_cat[category(name)] += ns
  per_step = lambda c, n: [(k, round(v / 1e6 / steps, 3)) for k, v in c.most_common(n)]
  return dict(
      _source_ns=dict(source), _counts=dict(counts),
      device_planes=[p.name for p in device_planes],
      lines_ms_per_step={k: round(v, 3) for k, v in lines_seen.items()},
      total_op_ms_per_step=round(sum(source.values()) / 1e6 / steps, 3),
      categories_ms_per_step=per_step(by_cat, 20),
      top_ops_ms_per_step=per_step(ops, 40),
      op_calls_per_step={k: counts[k] // steps for k, _ in ops.most_common(40)},
      top_kernels_ms_per_step=per_step(kernels, 40),
  )


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="cpu-small", choices=sorted(common.CONFIGS))
  p.add_argument("--variant", default="lora_jax/all@default", help="impl/targets@tune, as in train_step.py")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/profile_<variant>_<config>.json)")
  p.add_argument("--hlo", default=None, help="also write the optimised HLO text here")
  args = p.parse_args(argv)
  cfg = common.get_config(args.config)

  import jax

  impl, targets, tune_name = train_step._parse_key(args.variant)
  tune = train_step.tune_settings(tune_name, cfg)
  if tune["xla_flags"] and tune["xla_flags"] not in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit(f"tune {tune_name!r} needs XLA_FLAGS={tune['xla_flags']!r} set before this process starts "
                     "(train_step.py sets it per variant process; here, set it in the environment)")
  step, frozen, state, _, _, tokens = train_step.build(impl, targets, tune, cfg)
  compiled = step.lower(*frozen, *state, tokens).compile()
  hlo_text = compiled.as_text()
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(hlo_text)
  box = [state]

  def one():
    *new, loss = compiled(*frozen, *box[0], tokens)
    box[0] = new
    return loss.block_until_ready()

  for _ in range(3):
    one()
  trace_dir = tempfile.mkdtemp(prefix="lora_jax_trace_")
  t0 = time.perf_counter()
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.steps):
    one()
  jax.profiler.stop_trace()
  wall = (time.perf_counter() - t0) / args.steps
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  summary = summarise(path, args.steps)
  source_ns, counts = summary.pop("_source_ns"), summary.pop("_counts")
  quant = dequant_summary(hlo_text, source_ns, counts, args.steps)
  if quant is not None:
    summary["quantized_base"] = quant
  safe = args.variant.replace("/", "_").replace("@", "_")
  out = args.out or os.path.join(common.RESULTS, f"profile_{safe}_{cfg.name}.json")
  payload = dict(benchmark="profile_step", env=common.env_info("jax"), variant=args.variant,
                 config=vars(cfg), steps=args.steps, traced_wall_ms_per_step=round(wall * 1e3, 2), **summary)
  common.write_json(out, payload)
  print(f"{args.variant}: {wall * 1e3:.1f} ms/step while tracing; device ops {summary['total_op_ms_per_step']:.1f} ms/step")
  print("by category (ms/step):")
  for k, v in summary["categories_ms_per_step"]:
    print(f"  {k:28s} {v:8.2f}")
  top = summary["top_ops_ms_per_step"] or summary["top_kernels_ms_per_step"]
  print("top XLA ops / kernels (ms/step):")
  for k, v in top[:25]:
    print(f"  {k[:60]:60s} {v:8.2f}  {category(k)}")
  if quant is not None:
    q = quant["ms_per_step"]
    print(f"quantized base (HLO + trace, {quant['matched_share']:.0%} of op time matched to HLO names), ms/step:")
    print(f"  dequant fusions        {q['dequant']:8.2f}  ({quant['hlo_counts']['dequant']} in the HLO, "
          f"{quant['dequant_feeding_gemm']} feed a GEMM: dense kernel through HBM, {quant['dequant_feeding_gemm_ms_per_step']:.2f} ms; "
          f"{quant['dequant_out_bytes_per_step'] / 2**20:,.0f} MiB written per step)")
    print(f"  GEMMs reading codes    {q['gemm_fused_dequant']:8.2f}  ({quant['hlo_counts']['gemm_fused_dequant']} in the HLO)")
    print(f"  other GEMMs            {q['gemm']:8.2f}")
    print(f"  everything else        {q['other']:8.2f}")
    for n, t, typ, mat in quant["top_dequant_ms_per_step"][:8]:
      print(f"    {n[:40]:40s} {t:8.3f}  -> {typ}{'  (feeds a GEMM)' if mat else ''}")
  print(f"wrote {out}")
  return payload


if __name__ == "__main__":
  main()
