#!/usr/bin/env bash
# Everything chexnet_jax needs checked on one GPU, in one command of at most 9 minutes:
# correctness (tests/gpu), speed against PyTorch on the same card, and an end-to-end run.
#
#   bash benchmarks/device_check.sh [--tiny] [PART ...]
#
# PARTS, in the default order (most important first):
#   env       card, driver and library versions
#   speed1    JAX vs torch eager, DenseNet121 224 px bfloat16, per-device batch 64 and 128
#   tests     pytest tests/gpu (GPU vs CPU step, bf16/fp16 vs fp32, evaluate GPU vs CPU, main)
#   e2e       chexnet_jax.main --config configs/h100x1.py on records built from demo_data (256 px)
#   speed2    the same pairs at batch 256 bfloat16 and batch 64 float32
#   compile   torch.compile for the speed shapes, while the budget lasts
#   tune      JAX variants at 224/128 bf16 (XLA flags, remat), each next to its baseline
# `--tiny` runs every part on the CPU with a tiny model and small images (a rehearsal).
#
# Every step is its own process with its own timeout; the whole run stops starting new
# steps when BUDGET_S (default 500 s) is spent. Each result is written as soon as it
# exists, into $RES (benchmarks/results/<tag>-<time>/, or $OUT/results when the
# device runner's $OUT is set: a killed run still returns what finished, packed in
# $OUT/results.tgz after every step). The last lines printed are the summary table,
# also written as gpu_summary.json / summary.md by benchmarks/gpu_summary.py.
#
# Missing pure-Python or manylinux packages (grain, ml_collections, tensorflow-datasets,
# array-record, tensorboardX and what they need) are installed from wheels in $WHEEL_DIR
# (default .whl/) into /tmp/site when the machine lacks them; README "Benchmarks" says
# how to download them.
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=0
if [[ "${1:-}" == "--tiny" ]]; then TINY=1; shift; fi
PARTS="${*:-env speed1 tests e2e speed2 compile}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-500}"
WHEEL_DIR="${WHEEL_DIR:-.whl}"
START=$SECONDS
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
# Compiled programs persist between calls on a machine that stays up (ignored by git).
export JAX_COMPILATION_CACHE_DIR="$PWD/.gpucache/jax"
export TF_CPP_MIN_LOG_LEVEL=2

if (( TINY )); then
  TAG=tiny; export JAX_PLATFORMS=cpu
  SPEED1="32 4 bfloat16
32 8 bfloat16"; SPEED2="32 16 bfloat16
32 4 float32"
  JAX_ARGS="--config.model=tiny --steps 3 --warmup 1"
  TORCH_ARGS="--steps 3 --warmup 1 --device cpu --standin"
  E2E_ARGS="--config.model=tiny --config.dataset_image_size=64 --config.image_size=56
            --config.batch_size=16 --config.eval_batch_size=32 --config.grain_workers=2
            --config.num_train_steps=20 --config.dtype=float32"
  E2E_SIZE=64
else
  TAG=gpu; export JAX_PLATFORMS=cuda,cpu
  SPEED1="224 64 bfloat16
224 128 bfloat16"; SPEED2="224 256 bfloat16
224 64 float32"
  JAX_ARGS="--config.model=densenet121 --steps 30 --warmup 5"
  TORCH_ARGS="--steps 30 --warmup 5"
  E2E_ARGS="--config.num_train_steps=150"
  E2E_SIZE=256
fi
if [[ -n "${OUT:-}" ]]; then RES="$OUT/results"; else RES="benchmarks/results/$TAG-$(date +%Y%m%d-%H%M%S)"; fi
mkdir -p "$RES"
exec > >(tee -a "$RES/device_check.log") 2>&1

left() { echo $(( BUDGET_S - (SECONDS - START) )); }

pack() {  # What finished so far travels back even if the call is killed next.
  if [[ -n "${OUT:-}" ]]; then tar czf "$OUT/results.tgz.tmp" -C "$RES" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"; fi
}

# step NAME LIMIT CMD...: runs CMD (its output in NAME.log) unless the budget is spent.
# A step that writes no NAME.json gets one saying why.
step() {
  local name="$1" limit="$2"; shift 2
  local room; room=$(left)
  if (( room < 25 )); then
    echo "{\"status\": \"skipped: time budget\"}" > "$RES/$name.json"; return
  fi
  (( limit > room )) && limit=$room
  echo "== $name (limit ${limit}s, $(( SECONDS - START ))s elapsed)"
  timeout -k 5 "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  tail -n 4 "$RES/$name.log"
  if [[ ! -s "$RES/$name.json" ]]; then
    local why="failed (exit $rc)"; (( rc == 0 )) && why="ok"
    (( rc == 124 || rc == 137 )) && why="timed out (${limit}s)"
    echo "{\"status\": \"$why, see $name.log\"}" > "$RES/$name.json"
  fi
  pack
}

install_wheels() {  # Only what is missing, only from local files: the GPU machine has no network.
  if "$PY" -c 'import grain, ml_collections, tensorflow_datasets, array_record, tensorboardX' 2>/dev/null; then
    return
  fi
  if ! compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    echo "error: grain/TFDS/ml_collections missing and no wheels in $WHEEL_DIR (README: Benchmarks)"; exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEEL_DIR"/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
}

jax_speed() {  # NAME size batch dtype [extra config flags...]
  local name="$1" s="$2" b="$3" d="$4"; shift 4
  step "$name" 150 "$PY" -m chexnet_jax.benchmark --config configs/default.py \
    --config.dataset=synthetic --config.init_from= --config.image_size="$s" \
    --config.dataset_image_size="$s" --config.batch_size="$b" --config.dtype="$d" \
    $JAX_ARGS "$@" --json_out "$RES/$name.json"
}

torch_speed() {  # size batch dtype mode
  step "torch-$4-$1-$2-$3" 150 bash -c "\"$PY\" benchmarks/torch_reference.py --image_size $1 \
    --batch_size $2 --dtype $3 --mode $4 $TORCH_ARGS --json > \"$RES/torch-$4-$1-$2-$3.json\""
}

speed_pairs() {  # "size batch dtype" lines
  while read -r s b d; do
    jax_speed "jax-$s-$b-$d" "$s" "$b" "$d"
    torch_speed "$s" "$b" "$d" eager
  done <<< "$1"
}

part_env() {
  {
    date -u +%FT%TZ
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c 'import sys, jax, flax, optax; print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__); print(jax.devices())'
    "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -n 1
    nproc
  } > "$RES/env.txt" 2>&1
  cat "$RES/env.txt"; pack
}

part_tests() {
  # One process per test (main + evaluate share their run), each with its own limit, so a slow or hung test costs only itself.
  # Correctness needs no autotuning: XLA's default autotuning made the first DenseNet121
  # compilation take 114 s on an H200; these compile 7 programs.
  local t
  for t in test_float32_train_step_matches_cpu "test_low_precision_tracks_float32_for_20_steps[bfloat16]" \
           "test_low_precision_tracks_float32_for_20_steps[float16]" \
           "test_main_runs_30_steps_on_the_gpu or test_evaluate_on_gpu_gives_the_cpu_aurocs"; do
    local name="test-${t//[^A-Za-z0-9_]/_}"
    name="${name:0:60}"
    step "$name" 240 env XLA_FLAGS="--xla_gpu_autotune_level=0" "$PY" -m pytest -q -rA -s \
      -p no:cacheprovider -p no:xdist -p no:benchmark tests/gpu/test_gpu.py -k "$t" --junitxml="$RES/$name.xml"
    echo "$t: $(grep -E "[0-9]+ (passed|failed|skipped|error)" "$RES/$name.log" | tail -n 1)" >> "$RES/tests.txt"
  done
}

part_e2e() {
  local data="/tmp/chexnet_e2e/tfds" work="/tmp/chexnet_e2e/run"
  rm -rf /tmp/chexnet_e2e
  step e2e-build 90 "$PY" -m input_pipeline.build --manual_dir demo_data --data_dir "$data" \
    --image_size "$E2E_SIZE" --allow_subset
  step e2e 240 "$PY" -m chexnet_jax.main --config configs/h100x1.py --workdir "$work" \
    --config.data_dir="$data" --config.init_from= --config.eval_every_epochs=100000 \
    --config.log_every_steps=10 --config.checkpoint_every_steps=100000 $E2E_ARGS
  cp "$work/metrics.jsonl" "$RES/e2e-metrics.jsonl" 2>/dev/null
  cp "$work/config.json" "$RES/e2e-config.json" 2>/dev/null
  pack
}

part_compile() {
  while read -r s b d; do torch_speed "$s" "$b" "$d" compile; done <<< "$SPEED1"$'\n'"$SPEED2"
}

part_tune() {  # Each variant beside a fresh baseline of the same shape, same machine.
  # On an H200 the step was flat from batch 64 to 128 (42.5 vs 41.7 ms): launch-bound, so
  # the candidates are fewer, larger launches (CUDA graphs over every op, bigger batches).
  local shape="224 128 bfloat16"; (( TINY )) && shape="32 8 bfloat16"
  set -- $shape
  jax_speed "tune-base-$1-$2-$3" "$1" "$2" "$3"
  XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN" \
    jax_speed "tune-cmdbuf-$1-$2-$3" "$1" "$2" "$3"
  XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" jax_speed "tune-lhs-$1-$2-$3" "$1" "$2" "$3"
  XLA_FLAGS="--xla_gpu_autotune_level=0" jax_speed "tune-noautotune-$1-$2-$3" "$1" "$2" "$3"
}

install_wheels
for part in $PARTS; do
  case "$part" in
    env) part_env ;;
    speed1) speed_pairs "$SPEED1" ;;
    speed2) speed_pairs "$SPEED2" ;;
    tests) part_tests ;;
    e2e) part_e2e ;;
    compile) part_compile ;;
    tune) part_tune ;;
    *) echo "unknown part '$part' (env speed1 tests e2e speed2 compile tune)"; exit 2 ;;
  esac
done

"$PY" benchmarks/gpu_summary.py "$RES" --command "bash benchmarks/device_check.sh $*"
pack
echo "total $(( SECONDS - START ))s; results in $RES"
