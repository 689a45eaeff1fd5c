#!/usr/bin/env bash
# Device-machine, when little device time is left: the speedrun teacher without and with EDM's
# augmentation trained *at the same time* on one GPU for the same seconds (each gets about half
# of it), then each one's Heun FID; same staged parts as bench/gpu_augment.sh.
#   setsid nohup bash bench/gpu_augment_pair.sh /tmp/pair 150 10000 > /tmp/pair.log 2>&1 < /dev/null &
set -uo pipefail
RES="${1:-/tmp/pair}"
BUDGET="${2:-150}"
SAMPLES="${3:-10000}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
mkdir -p "$RES"
bash "$(dirname "$0")/stage_unpack.sh" /tmp/pair-data
COMMON=(--until teacher_fid --set "stages.teacher.train.max_seconds=$BUDGET" --set "stages.teacher_fid.num_samples=$SAMPLES")
AUG=(--set stages.teacher.network.augment_dim=9 --set "stages.teacher.train.augment={ p = 0.12 }" --set stages.teacher.train.xflip=false)
for variant in plain augment; do
  W=/tmp/pair-$variant
  mkdir -p $W && cp -r pipelines $W/ && ln -sfn /tmp/pair-data/data $W/data && ln -sfn /tmp/pair-data/models $W/models
  extra=()
  [ $variant = augment ] && extra=("${AUG[@]}")
  (cd $W && /tmp/pair-data/dmdpipe-bin run pipelines/cifar10-speedrun.toml "${COMMON[@]}" "${extra[@]}" -v > "$RES/$variant.log" 2>&1; echo "exit $?" > "$RES/$variant.exit") &
done
wait
grep -h "fid=\|steps=\|images_seen" "$RES"/*.log > "$RES/summary.txt"
touch "$RES/DONE"
