#!/usr/bin/env bash
# Everything chexnet_jax needs checked on one GPU, in calls of at most 580 s each: speed
# of each step change against its baseline (with a profile of the top ops), correctness
# (tests/gpu), PyTorch on the same card, and, as a call of its own, an end-to-end run.
#
#   bash benchmarks/device_check.sh [--tiny] [PART ...]     # one call: the default parts
#   bash benchmarks/device_check.sh [--tiny] e2e            # a second call
#
# PARTS, in the default order (most valuable first; later ones are cut when the budget ends):
#   env       card, driver and library versions
#   cmdbuf    JAX, DenseNet121 224 px bfloat16 batch 128, the default config: command
#             buffers over convolutions too (config.gpu_command_buffers, one CUDA graph per
#             step). Not profiled: under a profiler XLA runs command buffers op by op.
#   base      the same with XLA's default command buffers, with a profile summary (top
#             ops, their share, device busy time per step)
#   tests     pytest tests/gpu (GPU vs CPU equivalences on the tiny model)
#   dense     the default config + config.fused_dense_layer (the opt-in Pallas kernels)
#   batch     the default config at batch 256 and 512
#   fused     the default config + config.fused_optimizer (one Adam over all parameters)
#   torch     torch eager and torch.compile at batch 128 (AMP, channels_last)
#   e2e       (not a default part: it needs a call of its own) chexnet_jax.main,
#             configs/h100x1.py's recipe, on 24,000 records built here (300 steps across
#             3 epoch ends); no evaluation inside the timed steps
# `--tiny` runs every part on the CPU with a tiny model and small images (a rehearsal).
#
# Every step is its own process with its own limit (a cold DenseNet121 compile is 61-114 s
# on an H200); the run stops starting steps when BUDGET_S (default 540 s) is spent. Each
# benchmark prints a line after its compile and after its warm-up, so a step cut short
# still says how far it got. If the configured command buffers fail (a kind XLA refuses, a
# CUDA graph that fails to capture), the benchmark says so, goes on with XLA's default
# kinds, and every later part runs with XLA's default from the start (no doomed compile).
# CMDBUF_KINDS=... replaces the default config's kinds (a rehearsal of that fallback:
# CMDBUF_KINDS=FUSION,NOT_A_KIND). Profile traces are written outside the results and
# never packed. XLA's
# autotuning results are loaded from benchmarks/results/autotune_h200.textproto when it
# exists, and each run's results are merged into autotune.textproto for the next call.
# Results go to $RES (benchmarks/results/<tag>-<time>/, or /tmp/device_check/results
# when the device runner's $OUT is set; then $OUT receives only results.tgz, packed after
# every step so a killed run still returns what finished, and at the end summary.md,
# gpu_summary.json and autotune.textproto: at most 8 files).
#
# Missing pure-Python or manylinux packages (grain, ml_collections, tensorflow-datasets,
# array-record, tensorboardX and what they need) are installed from wheels in $WHEEL_DIR
# (default .whl/) into /tmp/site when the machine lacks them; RESULTS.md says how to
# download them.
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=0
if [[ "${1:-}" == "--tiny" ]]; then TINY=1; shift; fi
PARTS="${*:-env cmdbuf base tests dense batch fused torch}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-540}"
WHEEL_DIR="${WHEEL_DIR:-.whl}"
AUTOTUNE_IN="${AUTOTUNE_IN:-benchmarks/results/autotune_h200.textproto}"
START=$SECONDS
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
# Compiled programs persist between calls on a machine that stays up (ignored by git).
export JAX_COMPILATION_CACHE_DIR="$PWD/.gpucache/jax"
export TF_CPP_MIN_LOG_LEVEL=2

if (( TINY )); then
  TAG=tiny; export JAX_PLATFORMS=cpu
  SHAPE="32 8"; BATCHES="16 32"
  JAX_ARGS="--config.model=tiny --steps 3 --warmup 1"
  TORCH_ARGS="--steps 3 --warmup 1 --device cpu --standin"
  E2E_IMAGES=600; E2E_SIZE=64
  E2E_ARGS="--config.model=tiny --config.image_size=56 --config.batch_size=16
            --config.grain_workers=2 --config.num_train_steps=40 --config.log_every_steps=10"
  JAX_LIMIT=120; E2E_LIMIT=200
else
  TAG=gpu; export JAX_PLATFORMS=cuda,cpu
  SHAPE="224 128"; BATCHES="256 512"
  JAX_ARGS="--config.model=densenet121 --steps 30 --warmup 5"
  TORCH_ARGS="--steps 30 --warmup 5"
  # 24,000 images: ~21,600 train after 5% validation and 5% test = 84 steps of 256 an epoch,
  # so the 300 steps cross 3 epoch ends (grain's reshuffle) as a real run does.
  E2E_IMAGES=24000; E2E_SIZE=224
  E2E_ARGS="--config.num_train_steps=300 --config.log_every_steps=25"
  JAX_LIMIT=200; E2E_LIMIT=240
fi
if [[ -n "${OUT:-}" ]]; then RES=/tmp/device_check/results; else RES="benchmarks/results/$TAG-$(date +%Y%m%d-%H%M%S)"; fi
TRACES=/tmp/device_check/traces  # Large: summarised into each part's JSON, never packed.
rm -rf /tmp/device_check; mkdir -p "$RES" "$TRACES"
# The default config's kinds, or XLA's default once a part's command buffers failed.
CMDBUF_ARGS=()
[[ -n "${CMDBUF_KINDS:-}" ]] && CMDBUF_ARGS=("--config.gpu_command_buffers=$CMDBUF_KINDS")
exec > >(tee -a "$RES/device_check.log") 2>&1

left() { echo $(( BUDGET_S - (SECONDS - START) )); }

pack() {  # What finished so far travels back even if the call is killed next.
  if [[ -n "${OUT:-}" ]]; then
    tar czf "$OUT/results.tgz.tmp" --exclude='trace-*' --exclude='*.xplane.pb' \
      --exclude='*trace.json.gz' -C "$RES" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
  fi
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
  # The whole output goes to NAME.log; the benchmark's progress lines also show here.
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$RES/$name.log" | grep --line-buffered '^benchmark: '
  local rc=${PIPESTATUS[0]}
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
    echo "error: grain/TFDS/ml_collections missing and no wheels in $WHEEL_DIR (RESULTS.md: How to measure)"; exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEEL_DIR"/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
}

# XLA flags of a JAX run: reuse the autotuning known so far, dump this run's for the next.
autotune_flags() {  # NAME
  local flags="--xla_gpu_dump_autotune_results_to=$RES/autotune-$1.textproto"
  [[ -s "$RES/autotune.textproto" ]] && flags+=" --xla_gpu_load_autotune_results_from=$RES/autotune.textproto"
  (( TINY )) && flags=""
  echo "$flags"
}

merge_autotune() {  # Every run's results in one file, each convolution once.
  compgen -G "$RES/autotune-*.textproto" >/dev/null || return 0
  "$PY" - "$RES" <<'EOF'
import pathlib, re, sys
res = pathlib.Path(sys.argv[1])
blocks, version = {}, 'version: 3'
files = sorted(res.glob('autotune-*.textproto'))
if (res / 'autotune.textproto').exists():
  files.insert(0, res / 'autotune.textproto')
for path in files:
  text = path.read_text()
  version = (re.search(r'^version: \d+', text, re.M) or [version])[0]
  for block in re.findall(r'^results \{\n.*?^\}\n', text, re.M | re.S):
    blocks.setdefault(re.sub(r'^\s*result \{.*', '', block, flags=re.M | re.S), block)
(res / 'autotune.textproto').write_text(version + '\n' + ''.join(blocks.values()))
print(f'autotune.textproto: {len(blocks)} results')
EOF
}

jax_speed() {  # NAME BATCH PROFILE(0|1) [extra config flags...]
  local name="$1" b="$2" profile="" s="${SHAPE%% *}"
  (( $3 )) && profile="--profile_dir $TRACES/$name"
  shift 3
  step "$name" "$JAX_LIMIT" env XLA_FLAGS="$(autotune_flags "$name")" \
    "$PY" -m chexnet_jax.benchmark --config configs/h100x1.py \
    --config.dataset=synthetic --config.init_from= --config.image_size="$s" \
    --config.dataset_image_size="$s" --config.batch_size="$b" $JAX_ARGS "$@" \
    $profile --json_out "$RES/$name.json"
  rm -rf "${TRACES:?}/$name"  # Summarised into NAME.json; the raw trace is large.
  note_fallback "$name"
  merge_autotune
}

# After a part whose command buffers failed, the later parts use XLA's default at once.
note_fallback() {  # NAME
  if grep -q '"command_buffer_fallback": "' "$RES/$1.json" 2>/dev/null; then
    echo "   $1: command buffers failed; later parts run with XLA's default kinds"
    CMDBUF_ARGS=("--config.gpu_command_buffers=")
  fi
}

torch_speed() {  # batch mode
  local s; s=${SHAPE%% *}
  step "torch-$2-$s-$1-bfloat16" 150 bash -c "\"$PY\" benchmarks/torch_reference.py \
    --image_size $s --batch_size $1 --dtype bfloat16 --mode $2 $TORCH_ARGS --json \
    > \"$RES/torch-$2-$s-$1-bfloat16.json\""
}

part_env() {
  {
    date -u +%FT%TZ
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c 'import sys, jax, flax, optax; print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__); print(jax.devices())'
    "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -n 1
    nproc
  } > "$RES/env.txt" 2>&1
  cat "$RES/env.txt"
  if [[ -s "$AUTOTUNE_IN" ]] && (( ! TINY )); then cp "$AUTOTUNE_IN" "$RES/autotune.textproto"; fi
  pack
}

# Names: jax-PX-BATCH-bfloat16 is the default config; tune-VARIANT-PX-BATCH-bfloat16 a change.
part_base() {
  jax_speed "tune-xla_default-${SHAPE// /-}-bfloat16" "${SHAPE#* }" 1 --config.gpu_command_buffers=
}
# Not profiled: while a profiler runs, XLA executes command buffers op by op (RESULTS.md).
part_cmdbuf() { jax_speed "jax-${SHAPE// /-}-bfloat16" "${SHAPE#* }" 0 "${CMDBUF_ARGS[@]}"; }
part_batch() {
  local b
  for b in $BATCHES; do jax_speed "jax-${SHAPE%% *}-$b-bfloat16" "$b" 0 "${CMDBUF_ARGS[@]}"; done
}
part_dense() {  # config.fused_dense_layer: the opt-in Pallas kernels of the dense layers.
  jax_speed "tune-fused_dense_layer-${SHAPE// /-}-bfloat16" "${SHAPE#* }" 0 \
    --config.fused_dense_layer=True "${CMDBUF_ARGS[@]}"
}
part_fused() {
  jax_speed "tune-fused_adam-${SHAPE// /-}-bfloat16" "${SHAPE#* }" 0 \
    --config.fused_optimizer=True "${CMDBUF_ARGS[@]}"
}

part_e2e() {
  local root=/tmp/device_check/e2e
  step e2e-images 90 "$PY" - "$root" "$E2E_IMAGES" "$E2E_SIZE" <<'EOF'
# Distinct training images from the bundled NIH sample: each a random crop, flip and
# brightness change of one of its 300 X-rays, written as PNG at the records' size.
import csv, functools, os, sys
from concurrent import futures
import numpy as np
from PIL import Image
root, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(os.path.join(root, 'images'), exist_ok=True)
sources = sorted(os.listdir('demo_data/images'))
LABELS = ['Atelectasis', 'Effusion', 'Infiltration', 'Nodule']
@functools.lru_cache(maxsize=None)
def source(k):  # Decoded once per worker, at twice the output size.
  image = Image.open(os.path.join('demo_data/images', sources[k])).convert('L')
  return image.resize((2 * size, 2 * size))
def make(i):
  rng = np.random.default_rng(i)
  image = source(i % len(sources))
  w, h = image.size
  side = int(min(w, h) * rng.uniform(0.8, 1.0))
  x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
  pixels = np.asarray(image.crop((x, y, x + side, y + side)).resize((size, size)), np.float32)
  pixels = np.clip(pixels * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8)
  if rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  name = f'{i:06d}.png'
  Image.fromarray(np.ascontiguousarray(pixels)).save(os.path.join(root, 'images', name))
  return [name, f'p{i // 2}'] + [int(v) for v in rng.random(len(LABELS)) < 0.2]
with futures.ProcessPoolExecutor() as pool:
  rows = list(pool.map(make, range(count), chunksize=64))
with open(os.path.join(root, 'labels.csv'), 'w', newline='') as f:
  writer = csv.writer(f)
  writer.writerow(['path', 'patient'] + LABELS)
  writer.writerows(rows)
print(f'{count} images in {root}')
EOF
  [[ -s "$root/labels.csv" ]] || return 0
  step e2e-build 120 "$PY" -m input_pipeline.build --csv "$root/labels.csv" \
    --image_root "$root/images" --labels Atelectasis,Effusion,Infiltration,Nodule \
    --patient_column patient --val_fraction 0.05 --test_fraction 0.05 --name e2e \
    --data_dir "$root/tfds" --image_size "$E2E_SIZE"
  # Evaluation only after the last step (eval_every_epochs beyond the run), outside the
  # logged training intervals; no checkpoint inside them either.
  step e2e "$E2E_LIMIT" env XLA_FLAGS="$(autotune_flags e2e)" "$PY" -m chexnet_jax.main \
    --config configs/h100x1.py --workdir "$root/run" --config.dataset=e2e \
    --config.data_dir="$root/tfds" --config.dataset_image_size="$E2E_SIZE" \
    --config.init_from= --config.eval_every_epochs=100000 \
    --config.checkpoint_every_steps=100000 $E2E_ARGS "${CMDBUF_ARGS[@]}"
  cp "$root/run/metrics.jsonl" "$RES/e2e-metrics.jsonl" 2>/dev/null
  cp "$root/run/config.json" "$RES/e2e-config.json" 2>/dev/null
  merge_autotune
  pack
}

part_torch() { torch_speed "${SHAPE#* }" eager; torch_speed "${SHAPE#* }" compile; }

part_tests() {
  # The tiny model: the equivalences need no DenseNet121 compile (benchmark parts time it).
  step tests 150 env XLA_FLAGS="--xla_gpu_autotune_level=0" "$PY" -m pytest -q -rA -s \
    -p no:cacheprovider -p no:xdist -p no:benchmark tests/gpu/test_gpu.py --junitxml="$RES/tests.xml"
  if [[ -f "$RES/tests.log" ]]; then
    echo "tests/gpu: $(grep -E "[0-9]+ (passed|failed|skipped|error)" "$RES/tests.log" | tail -n 1)" > "$RES/tests.txt"
  fi
}

install_wheels
for part in $PARTS; do
  case "$part" in
    env|base|cmdbuf|batch|dense|fused|e2e|torch|tests) "part_$part" ;;
    *) echo "unknown part '$part' (env base cmdbuf batch dense fused e2e torch tests)"; exit 2 ;;
  esac
done

"$PY" benchmarks/gpu_summary.py "$RES" --command "bash benchmarks/device_check.sh $*"
pack
if [[ -n "${OUT:-}" ]]; then
  for f in summary.md gpu_summary.json autotune.textproto; do [[ -s "$RES/$f" ]] && cp "$RES/$f" "$OUT/"; done
fi
echo "total $(( SECONDS - START ))s; results in $RES"
