"""Command line: ``python -m lora_jax {inspect,merge,convert} ...`` (also ``lora-jax``).

  inspect PATH                 adapters (lora_jax or PEFT directory) or any .safetensors file
  merge --base B --adapters D --out O
                               fold adapters into a flat-path safetensors base, write O
  convert --to peft SRC OUT --name-map llama|bert
  convert --to lora_jax SRC OUT --name-map llama|bert --base B.safetensors

Exit status: 0 on success, 2 on a usage error, 1 when a file is refused (the message says why).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Any, Sequence



def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} B"


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> str:
  cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _is_peft_dir(path: str) -> bool:
  from lora_jax.interop import PEFT_CONFIG

  return os.path.isdir(path) and os.path.isfile(os.path.join(path, PEFT_CONFIG))


def _inspect_lora_jax(path: str) -> str:
  from lora_jax import io

  cfg = io.load_config(path)
  flat = io.load(path)  # validates the tensors too
  rows, total, nbytes = [], 0, 0
  for name, f in flat.items():
    e = cfg["adapters"][name]
    n = int(f.a.size + f.b.size)
    total += n
    nbytes += f.a.nbytes + f.b.nbytes
    shape = tuple(cfg["base_model"]["kernels"][name]["shape"])
    rows.append((name, shape, f.layout, f.rank, e["alpha"], f"{f.scale:g}", f"{n:,}"))
  lines = [
      f"lora_jax adapters: {path}",
      f"  format {cfg['format_version']}, written by lora_jax {cfg['library_version']}, "
      f"variant {cfg['variant']}, rslora={cfg['rslora']}, base fingerprint {cfg['base_model']['fingerprint']}",
  ]
  if cfg.get("spec"):
    s = cfg["spec"]
    lines.append(f"  spec: targets={s['targets']!r} r={s['rank']} alpha={s['alpha']} rank_pattern={s['rank_pattern']} alpha_pattern={s['alpha_pattern']}")
  lines.append(_table(("path", "kernel", "layout", "rank", "alpha", "scale", "params"), rows))
  lines.append(f"total: {total:,} adapter parameters ({_fmt_bytes(nbytes)}) in {len(rows)} adapted kernels")
  if cfg.get("metadata"):
    lines.append(f"metadata: {json.dumps(cfg['metadata'])}")
  return "\n".join(lines)


def _inspect_peft(path: str) -> str:
  from lora_jax.interop import read_peft

  ad = read_peft(path)
  rows, total, nbytes = [], 0, 0
  for m in ad.modules.values():
    n = int(m.A.size + m.B.size)
    total += n
    nbytes += m.A.nbytes + m.B.nbytes
    rows.append((m.name, "Embedding" if m.embedding else "Linear", tuple(m.A.shape), tuple(m.B.shape), m.r, f"{m.alpha:g}", f"{m.scale:g}", f"{n:,}"))
  c = ad.config
  lines = [
      f"PEFT LoRA adapter: {path}",
      f"  base_model_name_or_path={c.get('base_model_name_or_path')!r} task_type={c.get('task_type')!r} "
      f"r={c.get('r')} lora_alpha={c.get('lora_alpha')} use_rslora={c.get('use_rslora', False)}",
      _table(("module", "kind", "lora_A", "lora_B", "rank", "alpha", "scale", "params"), rows),
      f"total: {total:,} adapter parameters ({_fmt_bytes(nbytes)}) in {len(rows)} modules",
  ]
  if ad.ignored:
    lines.append(f"ignored (not LoRA factors): {list(ad.ignored)}")
  return "\n".join(lines)


def _inspect_safetensors(path: str) -> str:
  from lora_jax.io import read_header

  infos, metadata = read_header(path)
  rows = [(i.name, i.shape, i.dtype.name, f"{math.prod(i.shape):,}") for i in sorted(infos.values(), key=lambda i: i.name)]
  total = sum(math.prod(i.shape) for i in infos.values())
  nbytes = sum(i.end - i.begin for i in infos.values())
  lines = [f"safetensors: {path}", f"  metadata: {json.dumps(metadata)}", _table(("tensor", "shape", "dtype", "params"), rows)]
  lines.append(f"total: {total:,} parameters ({_fmt_bytes(nbytes)}) in {len(rows)} tensors")
  return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> str:
  from lora_jax import io

  path = args.path
  if _is_peft_dir(path):
    return _inspect_peft(path)
  tensor_path, config_path = io._files(path)
  if os.path.exists(config_path):
    return _inspect_lora_jax(path)
  if os.path.isfile(path):
    return _inspect_safetensors(path)
  raise FileNotFoundError(
      f"{path}: not a lora_jax adapter directory (no {io.CONFIG_FILE}), not a PEFT directory "
      "(no adapter_config.json), and not a file."
  )


def _base_shapes(path: str) -> dict[str, Any]:
  """A nested dict of ShapeDtypeStruct from a flat-path safetensors header (no data read)."""
  import jax

  from lora_jax import io

  infos, _ = io.read_header(path)
  return io._nest({k: jax.ShapeDtypeStruct(i.shape, i.dtype) for k, i in sorted(infos.items())}, path)


def _read_adapters(path: str, params: Any, name_map: str | None) -> Any:
  from lora_jax import io
  from lora_jax.interop import import_peft

  if _is_peft_dir(path):
    if not name_map:
      raise SystemExit(f"lora-jax: {path} is a PEFT directory; pass --name-map llama|bert to locate its modules.")
    return import_peft(path, params, name_map)
  return io.load(path, params, check_dtype=False)


def cmd_merge(args: argparse.Namespace) -> str:
  import jax.numpy as jnp

  from lora_jax import io

  params = io.load_params(args.base)
  adapters = _read_adapters(args.adapters, params, args.name_map)
  dtype = jnp.dtype(args.dtype) if args.dtype else None
  io.save_merged(args.out, params, adapters, dtype=dtype, safe=not args.unsafe)
  n = len(io.flatten_adapters(adapters))
  return f"merged {n} adapted kernels into {args.out}"


def cmd_convert(args: argparse.Namespace) -> str:
  from lora_jax import io
  from lora_jax.interop import export_peft

  if args.to == "peft":
    if _is_peft_dir(args.src):
      raise SystemExit(f"lora-jax: {args.src} is already a PEFT directory.")
    flat = io.load(args.src)
    export_peft(
        args.out, flat, args.name_map, base_model_name_or_path=args.base_model,
        task_type=None if args.task_type in (None, "none", "None") else args.task_type,
        rslora=io.load_config(args.src)["rslora"],
    )
    return f"wrote PEFT adapter ({len(flat)} adapted kernels) to {args.out}"
  if not _is_peft_dir(args.src):
    raise SystemExit(f"lora-jax: {args.src} is not a PEFT directory (no adapter_config.json).")
  if not args.base:
    raise SystemExit("lora-jax: convert --to lora_jax needs --base BASE.safetensors (flat-path params) for the kernel shapes.")
  shapes = _base_shapes(args.base)
  adapters = _read_adapters(args.src, shapes, args.name_map)
  io.save(args.out, adapters, params=shapes, metadata={"converted_from": "peft", "source": os.path.abspath(args.src)})
  return f"wrote lora_jax adapters ({len(io.flatten_adapters(adapters))} adapted kernels) to {args.out}"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="lora-jax", description="Inspect, merge and convert LoRA adapters.")
  sub = p.add_subparsers(dest="command", required=True)
  i = sub.add_parser("inspect", help="paths, ranks, alphas and parameter counts of adapters or a safetensors file")
  i.add_argument("path")
  i.set_defaults(func=cmd_inspect)
  m = sub.add_parser("merge", help="merge adapters into a flat-path safetensors base")
  m.add_argument("--base", required=True, help="base params, safetensors with '/'-joined names (lora_jax.save_params)")
  m.add_argument("--adapters", required=True, help="a lora_jax adapter directory/pair, or a PEFT directory (with --name-map)")
  m.add_argument("--out", required=True, help="output .safetensors")
  m.add_argument("--name-map", choices=["llama", "bert"], help="for PEFT adapters")
  m.add_argument("--dtype", help="store floating-point params in this dtype (e.g. bfloat16)")
  m.add_argument("--unsafe", action="store_true", help="write even if a merged kernel holds NaN/Inf")
  m.set_defaults(func=cmd_merge)
  c = sub.add_parser("convert", help="lora_jax <-> PEFT")
  c.add_argument("--to", required=True, choices=["peft", "lora_jax"])
  c.add_argument("src")
  c.add_argument("out")
  c.add_argument("--name-map", required=True, choices=["llama", "bert"])
  c.add_argument("--base", help="(--to lora_jax) base params safetensors, for kernel shapes; only its header is read")
  c.add_argument("--base-model", help="(--to peft) base_model_name_or_path to record")
  c.add_argument("--task-type", default="CAUSAL_LM", help="(--to peft) PEFT task_type, or 'none'")
  c.set_defaults(func=cmd_convert)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status.

  >>> main(["inspect", "/nonexistent"])
  1
  """
  from lora_jax.io import AdapterFileError

  args = build_parser().parse_args(argv)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", UserWarning)
      out = args.func(args)
  except (AdapterFileError, FileNotFoundError, ValueError, TypeError) as e:
    print(f"lora-jax {args.command}: {e}", file=sys.stderr)
    return 1
  for w in caught:
    print(f"{w.category.__name__}: {w.message}", file=sys.stderr)
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
