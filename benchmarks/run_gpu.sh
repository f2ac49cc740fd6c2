#!/usr/bin/env bash
# Runs the GPU benchmark suite (config tinyllama) on one GPU, time-boxed, writing into $OUT:
#   $OUT/results.tgz   the JSON files (packed after every stage and every 20 s)
#   $OUT/log.txt       everything printed
# Then, on the machine you work on:
#   tar -xzf results.tgz -C benchmarks/results && python benchmarks/report.py
#
# Usage: bash benchmarks/run_gpu.sh [stage ...]
#   stages: train peft inference overheads scaling (default: all five, in that order), and
#   profile (a jax.profiler trace of PROFILE_VARIANT, default lora_jax/all@unroll2, summarised);
#   train2 / peft2 add the variants in TRAIN2_VARIANTS / PEFT2_VARIANTS to the same JSON;
#   dora: DoRA vs LoRA, one run (~8 min with BUDGET_S=480): lora_jax LoRA, DoRA and LoRA+dropout
#     all-linear at one tune (DORA_TUNE, default unroll2+keep_xa), then PEFT LoRA / DoRA all-linear
#     (compile, then eager), into $RES/dora_train_step_$CONFIG.json and dora_peft_reference_$CONFIG.json
#     (DORA_TRAIN_VARIANTS / DORA_PEFT_VARIANTS override the lists; DORA_TRAIN_BUDGET=150 caps the
#     JAX half, the PEFT half gets the rest; every subprocess's limit is cut to the time left)
#   qlora: quantized base (QLoRA), one run (~8 min with BUDGET_S=480), each variant in its own process:
#     lora_jax all-linear at QLORA_TUNE (default unroll2+keep_xa) on a bf16, NF4 and int8 base at $CONFIG
#     (1.1B), then NF4 at QLORA_BIG_CONFIG (default llama7b: Llama-2-7B shapes); then PEFT + bitsandbytes:
#     bf16-base LoRA and QLoRA at $CONFIG, QLoRA at the 7B shapes (eager, gradient checkpointing, bf16
#     autocast: QLORA_PEFT_MODE), then, with the time left, PEFT QLoRA under torch.compile at $CONFIG.
#     Writes $RES/qlora_train_step_<config>.json and qlora_peft_reference_<config>.json for both configs;
#     QLORA_PROFILE=1 adds a short profile of the $CONFIG NF4 step (qlora_profile_$CONFIG.json: time in
#     dequantize fusions vs GEMMs). Caps (s): QLORA_TRAIN_BUDGET=170 (1.1B JAX), QLORA_BIG_BUDGET=130
#     (7B JAX), QLORA_PEFT_BUDGET=80 (1.1B PEFT); the 7B PEFT run gets what is left. bitsandbytes is
#     not in the device image: its wheel must be in .whl/ (see "Extras" below).
#   decode: many adapters, decode throughput (issue 12), one run (~9 min with BUDGET_S=570), each variant in
#     its own process: lora_jax (benchmarks/decode.py: base, merged, factored, mixed banks of N adapters per
#     bank mode, the sequential loop, the library's generate; hot swap in every mixed row) into
#     $RES/decode_$CONFIG.json, then PEFT (benchmarks/peft_decode.py: factored, merged, mixed adapter_names,
#     the loop; eager, then static cache + compile) into $RES/peft_decode_$CONFIG.json. DECODE_JAX_BUDGET=300
#     caps the lora_jax half, PEFT gets the rest; DECODE_PARTS="jax peft" picks the halves; DECODE_VARIANTS /
#     PEFT_DECODE_VARIANTS replace the lists, DECODE_ONLY / PEFT_DECODE_ONLY filter them (globs);
#     DECODE_ARGS adds arguments to both scripts (e.g. "--batch 64 --prompt 128 --new 128 --adapters 8,32,128");
#     DECODE_ISOLATE=0 runs the lora_jax variants in one process (faster; peak memory then process-wide).
#   sharded: the sharded LoRA step (issue 14, benchmarks/sharded_step.py) on one GPU: step time and XLA's
#     per-device memory plan of the FSDP x TP step on a (1, 1) mesh, into $RES/sharded_step_$CONFIG.json
#     (~1-2 min at tinyllama; SHARDED_BUDGET=150 caps it; SHARDED_DEVICES=1 lists the GPU counts to run)
# Environment (all optional):
#   OUT=/tmp/bench_out  BUDGET_S=540 (whole run)  CONFIG=tinyllama  RES=/tmp/bench_results (the JSON files)
#   TRAIN_VARIANTS / PEFT_VARIANTS: comma-separated variant keys (default: each script's plan)
#   APPEND=1: start from the JSON files in benchmarks/results and add/replace rows
#   LORA_JAX_COMMIT: recorded in the JSON when the machine has no git checkout (pass
#     LORA_JAX_COMMIT=$(git rev-parse --short HEAD) from where you launch it)
#   TRAIN_BUDGET PEFT_BUDGET INFER_BUDGET OVER_BUDGET SCALING_BUDGET: seconds per stage
# Extras: wheels in .whl/ (qwix, jax-lorax and their needs; bitsandbytes for the PEFT QLoRA variants)
# are installed with --target into /tmp/site_extra, which only the qwix / lorax / qlora variants put on
# their path.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_out}
CONFIG=${CONFIG:-tinyllama}
RES=${RES:-/tmp/bench_results}  # the JSON files (packed into $OUT/results.tgz)
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$RES"
exec > >(tee -a "$OUT/log.txt") 2>&1
start=$SECONDS
deadline=$((SECONDS + ${BUDGET_S:-540}))
left() { echo $((deadline - SECONDS)); }
pack() { tar -czf "$OUT/results.tgz.tmp" -C "$RES" . 2>/dev/null && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"; }
stage_budget() {  # min(requested, time left - 20)
  local want=$1 l
  l=$(( $(left) - 20 ))
  (( l < want )) && want=$l
  (( want < 0 )) && want=0
  echo "$want"
}

export PYTHONUNBUFFERED=1
export LORA_BENCH_RUN_ID="$(date -u +%FT%TZ)-$(hostname)-$$"  # recorded in every row of this run
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU in turn
export TOKENIZERS_PARALLELISM=false
# Later processes reuse executables and XLA's autotuning results of earlier ones (so compile_s
# in train_step/scaling is warm); overheads.py switches the cache off to time cold compiles.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache

echo "== $(date -u +%FT%TZ) run_gpu.sh $* (config $CONFIG, budget ${BUDGET_S:-540}s)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
$PY - <<'EOF'
import importlib.metadata as m
for n in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "torch", "transformers", "peft", "numpy"):
  try:
    print(f"  {n} {m.version(n)}")
  except Exception:
    pass
EOF
if ls .whl/*.whl >/dev/null 2>&1; then
  for w in .whl/*.whl; do  # one at a time: a wheel that does not fit this Python skips only itself
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_extra "$w" \
      && echo "  extra installed: $(basename "$w")"
  done
  export LORA_BENCH_EXTRA_SITE=/tmp/site_extra
fi
if [[ "${APPEND:-0}" == 1 ]]; then
  cp benchmarks/results/*_"$CONFIG".json "$RES"/ 2>/dev/null
  APPEND_FLAG=--append
else
  APPEND_FLAG=
fi
( while sleep 20; do pack; done ) &
packer=$!

stages=("$@")
(( ${#stages[@]} )) || stages=(train peft inference overheads scaling)
for stage in "${stages[@]}"; do
  echo "== stage $stage at +$((SECONDS - start))s, $(left)s left"
  if (( $(left) < 40 )); then echo "== stage $stage skipped: time budget"; continue; fi
  case $stage in
    train)
      b=$(stage_budget "${TRAIN_BUDGET:-300}")
      timeout $((b + 150)) $PY benchmarks/train_step.py --config "$CONFIG" --out "$RES/train_step_$CONFIG.json" \
        --budget-s "$b" --timeout-s 170 $APPEND_FLAG ${TRAIN_VARIANTS:+--variants "$TRAIN_VARIANTS"} ;;
    train2)  # more train_step variants, added to the same JSON
      b=$(stage_budget "${TRAIN2_BUDGET:-300}")
      timeout $((b + 150)) $PY benchmarks/train_step.py --config "$CONFIG" --out "$RES/train_step_$CONFIG.json" \
        --budget-s "$b" --timeout-s 170 --append --variants "${TRAIN2_VARIANTS:?set TRAIN2_VARIANTS}" ;;
    peft)
      b=$(stage_budget "${PEFT_BUDGET:-170}")
      timeout $((b + 200)) $PY benchmarks/peft_reference.py --config "$CONFIG" --out "$RES/peft_reference_$CONFIG.json" \
        --budget-s "$b" --timeout-s 240 $APPEND_FLAG ${PEFT_VARIANTS:+--variants "$PEFT_VARIANTS"} ;;
    peft2)
      b=$(stage_budget "${PEFT2_BUDGET:-170}")
      timeout $((b + 200)) $PY benchmarks/peft_reference.py --config "$CONFIG" --out "$RES/peft_reference_$CONFIG.json" \
        --budget-s "$b" --timeout-s 240 --append --variants "${PEFT2_VARIANTS:?set PEFT2_VARIANTS}" ;;
    dora)  # DoRA vs LoRA, same run: its own JSON files (report.py: "DoRA vs LoRA")
      tune=${DORA_TUNE:-unroll2+keep_xa}
      end=$(stage_budget "${DORA_TRAIN_BUDGET:-150}")
      timeout $((end + 30)) $PY benchmarks/train_step.py --config "$CONFIG" --out "$RES/dora_train_step_$CONFIG.json" \
        --isolate --end-s "$end" --min-start-s 25 --timeout-s 150 $APPEND_FLAG \
        --variants "${DORA_TRAIN_VARIANTS:-lora_jax/all@$tune,lora_jax_dora/all@$tune,lora_jax_dropout/all@$tune}"
      echo "== dora: lora_jax half exited $? at +$((SECONDS - start))s, $(left)s left"
      pack
      end=$(( $(left) - 15 ))
      if (( end > 40 )); then
        timeout $((end + 10)) $PY benchmarks/peft_reference.py --config "$CONFIG" \
          --out "$RES/dora_peft_reference_$CONFIG.json" --isolate --end-s "$end" --min-start-s 30 --timeout-s 300 \
          $APPEND_FLAG --variants "${DORA_PEFT_VARIANTS:-lora/all@compile,dora/all@compile,dora/all@eager,lora/all@eager}"
      else
        echo "== dora: PEFT half skipped: time budget"
      fi ;;
    qlora)  # quantized base: its own JSON files, one run (report.py: "Quantized base (QLoRA)")
      tune=${QLORA_TUNE:-unroll2+keep_xa}
      big=${QLORA_BIG_CONFIG:-llama7b}
      pmode=${QLORA_PEFT_MODE:-eager+ckpt+amp}
      end=$(stage_budget "${QLORA_TRAIN_BUDGET:-170}")
      timeout $((end + 30)) $PY benchmarks/train_step.py --config "$CONFIG" --out "$RES/qlora_train_step_$CONFIG.json" \
        --isolate --end-s "$end" --min-start-s 25 --timeout-s 120 $APPEND_FLAG \
        --variants "${QLORA_TRAIN_VARIANTS:-lora_jax/all@$tune,lora_jax_nf4/all@$tune,lora_jax_int8/all@$tune}"
      echo "== qlora: lora_jax $CONFIG exited $? at +$((SECONDS - start))s, $(left)s left"
      pack
      end=$(stage_budget "${QLORA_BIG_BUDGET:-130}")
      if (( end > 40 )); then
        timeout $((end + 30)) $PY benchmarks/train_step.py --config "$big" --out "$RES/qlora_train_step_$big.json" \
          --isolate --end-s "$end" --min-start-s 40 --timeout-s 170 $APPEND_FLAG \
          --variants "${QLORA_BIG_VARIANTS:-lora_jax_nf4/all@$tune}"
        echo "== qlora: lora_jax $big exited $? at +$((SECONDS - start))s, $(left)s left"
      else
        echo "== qlora: lora_jax $big skipped: time budget"
      fi
      pack
      end=$(stage_budget "${QLORA_PEFT_BUDGET:-80}")
      if (( end > 30 )); then
        timeout $((end + 20)) $PY benchmarks/peft_reference.py --config "$CONFIG" \
          --out "$RES/qlora_peft_reference_$CONFIG.json" --isolate --end-s "$end" --min-start-s 20 --timeout-s 90 \
          $APPEND_FLAG --variants "${QLORA_PEFT_VARIANTS:-lora/all@$pmode,qlora/all@$pmode}"
        echo "== qlora: PEFT $CONFIG exited $? at +$((SECONDS - start))s, $(left)s left"
      else
        echo "== qlora: PEFT $CONFIG skipped: time budget"
      fi
      pack
      want=$(( $(left) - 15 ))
      [[ "${QLORA_PROFILE:-0}" == 1 ]] && want=$(( want - 80 ))  # keep time for the profile
      end=$(stage_budget "$want")
      if (( end > 40 )); then
        timeout $((end + 20)) $PY benchmarks/peft_reference.py --config "$big" \
          --out "$RES/qlora_peft_reference_$big.json" --isolate --end-s "$end" --min-start-s 40 --timeout-s 200 \
          $APPEND_FLAG --variants "${QLORA_PEFT_BIG_VARIANTS:-qlora/all@$pmode}"
        echo "== qlora: PEFT $big exited $? at +$((SECONDS - start))s, $(left)s left"
      else
        echo "== qlora: PEFT $big skipped: time budget"
      fi
      pack
      if [[ "${QLORA_PROFILE:-0}" == 1 ]]; then
        b=$(stage_budget 90)
        if (( b > 40 )); then
          timeout "$b" $PY benchmarks/profile_step.py --config "$CONFIG" --variant "lora_jax_nf4/all@$tune" --steps 3 \
            --out "$RES/qlora_profile_$CONFIG.json"
          echo "== qlora: profile exited $? at +$((SECONDS - start))s, $(left)s left"
        else
          echo "== qlora: profile skipped: time budget"
        fi
        pack
      fi
      end=$(( $(left) - 15 ))  # torch.compile of the bitsandbytes model, if time is left (often graph-breaks)
      if (( end > 60 )); then
        timeout $((end + 10)) $PY benchmarks/peft_reference.py --config "$CONFIG" \
          --out "$RES/qlora_peft_reference_$CONFIG.json" --isolate --end-s "$end" --min-start-s 60 --timeout-s 240 \
          --append --variants "${QLORA_PEFT_EXTRA_VARIANTS:-qlora/all@compile+ckpt+amp}"
      else
        echo "== qlora: PEFT compile skipped: time budget"
      fi ;;
    decode)  # many adapters: decode throughput; its own JSON files (report.py: "Many adapters: decode")
      parts=" ${DECODE_PARTS:-jax peft} "
      if [[ "${DECODE_ISOLATE:-1}" == 1 ]]; then iso=--isolate; else iso=--inprocess; fi
      if [[ "$parts" == *" jax "* ]]; then
        want=${DECODE_JAX_BUDGET:-300}
        [[ "$parts" == *" peft "* ]] || want=$(( $(left) - 15 ))
        end=$(stage_budget "$want")
        timeout $((end + 30)) $PY benchmarks/decode.py --config "$CONFIG" --out "$RES/decode_$CONFIG.json" \
          $iso --end-s "$end" --min-start-s 25 --timeout-s 150 $APPEND_FLAG ${DECODE_ARGS:-} \
          ${DECODE_VARIANTS:+--variants "$DECODE_VARIANTS"} ${DECODE_ONLY:+--only "$DECODE_ONLY"}
        echo "== decode: lora_jax half exited $? at +$((SECONDS - start))s, $(left)s left"
        pack
      fi
      if [[ "$parts" == *" peft "* ]]; then
        end=$(( $(left) - 15 ))
        if (( end > 40 )); then
          timeout $((end + 10)) $PY benchmarks/peft_decode.py --config "$CONFIG" --out "$RES/peft_decode_$CONFIG.json" \
            --isolate --end-s "$end" --min-start-s 30 --timeout-s 240 $APPEND_FLAG ${DECODE_ARGS:-} \
            ${PEFT_DECODE_VARIANTS:+--variants "$PEFT_DECODE_VARIANTS"} ${PEFT_DECODE_ONLY:+--only "$PEFT_DECODE_ONLY"}
        else
          echo "== decode: PEFT half skipped: time budget"
        fi
      fi ;;
    sharded)  # the sharded LoRA step's 1-GPU figure (issue 14)
      b=$(stage_budget "${SHARDED_BUDGET:-150}")
      timeout $((b + 20)) $PY benchmarks/sharded_step.py --config "$CONFIG" --platform gpu \
        --devices "${SHARDED_DEVICES:-1}" --timeout-s "$b" --out "$RES/sharded_step_$CONFIG.json" ;;
    inference)
      b=$(stage_budget "${INFER_BUDGET:-70}")
      timeout "$b" $PY benchmarks/inference.py --config "$CONFIG" --out "$RES/inference_$CONFIG.json" ;;
    overheads)
      b=$(stage_budget "${OVER_BUDGET:-70}")
      timeout "$b" $PY benchmarks/overheads.py --config "$CONFIG" --out "$RES/overheads_$CONFIG.json" --no-train ;;
    scaling)
      tune=$($PY -c "import json,sys; print(json.load(open(sys.argv[1])).get('best_tune') or 'remat+chunk')" \
        "$RES/train_step_$CONFIG.json" 2>/dev/null || echo remat+chunk)
      b=$(stage_budget "${SCALING_BUDGET:-150}")
      timeout $((b + 60)) $PY benchmarks/scaling.py --config "$CONFIG" --out "$RES/scaling_$CONFIG.json" \
        --tune "$tune" --budget-s "$b" ;;
    profile)
      b=$(stage_budget "${PROFILE_BUDGET:-120}")
      timeout "$b" $PY benchmarks/profile_step.py --config "$CONFIG" --variant "${PROFILE_VARIANT:-lora_jax/all@unroll2}" \
        --out "$RES/profile_$CONFIG.json" ;;
    *) echo "unknown stage $stage" ;;
  esac
  echo "== stage $stage exited $? at +$((SECONDS - start))s"
  pack
done
kill "$packer" 2>/dev/null
pack
ls -la "$RES"
echo "== done in $((SECONDS - start))s"
