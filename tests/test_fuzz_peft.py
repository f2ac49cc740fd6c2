"""Seeded fuzz of a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

Every mutated directory either fails with a clean library error (AdapterFileError /
ValueError / TypeError) whose message names the file, or loads to exactly what the files
hold, decoded independently (the safetensors package's Rust parser, stdlib json, PEFT's
pattern rule with Python's re). Never another exception type, never a hang (an alarm per
case), never other numbers. ``LORA_JAX_FUZZ_CASES`` sets the number of cases (default 3000).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import struct
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lora_jax import io
from lora_jax.interop import export_peft, import_peft, read_peft
from lora_jax.kinds import LoraFactors

safetensors = pytest.importorskip("safetensors")

CASES = int(os.environ.get("LORA_JAX_FUZZ_CASES", "3000"))
SEED = 20261201
ALARM_S = 5.0
PREFIX = "base_model.model."
_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")
DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
NAMES = {  # torch module -> Flax path, as the "llama" name map says
    "model.layers.0.self_attn.q_proj": "params/layers_0/self_attn/q_proj/kernel",
    "model.layers.0.self_attn.v_proj": "params/layers_0/self_attn/v_proj/kernel",
    "model.embed_tokens": "params/embed_tokens/embedding",
}
SDS = jax.ShapeDtypeStruct
PARAMS = {"params": {
    "embed_tokens": {"embedding": SDS((16, 8), jnp.float32)},
    "layers_0": {"self_attn": {"q_proj": {"kernel": SDS((8, 8), jnp.float32)}, "v_proj": {"kernel": SDS((8, 4), jnp.float32)}}},
}}


class Hang(Exception):
  pass


@contextlib.contextmanager
def alarm(seconds):
  def on_alarm(signum, frame):
    raise Hang(f"no outcome after {seconds} s")

  old = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
  return make_original(tmp_path_factory.mktemp("peft"))


def make_original(d):
  """A valid PEFT directory's two files: Linear and Embedding modules, rank/alpha patterns, rsLoRA."""
  rng = np.random.default_rng(0)
  flat = {}
  for path, (rank, scale) in {
      "params/layers_0/self_attn/q_proj/kernel": (2, 5 / math.sqrt(2)),
      "params/layers_0/self_attn/v_proj/kernel": (3, 4 / math.sqrt(3)),
      "params/embed_tokens/embedding": (2, 4 / math.sqrt(2)),
  }.items():
    kin, kout = {"q": (8, 8), "v": (8, 4), "e": (16, 8)}[path.split("/")[-2][0]]
    a = rng.standard_normal((kin, rank)).astype(np.float32)
    b = rng.standard_normal((rank, kout)).astype(np.float32)
    flat[path] = LoraFactors(a=a, b=b, scale=scale, layout="io", rslora=True)
  export_peft(d, flat, "llama")
  cfg = json.loads((d / "adapter_config.json").read_text())
  assert cfg["use_rslora"] and cfg["rank_pattern"] and cfg["alpha_pattern"]  # the patterns are exercised
  return (d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------
# The independent reference: what the files say.
# ----------------------------------------------------------------------------------------------


def _peft_key(pattern, name):
  for key in pattern:  # peft.utils.other.get_pattern_key
    if re.match(rf"(.*\.)?({key})$", name):
      return key
  return None


def reference(cfg_bytes, st_bytes):
  """``{flax path: (a, b, scale)}`` as PEFT reads these files, or None where PEFT's own
  tooling could not read them at all."""
  try:
    cfg = json.loads(cfg_bytes)
    header, buf = _split_st(st_bytes)
    if isinstance(header, dict) and "__metadata__" in header and not header["__metadata__"]:
      # lora_jax's reader takes a falsy __metadata__ ([], "", 0, false) for none; the Rust
      # parser accepts only a map. Metadata holds no numbers, so read it as none here too.
      del header["__metadata__"]
      st_bytes = _join_st(header, buf, pad=False)
    tensors = {
        name: np.frombuffer(bytes(v["data"]), DTYPES[v["dtype"]]).reshape(v["shape"])
        for name, v in safetensors.deserialize(st_bytes)
    }
  except Exception:  # noqa: BLE001 - any failure: the reference cannot read it
    return None
  parts = {}
  for key, x in tensors.items():
    m = _KEY.fullmatch(key[len(PREFIX):] if key.startswith(PREFIX) else key)
    if m:
      parts.setdefault(m[1], {})["A" if m[2].endswith(("A.weight", "_A")) else "B"] = x
  out = {}
  for name, p in parts.items():
    rk, ak = _peft_key(cfg.get("rank_pattern") or {}, name), _peft_key(cfg.get("alpha_pattern") or {}, name)
    alpha = float(cfg["alpha_pattern"][ak] if ak is not None else cfg.get("lora_alpha", 8))
    rank = p["A"].shape[0]
    scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
    # Mixed factor dtypes are read as float32 (float64 if either is), as import_peft documents.
    dtype = p["A"].dtype if p["A"].dtype == p["B"].dtype else np.dtype(np.float64 if np.float64 in (p["A"].dtype, p["B"].dtype) else np.float32)
    out[NAMES.get(name, name)] = (p["A"].T.astype(dtype), p["B"].T.astype(dtype), scale)
  return out


def as_jax(ref):
  """The reference as JAX arrays hold it: float64 is float32 unless jax_enable_x64 (JAX's rule)."""
  out = {}
  for k, (a, b, scale) in ref.items():
    dtype = jax.dtypes.canonicalize_dtype(a.dtype)
    out[k] = (a.astype(dtype), b.astype(dtype), scale)
  return out


# ----------------------------------------------------------------------------------------------
# Mutations.
# ----------------------------------------------------------------------------------------------


def _split_st(data):
  n = struct.unpack("<Q", data[:8])[0]
  return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_st(header, buf, pad=True):
  text = json.dumps(header).encode()
  if pad:
    text += b" " * (-len(text) % 8)
  return struct.pack("<Q", len(text)) + text + buf


def _rebuild(tensors, metadata):
  """A valid safetensors file holding ``tensors`` (name -> (dtype name, shape, raw bytes))."""
  header, chunks, pos = {}, [], 0
  if metadata is not None:
    header["__metadata__"] = metadata
  for name, (dt, shape, raw) in tensors.items():
    header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
    chunks.append(raw)
    pos += len(raw)
  return _join_st(header, b"".join(chunks))


def _tensors(data):
  header, buf = _split_st(data)
  meta = header.pop("__metadata__", None)
  return {k: (v["dtype"], v["shape"], buf[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}, meta


def _bytes_mutation(rng, data):
  kind = rng.randrange(6)
  if kind == 0 or not data:  # truncate
    return data[: rng.randrange(len(data) + 1)]
  data = bytearray(data)
  if kind == 1:  # flip bytes; half the time within the first 200 (headers)
    for _ in range(rng.randint(1, 3)):
      i = rng.randrange(min(len(data), 200) if rng.random() < 0.5 else len(data))
      data[i] ^= rng.randint(1, 255)
  elif kind == 2:  # insert
    i = rng.randrange(len(data) + 1)
    data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
  elif kind == 3:  # delete a range
    i = rng.randrange(len(data))
    del data[i : i + rng.randint(1, 16)]
  elif kind == 4:  # append junk
    data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
  else:  # overwrite a run with one byte value
    i = rng.randrange(len(data))
    data[i : i + rng.randint(1, 8)] = bytes([rng.choice([0, 0x20, 0x7B, 0xFF, 0x22])]) * len(data[i : i + 8])
  return bytes(data)


_BAD_VALUES = [None, True, False, 0, -1, 1, 2, 3, 4, 2**40, 10**400, 2.5, float("nan"), "2", "", [], {}, [1], {"a": 1}]


def _header_lie(rng, data):
  header, buf = _split_st(data)
  names = [k for k in header if k != "__metadata__"]
  name = rng.choice(names)
  entry = header[name]
  kind = rng.randrange(10)
  if kind == 0:
    entry["dtype"] = rng.choice(list(DTYPES) + ["X", "f32", "F32 ", 3, None])
  elif kind == 1:
    entry["shape"] = rng.choice([[], [0], [2, 8], [8, 2], [3, 8], [2**48, 1], [2**49], [-1, 8], [2, 8, 1], "8", [2.0, 8], [True, 8], [1] * 40])
  elif kind == 2:
    b, e = entry["data_offsets"]
    entry["data_offsets"] = rng.choice([[b + 1, e], [b, e - 1], [b, e + 1], [e, b], [0, 2**64], [b, "x"], [b], [b - 1, e - 1], [-4, e]])
  elif kind == 3:
    del header[name]
  elif kind == 4:
    header[name + rng.choice(["", "x", ".lora_A.weight"])] = dict(entry)
  elif kind == 5:
    header["__metadata__"] = rng.choice([{"format": 1}, [], "pt", {"format": "pt", "x": None}, {}])
  elif kind == 6:
    entry[rng.choice(["extra", "dtype", "shape"])] = rng.choice(_BAD_VALUES)
  elif kind == 7:  # the header length field lies
    text = data[8 : 8 + struct.unpack("<Q", data[:8])[0]]
    n = rng.choice([0, 1, 2, len(text) - 1, len(text) + 1, len(text) + 8, 2**63, 2**64 - 1, 100 * 1024 * 1024 + 1])
    return struct.pack("<Q", n) + data[8:]
  elif kind == 8:
    return _join_st(header, buf, pad=False) if rng.random() < 0.5 else _join_st([header], buf)
  else:
    header[name] = rng.choice(_BAD_VALUES)
  return _join_st(header, buf)


def _valid_edit(rng, data):
  """A well-formed file that says something else: renamed, recast, removed, non-finite."""
  tensors, meta = _tensors(data)
  name = rng.choice(list(tensors))
  dt, shape, raw = tensors[name]
  kind = rng.randrange(7)
  if kind == 0:  # rename: another module, another factor kind, no prefix, a DoRA / bias key
    new = rng.choice([
        name.replace("q_proj", "k_proj"), name.replace("layers.0", "layers.1"), name.replace("lora_A", "lora_B"),
        name.replace("lora_B", "lora_A"), name.replace(".weight", ".bias"), name[len(PREFIX):],
        name.replace("lora_A.weight", "lora_embedding_A"), name.replace("lora_embedding_B", "lora_B.weight"),
        name.replace("lora_A.weight", "lora_magnitude_vector"), "base_model.model.model.norm.weight",
        name.replace("self_attn", "self_attn.default"), name + "x",
    ])
    tensors = {new if k == name else k: v for k, v in tensors.items()}
  elif kind == 1:  # another dtype, values converted
    new = rng.choice(["F16", "BF16", "F64", "I32", "F8_E4M3", "U8"])
    x = np.frombuffer(raw, DTYPES[dt]).astype(DTYPES[new])
    tensors[name] = (new, shape, x.tobytes())
  elif kind == 2:  # remove a tensor
    del tensors[name]
  elif kind == 3:  # non-finite or extreme values
    x = np.frombuffer(raw, DTYPES[dt]).copy()
    x[rng.randrange(x.size)] = rng.choice([np.nan, np.inf, -np.inf, 1e38, -0.0, 1e-45])
    tensors[name] = (dt, shape, x.tobytes())
  elif kind == 4:  # another shape for the same bytes (a transpose or a reshape)
    tensors[name] = (dt, rng.choice([shape[::-1], [int(np.prod(shape))], [1, *shape], [shape[0] * 2, shape[1] // 2] if shape[1] % 2 == 0 else shape]), raw)
  elif kind == 5:  # an extra, non-LoRA tensor PEFT may store (e.g. a full embedding)
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] = ("F32", [2, 2], np.ones(4, np.float32).tobytes())
  else:  # other metadata
    meta = rng.choice([None, {}, {"format": "np"}, {"format": "pt", "extra": "x"}])
  return _rebuild(tensors, meta)


_CONFIG_KEYS = ["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type", "use_dora",
                "lora_bias", "target_modules", "bias", "init_lora_weights", "use_bdlora", "kasa_config",
                "layer_replication", "target_parameters", "modules_to_save", "task_type", "fan_in_fan_out",
                "use_qalora", "new_option", "use_future_variant", "future_config"]
_CONFIG_VALUES = _BAD_VALUES + [
    "LORA", "LOHA", "none", "all", "pissa", "gaussian", "q_proj", "(a|a)+b", "(" * 60,
    {"q_proj": 3}, {"v_proj": 3}, {"q_proj": 2}, {"(a|a)+b": 2}, {"(" * 50: 2}, {"q_proj": 0},
    {"q_proj": 10**400}, {"(?i)Q": 2}, {r"(x)\1": 2}, {r"model\.layers\.\d+\.self_attn\.v_proj": 3},
    {"target_modules_bd_a": ["q_proj"], "nblocks": 2}, ["q_proj"], [3], 4.0, -0.0, 1e308,
]


def _config_edit(rng, data):
  cfg = json.loads(data)
  kind = rng.randrange(5)
  if kind == 0:
    cfg[rng.choice(_CONFIG_KEYS)] = rng.choice(_CONFIG_VALUES)
  elif kind == 1:
    cfg.pop(rng.choice(list(cfg)), None)
  elif kind == 2:
    pname = rng.choice(["rank_pattern", "alpha_pattern"])
    pattern = dict(cfg.get(pname) or {})
    pattern[rng.choice(["q_proj", "v_proj", "embed_tokens", ".*", "model.layers.0.self_attn.q_proj", "(q|v)_proj", "a{2000}", "x" * 1200])] = rng.choice([1, 2, 3, 4, 7, 1.5])
    cfg[pname] = pattern
  elif kind == 3:  # raw text: non-standard numbers, duplicate keys
    text = json.dumps(cfg)
    text = rng.choice([
        text.replace('"r": 2', '"r": NaN'), text.replace('"r": 2', '"r": 1e400'), text.replace('"r": 2', '"r": 2, "r": 3'),
        text.replace('"use_rslora": true', '"use_rslora": Infinity'), text.replace("{", "[", 1), text[:-1] + ', "x": }',
    ])
    return text.encode()
  else:
    return rng.choice([b"[]", b'"LORA"', b"null", b"", b"\xff\xfe", json.dumps({"peft_type": "LORA"}).encode(), b"{" * 10000])
  return json.dumps(cfg).encode()


def mutate(rng, cfg, st):
  for _ in range(rng.choice([1, 1, 1, 2])):
    which = rng.random()
    structured = {0: _config_edit, 2: _header_lie, 3: _valid_edit}.get(
        0 if which < 0.25 else 1 if which < 0.35 else 2 if which < 0.6 else 3 if which < 0.85 else 4)
    on_config = which < 0.35
    data = cfg if on_config else st
    try:
      data = structured(rng, data) if structured else _bytes_mutation(rng, data)
    except Exception:  # noqa: BLE001 - an earlier mutation broke the structure: mutate bytes
      data = _bytes_mutation(rng, data)
    cfg, st = (data, st) if on_config else (cfg, data)
  return cfg, st


# ----------------------------------------------------------------------------------------------
# The fuzz.
# ----------------------------------------------------------------------------------------------


def _check_error(e, d, what):
  assert isinstance(e, (ValueError, TypeError)), f"{what}: {type(e).__name__}: {e}"
  assert str(d) in str(e), f"{what}: the message does not name the file: {e}"


def _check_same(got, want, what):
  assert set(got) == set(want), f"{what}: modules {sorted(got)} vs {sorted(want)}"
  for k, (a, b, scale) in want.items():
    ga, gb, gs = got[k]
    assert ga.dtype == a.dtype and gb.dtype == b.dtype, (what, k, ga.dtype, a.dtype)
    np.testing.assert_array_equal(ga, a, err_msg=f"{what}: {k}")
    np.testing.assert_array_equal(gb, b, err_msg=f"{what}: {k}")
    assert gs == pytest.approx(scale, rel=1e-12), (what, k, gs, scale)


def test_fuzz_peft_directory(tmp_path, original):
  d = tmp_path / "case"
  d.mkdir()
  counts = {"error": 0, "read": 0, "import": 0, "same_as_original": 0, "reference_refused": 0}
  want_original = reference(*original)
  for case in range(CASES):
    rng = random.Random(SEED * 100003 + case)
    cfg, st = mutate(rng, *original) if case else original
    (d / "adapter_config.json").write_bytes(cfg)
    (d / "adapter_model.safetensors").write_bytes(st)
    what = f"case {case}"
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # import_peft warns about keys it did not import
      try:
        with alarm(ALARM_S):
          adapter = read_peft(d)
      except Hang:
        raise
      except Exception as e:  # noqa: BLE001 - the outcome under test
        _check_error(e, d, f"{what} read_peft")
        counts["error"] += 1
        continue
      want = reference(cfg, st)
      if want is None:  # the reference refuses what lora_jax read: then it must be the original
        want = want_original
        counts["reference_refused"] += 1
      got = {NAMES.get(m.name, m.name): (m.A.T, m.B.T, m.scale) for m in adapter.modules.values()}
      common = lambda a, b: a.dtype if a.dtype == b.dtype else np.dtype(np.float64 if np.float64 in (a.dtype, b.dtype) else np.float32)  # noqa: E731
      _check_same({k: (a.astype(common(a, b)), b.astype(common(a, b)), s) for k, (a, b, s) in got.items()}, want, f"{what} read_peft")
      counts["read"] += 1
      try:
        with alarm(ALARM_S):
          tree = import_peft(d, PARAMS, "llama")
      except Hang:
        raise
      except Exception as e:  # noqa: BLE001
        _check_error(e, d, f"{what} import_peft")
        continue
      flat = io.flatten_adapters(tree)
      _check_same({p: (np.asarray(f.a), np.asarray(f.b), f.scale) for p, f in flat.items()}, as_jax(want), f"{what} import_peft")
      assert all(f.rslora == bool(adapter.config.get("use_rslora")) for f in flat.values())
      counts["import"] += 1
      counts["same_as_original"] += set(want) == set(want_original) and all(
          np.array_equal(want[k][0], want_original[k][0]) and np.array_equal(want[k][1], want_original[k][1]) and want[k][2] == want_original[k][2]
          for k in want)
  # The fuzz reaches every outcome: refusals, loads that differ (what the files now say), and
  # loads equal to the original (mutations that change no meaning).
  print(counts)
  assert counts["error"] > CASES // 3 and counts["import"] > CASES // 50 and counts["same_as_original"] > 1, counts
