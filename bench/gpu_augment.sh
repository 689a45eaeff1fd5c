#!/usr/bin/env bash
# Device-machine: the speedrun teacher (pipelines/cifar10-speedrun.toml, 8.8M DDPM++) trained for
# the same seconds without and with EDM's augmentation (p = 0.12, 9 labels, dataset x-flips off
# as in EDM's train.py), each followed by its 50k-sample Heun FID; from parts staged in
# /tmp/stage (devcarry/a1..a4: the binary as xz, CIFAR-10 as xz, the Inception in two parts).
#   setsid nohup bash bench/gpu_augment.sh /tmp/augment 480 50000 > /tmp/augment.log 2>&1 < /dev/null &
# (arguments: result folder, training seconds, FID samples).
# Results (stage metrics, loss curves, grids, logs) in RES, then RES/DONE.
set -uo pipefail
RES="${1:-/tmp/augment}"
BUDGET="${2:-480}"
SAMPLES="${3:-50000}"
W=/tmp/aug
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
mkdir -p "$RES"
bash "$(dirname "$0")/stage_unpack.sh" $W
cp -r pipelines $W/
cd $W
P=pipelines/cifar10-speedrun.toml
COMMON=(--set "stages.teacher.train.max_seconds=$BUDGET" --set "stages.teacher_fid.num_samples=$SAMPLES")
AUG=(--set stages.teacher.network.augment_dim=9 --set "stages.teacher.train.augment={ p = 0.12 }" --set stages.teacher.train.xflip=false)
nvidia-smi --query-gpu=name,driver_version --format=csv > "$RES/gpu.txt"
for variant in plain augment; do
  extra=()
  [ $variant = augment ] && extra=("${AUG[@]}")
  start=$(date +%s)
  ./dmdpipe-bin run $P --until teacher_fid "${COMMON[@]}" "${extra[@]}" -v > "$RES/$variant.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" > "$RES/$variant.exit"
  for s in teacher teacher_fid; do
    d=$(./dmdpipe-bin path $P $s "${COMMON[@]}" "${extra[@]}" 2>/dev/null) || continue
    for f in "$d"/*.json "$d"/*.csv "$d"/*.png; do [ -f "$f" ] && cp "$f" "$RES/${variant}_${s}_$(basename "$f")"; done
  done
done
touch "$RES/DONE"
