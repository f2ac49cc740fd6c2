"""Files: adapters save/load (format 2 and format 1), atomicity, integrity of the config,
hostile inputs, merged export, and the untrusted-file reader."""

import dataclasses
import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import io
from _util import random_adapters
from lora_jax._paths import leaves_with_paths
from lora_jax.files import adapters as files_adapters
from lora_jax.files import atomic
from lora_jax.kinds import Adapter, LoraFactors, kernel_delta, kernel_labels, leaf_labels, register_kind

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V1_COMMIT = "d3620c1"  # the last commit whose save wrote format 1


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


def _adapters(params, spec=SPEC, dtype=jnp.float32, seed=0):
  return random_adapters(params, spec, dtype=dtype, seed=seed)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint8 if x.dtype.itemsize == 1 else f"u{x.dtype.itemsize}")


def _assert_identical(a, b):
  fa, fb = files_adapters.flatten_adapters(a), files_adapters.flatten_adapters(b)
  assert list(fa) == list(fb)
  for k in fa:
    assert type(fa[k]) is type(fb[k]) and fa[k].static() == fb[k].static(), k
    for n in fa[k].ROLES:
      x, y = fa[k].leaves()[n], fb[k].leaves()[n]
      assert x.dtype == y.dtype and x.shape == y.shape, (k, n)
      np.testing.assert_array_equal(_bits(x), _bits(y))


def _file(path):
  return os.path.join(path, io.ADAPTERS_FILE) if os.path.isdir(path) else os.fspath(path)


def _edit_config(path, fn, *, forge=False):
  """Rewrites the config inside a format-2 file. ``forge``: recompute every checksum, i.e. a
  consistent file that says something else (to reach the validators behind the checksums)."""
  f = _file(path)
  tensors, meta, _ = io.read_safetensors(f)
  cfg = json.loads(meta[io.CONFIG_KEY])
  fn(cfg)
  if forge:
    try:
      for e in cfg["adapters"].values():
        e["sha256"] = files_adapters._entry_digest(e)
      kernels = {k: e["kernel"] for k, e in cfg["adapters"].items()}
      cfg["base_model"]["fingerprint"] = files_adapters._fingerprint(kernels)
    except (AttributeError, KeyError, TypeError):
      pass  # an edit that broke the entries' shape: the validators refuse it before the checksums
  text = json.dumps(cfg)
  meta = dict(meta, **{io.CONFIG_KEY: text})
  if forge:
    meta[io.DIGEST_KEY] = hashlib.sha256(text.encode()).hexdigest()
  io.write_safetensors(f, tensors, meta)


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("form", ["dir", "file"])
def test_round_trip_bit_exact(tmp_path, dtype, form):
  params = _params(dtype)
  spec = lora_jax.LoraSpec(SPEC.targets, rank=2, alpha=4, rank_pattern={"out": 3}, alpha_pattern={"embed": 5},
                           layout={"layers/.*": "lio"}, dtype=dtype)
  ad = _adapters(params, spec, dtype)
  path = tmp_path / ("run" if form == "dir" else "step10.safetensors")
  assert lora_jax.save(path, ad, spec, {"step": 10}, params=params) == str(path)
  back = lora_jax.load(path, params)
  _assert_identical(ad, back)
  assert jax.tree.structure(back, is_leaf=lambda x: x is None) == jax.tree.structure(ad, is_leaf=lambda x: x is None)
  flat = lora_jax.load(path)
  assert list(flat) == ["embed/embedding", "layers/q/kernel", "out/kernel"]
  _assert_identical(ad, flat)
  if form == "file":  # one file, nothing beside it
    assert sorted(os.listdir(tmp_path)) == ["step10.safetensors"]
  else:
    assert sorted(os.listdir(path)) == [io.ADAPTERS_FILE]
  np.testing.assert_array_equal(
      lora_jax.merge(params, ad)["layers"]["q"]["kernel"], lora_jax.merge(params, back)["layers"]["q"]["kernel"]
  )


def test_config_contents(tmp_path):
  params = _params()
  ad = _adapters(params)
  lora_jax.save(tmp_path / "r", ad, SPEC, {"step": 3, "note": "x"}, params=params)
  cfg = lora_jax.load_config(tmp_path / "r")
  assert cfg["format_version"] == 2 and cfg["library_version"] == lora_jax.__version__
  assert cfg["spec"]["targets"] == ["q", "out", "embed"] and cfg["spec"]["rank_pattern"] == {"out": 3}
  assert cfg["spec"]["kind"] == "lora"
  e = cfg["adapters"]
  out = e["out/kernel"]
  assert out["kind"] == "lora"
  assert out["static"] == {"scale": 4 / 3, "layout": "io", "rslora": False, "dropout": 0.0, "base_digest": None}
  assert (out["rank"], out["alpha"]) == (3, 4.0)
  assert out["tensors"] == {"a": {"dtype": "float32", "shape": [6, 3]}, "b": {"dtype": "float32", "shape": [3, 5]}}
  assert (e["embed/embedding"]["alpha"], e["embed/embedding"]["static"]["scale"]) == (5.0, 2.5)
  assert e["layers/q/kernel"]["static"]["layout"] == "lio"
  assert e["layers/q/kernel"]["kernel"] == {"shape": [3, 6, 8], "dtype": "float32"}
  assert cfg["metadata"] == {"step": 3, "note": "x"}
  assert len(cfg["base_model"]["fingerprint"]) == 16
  # the file is plain safetensors: any reader gets the tensors and a str -> str metadata
  from safetensors.numpy import load_file
  from safetensors import safe_open

  assert sorted(load_file(tmp_path / "r" / io.ADAPTERS_FILE)) == sorted(
      f"{p}/{n}" for p in e for n in ("a", "b"))
  with safe_open(tmp_path / "r" / io.ADAPTERS_FILE, "np") as f:
    assert f.metadata()["format"] == "lora_jax.adapters" and f.metadata()["format_version"] == "2"
  # without a spec, alpha = scale * rank; without params, no kernel dtype
  lora_jax.save(tmp_path / "s", ad)
  cfg = lora_jax.load_config(tmp_path / "s")
  assert cfg["spec"] is None and cfg["adapters"]["out/kernel"]["alpha"] == 4.0
  assert cfg["adapters"]["out/kernel"]["kernel"] == {"shape": [6, 5], "dtype": None}


def test_rslora_alpha_recorded(tmp_path):
  params = _params()
  spec = lora_jax.LoraSpec(["out"], rank=4, alpha=16, rslora=True)
  ad = _adapters(params, spec)
  lora_jax.save(tmp_path / "r", ad, spec)
  cfg = lora_jax.load_config(tmp_path / "r")
  e = cfg["adapters"]["out/kernel"]
  assert cfg["rslora"] is True and (e["alpha"], e["static"]["scale"]) == (16.0, 8.0)
  assert lora_jax.load(tmp_path / "r")["out/kernel"].scale == 8.0


def test_numpy_scalars_in_spec_save(tmp_path):
  params = _params()
  spec = lora_jax.LoraSpec(["out", "q"], rank=np.int64(2), alpha=np.float32(4), rank_pattern={"out": np.int64(3)},
                           alpha_pattern={"q": np.float64(6)}, layout={"layers/.*": "lio"})
  ad = _adapters(params, spec)
  lora_jax.save(tmp_path / "r", ad, spec)
  s = lora_jax.load_config(tmp_path / "r")["spec"]
  assert (s["rank"], s["alpha"], s["rank_pattern"], s["alpha_pattern"]) == (2, 4.0, {"out": 3}, {"q": 6.0})
  assert type(s["rank_pattern"]["out"]) is int
  _assert_identical(ad, lora_jax.load(tmp_path / "r"))
  f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=jnp.float32(0.5), layout="io")  # a 0-d array scale
  lora_jax.save(tmp_path / "s", {"w/kernel": f})
  assert lora_jax.load(tmp_path / "s")["w/kernel"].scale == 0.5
  with pytest.raises(TypeError, match="'w/kernel': static field scale is a tuple; only str, int, float, bool and None"):
    lora_jax.save(tmp_path / "s", {"w/kernel": f.replace(scale=(0.5,))})


def test_save_errors(tmp_path):
  params = _params()
  ad = _adapters(params)
  with pytest.raises(ValueError, match="spec gives scale .* pass the spec these adapters were made with"):
    lora_jax.save(tmp_path / "x", ad, lora_jax.LoraSpec(["q", "out", "embed"], rank=2, alpha=1))
  bad = jax.tree.map(lambda x: x, ad)
  bad["out"]["kernel"] = LoraFactors(a=bad["out"]["kernel"].a.at[0, 0].set(jnp.nan), b=bad["out"]["kernel"].b, scale=1.0, layout="io")
  with pytest.raises(ValueError, match="'out/kernel': factor a holds NaN or Inf; refusing to save"):
    lora_jax.save(tmp_path / "x", bad)
  ints = {"w/kernel": LoraFactors(a=jnp.ones((3, 1), jnp.int32), b=jnp.ones((1, 2), jnp.int32), scale=1.0, layout="io")}
  with pytest.raises(TypeError, match="'w/kernel': leaf a has dtype int32; adapters must be floating point .* Cast it"):
    lora_jax.save(tmp_path / "x", ints)
  with pytest.raises(TypeError, match="metadata=...\\): must be JSON-serialisable"):
    lora_jax.save(tmp_path / "x", ad, metadata={"x": object()})
  with pytest.raises(TypeError, match="metadata=...\\): must be JSON-serialisable"):
    lora_jax.save(tmp_path / "x", ad, metadata={"x": float("nan")})
  with pytest.raises(TypeError, match=r"save\(metadata=...\): big\[0\]: <number 100000000000... of 401 characters, out of range>; numbers must fit in 64 bits. Store such values as strings"):
    lora_jax.save(tmp_path / "x", ad, metadata={"big": [10**400]})
  deep: Any = 1
  for _ in range(80):
    deep = [deep]
  with pytest.raises(TypeError, match=r"save\(metadata=...\): .*nested more than 62 levels deep"):
    lora_jax.save(tmp_path / "x", ad, metadata={"d": deep})
  with pytest.raises(ValueError, match="nothing to save"):
    lora_jax.save(tmp_path / "x", jax.tree.map(lambda _: None, params))
  with pytest.raises(ValueError, match="adapters do not mirror params"):
    lora_jax.save(tmp_path / "x", ad, params={"other": {"kernel": jnp.ones((2, 2))}})
  assert not os.path.exists(tmp_path / "x")
  (tmp_path / "f").write_text("")
  with pytest.raises(ValueError, match="f exists and is not a directory; pass a directory, or a NAME.safetensors file"):
    lora_jax.save(tmp_path / "f", ad)
  os.makedirs(tmp_path / "d" / io.ADAPTERS_FILE)
  with pytest.raises(ValueError, match="adapters.safetensors: is a directory; give the name of the file"):
    lora_jax.save(tmp_path / "d", ad)


def test_load_checks_params(tmp_path):
  params = _params()
  ad = _adapters(params)
  lora_jax.save(tmp_path / "r", ad, params=params)
  other = dict(params, layers={"k": {"kernel": params["layers"]["q"]["kernel"]}})
  with pytest.raises(ValueError, match="adapter for 'layers/q/kernel', which params lack. Params paths near it: 'layers/k/kernel'"):
    lora_jax.load(tmp_path / "r", other)
  wider = dict(params, out={"kernel": jnp.ones((6, 7)), "bias": jnp.zeros(7)})
  with pytest.raises(ValueError, match=r"r: 'out/kernel': adapters were saved for a kernel of shape \(6, 5\), params hold \(6, 7\)"):
    lora_jax.load(tmp_path / "r", wider)
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, params)
  with pytest.raises(ValueError, match="saved for a float32 kernel, params hold bfloat16. Pass check_dtype=False"):
    lora_jax.load(tmp_path / "r", half)
  got = lora_jax.load(tmp_path / "r", half, check_dtype=False)
  _assert_identical(ad, got)
  ints = dict(params, out={"kernel": jnp.ones((6, 5), jnp.int32), "bias": jnp.zeros(5)})
  with pytest.raises(TypeError, match=r"r: 'out/kernel': adapters hold a LoraFactors for a leaf of type int32"):
    lora_jax.load(tmp_path / "r", ints, check_dtype=False)


def test_missing_and_foreign_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no lora_jax adapters here"):
    lora_jax.load(tmp_path / "nothing")
  p = lora_jax.save_params(tmp_path / "p.safetensors", {"w": jnp.ones(2)})
  with pytest.raises(io.AdapterFileError, match="p.safetensors: a safetensors file without a lora_jax config .* lora_jax.load_params"):
    lora_jax.load(p)


def test_file_modes_follow_umask(tmp_path):
  ad = {"w/kernel": LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=1.0, layout="io")}
  old = os.umask(0o022)
  try:
    lora_jax.save(tmp_path / "r", ad)
    p = lora_jax.save_params(tmp_path / "p.safetensors", {"w": jnp.ones(2)})
    assert stat.S_IMODE(os.stat(tmp_path / "r" / io.ADAPTERS_FILE).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    os.umask(0o077)
    lora_jax.save(tmp_path / "r", ad)
    assert stat.S_IMODE(os.stat(tmp_path / "r" / io.ADAPTERS_FILE).st_mode) == 0o600
  finally:
    os.umask(old)


# ----------------------------------------------------------------------------------------------
# One save is one atomic act.
# ----------------------------------------------------------------------------------------------


def test_save_is_one_rename_after_everything_is_serialised(tmp_path, monkeypatch):
  params = _params()
  ad = _adapters(params)
  lora_jax.save(tmp_path / "r", ad)
  before = (tmp_path / "r" / io.ADAPTERS_FILE).read_bytes()
  # a config that cannot be serialised fails before the destination is touched
  # (a spec that the spec itself refuses never gets this far; bypass its check to test save's)
  bad_spec = dataclasses.replace(SPEC)
  object.__setattr__(bad_spec, "alpha_pattern", {"embed": 5, "zzz": "x"})
  with pytest.raises(TypeError, match=r"save\(spec=...\): alpha_pattern\['zzz'\] = 'x' cannot be saved; it must be a finite number"):
    lora_jax.save(tmp_path / "r", ad, bad_spec)
  with pytest.raises(TypeError, match="metadata"):
    lora_jax.save(tmp_path / "r", ad, metadata={"step": np.int64(3)})
  assert os.listdir(tmp_path / "r") == [io.ADAPTERS_FILE] and (tmp_path / "r" / io.ADAPTERS_FILE).read_bytes() == before
  calls = []
  real_replace, real_open = os.replace, os.open
  monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", os.path.basename(b))), real_replace(a, b))[1])
  monkeypatch.setattr(os, "open", lambda p, flags, *a: (calls.append(("open", flags & os.O_CREAT and os.path.basename(p))), real_open(p, flags, *a))[1])
  lora_jax.save(tmp_path / "r", _adapters(params, seed=1))
  assert [c for c in calls if c[0] == "replace"] == [("replace", io.ADAPTERS_FILE)]
  created = [name for op, name in calls if op == "open" and name]
  assert len(created) == 1 and created[0].startswith(f".{io.ADAPTERS_FILE}.") and created[0].endswith(".tmp")


class _Crash(BaseException):
  """A crash at an injected point (not an Exception: nothing may catch and carry on)."""


def _inject(monkeypatch, names, at):
  """Makes the ``at``-th call (counting from 0) to any of ``os.<names>`` raise _Crash;
  returns the list of calls made so far."""
  calls = []
  for name in names:
    real = getattr(os, name)

    def fake(*args, _real=real, _name=name, **kw):
      calls.append(_name)
      if len(calls) - 1 == at:
        raise _Crash(_name)
      return _real(*args, **kw)

    monkeypatch.setattr(os, name, fake)
  return calls


_OS_STEPS = ("open", "fsync", "replace", "rename", "unlink", "makedirs", "write")


@pytest.mark.parametrize("old_format", [2, 1])
def test_a_crash_at_each_step_leaves_old_or_new(tmp_path, monkeypatch, old_format):
  """A crash injected at each os call of a save (open, write, fsync, the rename, the cleanup)."""
  params = _params()
  old, new = _adapters(params, seed=0), _adapters(params, seed=1)
  target = tmp_path / "r"
  outcomes = []
  for k in range(100):
    if target.exists():
      for n in os.listdir(target):
        os.unlink(target / n)
    if old_format == 2:
      lora_jax.save(target, old)
    else:
      _save_v1(target, files_adapters.flatten_adapters(old))
    (target / f".{io.ADAPTERS_FILE}.{atomic._HOST}.999999999.0123abcd.tmp").write_bytes(b"x")  # a killed save's
    with monkeypatch.context() as m:
      calls = _inject(m, _OS_STEPS, at=k)
      try:
        lora_jax.save(target, new)
        crashed = None
      except _Crash as e:
        crashed = str(e)
    got = lora_jax.load(target)
    is_new = all(np.array_equal(_bits(got[p].a), _bits(f.a)) for p, f in files_adapters.flatten_adapters(new).items())
    _assert_identical(new if is_new else old, got)
    outcomes.append((crashed, "new" if is_new else "old"))
    # the failed save cleaned up after itself: at most the files of a save (and the old temp) remain
    assert {n for n in os.listdir(target) if not n.endswith("999999999.0123abcd.tmp")} <= {io.ADAPTERS_FILE, io.CONFIG_FILE}
    if crashed is None:
      break
  steps = [c for c, _ in outcomes[:-1]]
  assert outcomes[-1] == (None, "new") and "replace" in steps and "fsync" in steps and "open" in steps, outcomes
  i = steps.index("replace")
  assert all(o == "old" for _, o in outcomes[: i + 1]), outcomes  # before and at the rename: old
  assert all(o == "new" for _, o in outcomes[i + 1 :]), outcomes  # after it: new


_KILL_CHILD = r"""
import os, signal, sys, time
import numpy as np
import lora_jax
from lora_jax.kinds import LoraFactors

def adapters(seed):  # 4 x (2048x768 + 768x2048) float32 = 50 MB
  rng = np.random.default_rng(seed)
  return {f"l{i}/kernel": LoraFactors(a=rng.standard_normal((2048, 768), dtype=np.float32),
                                      b=rng.standard_normal((768, 2048), dtype=np.float32),
                                      scale=0.5 + seed, layout="io") for i in range(4)}

made = {0: adapters(0), 1: adapters(1)}
print("ready", flush=True)
for line in sys.stdin:  # "<dir> <seed> <delay>": fork a save of adapters(seed), SIGKILL it after delay
  d, seed, delay = line.split()
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    code = 1
    try:
      os.close(r)
      os.write(w, b"s")
      lora_jax.save(d, made[int(seed)])
      code = 0
    finally:
      os._exit(code)
  os.close(w)
  os.read(r, 1)
  t = time.perf_counter()
  status = None
  while time.perf_counter() - t < float(delay):
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
      status = st
      break
    time.sleep(0.0005)
  if status is None:
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
  what = "killed" if os.WIFSIGNALED(status) else "finished" if os.WEXITSTATUS(status) == 0 else "failed"
  print(what, time.perf_counter() - t, flush=True)
  os.close(r)
"""


def _kill_during_saves(tmp_path, n_kills):
  """A child process saves ~50 MB over a good save and is killed with SIGKILL at ``n_kills``
  moments spread over the save; after each, the directory loads as the old or the new
  adapters, bit-exactly. The saves alternate between two adapter sets."""
  if not hasattr(os, "fork"):
    pytest.skip("needs os.fork")
  rng = lambda s: np.random.default_rng(s)  # noqa: E731
  want = {}
  for seed in (0, 1):  # the same draws as the child's, as digests
    g = rng(seed)
    want[seed] = [
        (hashlib.sha256(g.standard_normal((2048, 768), dtype=np.float32).tobytes()).hexdigest(),
         hashlib.sha256(g.standard_normal((768, 2048), dtype=np.float32).tobytes()).hexdigest())
        for _ in range(4)]

  def which(d):
    got = lora_jax.load(d)
    digests = [(hashlib.sha256(np.asarray(f.a).tobytes()).hexdigest(), hashlib.sha256(np.asarray(f.b).tobytes()).hexdigest())
               for f in got.values()]
    seeds = [s for s in (0, 1) if digests == want[s] and all(f.scale == 0.5 + s for f in got.values())]
    assert len(seeds) == 1, "neither the old nor the new adapters"
    return seeds[0]

  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
  try:
    assert child.stdout.readline().strip() == "ready"
    d = tmp_path / "run"

    def run(seed, delay):
      child.stdin.write(f"{d} {seed} {delay}\n")
      child.stdin.flush()
      what, seconds = child.stdout.readline().split()
      return what, float(seconds)

    what, full = run(0, 120)  # the first save completes: the "old" one, and how long a save takes
    assert what == "finished" and which(d) == 0
    current, results = 0, []
    for k in range(n_kills):
      delay = full * 1.1 * (k + 0.5) / n_kills
      what, _ = run(1 - current, delay)
      got = which(d)
      assert got in (current, 1 - current)
      if what == "finished":
        assert got == 1 - current
      results.append((round(delay, 3), what, "new" if got != current else "old"))
      current = got
      temps = [n for n in os.listdir(d) if n != io.ADAPTERS_FILE]
      assert len(temps) <= 1 and all(n.endswith(".tmp") for n in temps), temps  # one killed save's temp, at most
    assert any(w == "killed" and o == "old" for _, w, o in results), results
    lora_jax.save(d, lora_jax.load(d))  # a completed save removes the temp files of killed ones
    assert os.listdir(d) == [io.ADAPTERS_FILE]
    return results
  finally:
    child.stdin.close()
    child.wait(timeout=60)
    child.stdout.close()


def test_kill_9_during_save(tmp_path):
  _kill_during_saves(tmp_path, 6)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LORA_JAX_SLOW"), reason="long; set LORA_JAX_SLOW=1")
def test_kill_9_during_save_many(tmp_path):
  results = _kill_during_saves(tmp_path, 60)
  print(results)


def test_stale_temp_files_removed(tmp_path):
  ad = {"w/kernel": LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=1.0, layout="io")}
  d = tmp_path / "r"
  os.makedirs(d)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
  names = {
      "dead": f".{io.ADAPTERS_FILE}.{atomic._HOST}.{dead}.0123abcd.tmp",
      "alive": f".{io.ADAPTERS_FILE}.{atomic._HOST}.{os.getppid()}.0123abcd.tmp",
      "other_host": f".{io.ADAPTERS_FILE}.elsewhere.{dead}.0123abcd.tmp",
      "legacy_old": f".{io.ADAPTERS_FILE}.ab_cd123.tmp",
      "legacy_new": f".{io.ADAPTERS_FILE}.xy_cd123.tmp",
      "other_file": f".params.safetensors.{atomic._HOST}.{dead}.0123abcd.tmp",
      "user": "notes.txt",
  }
  for n in names.values():
    (d / n).write_bytes(b"x")
  os.utime(d / names["legacy_old"], (time.time() - 7200,) * 2)
  lora_jax.save(d, ad)
  left = set(os.listdir(d))
  assert left == {io.ADAPTERS_FILE} | {names[k] for k in ("alive", "other_host", "legacy_new", "other_file", "user")}


# ----------------------------------------------------------------------------------------------
# Format 1 (lora_jax 0.1) still loads.
# ----------------------------------------------------------------------------------------------


def _save_v1(path, flat, *, spec=None, kernel_dtypes=None, metadata=None, rslora=False):
  """What lora_jax 0.1's save wrote: adapters.safetensors + lora_jax.json (format 1), by hand."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    tensor_path, config_path = path, path[: -len(".safetensors")] + ".json"
  else:
    os.makedirs(path, exist_ok=True)
    tensor_path, config_path = os.path.join(path, io.ADAPTERS_FILE), os.path.join(path, io.CONFIG_FILE)
  tensors, entries, base = {}, {}, {}
  for name, f in flat.items():
    a, b = np.asarray(f.a), np.asarray(f.b)
    tensors[f"{name}/a"], tensors[f"{name}/b"] = a, b
    alpha = float(spec.alpha_for(name)) if spec is not None else io._alpha(f.scale, f.rank, rslora)
    entries[name] = {"rank": f.rank, "alpha": alpha, "scale": float(f.scale), "layout": f.layout,
                     "a_dtype": a.dtype.name, "b_dtype": b.dtype.name}
    base[name] = {"shape": list(f.kernel_shape), "dtype": (kernel_dtypes or {}).get(name)}
  digest = io.write_safetensors(tensor_path, tensors, {"format": "lora_jax.adapters", "lora_jax_version": "0.1.0"})
  canon = json.dumps({k: [v["shape"], v["dtype"]] for k, v in sorted(base.items())}, separators=(",", ":"))
  config = {
      "format": "lora_jax.adapters", "format_version": 1, "library_version": "0.1.0", "variant": "lora",
      "tensors": os.path.basename(tensor_path), "tensors_sha256": digest, "rslora": rslora,
      "spec": None if spec is None else {
          "targets": list(spec.targets) if not isinstance(spec.targets, str) else spec.targets,
          "rank": int(spec.rank), "alpha": float(spec.alpha), "rank_pattern": dict(spec.rank_pattern or {}),
          "alpha_pattern": {k: float(v) for k, v in (spec.alpha_pattern or {}).items()}, "rslora": bool(spec.rslora)},
      "adapters": entries,
      "base_model": {"fingerprint": hashlib.sha256(canon.encode()).hexdigest()[:16], "kernels": base},
      "metadata": dict(metadata or {}),
  }
  with open(config_path, "w") as fh:
    fh.write(json.dumps(config, indent=2, sort_keys=False, allow_nan=False) + "\n")
  return path


@pytest.mark.parametrize("form", ["dir", "pair"])
def test_format_1_still_loads(tmp_path, form):
  params = _params()
  ad = _adapters(params)
  kd = {p: "float32" for p in files_adapters.flatten_adapters(ad)}
  path = tmp_path / ("run" if form == "dir" else "s.safetensors")
  _save_v1(path, files_adapters.flatten_adapters(ad), spec=SPEC, kernel_dtypes=kd, metadata={"step": 1})
  _assert_identical(ad, lora_jax.load(path, params))
  if form == "pair":
    _assert_identical(ad, lora_jax.load(tmp_path / "s.json"))
  cfg = lora_jax.load_config(path)
  assert cfg["format_version"] == 1 and cfg["metadata"] == {"step": 1}
  e = cfg["adapters"]["layers/q/kernel"]  # the format-2 shape
  assert e["kind"] == "lora" and e["static"] == {"scale": 2.0, "layout": "lio"} and e["rank"] == 2
  assert e["tensors"]["a"] == {"dtype": "float32", "shape": [3, 6, 2]}
  # its tensor file is covered by the sha256 in its JSON
  t, m, _ = io.read_safetensors(io._files(path)[0])
  t["out/kernel/b"] = t["out/kernel/b"] * 2
  io.write_safetensors(io._files(path)[0], t, m)
  with pytest.raises(io.AdapterFileError, match="do not match the sha256 recorded in .* two different saves"):
    lora_jax.load(path)
  # saving over it upgrades it to one format-2 file, and removes the old JSON
  lora_jax.save(path, ad)
  assert sorted(os.listdir(tmp_path if form == "pair" else path)) == (["s.safetensors"] if form == "pair" else [io.ADAPTERS_FILE])
  _assert_identical(ad, lora_jax.load(path))


def test_format_1_edge_cases(tmp_path):
  params = _params()
  ad = files_adapters.flatten_adapters(_adapters(params))
  _save_v1(tmp_path / "r", ad)
  os.unlink(tmp_path / "r" / io.ADAPTERS_FILE)
  with pytest.raises(FileNotFoundError, match="the tensor file named by .* is missing"):
    lora_jax.load(tmp_path / "r")
  # a format-2 file beside a stale format-1 JSON (a kill after the rename): the file wins
  _save_v1(tmp_path / "s", ad)
  lora_jax.save(tmp_path / "x.safetensors", {k: f.replace(a=f.a * 2) for k, f in ad.items()})
  os.replace(tmp_path / "x.safetensors", tmp_path / "s" / io.ADAPTERS_FILE)
  assert sorted(os.listdir(tmp_path / "s")) == [io.ADAPTERS_FILE, io.CONFIG_FILE]
  np.testing.assert_array_equal(lora_jax.load(tmp_path / "s")["out/kernel"].a, ad["out/kernel"].a * 2)
  # a user's own JSON beside a save is never removed
  (tmp_path / "u.json").write_text('{"mine": true}')
  lora_jax.save(tmp_path / "u.safetensors", ad)
  assert json.loads((tmp_path / "u.json").read_text()) == {"mine": True}


def test_format_1_writer_matches_the_old_code(tmp_path, monkeypatch):
  """The hand-written format-1 writer above is what lora_jax 0.1's save really wrote."""
  monkeypatch.setattr(lora_jax, "__version__", "0.1.0")  # the old code records the version
  r = subprocess.run(["git", "-C", REPO, "show", f"{V1_COMMIT}:lora_jax/io.py"], capture_output=True, text=True)
  if r.returncode != 0:
    pytest.skip(f"git history with {V1_COMMIT} not available")
  import importlib.util

  (tmp_path / "old_io.py").write_text(r.stdout)
  spec_ = importlib.util.spec_from_file_location("lora_jax_old_io", tmp_path / "old_io.py")
  old_io = importlib.util.module_from_spec(spec_)
  sys.modules["lora_jax_old_io"] = old_io  # dataclasses look their module up
  try:
    spec_.loader.exec_module(old_io)
  finally:
    del sys.modules["lora_jax_old_io"]
  params = _params()
  ad = _adapters(params)
  old_io.save(tmp_path / "old", ad, SPEC, {"step": 4}, params=params)
  kd = {p: "float32" for p in files_adapters.flatten_adapters(ad)}
  _save_v1(tmp_path / "mine", files_adapters.flatten_adapters(ad), spec=SPEC, kernel_dtypes=kd, metadata={"step": 4})
  for name in (io.ADAPTERS_FILE, io.CONFIG_FILE):
    assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "mine" / name).read_bytes(), name
  _assert_identical(ad, lora_jax.load(tmp_path / "old", params))


# ----------------------------------------------------------------------------------------------
# The config is covered by the integrity check.
# ----------------------------------------------------------------------------------------------


def _square_save(tmp_path):
  params = {"sq": {"kernel": jnp.ones((4, 4))}, "out": {"kernel": jnp.ones((4, 3))}}
  spec = lora_jax.LoraSpec(["sq", "out"], rank=2, alpha=3)
  ad = _adapters(params, spec)
  lora_jax.save(tmp_path / "r", ad, spec, {"step": 1}, params=params)
  return tmp_path / "r", ad, params


def test_config_edits_are_detected(tmp_path):
  path, ad, params = _square_save(tmp_path)
  good = (path / io.ADAPTERS_FILE).read_bytes()

  def edited(fn, match):
    (path / io.ADAPTERS_FILE).write_bytes(good)
    _edit_config(path, fn)
    with pytest.raises(io.AdapterFileError, match=match):
      lora_jax.load(path, params)
    with pytest.raises(io.AdapterFileError, match=match):
      lora_jax.load_config(path)

  entry = r"adapters\['sq/kernel'\]: its kind, static fields \(scale, layout\), rank, alpha, kernel or tensor shapes differ from what was saved \(checksum mismatch\)"
  sq = lambda c: c["adapters"]["sq/kernel"]  # noqa: E731
  edited(lambda c: sq(c)["static"].update(layout="oi"), entry)  # a transposed update, same shapes
  edited(lambda c: sq(c)["static"].update(scale=sq(c)["static"]["scale"] * (1 + 1e-12)), entry)
  edited(lambda c: sq(c).update(alpha=sq(c)["alpha"] * (1 + 1e-12)), entry)
  edited(lambda c: sq(c)["kernel"].update(dtype="bfloat16"), entry)
  edited(lambda c: c["metadata"].update(step=2), "the lora_jax config .* differs from what was saved .* edited or corrupted")
  edited(lambda c: c.update(rslora=True), "scale .* does not equal alpha/sqrt\\(rank\\)")
  edited(lambda c: c["adapters"].pop("out/kernel"), "'base_model.fingerprint' does not match the kernels")
  # the tensors are covered too, per path
  (path / io.ADAPTERS_FILE).write_bytes(good)
  tensors, meta, _ = io.read_safetensors(path / io.ADAPTERS_FILE)
  tensors["sq/kernel/b"] = tensors["sq/kernel/b"].copy()
  tensors["sq/kernel/b"].view(np.uint32)[0, 0] ^= 1
  io.write_safetensors(path / io.ADAPTERS_FILE, tensors, meta)
  with pytest.raises(io.AdapterFileError, match=r"adapters\['sq/kernel'\]: the tensors differ from what was saved \(checksum mismatch\)"):
    lora_jax.load(path)
  tensors["sq/kernel/a"], tensors["sq/kernel/b"] = tensors["sq/kernel/b"].T.copy(), tensors["sq/kernel/a"].T.copy()
  io.write_safetensors(path / io.ADAPTERS_FILE, tensors, meta)
  with pytest.raises(io.AdapterFileError, match=r"tensor 'sq/kernel/a' is float32\[4, 2\], its config says float32\[4, 2\]|differ from what was saved"):
    lora_jax.load(path)
  (path / io.ADAPTERS_FILE).write_bytes(good)
  _assert_identical(ad, lora_jax.load(path, params))


def _forged(tmp_path, fn, match, *, what=io.AdapterFileError, limit_s=2.0):
  path, _, params = _square_save(tmp_path)
  _edit_config(path, fn, forge=True)
  t = time.perf_counter()
  with pytest.raises(what, match=match):
    lora_jax.load(path, params)
  assert time.perf_counter() - t < limit_s
  with pytest.raises(what, match=match):
    lora_jax.load_config(path)


def _set(*keys, value):
  def fn(c):
    node = c
    for k in keys[:-1]:
      node = node[k]
    node[keys[-1]] = value
  return fn


@pytest.mark.parametrize("fn, match", [
    (_set("adapters", "sq/kernel", "alpha", value=10**400),
     r"r/adapters.safetensors: adapters\['sq/kernel'\]\['alpha'\]: <number 100000000000... of 401 characters, out of range>"),
    (_set("adapters", "sq/kernel", "static", "scale", value=10**30),
     r"adapters\['sq/kernel'\]\['static'\]\['scale'\]: <number 100000000000... of 31 characters, out of range>"),
    (_set("adapters", "sq/kernel", "static", "layout", value="i" * 64000 + "x"),
     r"adapters\['sq/kernel'\]\['static'\]\['layout'\] has 64001 letters; a layout has one letter per kernel axis, 2 to 32"),
    (_set("adapters", "sq/kernel", "static", "layout", value="i" * 10**6),
     r"\['layout'\] has 1000000 letters"),
    (_set("adapters", "sq/kernel", "static", "layout", value="ix"),
     r"\['layout'\] 'ix' must be letters from 'l', 'i', 'o'"),
    (_set("adapters", "sq/kernel", "static", "layout", value="lo"),
     r"\['layout'\] 'lo' must be letters from 'l', 'i', 'o' with at least one 'i' and one 'o'"),
    (_set("adapters", "sq/kernel", "static", "layout", value="iio"),
     r"adapters\['sq/kernel'\]\['kernel'\] must give the kernel's shape \(3 sizes, one per layout letter\)"),
    (_set("adapters", "sq/kernel", "kind", value="loha"),
     r"adapters\['sq/kernel'\]: adapter kind 'loha' is not registered in this lora_jax \(known: \[.*'lora'.*\]\).* upgrade lora_jax, or import the module that registers it"),
    (_set("adapters", "sq/kernel", "kind", value="k" * 10**5), r"adapters\['sq/kernel'\]\['kind'\] must be a kind name, found 'kkkk"),
    (_set("adapters", "sq/kernel", "static", value={"layout": "io"}),
     r"adapters\['sq/kernel'\]\['static'\] must give \['base_digest', 'dropout', 'layout', 'rslora', 'scale'\] for kind 'lora'"),
    (_set("adapters", "sq/kernel", "static", "scale", value="2"),
     r"adapters\['sq/kernel'\]\['alpha'\] .*|scale must be a number, found '2'"),
    (_set("adapters", "sq/kernel", "tensors", value={"a": {"dtype": "float32", "shape": [4, 2]}}),
     r"adapters\['sq/kernel'\]\['tensors'\] must name the leaves \['a', 'b'\] of kind 'lora'"),
    (_set("adapters", "sq/kernel", "tensors", "a", "dtype", value="int8"),
     r"adapters\['sq/kernel'\]\['tensors'\]\['a'\] must give a floating-point dtype"),
    (_set("adapters", "sq/kernel", "tensors", "a", "shape", value=[4, 3]),
     r"adapters\['sq/kernel'\]: leaf 'b' has shape \(2, 4\): size 2 for its 'r' axis, where 3 is expected"),
    (_set("adapters", "sq/kernel", "kernel", "shape", value=[5, 4]),
     r"adapters\['sq/kernel'\]: leaf 'a' has shape \(4, 2\): size 4 for kernel axis 0, where 5 is expected"),
    (_set("adapters", "sq/kernel", "rank", value=3), r"adapters\['sq/kernel'\]\['rank'\] is 3, but its tensors have rank 2"),
    (_set("adapters", "sq/kernel", "rank", value=True), r"\['rank'\] is True, but its tensors have rank 2"),
    (_set("adapters", "sq/kernel", "static", "scale", value=1.4),
     r"adapters\['sq/kernel'\]: scale 1.4 does not equal alpha/rank = 1.5; the config was edited inconsistently"),
    (_set("adapters", "sq/kernel", "extra", value=1), r"adapters\['sq/kernel'\] must hold \['data_sha256', 'kernel', 'kind', 'sha256', 'static', 'tensors'\]"),
    (_set("adapters", "sq/kernel", value=[]), r"adapters\['sq/kernel'\] must be an object, found \[\]"),
    (_set("adapters", value={}), r"'adapters' must be a non-empty object"),
    (_set("format_version", value=99), "format_version 99 was written by a newer lora_jax .* upgrade lora_jax"),
    (_set("format_version", value=1), "format_version 1 does not match the layout of this save"),
    (lambda c: c.pop("library_version"), r"the config lacks the fields \['library_version'\]"),
    (lambda c: c.pop("spec"), r"the config lacks the fields \['spec'\]"),
    (_set("library_version", value="v" * 1000), "'library_version' must be a version string"),
    (_set("spec", value={"rank": 2}), r"spec must be null or an object with \['alpha', 'alpha_pattern', 'kind', 'rank', 'rank_pattern', 'rslora', 'targets'\]"),
    (_set("spec", "rank_pattern", value={"(a+)+$": "x"}), r"spec\['rank_pattern'\] must map pattern strings to ranks"),
    (_set("spec", "targets", value=[1]), r"spec\['targets'\] must be null, a string or a list of strings"),
    (_set("metadata", value=json.loads("[" * 70 + "]" * 70)), r"'metadata' must be an object|nested more than 64 levels deep"),
    (_set("metadata", "deep", value=json.loads("[" * 70 + "]" * 70)), r"metadata\['deep'\]\[0\].*: nested more than 64 levels deep"),
    (_set("rslora", value="no"), "'rslora' must be true or false, found 'no'"),
    (_set("extra", value=1), r"lora_jax config: unexpected fields \['extra'\]"),
])
def test_hostile_configs_are_clear_errors(tmp_path, fn, match):
  _forged(tmp_path, fn, match)


def test_hostile_format_1_configs(tmp_path):
  params = _params()
  ad = files_adapters.flatten_adapters(_adapters(params))
  _save_v1(tmp_path / "r", ad)
  cfg_path = tmp_path / "r" / io.CONFIG_FILE
  good = cfg_path.read_text()

  def edited(text_or_fn, match, limit_s=2.0):
    text = text_or_fn if isinstance(text_or_fn, str) else None
    if text is None:
      cfg = json.loads(good)
      text_or_fn(cfg)
      text = json.dumps(cfg)
    cfg_path.write_text(text)
    t = time.perf_counter()
    with pytest.raises(io.AdapterFileError, match=match):
      lora_jax.load(tmp_path / "r")
    assert time.perf_counter() - t < limit_s

  out = lambda c: c["adapters"]["out/kernel"]  # noqa: E731
  edited(good.replace('"alpha": 4.0', '"alpha": 1' + "0" * 400, 1),
         r"lora_jax.json: adapters\['embed/embedding'\]\['alpha'\]|lora_jax.json: adapters\['.*'\]\['alpha'\]: <number 1")
  edited(lambda c: out(c).update(layout="i" * 64000 + "x"), r"lora_jax.json: adapters\['out/kernel'\]\['layout'\] has 64001 letters")
  edited(lambda c: out(c).update(scale=9.0), "scale 9.0 does not equal alpha/rank")
  edited(lambda c: out(c).update(rank=0), "rank'\\] must be a positive integer")
  edited(lambda c: out(c).update(layout="oo"), "must be letters from 'l', 'i', 'o'")
  edited(lambda c: c.update(variant="dora"), "variant 'dora' is not supported")
  edited(lambda c: c.update(format_version=99), "format_version 99 was written by a newer lora_jax")
  edited(lambda c: c.pop("library_version"), r"lora_jax.json: the config lacks the fields \['library_version'\]")
  edited(lambda c: c.pop("spec"), r"lora_jax.json: the config lacks the fields \['spec'\]")
  edited(lambda c: c.update(library_version=3), "'library_version' must be a version string, found 3")
  edited(lambda c: c.update(spec={"targets": "x"}), "spec must be null or an object with")
  edited(lambda c: c["base_model"]["kernels"].pop("out/kernel"), "base_model.kernels and adapters name different paths")
  edited(lambda c: c["base_model"]["kernels"].update({"out/kernel": {"shape": [6, 5, 1], "dtype": None}}),
         r"base_model.kernels\['out/kernel'\] must give the kernel's shape \(2 sizes\)")
  edited(lambda c: out(c).update(layout="oi"), "tensor 'out/kernel/a' is float32\\[6, 3\\], its config says float32\\[5, 3\\]")
  edited("{not json", "not valid JSON")
  edited('{"format": "lora_jax.adapters", "format": 1}', "duplicate key 'format'")
  edited("[" * 100000 + "]" * 100000, "not valid JSON|expected a JSON object|nested more than")


def test_non_finite_file_rejected(tmp_path):
  path, _, _ = _square_save(tmp_path)
  tensors, meta, _ = io.read_safetensors(path / io.ADAPTERS_FILE)
  tensors["out/kernel/b"][0, 1] = np.inf
  io.write_safetensors(path / io.ADAPTERS_FILE, tensors, meta)
  with pytest.raises(io.AdapterFileError, match=r"adapters\['out/kernel'\]: the tensors differ from what was saved"):
    lora_jax.load(path)
  # even with consistent checksums, a non-finite adapter is refused
  _edit_config(path, lambda c: c["adapters"]["out/kernel"].update(
      data_sha256=files_adapters._data_digest({"a": tensors["out/kernel/a"], "b": tensors["out/kernel/b"]})), forge=True)
  with pytest.raises(io.AdapterFileError, match="out/kernel/b holds NaN or Inf; refusing a non-finite adapter"):
    lora_jax.load(path)


# ----------------------------------------------------------------------------------------------
# Adapter kinds: a new kind saves and loads with no change to the file code.
# ----------------------------------------------------------------------------------------------


@register_kind
@dataclasses.dataclass(frozen=True)
class _Gain(Adapter):
  """A test-only kind: LoRA times a trainable per-output gain ``g``."""

  KIND = "test_gain"
  ROLES = {"a": "lir", "b": "lro", "g": "lo"}
  TRAINABLE = frozenset({"a", "b", "g"})

  a: Any
  b: Any
  g: Any
  scale: float
  layout: str

  def delta(self, dtype=None):
    d = kernel_delta(self.a, self.b, self.scale, self.layout)
    letters = dict(zip(kernel_labels(self.layout), "abcdefgh"))
    g_sub = "".join(letters[lab] for lab in leaf_labels("lo", self.layout))
    k_sub = "".join(letters[lab] for lab in kernel_labels(self.layout))
    d = jnp.einsum(f"{k_sub},{g_sub}->{k_sub}", d, self.g.astype(d.dtype))
    return d if dtype is None else d.astype(dtype)


def test_a_new_kind_round_trips(tmp_path):
  rng = np.random.default_rng(3)
  params = {"q": {"kernel": jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32)},
            "o": {"kernel": jnp.asarray(rng.standard_normal((5, 4)), jnp.bfloat16)}}
  ad = {
      "q": {"kernel": _Gain(a=jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32), b=jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32),
                            g=jnp.asarray(rng.standard_normal((2, 4)), jnp.float32), scale=0.25, layout="lio")},
      "o": {"kernel": LoraFactors(a=jnp.asarray(rng.standard_normal((5, 2)), jnp.bfloat16),
                                  b=jnp.asarray(rng.standard_normal((2, 4)), jnp.bfloat16), scale=2.0, layout="io")},
  }
  lora_jax.save(tmp_path / "r", ad, metadata={"kinds": 2}, params=params)
  back = lora_jax.load(tmp_path / "r", params)
  _assert_identical(ad, back)
  assert isinstance(back["q"]["kernel"], _Gain) and isinstance(back["o"]["kernel"], LoraFactors)
  e = lora_jax.load_config(tmp_path / "r")["adapters"]["q/kernel"]
  assert e["kind"] == "test_gain" and sorted(e["tensors"]) == ["a", "b", "g"] and e["tensors"]["g"]["shape"] == [2, 4]
  assert (e["rank"], e["alpha"], e["static"]) == (3, 0.75, {"scale": 0.25, "layout": "lio"})
  np.testing.assert_array_equal(lora_jax.merge(params, ad)["q"]["kernel"], lora_jax.merge(params, back)["q"]["kernel"])
  # code that handles plain LoRA only (PEFT export) gets a clear refusal, not a silent a/b
  with pytest.raises(TypeError, match=r"adapters\['q/kernel'\] is a _Gain \(kind 'test_gain'\); only LoraFactors adapters are handled here"):
    io.flatten_adapters(ad)
  # the file says which leaves the kind has: a missing leaf or a kind this lora_jax lacks is named
  _edit_config(tmp_path / "r", lambda c: c["adapters"]["q/kernel"]["tensors"].pop("g"), forge=True)
  with pytest.raises(io.AdapterFileError, match=r"adapters\['q/kernel'\]\['tensors'\] must name the leaves \['a', 'b', 'g'\] of kind 'test_gain'"):
    lora_jax.load(tmp_path / "r")
  lora_jax.save(tmp_path / "r", ad)
  _edit_config(tmp_path / "r", lambda c: c["adapters"]["q/kernel"].update(kind="test_gain_v2"), forge=True)
  with pytest.raises(io.AdapterFileError, match=r"r/adapters.safetensors: adapters\['q/kernel'\]: adapter kind 'test_gain_v2' is not registered"):
    lora_jax.load(tmp_path / "r")


# ----------------------------------------------------------------------------------------------
# Odd files: FIFOs, directories, pickles.
# ----------------------------------------------------------------------------------------------


def _within(seconds, fn, *args, **kw):
  """Runs fn in a thread; fails (instead of hanging the suite) if it takes longer."""
  box = {}

  def run():
    try:
      box["value"] = fn(*args, **kw)
    except BaseException as e:  # noqa: BLE001 - handed to the caller
      box["error"] = e

  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(seconds)
  assert not t.is_alive(), f"{fn.__name__} still running after {seconds} s (it blocks)"
  if "error" in box:
    raise box["error"]
  return box.get("value")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_directories_refused(tmp_path):
  d = tmp_path / "r"
  os.makedirs(d)
  os.mkfifo(d / io.ADAPTERS_FILE)
  try:
    with pytest.raises(io.AdapterFileError, match=r"adapters.safetensors: is a FIFO \(named pipe\), not a regular file; refusing to read it"):
      _within(10, lora_jax.load, d)
    os.mkfifo(tmp_path / "p.safetensors")
    with pytest.raises(io.AdapterFileError, match="p.safetensors: is a FIFO"):
      _within(10, lora_jax.load_params, tmp_path / "p.safetensors")
    with pytest.raises(io.AdapterFileError, match="p.safetensors: is a FIFO"):
      _within(10, io.read_header, tmp_path / "p.safetensors")
    os.mkfifo(tmp_path / "c.json")
    with pytest.raises(io.AdapterFileError, match="c.json: is a FIFO"):
      _within(10, io.read_json, tmp_path / "c.json")
  finally:  # unblock any reader left behind by a failure
    for p in (d / io.ADAPTERS_FILE, tmp_path / "p.safetensors", tmp_path / "c.json"):
      if p.exists():
        os.unlink(p)
  os.makedirs(d / io.ADAPTERS_FILE)
  with pytest.raises(io.AdapterFileError, match="adapters.safetensors: is a directory, expected a file"):
    lora_jax.load(d)
  with pytest.raises(io.AdapterFileError, match="is a directory, expected a file"):
    lora_jax.load_params(d)


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
        (_raw(b"{bad json}  "), "safetensors header: not valid JSON"),
        (_raw(b"\xff{}"), "does not start"),
        (_raw(b"{\xff}"), "not valid JSON .*utf-8"),
        (_raw(b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), "duplicate key 'x'"),
        (_raw({"x": {"dtype": "F32", "shape": [float("nan")], "data_offsets": [0, 4]}}, b"\0" * 4), "non-standard JSON constant NaN"),
        (_raw({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "unsupported dtype 'C64'"),
        (_raw({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "is not a list of at most"),
        (_raw({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), "is not a list of at most"),
        (_raw({"x": {"dtype": "F32", "shape": [2**60, 0], "data_offsets": [0, 0]}}), "is not a list of at most"),
        (_raw({"x": {"dtype": "F32", "shape": [10**30], "data_offsets": [0, 4]}}, b"\0" * 4), r"x\['shape'\]\[0\]: <number 100000000000... of 31 characters, out of range>"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"m": json.loads("[" * 80 + "]" * 80)}}, b"\0" * 4),
         r"__metadata__\['m'\].*nested more than 64 levels deep"),
        (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "fall outside the 4-byte data buffer"),
        (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "holds 4 bytes but shape \\(2,\\) of F32 needs 8"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6), "overlap or leave gaps"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "overlap or leave gaps"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9), "cover 4 bytes of a 9-byte data buffer"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}, b"\0" * 4), "exactly dtype, shape and data_offsets"),
        (_raw({"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "a tensor with an empty name"),
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
  assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~_umask()
  # a flat {path: LoraFactors} dict (as load() returns) works too, and dtype= casts floats only
  lora_jax.save(tmp_path / "ad", ad)
  p2 = lora_jax.save_merged(tmp_path / "m2.safetensors", params, lora_jax.load(tmp_path / "ad"), dtype=jnp.float16)
  got2 = lora_jax.load_params(p2)
  assert got2["out"]["kernel"].dtype == jnp.float16 and got2["step"].dtype == jnp.int32


def _umask():
  m = os.umask(0)
  os.umask(m)
  return m


def test_save_merged_refuses(tmp_path):
  params = _params()
  ad = _adapters(params)
  for dtype, name in ((jnp.int8, "int8"), ("int32", "int32"), (bool, "bool")):
    with pytest.raises(TypeError, match=rf"save_merged\(dtype=...\): {name} is not a floating-point dtype; casting weights to it would truncate them"):
      lora_jax.save_merged(tmp_path / "m.safetensors", params, ad, dtype=dtype)
  with pytest.raises(TypeError, match=r"save_merged\(dtype=...\): 'floot' is not a dtype"):
    lora_jax.save_merged(tmp_path / "m.safetensors", params, ad, dtype="floot")
  os.makedirs(tmp_path / "dir")
  with pytest.raises(ValueError, match="dir: is a directory; give the name of the file to write there, e.g. .*dir/merged.safetensors"):
    lora_jax.save_merged(tmp_path / "dir", params, ad)
  assert os.listdir(tmp_path) == ["dir"] and os.listdir(tmp_path / "dir") == []


def test_save_merged_safe(tmp_path):
  params = _params()
  ad = _adapters(params)
  ad["out"]["kernel"] = LoraFactors(a=ad["out"]["kernel"].a.at[0, 0].set(jnp.inf), b=ad["out"]["kernel"].b, scale=1.0, layout="io")
  with pytest.raises(ValueError, match="'out/kernel': holds NaN or Inf after merging its adapter; refusing to save \\(safe=True\\)"):
    lora_jax.save_merged(tmp_path / "m.safetensors", params, ad)
  assert not os.path.exists(tmp_path / "m.safetensors")
  lora_jax.save_merged(tmp_path / "m.safetensors", params, ad, safe=False)
  with pytest.raises(io.AdapterFileError, match=r"m.safetensors: 'out/kernel' holds NaN or Inf; refusing non-finite weights. Pass check_finite=False"):
    lora_jax.load_params(tmp_path / "m.safetensors")
  with pytest.raises(io.AdapterFileError, match="holds NaN or Inf"):
    lora_jax.load_params(tmp_path / "m.safetensors", like=params)
  assert not np.isfinite(lora_jax.load_params(tmp_path / "m.safetensors", check_finite=False)["out"]["kernel"]).all()
  big = {"w": {"kernel": jnp.full((2, 2), 1e30)}}
  with pytest.raises(ValueError, match="'w/kernel': holds NaN or Inf after casting it to float16"):
    lora_jax.save_merged(tmp_path / "h.safetensors", big, {"w": {"kernel": None}}, dtype=jnp.float16)


def test_load_params_like(tmp_path):
  params = _params()
  p = lora_jax.save_params(tmp_path / "p.safetensors", params)
  with pytest.raises(io.AdapterFileError, match="missing \\['extra/kernel'\\]"):
    lora_jax.load_params(p, like=dict(params, extra={"kernel": jnp.ones(2)}))
  with pytest.raises(io.AdapterFileError, match=r"p.safetensors: 'out/kernel': `like` has shape \(6, 6\), the file holds \(6, 5\)"):
    lora_jax.load_params(p, like=dict(params, out=dict(params["out"], kernel=jnp.zeros((6, 6)))))
  # a bf16 export onto float32 params: the error offers the fix, and the fix casts
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, params)
  h = lora_jax.save_params(tmp_path / "h.safetensors", half)
  with pytest.raises(io.AdapterFileError, match=r"h.safetensors: 'embed/embedding': `like` has dtype float32, the file holds bfloat16. Pass check_dtype=False to cast to `like`'s dtypes"):
    lora_jax.load_params(h, like=params)
  got = lora_jax.load_params(h, like=params, check_dtype=False)
  for g, x, orig in zip(jax.tree.leaves(got), jax.tree.leaves(half), jax.tree.leaves(params)):
    assert g.dtype == orig.dtype
    np.testing.assert_array_equal(g, np.asarray(x).astype(orig.dtype))
  ints = dict(params, step=jnp.array(7.0))
  with pytest.raises(io.AdapterFileError, match="'step': `like` has dtype float32, the file holds int32. Integer and floating-point tensors are never cast"):
    lora_jax.load_params(p, like=ints, check_dtype=False)


def test_params_files_are_checksummed(tmp_path):
  params = _params()
  p = lora_jax.save_params(tmp_path / "p.safetensors", params, {"note": "x"})
  tensors, meta, _ = io.read_safetensors(p)
  assert meta["format"] == "lora_jax.params.v2" and meta["note"] == "x" and len(meta["lora_jax_data_sha256"]) == 64
  raw = bytearray((tmp_path / "p.safetensors").read_bytes())
  raw[-3] ^= 0x10  # one bit of the last tensor
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(bytes(raw))
  with pytest.raises(io.AdapterFileError, match=r"bad.safetensors: the tensors or their table differ from the checksum the file records \(lora_jax_data_sha256\)"):
    lora_jax.load_params(bad)
  meta_less = {k: v for k, v in meta.items() if k != "lora_jax_data_sha256"}
  io.write_safetensors(bad, tensors, meta_less)
  with pytest.raises(io.AdapterFileError, match=r"bad.safetensors: a lora_jax params file without the checksum of its tensors"):
    lora_jax.load_params(bad)
  # files of lora_jax 0.1 and of other tools carry none, and load
  for m in ({"format": "lora_jax.params", "lora_jax_version": "0.1.0"}, {"format": "pt"}, None):
    io.write_safetensors(bad, tensors, m)
    got = lora_jax.load_params(bad, like=params)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
      np.testing.assert_array_equal(_bits(x), _bits(y))


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
