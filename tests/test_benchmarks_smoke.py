"""The benchmark scripts run end to end at ``--config cpu-small`` and write the JSON they promise.

The scripts run at once, each in its own subprocess (as a user would run them; peft_reference
only where torch, transformers and peft are installed, DoRA eager only, and PEFT QLoRA where
bitsandbytes is), with the smallest settings; the GPU numbers themselves come from
``benchmarks/run_gpu.sh``. The QLoRA pieces are also checked against the APIs they stand in for:
the layer-by-layer quantized base against ``lora_jax.quantize``, the in-place bitsandbytes model
against ``from_pretrained(..., load_in_4bit=True)``. The decode benchmarks check their own
invariants: factored == merged and mixed == loop greedy tokens, and no recompile after a hot swap.
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
                      "lora_jax_dora/all@remat+chunk,lora_jax_dropout/all@remat+chunk,lora_jax_nf4/all@remat+chunk,"
                      "lora_jax/all@unscanned+noremat+hf+ewremat+chunk",
        "--warmup", "1", "--iters", "2",
    ],
    "inference": ["--ranks", "2", "--iters", "2"],
    "overheads": ["--no-train", "--repeats", "1"],
    # The NF4 step: the plain profile, plus the dequantize-fusion summary.
    "profile_step": ["--variant", "lora_jax_nf4/all@remat+chunk", "--steps", "2"],
    # The layer-by-layer quantized base is lora_jax.quantize's (NF4 with double quantization:
    # per-layer second-level scales; int8 takes the same path).
    "train_step:quantized_init": ["--check-quantized-init", "nf4"],
    # Decoding with many adapters: one adapter merged and factored, a mixed batch (with its hot
    # swap) and the sequential loop it replaces; three new tokens, one timed call each.
    # Sharded LoRA step on 1 and 2 CPU host devices (each in its own subprocess).
    "sharded_step": ["--devices", "1,2", "--warmup", "1", "--iters", "2"],
    "decode": ["--variants", "lora_jax/merged,lora_jax/factored,lora_jax/mixed2@auto,lora_jax/loop2x4", "--new", "3",
               "--iters", "1"],
}
DECODE_PEFT = ["peft/merged@eager", "peft/factored@eager", "peft/mixed2@eager", "peft/loop2x4@eager"]
HAS_PEFT = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
HAS_BNB = HAS_PEFT and importlib.util.find_spec("bitsandbytes") is not None
if HAS_PEFT:  # eager only: torch.compile takes minutes on a CPU
  RUNS["peft_reference"] = ["--variants", "dora/all@eager" + (",qlora/all@eager+ckpt+amp" if HAS_BNB else ""),
                            "--warmup", "0", "--iters", "2"]
  RUNS["peft_decode"] = ["--variants", ",".join(DECODE_PEFT), "--new", "3", "--iters", "1"]
if HAS_BNB:  # the in-place bitsandbytes model is from_pretrained(load_in_4bit=True)'s
  RUNS["peft_reference:bnb_check"] = ["--check-bnb"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bench")
  # Cheaper XLA CPU compiles: this test checks that the scripts run, not how fast.
  flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  procs = {}
  for key, extra in RUNS.items():
    script = key.split(":")[0]  # "train_step:quantized_init": the same script, another run
    out = tmp / f"{key.replace(':', '_')}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--config", "cpu-small", "--out", str(out), *extra]
    procs[key] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), out)
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
  rows = {r["variant"]: r for r in payload["rows"]}
  lora_all = [r for r in rows.values() if r["impl"] == "lora_jax" and r["targets"] == "all"]
  assert payload["best_tune"] == min(lora_all, key=lambda r: r["step_ms"])["tune"]  # no peak on a CPU: all fit
  assert set(rows) == {"lora_jax/all@remat+chunk", "handwritten/all@remat+chunk", "lora_jax_nogroup/all@unroll2",
                       "handwritten_grouped/all@unroll2", "lora_jax_dora/all@remat+chunk", "lora_jax_dropout/all@remat+chunk",
                       "lora_jax_nf4/all@remat+chunk", "lora_jax/all@unscanned+noremat+hf+ewremat+chunk"}
  fast = rows["lora_jax/all@unscanned+noremat+hf+ewremat+chunk"]  # the tune tokens reached the model
  assert (fast["scan_layers"], fast["remat"], fast["elementwise_remat"], fast["logits_dtype"]) == (False, False, True, None)
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
  rows.pop("lora_jax/all@unscanned+noremat+hf+ewremat+chunk")  # unscanned: other random params
  # The same loss at step 0 (same init, same model), grouped or not, by hand or by wrap; DoRA
  # (m = ||W|| at b = 0) and dropout (on the b = 0 path) start from the base model too.
  losses = [r["loss_first"] for r in [*rows.values(), dora]]
  assert max(losses) - min(losses) < 0.05 * abs(losses[0]), losses


def test_quantized_base_rows(results):
  """The NF4 row's base: the all-linear kernels quantized (NF4 with double quant: ~4.13 bits a
  weight), the rest dense and of the bf16 row's size; the bf16 row names the same kernels."""
  rows = {r["variant"]: r for r in results["train_step"]["rows"]}
  nf4, bf16 = rows["lora_jax_nf4/all@remat+chunk"], rows["lora_jax/all@remat+chunk"]
  assert nf4["base_format"] == "nf4" and bf16["base_format"] == "bfloat16"
  assert nf4["qkernel_count"] == nf4["linear_count"] == bf16["linear_count"] == 7 and bf16["qkernel_count"] == 0
  assert nf4["linear_bytes_dense"] == bf16["linear_bytes_dense"] == bf16["linear_bytes_stored"]
  assert nf4["other_bytes"] == bf16["other_bytes"] > 0
  assert 0.25 < nf4["linear_bytes_stored"] / nf4["linear_bytes_dense"] < 0.30
  assert nf4["base_bytes_stored"] == nf4["linear_bytes_stored"] + nf4["other_bytes"]


def test_streamed_quantized_init_is_what_quantize_gives(results):
  """``train_step.init_params`` (each kernel drawn and quantized a layer at a time, so the dense
  model never exists) gives exactly ``lora_jax.quantize(params, "all-linear", model.apply, x)``
  of the same values drawn densely: structure, static fields and every stored array."""
  (r,) = results["train_step:quantized_init"]["rows"]
  assert r["format"] == "nf4" and r["same_tree"] and r["equal"] and r["arrays"] > 7, r


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_bnb_in_place_is_what_load_in_4bit_gives(results):
  """``peft_reference.quantize_bnb_4bit`` (the model quantized in place) equals the same weights
  saved and loaded with ``from_pretrained(..., quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, nf4, double quant, compute bf16))``: module classes, packed weights, scales."""
  (r,) = results["peft_reference:bnb_check"]["rows"]
  assert r["equal"], r["diffs"]
  assert r["linear4bit_compared"] == 7 * CFG.layers and r["reference_loaded_in_4bit"]
  assert r["bnb"]["kept"] == ["lm_head"] and r["dense_dtypes"] == ["torch.bfloat16"]


@pytest.mark.skipif(not HAS_PEFT, reason="torch / transformers / peft not installed")
def test_peft_reference_json(results):
  payload = results["peft_reference"]
  _check_env(payload, "peft_reference")
  rows = {x["variant"]: x for x in payload["rows"]}
  assert set(rows) == {"dora/all@eager"} | ({"qlora/all@eager+ckpt+amp"} if HAS_BNB else set())
  r = rows["dora/all@eager"]
  assert r["variant"] == "dora/all@eager" and r["impl"] == "peft_dora"
  assert "error" not in r, f"{r.get('error')}\n{r.get('traceback_tail')}"
  assert r["step_ms"] > 0 and len(r["step_ms_all"]) == 2
  # PEFT DoRA trains what lora_jax DoRA trains: a, b and one magnitude per output feature.
  jax_dora = next(x for x in results["train_step"]["rows"] if x["variant"] == "lora_jax_dora/all@remat+chunk")
  assert r["trainable_params"] == jax_dora["trainable_params"]


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_peft_qlora_json(results):
  rows = {x["variant"]: x for x in results["peft_reference"]["rows"]}
  r = rows["qlora/all@eager+ckpt+amp"]
  assert "error" not in r, f"{r.get('error')}\n{r.get('traceback_tail')}"
  assert r["impl"] == "peft_qlora" and r["grad_ckpt"] and r["autocast_bf16"] and r["step_ms"] > 0
  assert r["bnb"]["quant_type"] == ["nf4"] and r["bnb"]["double_quant"] == [True] and r["bnb"]["lm_head"] == "Linear torch.bfloat16"
  # The same adapters as lora_jax's all-linear rows; the same kernels quantized as lora_jax NF4's.
  jax_nf4 = next(x for x in results["train_step"]["rows"] if x["variant"] == "lora_jax_nf4/all@remat+chunk")
  assert r["trainable_params"] == jax_nf4["trainable_params"]
  assert r["linear_count"] == CFG.layers * jax_nf4["linear_count"]  # modules per layer vs stacked leaves
  assert r["linear_bytes_dense"] == jax_nf4["linear_bytes_dense"]
  assert r["other_bytes"] == jax_nf4["other_bytes"]


def test_report_qlora_section(results, tmp_path):
  """report.py renders "Quantized base (QLoRA)" from the stage's files (here the smoke run's)."""
  from benchmarks import report

  for name, key in (("qlora_train_step", "train_step"), ("qlora_peft_reference", "peft_reference"),
                    ("qlora_profile", "profile_step")):
    if key in results:
      (tmp_path / f"{name}_cpu-small.json").write_text(json.dumps(results[key]))
  text = report.main(["--config", "cpu-small", "--big-config", "cpu-small", "--results", str(tmp_path)])
  assert "## Quantized base (QLoRA)" in text
  assert "NF4-base / bf16-base step time" in text and "all-linear kernels" in text
  assert "dequantize fusions in the HLO" in text


def test_profile_json(results):
  payload = results["profile_step"]
  _check_env(payload, "profile_step")
  assert payload["total_op_ms_per_step"] > 0
  cats = dict(payload["categories_ms_per_step"])
  assert sum(cats.values()) == pytest.approx(payload["total_op_ms_per_step"], rel=0.01)
  assert payload["top_ops_ms_per_step"] or payload["top_kernels_ms_per_step"]
  # NF4: the HLO has dequantize fusions (codes -> kernel) feeding GEMMs, matched to the trace.
  q = payload["quantized_base"]
  assert q["hlo_counts"]["dequant"] > 0 and q["hlo_counts"]["gemm"] > 0
  assert q["dequant_feeding_gemm"] + q["hlo_counts"]["gemm_fused_dequant"] > 0
  assert q["matched_share"] > 0.5 and q["ms_per_step"]["gemm"] > 0


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


def _decode_rows(payload, benchmark, keys):
  _check_env(payload, benchmark)
  c = payload["config"]
  assert (c["batch"], c["prompt"], c["new"], c["rank"]) == (8, 16, 3, 16) and c["loop"] == [2, 4]
  rows = {r["variant"]: r for r in payload["rows"]}
  assert set(rows) == set(keys)
  for key, r in rows.items():
    assert "error" not in r, f"{key}: {r.get('error')}\n{r.get('traceback_tail')}"
    # total and prefill are two separately timed calls of one iteration each: on a loaded CPU
    # either can be the longer, so only their presence and sign are checked here
    assert r["tokens_per_s"] > 0 and r["prefill_ms"] > 0 and r["total_ms"] > 0 and r["iters"] == 1
    assert r["step_ms"] is not None
  assert rows[keys[2]]["adapters_used"] == 2 and rows[keys[3]]["calls"] == 2 and rows[keys[3]]["rows_per_call"] == 4
  # One adapter factored gives the merged model's greedy tokens, the mixed batch the loop's
  # (each row with the same adapter), up to bf16 near-ties.
  assert rows[keys[1]]["prefix_agree_vs_merged"] > 0.5
  assert rows[keys[2]]["prefix_agree_vs_loop"] > 0.5
  return rows


def test_decode_json(results):
  rows = _decode_rows(results["decode"], "decode", RUNS["decode"][1].split(","))
  mixed = rows["lora_jax/mixed2@auto"]
  assert mixed["bank_mode"] == "auto" and mixed["adapter_bytes"] > rows["lora_jax/factored"]["adapter_bytes"]
  # The hot swap: replace_adapter on the live bank, then the next call, compiles nothing; only
  # the swapped member's rows change.
  assert (mixed["traces_after_swap"], mixed["lowerings_after_swap"], mixed["compiles_after_swap"]) == (0, 0, 0)
  assert mixed["compile_counter_control"]["traces"] > 0 and mixed["compile_counter_control"]["lowerings"] > 0
  assert mixed["other_rows_equal"] is True and mixed["swapped_rows_changed"] > 0
  assert mixed["swap_ms"] > 0 and mixed["swap_jit_ms"] > 0


@pytest.mark.skipif(not HAS_PEFT, reason="torch / transformers / peft not installed")
def test_peft_decode_json(results):
  rows = _decode_rows(results["peft_decode"], "peft_decode", DECODE_PEFT)
  assert {r["attention"] for r in rows.values()} == {"sdpa"} and {r["cache"] for r in rows.values()} == {"dynamic"}
  assert rows["peft/factored@eager"]["adapter_dtype"] == "torch.float32"  # PEFT's default for a bf16 base


def test_report_decode_section(results, tmp_path):
  """report.py renders "Many adapters: decode" from the stage's files (here the smoke run's)."""
  from benchmarks import report

  for name in ("decode", "peft_decode"):
    if name in results:
      (tmp_path / f"{name}_cpu-small.json").write_text(json.dumps(results[name]))
  text = report.main(["--config", "cpu-small", "--results", str(tmp_path)])
  assert "## Many adapters: decode" in text
  assert "lora_jax: factored / merged step time" in text and "mixed2@auto (2 in the batch) / merged tokens/s" in text
  assert "sequential loop (loop2x4)" in text and "hot swap" in text
  if "peft_decode" in results:
    assert "lora_jax mixed2@auto / PEFT mixed2@eager tokens/s" in text


def test_sharded_step_json(results):
  """The sharded step ran on 1 and 2 host devices; FSDP over 2 devices holds fewer argument
  bytes per device than one device holds (the params are split, norms replicated), the
  adapters kept their derived shardings through the donated steps, and only the 2-device
  step has collectives."""
  payload = results["sharded_step"]
  _check_env(payload, "sharded_step")
  rows = {r["devices"]: r for r in payload["rows"]}
  assert set(rows) == {1, 2}
  for n, r in rows.items():
    assert "error" not in r, f"{n}: {r.get('error')}\n{r.get('traceback_tail')}"
    assert r["step_ms"] > 0 and len(r["step_ms_all"]) == 2 and r["shardings_kept"] is True
    assert r["memory_per_device"]["argument_size"] > 0
  one, two = rows[1], rows[2]
  assert two["mesh"] == "fsdp2 x model1" and one["mesh"] == "fsdp1 x model1"
  assert two["params_bytes_device0"] < 0.6 * one["params_bytes_device0"]
  assert two["memory_per_device"]["argument_size"] < 0.8 * one["memory_per_device"]["argument_size"]
  assert one["collective_bytes"]["total"] == 0 and two["collective_bytes"]["total"] > 0
  assert one["loss_first"] == pytest.approx(two["loss_first"], rel=0.02)  # the same model and batch


def test_tune_tokens_compose():
  from benchmarks import train_step  # noqa: PLC0415

  t = train_step.tune_settings("unroll2+keep_xa+hf+notriton", CFG)
  assert (t["unroll"], t["remat"], t["remat_policy"], t["rope_dtype"], t["logits_dtype"]) == (
      2, True, "lora_jax.remat_policy()", None, None)
  assert t["xla_flags"] == "--xla_gpu_enable_triton_gemm=false"
  assert train_step.tune_settings("remat+chunk", CFG)["chunk"] == CFG.chunk
  with pytest.raises(ValueError, match="unknown tune token 'fast'"):
    train_step.tune_settings("unroll2+fast", CFG)


def test_compare_pairs_at_matched_memory():
  """compare.py: each PyTorch row meets the fastest lora_jax row of its family that fits in its
  memory; fastest-vs-fastest flags a JAX side that needed more memory."""
  from benchmarks import compare  # noqa: PLC0415

  def jax_row(impl, targets, tune, ms, gib):
    return dict(impl=impl, targets=targets, tune=tune, variant=f"{impl}/{targets}@{tune}", step_ms=ms, peak_gib=gib,
                model_tflop=1.0, mfu=0.5)

  def torch_row(impl, targets, mode, ms, gib):
    return dict(impl=impl, targets=targets, mode=mode, variant=f"{impl}/{targets}@{mode}", step_ms=ms, peak_gib=gib)

  jr = [jax_row("lora_jax", "all", "fast", 50.0, 7.5), jax_row("lora_jax", "all", "small", 60.0, 3.4),
        jax_row("lora_jax", "qv", "fast", 40.0, 9.0), jax_row("full", "all", "fast", 55.0, 12.0),
        dict(impl="lora_jax", targets="all", tune="broken", variant="x", error="boom")]
  tr = [torch_row("peft_lora", "all", "compile", 80.0, 11.0), torch_row("peft_lora", "all", "compile+ckpt", 100.0, 3.9),
        torch_row("peft_lora", "qv", "compile", 50.0, 8.0), torch_row("torch_full", "all", "compile", 64.0, 13.0),
        torch_row("peft_lora", "all", "compile+ckpt+amp", 1.0, 1.0) | dict(autocast_bf16=True)]
  out = compare.compare(jr, tr, cap_gib=4.0, datasheet_tflops=100.0)
  fastest = {p["family"]: p for p in out["fastest"]}
  assert fastest["lora/all"]["speedup"] == 1.6 and not fastest["lora/all"]["more_memory"]
  assert fastest["lora/qv"]["more_memory"]  # 9 GiB against 8
  matched = {(p["family"], p["torch"]["variant"]): p for p in out["matched_memory"]}
  assert matched[("lora/all", "peft_lora/all@compile+ckpt")]["jax"]["variant"] == "lora_jax/all@small"
  assert matched[("lora/all", "peft_lora/all@compile+ckpt")]["speedup"] == round(100 / 60, 3)
  assert matched[("lora/qv", "peft_lora/qv@compile")]["jax"] is None  # nothing of ours fits in 8 GiB
  assert out["best_under_cap"]["variant"] == "lora_jax/all@small"
  assert out["lora_over_full"]["ratio"] == round(50 / 55, 3)
  assert {m["family"]: m["mfu_datasheet"] for m in out["mfu"]}["lora/all"] == round(1.0 / 0.05 / 100.0, 4)
