"""Files: adapters save/load, merged export, and the untrusted-file reader."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_jax
from lora_jax import io
from _util import random_adapters
from lora_jax._paths import leaves_with_paths
from lora_jax.kinds import LoraFactors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {
      "embed": {"embedding": jnp.asarray(rng.standard_normal((11, 6)), dtype)},
      "layers": {"q": {"kernel": jnp.asarray(rng.standard_normal((3, 6, 8)), dtype)}},
      "out": {"kernel": jnp.asarray(rng.standard_normal((6, 5)), dtype), "bias": jnp.zeros(5, dtype)},
      "step": jnp.array(7, jnp.int32),
  }


SPEC = lora_jax.LoraSpec(
    ["q", "out", "embed"], rank=2, alpha=4, rank_pattern={"out": 3}, alpha_pattern={"embed": 5},
    layout={"layers/.*": "lio"},
)


def _adapters(params, spec=SPEC, dtype=jnp.float32):
  return random_adapters(params, spec, dtype=dtype)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint8 if x.dtype.itemsize == 1 else f"u{x.dtype.itemsize}")


def _assert_identical(a, b):
  fa, fb = io.flatten_adapters(a), io.flatten_adapters(b)
  assert list(fa) == list(fb)
  for k in fa:
    assert (fa[k].scale, fa[k].layout) == (fb[k].scale, fb[k].layout), k
    for x, y in ((fa[k].a, fb[k].a), (fa[k].b, fb[k].b)):
      assert x.dtype == y.dtype and x.shape == y.shape, k
      np.testing.assert_array_equal(_bits(x), _bits(y))


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("form", ["dir", "pair"])
def test_round_trip_bit_exact(tmp_path, dtype, form):
  params = _params(dtype)
  spec = lora_jax.LoraSpec(SPEC.targets, rank=2, alpha=4, rank_pattern={"out": 3}, alpha_pattern={"embed": 5},
                           layout={"layers/.*": "lio"}, dtype=dtype)
  ad = _adapters(params, spec, dtype)
  path = tmp_path / ("run" if form == "dir" else "step10.safetensors")
  lora_jax.save(path, ad, spec, {"step": 10}, params=params)
  back = lora_jax.load(path, params)
  _assert_identical(ad, back)
  assert jax.tree.structure(back, is_leaf=lambda x: x is None) == jax.tree.structure(ad, is_leaf=lambda x: x is None)
  flat = lora_jax.load(path)
  assert list(flat) == ["embed/embedding", "layers/q/kernel", "out/kernel"]
  _assert_identical(ad, flat)
  if form == "pair":
    assert sorted(os.listdir(tmp_path)) == ["step10.json", "step10.safetensors"]
    _assert_identical(ad, lora_jax.load(tmp_path / "step10.json", params))
  # merge is unchanged by the round trip
  np.testing.assert_array_equal(
      lora_jax.merge(params, ad)["layers"]["q"]["kernel"], lora_jax.merge(params, back)["layers"]["q"]["kernel"]
  )


def test_config_contents(tmp_path):
  params = _params()
  ad = _adapters(params)
  lora_jax.save(tmp_path / "r", ad, SPEC, {"step": 3, "note": "x"}, params=params)
  cfg = lora_jax.load_config(tmp_path / "r")
  assert cfg["variant"] == "lora" and cfg["library_version"] == lora_jax.__version__
  assert cfg["spec"]["targets"] == ["q", "out", "embed"] and cfg["spec"]["rank_pattern"] == {"out": 3}
  e = cfg["adapters"]
  assert (e["out/kernel"]["rank"], e["out/kernel"]["alpha"], e["out/kernel"]["scale"]) == (3, 4.0, 4 / 3)
  assert (e["embed/embedding"]["alpha"], e["embed/embedding"]["scale"]) == (5.0, 2.5)
  assert e["layers/q/kernel"]["layout"] == "lio"
  assert cfg["base_model"]["kernels"]["layers/q/kernel"] == {"shape": [3, 6, 8], "dtype": "float32"}
  assert cfg["metadata"] == {"step": 3, "note": "x"}
  assert len(cfg["base_model"]["fingerprint"]) == 16
  # without a spec, alpha = scale * rank
  lora_jax.save(tmp_path / "s", ad)
  cfg = lora_jax.load_config(tmp_path / "s")
  assert cfg["spec"] is None and cfg["adapters"]["out/kernel"]["alpha"] == 4.0
  assert cfg["base_model"]["kernels"]["out/kernel"]["dtype"] is None


def test_rslora_alpha_recorded(tmp_path):
  params = _params()
  spec = lora_jax.LoraSpec(["out"], rank=4, alpha=16, rslora=True)
  ad = _adapters(params, spec)
  lora_jax.save(tmp_path / "r", ad, spec)
  e = lora_jax.load_config(tmp_path / "r")["adapters"]["out/kernel"]
  assert (e["alpha"], e["scale"]) == (16.0, 8.0)
  assert lora_jax.load(tmp_path / "r")["out/kernel"].scale == 8.0


def test_save_errors(tmp_path):
  params = _params()
  ad = _adapters(params)
  with pytest.raises(ValueError, match="spec gives scale .* pass the spec these adapters were made with"):
    lora_jax.save(tmp_path / "x", ad, lora_jax.LoraSpec(["q", "out", "embed"], rank=2, alpha=1))
  bad = jax.tree.map(lambda x: x, ad)
  bad["out"]["kernel"] = LoraFactors(a=bad["out"]["kernel"].a.at[0, 0].set(jnp.nan), b=bad["out"]["kernel"].b, scale=1.0, layout="io")
  with pytest.raises(ValueError, match="'out/kernel': factor a holds NaN or Inf; refusing to save"):
    lora_jax.save(tmp_path / "x", bad)
  with pytest.raises(TypeError, match="metadata=...\\): must be JSON-serialisable"):
    lora_jax.save(tmp_path / "x", ad, metadata={"x": object()})
  with pytest.raises(ValueError, match="nothing to save"):
    lora_jax.save(tmp_path / "x", jax.tree.map(lambda _: None, params))
  with pytest.raises(ValueError, match="adapters do not mirror params"):
    lora_jax.save(tmp_path / "x", ad, params={"other": {"kernel": jnp.ones((2, 2))}})
  assert not os.path.exists(tmp_path / "x")


def test_load_checks_params(tmp_path):
  params = _params()
  ad = _adapters(params)
  lora_jax.save(tmp_path / "r", ad, params=params)
  other = dict(params, layers={"k": {"kernel": params["layers"]["q"]["kernel"]}})
  with pytest.raises(ValueError, match="adapter for 'layers/q/kernel', which params lack. Params paths near it: 'layers/k/kernel'"):
    lora_jax.load(tmp_path / "r", other)
  wider = dict(params, out={"kernel": jnp.ones((6, 7)), "bias": jnp.zeros(7)})
  with pytest.raises(ValueError, match=r"'out/kernel': adapters were saved for a kernel of shape \(6, 5\), params hold \(6, 7\)"):
    lora_jax.load(tmp_path / "r", wider)
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, params)
  with pytest.raises(ValueError, match="saved for a float32 kernel, params hold bfloat16. Pass check_dtype=False"):
    lora_jax.load(tmp_path / "r", half)
  got = lora_jax.load(tmp_path / "r", half, check_dtype=False)
  _assert_identical(ad, got)


def test_load_detects_inconsistent_pair(tmp_path):
  params = _params()
  ad = _adapters(params)
  lora_jax.save(tmp_path / "r", ad)
  lora_jax.save(tmp_path / "s", jax.tree.map(lambda x: x * 2, ad))
  os.replace(tmp_path / "s" / io.ADAPTERS_FILE, tmp_path / "r" / io.ADAPTERS_FILE)  # a half-finished save
  with pytest.raises(io.AdapterFileError, match="do not match the sha256 recorded .* two different saves"):
    lora_jax.load(tmp_path / "r")
  with pytest.raises(FileNotFoundError, match="the tensor file named by .* is missing"):
    lora_jax.load(tmp_path / "s")
  with pytest.raises(FileNotFoundError, match="no lora_jax config here"):
    lora_jax.load(tmp_path / "nothing")


def test_load_rejects_edited_config(tmp_path):
  params = _params()
  lora_jax.save(tmp_path / "r", _adapters(params))
  cfg_path = tmp_path / "r" / io.CONFIG_FILE
  good = json.loads(cfg_path.read_text())

  def edited(fn, match):
    cfg = json.loads(json.dumps(good))
    fn(cfg)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(io.AdapterFileError, match=match):
      lora_jax.load(tmp_path / "r")

  edited(lambda c: c["adapters"]["out/kernel"].update(scale=9.0), "scale 9.0 does not equal alpha/rank")
  edited(lambda c: c["adapters"]["out/kernel"].update(rank=0), "rank must be a positive integer")
  edited(lambda c: c["adapters"]["out/kernel"].update(layout="oo"), "layout must be a string")
  edited(lambda c: c.update(variant="dora"), "variant 'dora' is not supported")
  edited(lambda c: c.update(format_version=99), "format_version 99 is not one this lora_jax")
  edited(lambda c: c["base_model"]["kernels"].pop("out/kernel"), "base_model.kernels\\['out/kernel'\\]")
  edited(lambda c: c["adapters"]["out/kernel"].update(layout="oi"), "do not match the config")
  cfg_path.write_text("{not json")
  with pytest.raises(io.AdapterFileError, match="not valid JSON"):
    lora_jax.load(tmp_path / "r")
  cfg_path.write_text('{"format": "lora_jax.adapters", "format": 1}')
  with pytest.raises(io.AdapterFileError, match="duplicate key 'format'"):
    lora_jax.load(tmp_path / "r")


def test_non_finite_file_rejected(tmp_path):
  params = _params()
  ad = _adapters(params)
  lora_jax.save(tmp_path / "r", ad)
  t, _, _ = io.read_safetensors(tmp_path / "r" / io.ADAPTERS_FILE)
  t["out/kernel/b"][0, 1] = np.inf
  digest = io.write_safetensors(tmp_path / "r" / io.ADAPTERS_FILE, t)
  cfg = json.loads((tmp_path / "r" / io.CONFIG_FILE).read_text())
  cfg["tensors_sha256"] = digest
  (tmp_path / "r" / io.CONFIG_FILE).write_text(json.dumps(cfg))
  with pytest.raises(io.AdapterFileError, match="out/kernel/b holds NaN or Inf; refusing a non-finite adapter"):
    lora_jax.load(tmp_path / "r")


def test_atomic_save_keeps_good_files(tmp_path, monkeypatch):
  params = _params()
  ad = _adapters(params)
  lora_jax.save(tmp_path / "r", ad)
  before = {n: (tmp_path / "r" / n).read_bytes() for n in os.listdir(tmp_path / "r")}

  def boom(fd):
    raise OSError("disk full")

  monkeypatch.setattr(io.os, "fsync", boom)
  with pytest.raises(OSError, match="disk full"):
    lora_jax.save(tmp_path / "r", jax.tree.map(lambda x: x + 1, ad))
  monkeypatch.undo()
  assert {n: (tmp_path / "r" / n).read_bytes() for n in os.listdir(tmp_path / "r")} == before  # no temp files left
  _assert_identical(ad, lora_jax.load(tmp_path / "r"))


def test_pickles_refused(tmp_path):
  p = tmp_path / "adapter_model.bin"
  p.write_bytes(b"\x80\x04K\x01.")
  with pytest.raises(io.AdapterFileError, match="refusing to read a pickle-based file .* safetensors"):
    io.read_safetensors(p)
  with pytest.raises(io.AdapterFileError, match="refusing to read a pickle"):
    lora_jax.load(p)
  zipped = tmp_path / "model.safetensors"
  zipped.write_bytes(b"PK\x03\x04" + b"\0" * 100)
  with pytest.raises(io.AdapterFileError, match="looks like a PyTorch/pickle file"):
    io.read_safetensors(zipped)


# ----------------------------------------------------------------------------------------------
# The safetensors reader, every check.
# ----------------------------------------------------------------------------------------------


def _raw(header, data=b"", *, pad=True):
  blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
  if pad:
    blob += b" " * (-len(blob) % 8)
  return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\x01\x02", "too short for a safetensors header"),
        (struct.pack("<Q", 10**12) + b"{}", "header length 1000000000000 does not fit"),
        (_raw(b"[1, 2]"), "does not start with"),
        (_raw(b"{bad json}  "), "not valid JSON"),
        (_raw(b"\xff{}"), "not UTF-8|does not start"),
        (_raw(b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), "duplicate key 'x'"),
        (_raw({"x": {"dtype": "F32", "shape": [float("nan")], "data_offsets": [0, 4]}}, b"\0" * 4), "non-standard JSON constant NaN"),
        (_raw({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "unsupported dtype 'C64'"),
        (_raw({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "is not a list of at most"),
        (_raw({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), "is not a list of at most"),
        (_raw({"x": {"dtype": "F32", "shape": [2**60, 0], "data_offsets": [0, 0]}}), "is not a list of at most"),
        (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "fall outside the 4-byte data buffer"),
        (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "holds 4 bytes but shape \\(2,\\) of F32 needs 8"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6), "overlap or leave gaps"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "overlap or leave gaps"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9), "cover 4 bytes of a 9-byte data buffer"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}, b"\0" * 4), "exactly dtype, shape and data_offsets"),
        (_raw({"__metadata__": {"a": 1}}), "__metadata__ must map strings to strings"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, b"\0" * 4), "is not a pair of integers"),
    ],
)
def test_reader_rejects(tmp_path, raw, match):
  p = tmp_path / "f.safetensors"
  p.write_bytes(raw)
  with pytest.raises(io.AdapterFileError, match=match):
    io.read_safetensors(p)


def test_reader_interop_with_safetensors_library(tmp_path):
  from safetensors.numpy import load_file, save_file

  t = {"b": np.arange(5, dtype=np.float32), "a/x": np.ones((2, 3), jnp.bfloat16),
       "z": np.zeros((0, 4), np.float16), "s": np.array(3, np.int64)}
  io.write_safetensors(tmp_path / "mine.safetensors", t, {"format": "pt"})
  theirs = load_file(tmp_path / "mine.safetensors")
  for k in t:
    assert theirs[k].dtype == t[k].dtype and theirs[k].shape == t[k].shape
    np.testing.assert_array_equal(theirs[k], t[k])
  save_file(t, tmp_path / "theirs.safetensors", metadata={"k": "v"})
  mine, meta, _ = io.read_safetensors(tmp_path / "theirs.safetensors")
  assert meta == {"k": "v"} and set(mine) == set(t)
  for k in t:
    np.testing.assert_array_equal(_bits(mine[k]), _bits(t[k]))
  with pytest.raises(TypeError, match="cannot be stored in safetensors"):
    io.write_safetensors(tmp_path / "c.safetensors", {"c": np.ones(2, np.complex64)})


# ----------------------------------------------------------------------------------------------
# Fuzzing: a mutated file gives the same adapters back or an AdapterFileError, nothing else.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  d = tmp_path_factory.mktemp("fuzz")
  params = {"x": {"kernel": jnp.arange(12.0).reshape(3, 4)}, "y": {"kernel": jnp.ones((2, 3, 2))}}
  spec = lora_jax.LoraSpec(["x", "y"], rank=2, alpha=4, layout={"y/.*": "lio"})
  ad = _adapters(params, spec)
  lora_jax.save(d / "good", ad, spec, params=params)
  return d / "good", ad, params


def _mutations():
  flip = st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255))
  cut = st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0))
  insert = st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255))
  header = st.tuples(
      st.just("header"),
      st.sampled_from(['"F32"', '"shape"', '"data_offsets"', "[", "]", ",", "2", "0", "{", "}"]),
      st.sampled_from(['"BF16"', '"F64"', '"shapes"', "[[", "", ",,", "3", "-1", "99999999999", "1e3", "null", "NaN"]),
  )
  length = st.tuples(st.just("length"), st.integers(0, 2**64 - 1), st.just(0))
  return st.lists(st.one_of(flip, cut, insert, header, length), min_size=1, max_size=3)


def _mutate(raw: bytes, ops) -> bytes:
  data = bytearray(raw)
  for op, a, b in ops:
    if op == "flip" and data:
      data[a % len(data)] ^= b
    elif op == "truncate":
      data = data[: a % (len(data) + 1)]
    elif op == "insert":
      data.insert(a % (len(data) + 1), b)
    elif op == "header" and len(data) >= 8:
      n = int.from_bytes(data[:8], "little")
      head = bytes(data[8 : 8 + n]).replace(a.encode(), b.encode(), 1)
      data = bytearray(len(head).to_bytes(8, "little") + head + bytes(data[8 + n :]))
    elif op == "length" and len(data) >= 8:
      data[:8] = a.to_bytes(8, "little")
  return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_mutations())
def test_fuzz_reader(tmp_path_factory, saved, ops):
  path, ad, params = saved
  raw = (path / io.ADAPTERS_FILE).read_bytes()
  d = tmp_path_factory.mktemp("m")
  bad = _mutate(raw, ops)
  (d / "f.safetensors").write_bytes(bad)
  try:
    tensors, _, _ = io.read_safetensors(d / "f.safetensors")
  except io.AdapterFileError:
    pass
  else:  # whatever it returns is consistent with the header it validated
    infos, _ = io.read_header(d / "f.safetensors")
    assert set(tensors) == set(infos)
    for k, t in tensors.items():
      assert t.shape == infos[k].shape and t.dtype == infos[k].dtype
  # the adapter pair: identical adapters back (only if the bytes are unchanged), else our error
  os.makedirs(d / "pair")
  (d / "pair" / io.CONFIG_FILE).write_bytes((path / io.CONFIG_FILE).read_bytes())
  (d / "pair" / io.ADAPTERS_FILE).write_bytes(bad)
  try:
    got = lora_jax.load(d / "pair", params)
  except io.AdapterFileError:
    assert bad != raw
  else:
    assert bad == raw
    _assert_identical(ad, got)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["flip", "truncate", "insert"]), st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3))
def test_fuzz_config(tmp_path_factory, saved, ops):
  path, ad, params = saved
  raw = (path / io.CONFIG_FILE).read_bytes()
  d = tmp_path_factory.mktemp("c")
  bad = _mutate(raw, ops)
  (d / io.CONFIG_FILE).write_bytes(bad)
  (d / io.ADAPTERS_FILE).write_bytes((path / io.ADAPTERS_FILE).read_bytes())
  try:
    got = lora_jax.load(d, params)
  except (io.AdapterFileError, ValueError) as e:  # ValueError: a valid config for another model
    assert isinstance(e, io.AdapterFileError) or "params" in str(e)
  else:  # an edit that kept the config valid (e.g. whitespace, metadata) must not change the adapters
    _assert_identical(ad, got)


# ----------------------------------------------------------------------------------------------
# Merged export.
# ----------------------------------------------------------------------------------------------


def _reference_merge(params, ad):
  """W + scale * a @ b, by hand, in float64."""
  out = jax.tree.map(lambda x: np.asarray(x), params)
  q = ad["layers"]["q"]["kernel"]
  w = np.asarray(params["layers"]["q"]["kernel"], np.float64)
  out["layers"]["q"]["kernel"] = w + q.scale * np.einsum("lir,lro->lio", np.asarray(q.a, np.float64), np.asarray(q.b, np.float64))
  o = ad["out"]["kernel"]
  out["out"]["kernel"] = np.asarray(params["out"]["kernel"], np.float64) + o.scale * np.asarray(o.a, np.float64) @ np.asarray(o.b, np.float64)
  e = ad["embed"]["embedding"]
  out["embed"]["embedding"] = np.asarray(params["embed"]["embedding"], np.float64) + e.scale * np.asarray(e.a, np.float64) @ np.asarray(e.b, np.float64)
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_merged(tmp_path, dtype):
  params = _params(dtype)
  ad = _adapters(params)
  p = lora_jax.save_merged(tmp_path / "m.safetensors", params, ad)
  got = lora_jax.load_params(p)
  ref = _reference_merge(params, ad)
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for (path, g), r, orig in zip(leaves_with_paths(got), jax.tree.leaves(ref), jax.tree.leaves(params)):
    assert g.dtype == orig.dtype and g.shape == orig.shape, path
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(r, np.float64), rtol=tol, atol=tol, err_msg=path)
  like = lora_jax.load_params(p, like=params)
  assert jax.tree.structure(like) == jax.tree.structure(params)
  # a flat {path: LoraFactors} dict (as load() returns) works too, and dtype= casts floats only
  lora_jax.save(tmp_path / "ad", ad)
  p2 = lora_jax.save_merged(tmp_path / "m2.safetensors", params, lora_jax.load(tmp_path / "ad"), dtype=jnp.float16)
  got2 = lora_jax.load_params(p2)
  assert got2["out"]["kernel"].dtype == jnp.float16 and got2["step"].dtype == jnp.int32


def test_save_merged_safe(tmp_path):
  params = _params()
  ad = _adapters(params)
  ad["out"]["kernel"] = LoraFactors(a=ad["out"]["kernel"].a.at[0, 0].set(jnp.inf), b=ad["out"]["kernel"].b, scale=1.0, layout="io")
  with pytest.raises(ValueError, match="'out/kernel': holds NaN or Inf after merging its adapter; refusing to save \\(safe=True\\)"):
    lora_jax.save_merged(tmp_path / "m.safetensors", params, ad)
  assert not os.path.exists(tmp_path / "m.safetensors")
  lora_jax.save_merged(tmp_path / "m.safetensors", params, ad, safe=False)
  assert not np.isfinite(lora_jax.load_params(tmp_path / "m.safetensors")["out"]["kernel"]).all()
  big = {"w": {"kernel": jnp.full((2, 2), 1e30)}}
  with pytest.raises(ValueError, match="'w/kernel': holds NaN or Inf after casting it to float16"):
    lora_jax.save_merged(tmp_path / "h.safetensors", big, {"w": {"kernel": None}}, dtype=jnp.float16)


def test_load_params_like_mismatch(tmp_path):
  params = _params()
  p = lora_jax.save_params(tmp_path / "p.safetensors", params)
  with pytest.raises(io.AdapterFileError, match="missing \\['extra/kernel'\\]"):
    lora_jax.load_params(p, like=dict(params, extra={"kernel": jnp.ones(2)}))
  with pytest.raises(io.AdapterFileError, match=r"'out/bias': expected \(5,\) bfloat16, found \(5,\) float32"):
    lora_jax.load_params(p, like=dict(params, out=dict(params["out"], bias=jnp.zeros(5, jnp.bfloat16))))


# ----------------------------------------------------------------------------------------------
# Training state with orbax, and sharded arrays.
# ----------------------------------------------------------------------------------------------


def test_orbax_training_state(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import optax

  params = _params()
  ad = _adapters(params)
  tx = optax.adam(1e-3)

  @jax.jit
  def step(ad):
    opt_state = tx.init(ad)
    updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, ad), opt_state, ad)
    return optax.apply_updates(ad, updates), opt_state

  ad, opt_state = step(ad)
  state = {"adapters": ad, "opt_state": opt_state, "step": jnp.array(1)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(x, y)


def test_sharded_save_load():
  script = textwrap.dedent(
      """
      import os, tempfile
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      import lora_jax
      from lora_jax.kinds import LoraFactors
      assert jax.device_count() == 8
      mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
      params = {"q": {"kernel": jax.device_put(jnp.ones((16, 32)), NamedSharding(mesh, P("data", "model")))}}
      spec = lora_jax.LoraSpec(["q"], rank=4)
      ad = lora_jax.init(jax.random.key(0), params, spec)
      f = ad["q"]["kernel"]
      sh = LoraFactors(a=NamedSharding(mesh, P("data", None)), b=NamedSharding(mesh, P(None, "model")), scale=f.scale, layout=f.layout)
      f = LoraFactors(a=jax.device_put(f.a + 1, sh.a), b=jax.device_put(f.b + 2, sh.b), scale=f.scale, layout=f.layout)
      ad = {"q": {"kernel": f}}
      d = tempfile.mkdtemp()
      lora_jax.save(d + "/r", ad, spec, params=params)
      back = lora_jax.shard_like(lora_jax.load(d + "/r", params), params)  # a follows fan-in, b fan-out
      g = back["q"]["kernel"]
      assert g.a.sharding.is_equivalent_to(sh.a, 2) and g.b.sharding.is_equivalent_to(sh.b, 2)
      np.testing.assert_array_equal(g.a, f.a); np.testing.assert_array_equal(g.b, f.b)
      merged = jax.jit(lora_jax.merge)(params, back)
      lora_jax.save_merged(d + "/m.safetensors", params, back)
      np.testing.assert_array_equal(lora_jax.load_params(d + "/m.safetensors")["q"]["kernel"], merged["q"]["kernel"])
      print("OK")
      """
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
