#!/usr/bin/env bash
# chexnet_jax vs the PyTorch reference, DenseNet121 train step, on ONE card.
#
#   bash benchmarks/gpu.sh           # on a GPU machine, < 8 minutes
#   bash benchmarks/gpu.sh --tiny    # end-to-end check on CPU: tiny model, small images, 2 steps
#
# Shapes: 224 and 256 px x per-device batch 64, 128, 256 in bfloat16, plus float32 at 224/64.
# For each: `python -m chexnet_jax.benchmark` (synthetic in-memory uint8 batches) and
# benchmarks/torch_reference.py (torchvision densenet121, AMP, channels_last) in eager mode;
# then torch.compile for the same shapes while the time budget lasts (each compile takes
# a minute or more, so the last ones may read 'skipped: time budget').
# Every run is its own process (an out-of-memory shape fails alone) with a timeout.
#
# Output: one table with JAX/torch ratios on stdout and in benchmarks/results/<tag>-<time>.md,
# per-run JSON beside it in benchmarks/results/<tag>-<time>/. If $OUT is set (the device
# runner's return folder) the results are copied there too.
#
# Dependencies: jax (+ CUDA plugin), flax, optax, numpy; torch + torchvision for the torch rows
# (without torchvision those rows say so). The benchmark imports no grain / TFDS / clu; it
# needs ml_collections (pure Python). On a machine without network, carry its wheel in
# $WHEEL_DIR (default .whl/):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml_collections
# and this script installs them with `pip install --no-deps --no-index` when missing.
#
# Environment: PYTHON (default python3), BUDGET_S (default 450 s total), RUN_TIMEOUT_S (180),
# WHEEL_DIR (.whl), CUDA_VISIBLE_DEVICES (default 0: both frameworks on the same single card).
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-450}"
RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-180}"
WHEEL_DIR="${WHEEL_DIR:-.whl}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

if (( TINY )); then
  TAG=tiny; SIZES="32 48"; BATCHES="2 4"; FP32_SHAPE="32 2"
  JAX_ARGS="--config.model=tiny --steps 2 --warmup 1"
  TORCH_ARGS="--steps 2 --warmup 1 --device cpu"
else
  TAG=gpu; SIZES="224 256"; BATCHES="64 128 256"; FP32_SHAPE="224 64"
  JAX_ARGS="--config.model=densenet121 --steps 30 --warmup 5"
  TORCH_ARGS="--steps 30 --warmup 5"
fi
STAMP="$(date +%Y%m%d-%H%M%S)"
RES="benchmarks/results/$TAG-$STAMP"
mkdir -p "$RES"

install_wheels() {
  # Only what is missing, only from local files: the GPU machine has no network.
  if ! "$PY" -c 'import ml_collections' 2>/dev/null; then
    if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
      "$PY" -m pip install -q --no-deps --no-index "$WHEEL_DIR"/*.whl
    else
      echo "ml_collections missing and no wheels in $WHEEL_DIR: run, where there is network," >&2
      echo "  pip download --no-deps --only-binary=:all: -d $WHEEL_DIR ml_collections" >&2
      exit 1
    fi
  fi
}

# run NAME CMD...: runs CMD with a timeout unless the budget is spent; CMD writes $RES/NAME.json.
run() {
  local name="$1"; shift
  local left=$(( BUDGET_S - (SECONDS - START) ))
  if (( left < 20 )); then
    echo "{\"status\": \"skipped: time budget\"}" > "$RES/$name.json"; return
  fi
  local limit=$(( left < RUN_TIMEOUT_S ? left : RUN_TIMEOUT_S ))
  echo "== $name (limit ${limit}s, $(( SECONDS - START ))s elapsed)"
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$RES/$name.log"
  if [[ ! -s "$RES/$name.json" ]]; then
    local why="failed (exit $rc)"; (( rc == 124 )) && why="timed out (${limit}s)"
    echo "{\"status\": \"$why, see $name.log\"}" > "$RES/$name.json"
  fi
}

run_jax() {  # size batch dtype
  run "jax-$1-$2-$3" "$PY" -m chexnet_jax.benchmark --config configs/default.py \
    --config.dataset=synthetic --config.image_size="$1" --config.dataset_image_size="$1" \
    --config.batch_size="$2" --config.dtype="$3" $JAX_ARGS --json_out "$RES/jax-$1-$2-$3.json"
}

run_torch() {  # size batch dtype mode
  run "torch-$4-$1-$2-$3" bash -c "\"$PY\" benchmarks/torch_reference.py --image_size $1 \
    --batch_size $2 --dtype $3 --mode $4 $TORCH_ARGS --json > \"$RES/torch-$4-$1-$2-$3.json\""
}

shapes() {  # "size batch dtype" lines, most important first
  for b in $BATCHES; do for s in $SIZES; do echo "$s $b bfloat16"; done; done
  echo "$FP32_SHAPE float32"
}

install_wheels
{
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tail -n 1
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader
} > "$RES/env.txt" 2>&1
cat "$RES/env.txt"

while read -r s b d; do run_jax "$s" "$b" "$d"; run_torch "$s" "$b" "$d" eager; done < <(shapes)
while read -r s b d; do run_torch "$s" "$b" "$d" compile; done < <(shapes)

"$PY" - "$RES" "$TAG" <<'EOF' | tee "$RES.md"
"""One table: JAX vs torch eager / torch.compile, per shape."""
import json, pathlib, sys

res, tag = pathlib.Path(sys.argv[1]), sys.argv[2]

def load(name):
  p = res / f'{name}.json'
  return json.loads(p.read_text()) if p.exists() else {'status': 'not run'}

def ips(r):
  if 'images_per_s' in r:
    return f"{r['images_per_s']:.0f}"
  return r.get('status', 'n/a')

def ratio(a, b):
  if 'images_per_s' in a and 'images_per_s' in b:
    return f"{a['images_per_s'] / b['images_per_s']:.2f}"
  return 'n/a'

def extra(r):
  mfu = r.get('mfu')
  mem = r.get('peak_memory_bytes')
  return ('n/a' if mfu is None else f'{100 * mfu:.1f}%',
          'n/a' if mem is None else f'{mem / 2**30:.1f}')

print(f"# benchmarks/gpu.sh {'--tiny ' if tag == 'tiny' else ''}({res.name})\n")
print((res / 'env.txt').read_text())
print('images/s on one device (global = per device); ratio = JAX / torch.\n')
print('| px | batch | dtype | JAX | torch eager | torch.compile | JAX/eager | JAX/compile '
      '| JAX MFU | JAX peak GiB | JAX 10 epochs (s) |')
print('| --- ' * 11 + '|')
shapes = sorted({tuple(p.stem.split('-')[1:]) for p in res.glob('jax-*.json')},
                key=lambda t: (t[2], int(t[1]), int(t[0])))
for s, b, d in shapes:
  j = load(f'jax-{s}-{b}-{d}')
  e, c = load(f'torch-eager-{s}-{b}-{d}'), load(f'torch-compile-{s}-{b}-{d}')
  ten = f"{j['ten_epochs_s']:.0f}" if 'ten_epochs_s' in j else 'n/a'
  print(f'| {s} | {b} | {d} | {ips(j)} | {ips(e)} | {ips(c)} | {ratio(j, e)} | '
        f'{ratio(j, c)} | ' + ' | '.join(extra(j)) + f' | {ten} |')
print('\nReference (TF 1.12 + Horovod, 1 V100, 256 px, batch 64, fp32): 185.12 images/s.')
EOF

echo "total $(( SECONDS - START ))s; results: $RES.md and $RES/"
if [[ -n "${OUT:-}" ]]; then cp -r "$RES" "$RES.md" "$OUT"/; fi
