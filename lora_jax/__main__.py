"""Command line: ``python -m lora_jax {inspect,merge,convert} ...`` (also ``lora-jax``).

  inspect PATH                 adapters (lora_jax or PEFT directory) or any .safetensors file
  merge --base B --adapters D --out O
                               fold adapters into a flat-path safetensors base, write O
  convert --to peft SRC OUT --name-map llama|bert
  convert --to lora_jax SRC OUT --name-map llama|bert --base B.safetensors

Exit status: 0 on success; 2 when the arguments or a file are refused (a malformed, hostile or
missing input, an output that cannot be written): one line on stderr names the problem. An
unexpected internal error still shows its traceback (and exits 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Any, Sequence


class UsageError(ValueError):
  """A command line that cannot be carried out as given; the message says why and what to do."""


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


def _c(x: Any, n: int = 120) -> str:
  """A string from a file, safe to print: control characters escaped, cut to ``n`` characters."""
  s = str(x)
  if not s.isprintable():
    s = repr(s)[1:-1]
  return s if len(s) <= n else s[:n] + f"...({len(s)} chars)"


def _num(x: Any) -> str:
  return "-" if x is None else f"{x:g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else _c(x)


def _is_peft_dir(path: str) -> bool:
  from lora_jax.interop import PEFT_CONFIG

  return os.path.isdir(path) and os.path.isfile(os.path.join(path, PEFT_CONFIG))


def _inspect_lora_jax(path: str) -> str:
  from lora_jax import io

  cfg = io.load_config(path)
  flat = io.load(path)  # validates the tensors too
  rows, total, nbytes = [], 0, 0
  for name, e in cfg["adapters"].items():
    leaves = flat[name].leaves()
    n = sum(int(x.size) for x in leaves.values())
    total += n
    nbytes += sum(int(x.nbytes) for x in leaves.values())
    static = e["static"]
    rows.append((_c(name), _c(e["kind"]), tuple(e["kernel"]["shape"]), static["layout"], e.get("rank", "-"),
                 _num(e.get("alpha")), _num(static.get("scale")), "+".join(sorted(leaves)), f"{n:,}"))
  lines = [
      f"lora_jax adapters: {_c(path, 400)}",
      f"  format {cfg['format_version']}, written by lora_jax {_c(cfg['library_version'])}, "
      f"rslora={cfg['rslora']}, base fingerprint {_c(cfg['base_model']['fingerprint'])}",
  ]
  if cfg.get("spec"):
    s = cfg["spec"]
    lines.append(
        f"  spec: targets={_c(repr(s['targets']), 400)} r={s['rank']} alpha={_num(s['alpha'])} "
        f"rank_pattern={_c(s['rank_pattern'], 400)} alpha_pattern={_c(s['alpha_pattern'], 400)}"
    )
  lines.append(_table(("path", "kind", "kernel", "layout", "rank", "alpha", "scale", "leaves", "params"), rows))
  lines.append(f"total: {total:,} adapter parameters ({_fmt_bytes(nbytes)}) in {len(rows)} adapted kernels")
  if cfg.get("metadata"):
    lines.append(f"metadata: {_c(json.dumps(cfg['metadata']), 2000)}")
  return "\n".join(lines)


def _inspect_peft(path: str) -> str:
  from lora_jax.interop import read_peft

  ad = read_peft(path)
  rows, total, nbytes = [], 0, 0
  for m in ad.modules.values():
    n = int(m.A.size + m.B.size)
    total += n
    nbytes += m.A.nbytes + m.B.nbytes
    rows.append((_c(m.name), "Embedding" if m.embedding else "Linear", tuple(m.A.shape), tuple(m.B.shape), m.r, _num(m.alpha), _num(m.scale), f"{n:,}"))
  c = ad.config
  lines = [
      f"PEFT LoRA adapter: {_c(path, 400)}",
      f"  base_model_name_or_path={_c(repr(c.get('base_model_name_or_path')))} task_type={_c(repr(c.get('task_type')))} "
      f"r={_c(c.get('r'))} lora_alpha={_c(c.get('lora_alpha'))} use_rslora={_c(c.get('use_rslora', False))}",
      _table(("module", "kind", "lora_A", "lora_B", "rank", "alpha", "scale", "params"), rows),
      f"total: {total:,} adapter parameters ({_fmt_bytes(nbytes)}) in {len(rows)} modules",
  ]
  if ad.ignored:
    lines.append(f"ignored (not LoRA factors): {_c(list(ad.ignored), 2000)}")
  return "\n".join(lines)


def _inspect_safetensors(path: str, infos: Any, metadata: Any) -> str:
  rows = [(_c(i.name), i.shape, i.dtype.name, f"{math.prod(i.shape):,}") for i in sorted(infos.values(), key=lambda i: i.name)]
  total = sum(math.prod(i.shape) for i in infos.values())
  nbytes = sum(i.end - i.begin for i in infos.values())
  lines = [f"safetensors: {_c(path, 400)}", f"  metadata: {_c(json.dumps(metadata), 2000)}", _table(("tensor", "shape", "dtype", "params"), rows)]
  lines.append(f"total: {total:,} parameters ({_fmt_bytes(nbytes)}) in {len(rows)} tensors")
  return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> str:
  from lora_jax import io

  path = args.path
  if _is_peft_dir(path):
    return _inspect_peft(path)
  if os.path.isdir(path):
    if any(os.path.lexists(os.path.join(path, n)) for n in (io.ADAPTERS_FILE, io.CONFIG_FILE)):
      return _inspect_lora_jax(path)
    raise UsageError(
        f"{path}: not a lora_jax adapter directory (no {io.ADAPTERS_FILE}) and not a PEFT directory "
        "(no adapter_config.json)."
    )
  if not os.path.lexists(path):
    raise UsageError(f"{path}: no such file or directory.")
  if path.endswith(".json"):
    return _inspect_lora_jax(path)
  infos, metadata = io.read_header(path)
  if io.CONFIG_KEY in metadata:
    return _inspect_lora_jax(path)
  return _inspect_safetensors(path, infos, metadata)


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
      raise UsageError(f"{path} is a PEFT directory; pass --name-map llama|bert to locate its modules.")
    return import_peft(path, params, name_map)
  return io.load(path, params, check_dtype=False)


def _dtype_arg(name: str | None) -> Any:
  import jax.numpy as jnp

  if not name:
    return None
  try:
    dtype = jnp.dtype(name)
  except TypeError:
    raise UsageError(f"--dtype {name!r} is not a dtype; use bfloat16, float16 or float32.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise UsageError(f"--dtype {name}: not a floating-point dtype; merged weights would be truncated. Use bfloat16, float16 or float32.")
  return dtype


def _writable(flag: str, out: str, what: str) -> None:
  if os.path.isdir(out) and what == "file":
    raise UsageError(f"{flag} {out} is a directory; name the file to write, e.g. {os.path.join(out, 'merged.safetensors')}.")
  if os.path.lexists(out) and not os.path.isdir(out) and what == "directory":
    raise UsageError(f"{flag} {out} exists and is not a directory; name a new or existing directory.")
  parent = os.path.dirname(os.path.abspath(out))
  while not os.path.exists(parent) and os.path.dirname(parent) != parent:
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UsageError(f"{flag} {out}: {parent} is not a directory.")
  if not os.access(parent, os.W_OK):
    raise UsageError(f"{flag} {out}: cannot write in {parent} (permission denied).")


def _write(flag: str, out: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
  try:
    return fn(*args, **kwargs)
  except OSError as e:
    raise UsageError(f"{flag} {out}: cannot write it ({e.strerror or e}).") from None


def cmd_merge(args: argparse.Namespace) -> str:
  from lora_jax import io
  from lora_jax.files import flatten_adapters as files_flatten

  _writable("--out", args.out, "file")
  dtype = _dtype_arg(args.dtype)
  params = io.load_params(args.base)
  adapters = _read_adapters(args.adapters, params, args.name_map)
  _write("--out", args.out, io.save_merged, args.out, params, adapters, dtype=dtype, safe=not args.unsafe)
  n = len(files_flatten(adapters))
  return f"merged {n} adapted kernels into {args.out}"


def cmd_convert(args: argparse.Namespace) -> str:
  from lora_jax import io
  from lora_jax.files import flatten_adapters as files_flatten
  from lora_jax.interop import export_peft

  if args.to == "peft":
    if _is_peft_dir(args.src):
      raise UsageError(f"{args.src} is already a PEFT directory.")
    _writable("OUT", args.out, "directory")
    flat = io.load(args.src)
    _write("OUT", args.out, export_peft,
        args.out, flat, args.name_map, base_model_name_or_path=args.base_model,
        task_type=None if args.task_type in (None, "none", "None") else args.task_type,
        rslora=io.load_config(args.src)["rslora"],
    )
    return f"wrote PEFT adapter ({len(flat)} adapted kernels) to {args.out}"
  if not _is_peft_dir(args.src):
    raise UsageError(f"{args.src} is not a PEFT directory (no adapter_config.json).")
  if not args.base:
    raise UsageError("convert --to lora_jax needs --base BASE.safetensors (flat-path params) for the kernel shapes.")
  _writable("OUT", args.out, "directory" if not args.out.endswith(".safetensors") else "file")
  from lora_jax.interop import read_peft

  shapes = _base_shapes(args.base)
  # DoRA's base_norm is computed from the kernels' values; plain LoRA needs their shapes only.
  base = io.load_params(args.base, check_dtype=False) if read_peft(args.src).use_dora else shapes
  adapters = _read_adapters(args.src, base, args.name_map)
  _write("OUT", args.out, io.save, args.out, adapters, params=shapes,
         metadata={"converted_from": "peft", "source": os.path.abspath(args.src)})
  return f"wrote lora_jax adapters ({len(files_flatten(adapters))} adapted kernels) to {args.out}"


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


def _one_line(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename is not None:
    text = f"{e.filename}: {e.strerror or e}"
  else:
    text = str(e) or type(e).__name__
  return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (2: refused, with one line on stderr saying why).

  >>> main(["inspect", "/nonexistent"])
  2
  """
  args = build_parser().parse_args(argv)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", UserWarning)
      out = args.func(args)
  except (ValueError, TypeError, OSError) as e:  # refused input or output: AdapterFileError is a ValueError
    print(f"lora-jax {args.command}: {_one_line(e)}", file=sys.stderr)
    return 2
  for w in caught:
    print(f"{w.category.__name__}: {w.message}", file=sys.stderr)
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
