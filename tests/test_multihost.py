"""Multi-process (multi-host) runs on one machine: N local CPU processes joined by
``jax.distributed.initialize``, one global mesh over their devices.

tests/multidevice/multihost_worker.py is each process; this test starts them, waits (with a
deadline, killing the others as soon as one fails), and compares what they computed with the
same training on one device here. One process writes each lora_jax file; every process
reads it back.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from _util import assert_close

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "multidevice", "multihost_worker.py")
TIMEOUT_S = 150  # the whole run; on 2 CPU cores it takes about 25 s
RTOL = 1e-4  # sharded training vs one device: reductions split across devices and processes


def _worker_module():
  spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(path: str, n: int = 4000) -> str:
  with open(path, errors="replace") as f:
    text = f.read()
  lines = [ln for ln in text.splitlines() if "Gloo" not in ln]  # gloo's connection chatter
  return "\n".join(lines)[-n:]


def _launch(n: int, devices: int, out_dir: str, port: int) -> tuple[list[int], list[str]]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  env.pop("JAX_NUM_PROCESSES", None)
  logs = [os.path.join(out_dir, f"log_{i}.txt") for i in range(n)]
  procs = []
  try:
    for i in range(n):
      with open(logs[i], "w") as log:
        procs.append(subprocess.Popen([sys.executable, WORKER, str(i), str(n), str(port), out_dir], env=env, cwd=REPO,
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break  # one failed (the others would wait for it in a collective), or out of time
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait()
  return [p.returncode for p in procs], logs


def run_processes(n: int, devices: int, out_dir: str) -> list[dict]:
  """Runs the worker as ``n`` processes of ``devices`` CPU devices each; their results."""
  for attempt in range(2):  # a port taken between choosing and binding it: once more, another port
    rcs, logs = _launch(n, devices, out_dir, _free_port())
    text = {i: _tail(log) for i, log in enumerate(logs)}
    if any("SKIP:" in t for t in text.values()) and all(rc in (0, 77, -9) for rc in rcs):
      pytest.skip(next(t for t in text.values() if "SKIP:" in t).split("SKIP:")[1].strip().splitlines()[0])
    if all(rc == 0 for rc in rcs) or not any("ddress already in use" in t for t in text.values()):
      break
  if not all(rc == 0 for rc in rcs):
    shown = "\n".join(f"--- process {i} (exit {rcs[i]}) ---\n{text[i]}" for i in range(n))
    pytest.fail(f"{n} processes x {devices} devices: exit statuses {rcs} (-9: killed after another failed or "
                f"after {TIMEOUT_S} s)\n{shown}")
  return [dict(np.load(os.path.join(out_dir, f"out_{i}.npz"))) for i in range(n)]


def _reference(w):
  """The worker's training on one device in this process (no sharding, no processes)."""
  import lora_jax

  MLP, params, adapters, x, y, spec = w.setup()
  tx, step = w.make_step(MLP)
  opt = tx.init(adapters)
  losses = []
  for _ in range(w.STEPS):
    adapters, opt, loss = step(params, adapters, opt, x, y)
    losses.append(float(loss))
  more, _, loss = step(params, adapters, opt, x, y)
  merged = lora_jax.merge(params, adapters)
  return params, adapters, more, losses + [float(loss)], merged, spec


def _flat(tree, prefix):
  return {prefix + jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.skipif(not hasattr(jax, "distributed"), reason="this JAX has no jax.distributed")
def test_two_processes_two_devices_each(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  import lora_jax

  w = _worker_module()
  outs = run_processes(2, 2, str(tmp_path))
  params, trained, more, losses, merged, spec = _reference(w)
  want = {**_flat(trained, "trained"), **_flat(more, "continued")}
  want_merged = _flat(merged, "merged")
  for pid, out in enumerate(outs):
    assert out["devices"].tolist() == [2, 2, 4], out["devices"]
    np.testing.assert_allclose(out["losses"], losses, rtol=1e-5, err_msg=f"process {pid}")
    for k, v in want.items():  # trained, and one step more after the orbax restore
      assert_close(out[k], v, RTOL, err_msg=f"process {pid}: {k}")
    for k, v in want_merged.items():  # the merged export process 0 wrote, read by every process
      assert_close(out[k], v, RTOL, err_msg=f"process {pid}: {k}")
    # process 0 writes every file; the others only wait for it, and raise when it failed.
    assert out["writes_atomic"] == (7 if pid == 0 else 0) and out["writes_set"] == (1 if pid == 0 else 0), pid
    assert str(out["failed_write_raised"]) == ("FileExistsError" if pid == 0 else "OSError"), out["failed_write_raised"]
    assert bool(out["shard_like_direct"])  # host-local (uncommitted) adapters: jax.device_put places them
  # Every process holds the same values, bit for bit.
  for k in outs[0]:
    if k.startswith(("trained", "continued", "merged")):
      np.testing.assert_array_equal(outs[0][k], outs[1][k], err_msg=k)
  # The files, read here in one process: what the processes trained.
  d = tmp_path / "adapters"
  back = lora_jax.load(d, params)
  for k, v in _flat(back, "trained").items():
    np.testing.assert_array_equal(v, outs[0][k], err_msg=k)
  assert lora_jax.load_config(d)["metadata"] == {"step": w.STEPS}
  assert sorted(os.listdir(d)) == ["adapters.safetensors"]  # one file, no temp files left
  got = lora_jax.load_set(tmp_path / "set", params)
  assert list(got) == ["default", "first", "more"]
  for k, v in _flat(got["more"], "continued").items():
    np.testing.assert_array_equal(v, outs[0][k], err_msg=k)
  base = lora_jax.load_params(tmp_path / "base.safetensors", like=params)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
