"""The benchmark scripts run end to end at ``--config cpu-small`` and write the JSON they promise.

The scripts run at once, each in its own subprocess (as a user would run them; peft_reference
only where torch, transformers and peft are installed, DoRA eager only), with
the smallest settings; the GPU numbers themselves come from ``benchmarks/run_gpu.sh``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import common  # noqa: E402

CFG = common.get_config("cpu-small")
RUNS = {
    "train_step": [
        "--variants", "lora_jax/all@remat+chunk,handwritten/all@remat+chunk,lora_jax_nogroup/all@unroll2,handwritten_grouped/all@unroll2,"
                      "lora_jax_dora/all@remat+chunk,lora_jax_dropout/all@remat+chunk",
        "--warmup", "1", "--iters", "2",
    ],
    "inference": ["--ranks", "2", "--iters", "2"],
    "overheads": ["--no-train", "--repeats", "1"],
    "profile_step": ["--variant", "lora_jax/all@remat+chunk", "--steps", "2"],
}
HAS_PEFT = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
if HAS_PEFT:  # eager only: torch.compile takes minutes on a CPU
  RUNS["peft_reference"] = ["--variants", "dora/all@eager", "--warmup", "1", "--iters", "2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bench")
  # Cheaper XLA CPU compiles: this test checks that the scripts run, not how fast.
  flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  procs = {}
  for script, extra in RUNS.items():
    out = tmp / f"{script}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--config", "cpu-small", "--out", str(out), *extra]
    procs[script] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), out)
  found = {}
  for script, (proc, out) in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{stderr[-3000:]}"
    assert "wrote" in stdout  # the table was printed and the file named
    found[script] = json.loads(out.read_text())
  return found


def _check_env(payload, benchmark):
  assert payload["benchmark"] == benchmark
  env = payload["env"]
  for key in ("device", "platform", "date_utc", "python", "versions"):
    assert env.get(key), f"{benchmark}: env lacks {key!r}"
  assert env["versions"]["jax"] and env["versions"]["lora_jax"]
  assert payload["config"]["name"] == "cpu-small"


def test_train_step_json(results):
  payload = results["train_step"]
  _check_env(payload, "train_step")
  assert payload["env"]["matmul_peak_tflops"] > 0
  assert payload["best_tune"] == "remat+chunk"
  rows = {r["variant"]: r for r in payload["rows"]}
  assert set(rows) == {"lora_jax/all@remat+chunk", "handwritten/all@remat+chunk", "lora_jax_nogroup/all@unroll2",
                       "handwritten_grouped/all@unroll2", "lora_jax_dora/all@remat+chunk", "lora_jax_dropout/all@remat+chunk"}
  for key, r in rows.items():
    assert "error" not in r, f"{key}: {r.get('error')}\n{r.get('traceback_tail')}"
    for field in ("step_ms", "tokens_per_s", "mfu", "model_tflop", "trainable_params", "compile_s", "trace_s", "loss_first"):
      assert r[field] is not None, f"{key}: {field} missing"
    assert r["step_ms"] > 0 and r["tokens_per_s"] > 0
    assert len(r["step_ms_all"]) == 2
  # Same adapters (all-linear, r=16) in every implementation; DoRA adds one magnitude per
  # output feature (its frozen base_norm is not counted).
  dora = rows.pop("lora_jax_dora/all@remat+chunk")
  assert len({r["trainable_params"] for r in rows.values()}) == 1
  lora = rows["lora_jax/all@remat+chunk"]
  assert dora["trainable_params"] == lora["trainable_params"] + common.dora_magnitude_count(CFG, "all")
  n = common.lora_param_count(CFG, 16, "all")
  assert common.train_flops(CFG, "dora", n, rank=16) > common.train_flops(CFG, "lora", n)  # + the column norm
  assert {r["unroll"] for r in rows.values()} == {1, 2}
  # The same loss at step 0 (same init, same model), grouped or not, by hand or by wrap; DoRA
  # (m = ||W|| at b = 0) and dropout (on the b = 0 path) start from the base model too.
  losses = [r["loss_first"] for r in [*rows.values(), dora]]
  assert max(losses) - min(losses) < 0.05 * abs(losses[0]), losses


@pytest.mark.skipif(not HAS_PEFT, reason="torch / transformers / peft not installed")
def test_peft_reference_json(results):
  payload = results["peft_reference"]
  _check_env(payload, "peft_reference")
  (r,) = payload["rows"]
  assert r["variant"] == "dora/all@eager" and r["impl"] == "peft_dora"
  assert "error" not in r, f"{r.get('error')}\n{r.get('traceback_tail')}"
  assert r["step_ms"] > 0 and len(r["step_ms_all"]) == 2
  # PEFT DoRA trains what lora_jax DoRA trains: a, b and one magnitude per output feature.
  jax_dora = next(x for x in results["train_step"]["rows"] if x["variant"] == "lora_jax_dora/all@remat+chunk")
  assert r["trainable_params"] == jax_dora["trainable_params"]


def test_profile_json(results):
  payload = results["profile_step"]
  _check_env(payload, "profile_step")
  assert payload["total_op_ms_per_step"] > 0
  cats = dict(payload["categories_ms_per_step"])
  assert sum(cats.values()) == pytest.approx(payload["total_op_ms_per_step"], rel=0.01)
  assert payload["top_ops_ms_per_step"] or payload["top_kernels_ms_per_step"]


def test_inference_json(results):
  payload = results["inference"]
  _check_env(payload, "inference")
  rows = {r["variant"]: r for r in payload["rows"]}
  assert set(rows) == {"base", "merged r=2", "factored r=2"}
  for r in rows.values():
    assert "error" not in r and r["ms"] > 0
  f = rows["factored r=2"]
  assert f["b0_equals_base"] is True
  assert f["rel_l2_diff_vs_merged"] < 0.05  # bf16: factored and merged agree to rounding
  assert f["rel_l2_update"] > 0  # the adapters did change the output


def test_overheads_json(results):
  payload = results["overheads"]
  _check_env(payload, "overheads")
  rows = {r["what"]: r for r in payload["rows"]}
  for what in ("init (eager)", "merge (jit)", "unmerge (jit)", "count"):
    assert "error" not in rows[what] and rows[what]["median_s"] >= 0
  for what in ("forward loss: bare model", "forward loss: wrap (factored)"):
    assert "error" not in rows[what] and rows[what]["trace_s"] > 0 and rows[what]["compile_s"] > 0
  assert payload["lora_params"] > 0
