"""Fuzzing the file readers: every mutation of a valid file — truncations, byte flips, header
lies, config edits — is a clean library error naming the file, or a load that equals the
original, bit for bit. Never another exception type, a hang (a per-case alarm) or different
numbers.

Targets: a format-2 adapters save, a format-1 save (its tensor file; its JSON, which format 1
never covered by a checksum, is fuzzed for errors and hangs only), and a merged params file.
The default run is seeded and takes well under a minute; the long run
(``LORA_JAX_FUZZ_N=100000 python -m pytest tests/test_fuzz_files.py -m slow -s``) prints its
counts (and writes them to ``$LORA_JAX_FUZZ_REPORT`` if set).
"""

import collections
import hashlib
import json
import os
import random
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import io
from lora_jax.files import adapters as files_adapters
from lora_jax.kinds import LoraFactors

SEED = 20261124
CASE_ALARM_S = 20  # a case taking this long is a hang
DEFAULT_CASES = {"adapters2": 1600, "adapters2-forged": 300, "adapters1": 400, "params": 900}


# ----------------------------------------------------------------------------------------------
# The valid files.
# ----------------------------------------------------------------------------------------------


def _originals(d):
  rng = np.random.default_rng(7)
  params = {
      "x": {"kernel": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "bias": jnp.zeros(4, jnp.float32)},
      "y": {"kernel": jnp.asarray(rng.standard_normal((2, 3, 2)), jnp.float32)},
      "z": {"embedding": jnp.asarray(rng.standard_normal((5, 3)), jnp.bfloat16)},
      "n": {"step": jnp.array(3, jnp.int32)},
  }
  f = lambda *s: np.asarray(rng.standard_normal(s), np.float32)  # noqa: E731
  ad = jax.tree.map(lambda _: None, params)
  ad["x"]["kernel"] = LoraFactors(a=jnp.asarray(f(3, 2)), b=jnp.asarray(f(2, 4)), scale=2.0, layout="io")
  ad["y"]["kernel"] = LoraFactors(a=jnp.asarray(f(2, 3, 1)), b=jnp.asarray(f(2, 1, 2)), scale=4.0, layout="lio")
  ad["z"]["embedding"] = LoraFactors(a=jnp.asarray(f(5, 2), jnp.bfloat16), b=jnp.asarray(f(2, 3), jnp.bfloat16), scale=0.5, layout="io")
  spec = lora_jax.LoraSpec(["x", "y", "z"], rank=2, alpha=4, rank_pattern={"y": 1}, alpha_pattern={"z": 1}, layout={"y/.*": "lio"})
  v2 = lora_jax.save(d / "v2", ad, spec, {"step": 9, "run": "fuzz"}, params=params)
  from test_io import _save_v1

  v1 = _save_v1(d / "v1", files_adapters.flatten_adapters(ad), spec=spec, metadata={"step": 9})
  merged = lora_jax.save_merged(d / "merged.safetensors", params, ad)
  return {
      "params": params,
      "adapters": ad,
      "v2": (d / "v2" / io.ADAPTERS_FILE).read_bytes(),
      "v1": (d / "v1" / io.ADAPTERS_FILE).read_bytes(),
      "v1_json": (d / "v1" / io.CONFIG_FILE).read_bytes(),
      "merged": (d / "merged.safetensors").read_bytes(),
      "merged_tree": lora_jax.load_params(merged, like=params),
  }


# ----------------------------------------------------------------------------------------------
# Mutations.
# ----------------------------------------------------------------------------------------------


def _split(raw):
  if len(raw) < 8:
    return None
  n = int.from_bytes(raw[:8], "little")
  if n > len(raw) - 8:
    return None
  try:
    header = json.loads(raw[8 : 8 + n])
  except (ValueError, RecursionError):
    return None
  return (header, raw[8 + n :]) if isinstance(header, dict) else None


def _join(header, data):
  blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
  blob += b" " * (-len(blob) % 8)
  return len(blob).to_bytes(8, "little") + blob + data


def _header_end(raw):
  return 8 + int.from_bytes(raw[:8], "little") if len(raw) >= 8 else len(raw)


def _deep(n):
  x = []
  for _ in range(n):
    x = [x]
  return x


HOSTILE = [
    10**400, -(10**30), 2**63, 2**48 + 1, -1, 0, 1, 3, 1e308, 1.5, -0.0, True, False, None, "", "0", "2",
    "i" * 5000 + "x", "x" * 20000, "io", "oi", "lio", "ii", "lora", "dora", "float32", "int8", "bfloat16", "F32",
    "0" * 64, [], {}, [1, 2], [2, 3, 4], {"a": 1}, _deep(100), "\x1b[2J", "é" * 10,
]


def _nudge(v, rng):
  if isinstance(v, bool):
    return not v
  if isinstance(v, int):
    return v + rng.choice([-1, 1])
  if isinstance(v, float):
    return v * (1 + rng.choice([1e-12, -1e-12, 1e-6])) if v else 1e-300
  if isinstance(v, str):
    return v[::-1] if len(v) > 1 and v != v[::-1] else v + "x"
  if isinstance(v, list):
    return v[::-1] if len(v) > 1 else v + [1]
  return v


def _nodes(obj):
  """Every (container, key) of a JSON tree, so that one of them can be changed."""
  out, stack = [], [obj]
  while stack:
    x = stack.pop()
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
      out.append((x, k))
      if isinstance(v, (dict, list)):
        stack.append(v)
  return out


def _edit_json(obj, rng):
  """One random edit of a JSON tree, in place: set a node to a hostile or nudged value, delete
  a key, or add one."""
  nodes = _nodes(obj)
  if not nodes:
    return "none"
  parent, key = rng.choice(nodes)
  r = rng.random()
  if r < 0.45:
    parent[key] = rng.choice(HOSTILE)
    return f"set {key!r}"
  if r < 0.75:
    parent[key] = _nudge(parent[key], rng)
    return f"nudge {key!r}"
  if r < 0.9 and isinstance(parent, dict):
    del parent[key]
    return f"del {key!r}"
  dicts = [x for x, _ in nodes if isinstance(x, dict)] or [obj]
  rng.choice(dicts)[rng.choice(["extra", "kind", "sha256", "rank", "alpha", "scale", "layout", "a", "g"])] = rng.choice(HOSTILE)
  return "add"


def _byte_op(raw, rng):
  data = bytearray(raw)
  op = rng.choice(["flip", "flip", "flip_data", "truncate", "insert", "delete", "length"])
  end = _header_end(raw)
  if op == "flip" and data:
    data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
  elif op == "flip_data" and len(data) > end:
    data[rng.randrange(end, len(data))] ^= 1 << rng.randrange(8)
  elif op == "truncate":
    data = data[: rng.randrange(len(data) + 1)]
  elif op == "insert":
    data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
  elif op == "delete" and data:
    i = rng.randrange(len(data))
    del data[i : i + rng.choice([1, 1, 8, 100])]
  elif op == "length" and len(data) >= 8:
    n = int.from_bytes(data[:8], "little")
    value = rng.choice([n + rng.choice([-8, -1, 1, 8]), rng.randrange(2**64), 0, 2**63, len(data)])
    data[:8] = (value % 2**64).to_bytes(8, "little")
  return bytes(data), op


def _header_op(raw, rng):
  parts = _split(raw)
  if parts is None:
    return raw, "header(unparsable)"
  header, data = parts
  names = [k for k in header if k != "__metadata__"]
  if not names:
    return raw, "header(empty)"
  t = rng.choice(names)
  e = header[t]
  op = rng.choice(["dtype", "shape", "offsets", "swap", "drop", "rename", "meta", "meta", "entry"])
  if op == "dtype":
    e["dtype"] = rng.choice(["F32", "BF16", "F16", "F64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "", 3, None])
  elif op == "shape" and isinstance(e.get("shape"), list):
    s = e["shape"]
    k = rng.choice(["inc", "dec", "append", "pop", "reverse", "hostile", "empty"])
    if k == "inc" and s:
      s[rng.randrange(len(s))] += 1
    elif k == "dec" and s:
      s[rng.randrange(len(s))] -= 1
    elif k == "append":
      s.append(1)
    elif k == "pop" and s:
      s.pop()
    elif k == "reverse":
      s.reverse()
    elif k == "hostile" and s:
      s[rng.randrange(len(s))] = rng.choice([2**60, -1, 1.5, "3", 10**30, None])
    else:
      e["shape"] = []
    op += "." + k
  elif op == "offsets" and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2:
    j = rng.randrange(2)
    e["data_offsets"][j] = rng.choice([e["data_offsets"][j] + rng.choice([-4, -2, -1, 1, 2, 4]), -1, 2**64, 1.5])
  elif op == "swap" and len(names) > 1:
    u = rng.choice([n for n in names if n != t])
    header[t]["data_offsets"], header[u]["data_offsets"] = header[u]["data_offsets"], header[t]["data_offsets"]
  elif op == "drop":
    del header[t]
  elif op == "rename":
    header[rng.choice(["", t + "x", t.rsplit("/", 1)[0], "__metadata__x", "a" * 5000, t[:-1] + "b", t[:-1] + "g"])] = header.pop(t)
  elif op == "meta":
    meta = header.setdefault("__metadata__", {})
    keys = [k for k in meta if k != io.CONFIG_KEY]
    if keys and rng.random() < 0.5:
      k = rng.choice(keys)
      if rng.random() < 0.5:
        del meta[k]
      else:
        meta[k] = rng.choice(["", "3", "x" * 1000, 1, None, meta[k][::-1]])
      op += f".{k}"
    else:
      meta[rng.choice(["format", "format_version", "lora_jax_data_sha256", "x"])] = rng.choice(["lora_jax.params", "2", "0" * 64, "pt"])
  elif op == "entry":
    e[rng.choice(["extra", "dtype", "shape"])] = rng.choice(HOSTILE)
  return _join(header, data), "header." + op


def _config_op(raw, rng, *, forge):
  parts = _split(raw)
  if parts is None or not isinstance(parts[0].get("__metadata__"), dict) or io.CONFIG_KEY not in parts[0]["__metadata__"]:
    return raw, "config(unparsable)"
  header, data = parts
  meta = header["__metadata__"]
  text = meta[io.CONFIG_KEY]
  if not forge and rng.random() < 0.3 and text:  # a character of the config text
    i = rng.randrange(len(text))
    meta[io.CONFIG_KEY] = text[:i] + rng.choice(['"', "}", "]", ",", "0", "9", " ", "\\", "x", "\x00", "é"]) + text[i + 1 :]
    return _join(header, data), "config.char"
  try:
    cfg = json.loads(text)
  except (ValueError, RecursionError):
    return raw, "config(unparsable)"
  what = _edit_json(cfg, rng)
  if forge:  # recompute every checksum: a consistent file that says something else
    try:
      for e in cfg["adapters"].values():
        e["sha256"] = files_adapters._entry_digest(e)
      cfg["base_model"]["fingerprint"] = files_adapters._fingerprint({k: e["kernel"] for k, e in cfg["adapters"].items()})
    except (AttributeError, KeyError, TypeError, ValueError):
      pass
  new = json.dumps(cfg, separators=(",", ":"), ensure_ascii=False)
  meta[io.CONFIG_KEY] = new
  if forge:
    meta[io.DIGEST_KEY] = hashlib.sha256(new.encode()).hexdigest()
  return _join(header, data), "config." + what


# ----------------------------------------------------------------------------------------------
# Running cases.
# ----------------------------------------------------------------------------------------------


class _Hang(BaseException):
  pass


def _alarm(signum, frame):
  raise _Hang()


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint8 if x.dtype.itemsize == 1 else f"u{x.dtype.itemsize}")


def _same_adapters(a, b):
  fa, fb = files_adapters.flatten_adapters(a), files_adapters.flatten_adapters(b)
  if list(fa) != list(fb):
    return False
  for k in fa:
    if type(fa[k]) is not type(fb[k]) or fa[k].static() != fb[k].static():
      return False
    for n in fa[k].ROLES:
      x, y = fa[k].leaves()[n], fb[k].leaves()[n]
      if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(_bits(x), _bits(y)):
        return False
  return jax.tree.structure(a, is_leaf=lambda x: x is None) == jax.tree.structure(b, is_leaf=lambda x: x is None)


def _same_tree(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      x.dtype == y.dtype and x.shape == y.shape and np.array_equal(_bits(x), _bits(y)) for x, y in zip(la, lb))


def _guard(fn):
  """A mutation that does not apply to what earlier ones left (e.g. a header that is no longer
  an object) leaves the bytes as they are."""
  def run(raw, rng, **kw):
    try:
      return fn(raw, rng, **kw)
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError, RecursionError):
      return raw, fn.__name__ + "(skipped)"
  return run


def _edit_json_text(raw, rng):
  cfg = json.loads(raw)
  op = "json." + _edit_json(cfg, rng)
  return json.dumps(cfg, indent=2).encode(), op


def _mutate(target, orig, rng):
  n_ops = rng.choice([1, 1, 1, 2, 3])
  ops = []
  if target == "adapters1":
    which = "json" if rng.random() < 0.35 else "tensors"
    raw = orig["v1_json"] if which == "json" else orig["v1"]
    for _ in range(n_ops):
      if which == "json":
        raw, op = _guard(_byte_op if rng.random() < 0.5 else _edit_json_text)(raw, rng)
      else:
        raw, op = _guard(_byte_op if rng.random() < 0.6 else _header_op)(raw, rng)
      ops.append(op)
    return which, raw, ops
  raw = orig["merged"] if target == "params" else orig["v2"]
  for _ in range(n_ops):
    r = rng.random()
    if target == "adapters2-forged":
      raw, op = _guard(_config_op)(raw, rng, forge=True)
    elif target == "adapters2" and r < 0.35:
      raw, op = _guard(_config_op)(raw, rng, forge=False)
    elif r < 0.7:
      raw, op = _guard(_byte_op)(raw, rng)
    else:
      raw, op = _guard(_header_op)(raw, rng)
    ops.append(op)
  return None, raw, ops


def _run_case(target, i, orig, d):
  """One mutation and load; ``(outcome, problem-or-None, ops)``."""
  rng = random.Random(f"{SEED}/{target}/{i}")
  which, raw, ops = _mutate(target, orig, rng)
  if target.startswith("adapters2"):
    path, load = d / "v2", lambda: lora_jax.load(d / "v2", orig["params"])
    (d / "v2" / io.ADAPTERS_FILE).write_bytes(raw)
  elif target == "adapters1":
    path, load = d / "v1", lambda: lora_jax.load(d / "v1", orig["params"])
    (d / "v1" / io.ADAPTERS_FILE).write_bytes(raw if which == "tensors" else orig["v1"])
    (d / "v1" / io.CONFIG_FILE).write_bytes(raw if which == "json" else orig["v1_json"])
  else:
    path = d / "merged.safetensors"
    path.write_bytes(raw)
    like = rng.random() < 0.8
    load = (lambda: lora_jax.load_params(path, like=orig["params"])) if like else (lambda: lora_jax.load_params(path))
  signal.setitimer(signal.ITIMER_REAL, CASE_ALARM_S)
  try:
    got = load()
  except _Hang:
    return "hang", f"no answer in {CASE_ALARM_S} s", ops
  except (ValueError, TypeError) as e:  # AdapterFileError is a ValueError
    name = type(e).__name__
    if str(path) not in str(e):
      return name, f"the message does not name the file: {str(e)[:300]}", ops
    return name, None, ops
  except Exception as e:  # noqa: BLE001 - any other type is a failure, reported below
    return type(e).__name__, f"not a clean library error: {type(e).__name__}: {str(e)[:300]}", ops
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
  if target == "params":
    want = orig["merged_tree"] if like else lora_jax.load_params(d / "pristine.safetensors")
    return ("equal", None, ops) if _same_tree(got, want) else ("different", "loaded different numbers", ops)
  if _same_adapters(got, orig["adapters"]):
    return "equal", None, ops
  if target == "adapters2-forged":  # a consistent file that says something else may load; it must fit
    lora_jax.check_adapters(orig["params"], got)
    return "forged-loaded", None, ops
  if target == "adapters1" and which == "json":  # format 1 never covered its JSON by a checksum
    return "v1-json-loaded-different", None, ops
  return "different", "loaded different numbers", ops


def fuzz(tmp_path, cases):
  """Runs ``cases`` ({target: n}); returns (counts, failures, seconds)."""
  orig = _originals(tmp_path / "orig")
  d = tmp_path / "work"
  for sub in ("v2", "v1"):
    os.makedirs(d / sub)
  (d / "pristine.safetensors").write_bytes(orig["merged"])
  old = signal.signal(signal.SIGALRM, _alarm)
  counts, failures = collections.Counter(), []
  t = time.perf_counter()
  try:
    for target, n in cases.items():
      for i in range(n):
        outcome, problem, ops = _run_case(target, i, orig, d)
        counts[(target, outcome)] += 1
        if problem is not None:
          failures.append((target, i, outcome, problem, ops))
  finally:
    signal.signal(signal.SIGALRM, old)
  return counts, failures, time.perf_counter() - t


def _report(counts, seconds):
  lines = [f"{sum(counts.values())} mutations in {seconds:.0f} s"]
  for target in sorted({t for t, _ in counts}):
    row = {o: c for (t, o), c in sorted(counts.items()) if t == target}
    lines.append(f"  {target}: {sum(row.values())}: " + ", ".join(f"{o} {c}" for o, c in sorted(row.items(), key=lambda kv: -kv[1])))
  return "\n".join(lines)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
def test_fuzz_files(tmp_path):
  counts, failures, seconds = fuzz(tmp_path, DEFAULT_CASES)
  assert not failures, f"{len(failures)} failures, first: " + "\n".join(map(repr, failures[:10]))
  # the fuzzer reaches both outcomes and every target (it is not refusing everything)
  for target in DEFAULT_CASES:
    assert counts[(target, "AdapterFileError")] > 0, (target, counts)
  assert counts[("adapters2", "equal")] > 0 and counts[("params", "equal")] > 0, counts
  assert seconds < 240, _report(counts, seconds)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LORA_JAX_FUZZ_N"), reason="long; set LORA_JAX_FUZZ_N=100000")
def test_fuzz_files_long(tmp_path):
  n = int(os.environ["LORA_JAX_FUZZ_N"])
  total = sum(DEFAULT_CASES.values())
  cases = {t: max(1, round(n * c / total)) for t, c in DEFAULT_CASES.items()}
  counts, failures, seconds = fuzz(tmp_path, cases)
  report = _report(counts, seconds)
  print(report)
  if os.environ.get("LORA_JAX_FUZZ_REPORT"):
    with open(os.environ["LORA_JAX_FUZZ_REPORT"], "w") as f:
      json.dump({"cases": cases, "seconds": round(seconds, 1), "failures": len(failures),
                 "counts": {f"{t}/{o}": c for (t, o), c in sorted(counts.items())},
                 "first_failures": [repr(x) for x in failures[:20]]}, f, indent=2)
  assert not failures, f"{len(failures)} failures, first: " + "\n".join(map(repr, failures[:10]))
