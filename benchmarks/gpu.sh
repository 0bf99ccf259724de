#!/usr/bin/env bash
# The GPU check: our train step with every conv_impl against torchvision's on one GPU.
#
#   bash benchmarks/gpu.sh        # from anywhere; about 6 minutes on one H100
#
# ResNeXt-50 32x4d and ResNeXt-101 32x8d, bfloat16, batch 128: `python -m
# resnext_jax.benchmark` once per implementation, and benchmarks/torch_reference.py
# (channels_last, bf16 autocast, cuDNN autotuning), each in its own process with a time
# limit, then a table of images/s and of each of ours over torchvision's; and, where the
# full requirements are installed, the end-to-end check (the trainer's loop on generated
# JPEGs against the step alone). The step runs need only the machine's jax (CUDA), flax,
# optax, torch and torchvision. Logs go to $OUT if set (the
# device tool brings that folder back), else to a temporary folder. ARCHS, IMPLS, BATCH,
# IMAGE_SIZE, STEPS and PYTHON override the defaults.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
ARCHS=${ARCHS:-resnext50_32x4d resnext101_32x8d}
IMPLS=${IMPLS:-xla taps}
BATCH=${BATCH:-128}
IMAGE_SIZE=${IMAGE_SIZE:-224}
STEPS=${STEPS:-10}
BUDGET_S=${BUDGET_S:-450}   # all runs together stop by then (each at most 200 s)
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c 'import jax, flax, optax, torch, torchvision as tv
print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), flax {flax.__version__}, "
      f"optax {optax.__version__}, torch {torch.__version__}, torchvision {tv.__version__}")'
date -u +'%Y-%m-%d %H:%M UTC'

start=$(date +%s)
run() {  # run LOG CMD...: runs CMD within what is left of the time budget
  local log=$1; shift
  local left=$(( BUDGET_S - ($(date +%s) - start) ))
  (( left > 200 )) && left=200
  if (( left < 60 )); then
    echo "skipped: time budget spent" > "$log"; echo "$(basename "$log" .log): skipped"
    return
  fi
  echo "+ $*" > "$log"
  timeout $left "$@" >> "$log" 2>&1 || echo "exit status $?" >> "$log"
  echo "$(basename "$log" .log): $(grep -E '^(compile_s|warmup_s|step_s|images_per_sec)' "$log" | tr '\n' ' ')"
}
ips() { grep -o '^images_per_sec=[0-9.]*' "$1" 2>/dev/null | cut -d= -f2; }

for arch in $ARCHS; do
  run "$LOGS/torch_$arch.log" $PY benchmarks/torch_reference.py --arch=$arch \
      --batch_size=$BATCH --image_size=$IMAGE_SIZE --dtype=bfloat16 --steps=$STEPS --warmup=5
  for impl in $IMPLS; do
    run "$LOGS/jax_${arch}_$impl.log" $PY -m resnext_jax.benchmark --arch=$arch \
        --batch_size=$BATCH --image_size=$IMAGE_SIZE --dtype=bfloat16 --conv_impl=$impl \
        --steps=$STEPS --warmup=2
  done
done

# The trainer's whole loop (JPEG decoding, prefetch, logging) against the step alone; it
# needs the full requirements (TensorFlow, tfds, clu, orbax), which a bare GPU image may lack.
E2E_ARCH=${E2E_ARCH:-resnext50_32x4d}
if $PY -c 'import tensorflow, tensorflow_datasets, clu, ml_collections, orbax.checkpoint' \
    2>/dev/null; then
  run "$LOGS/end_to_end_$E2E_ARCH.log" $PY -m resnext_jax.benchmark --mode=end_to_end \
      --arch=$E2E_ARCH --batch_size=$BATCH --image_size=$IMAGE_SIZE --dtype=bfloat16 \
      --steps=$STEPS --warmup=2 --num_files=$(( BATCH * 4 ))
  grep -E '^(end_to_end_images_per_sec|synthetic_images_per_sec|input_wait_share|ratio)=' \
      "$LOGS/end_to_end_$E2E_ARCH.log"
else
  echo "end_to_end: skipped (needs: pip install -r requirements.txt)"
fi

echo
printf '%-18s %-12s %10s %12s\n' arch step images/s 'vs torch'
for arch in $ARCHS; do
  ref=$(ips "$LOGS/torch_$arch.log")
  printf '%-18s %-12s %10s %12s\n' $arch torchvision "${ref:--}" 1.00
  for impl in $IMPLS; do
    ours=$(ips "$LOGS/jax_${arch}_$impl.log")
    ratio=-
    if [[ -n "$ours" && -n "$ref" ]]; then
      ratio=$(awk -v a="$ours" -v b="$ref" 'BEGIN { printf "%.2f", a / b }')
    fi
    printf '%-18s %-12s %10s %12s\n' $arch "jax:$impl" "${ours:--}" $ratio
  done
done
echo "logs: $LOGS"
