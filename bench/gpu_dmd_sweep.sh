#!/usr/bin/env bash
# Device-machine DMD study: pipelines/cifar10-speedrun-distill.toml (imported speedrun teacher and
# reference statistics from /tmp/stage) up to the pairs once, then several DMD settings in
# parallel, each in its own copy of the project (own cache), each with its FID-vs-iterations curve.
# Usage: bash bench/gpu_dmd_sweep.sh SECONDS NAME:batch:lr:fake_lr:warmup:fake_updates:reg_weight[:ema_halflife_images[:gan_weight]] ...
# SWEEP_GPUS="1 2 3" puts the settings on those GPUs in turn (default: all on the visible ones).
set -uo pipefail
OUT_DIR="${OUT_DIR:-$OUT}"
read -r -a gpus <<< "${SWEEP_GPUS:-}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
S=/tmp/stage
secs=$1; shift
mkdir -p models data/cifar-10-batches-bin
cat $S/inception.part* > models/inception-2015-12-05.safetensors
cp $S/speedrun-teacher.safetensors $S/cifar10-train-stats.npz models/
cp $S/dmdpipe ./dmdpipe-bin
BIN="$PWD/dmdpipe-bin"
python3 -c "import lzma; open('data/cifar-10-batches-bin/test_batch.bin','wb').write(lzma.open('$S/test_batch.bin.xz').read())"
P=pipelines/cifar10-speedrun-distill.toml
export CUDA_VISIBLE_DEVICES="${gpus[0]:-${CUDA_VISIBLE_DEVICES:-0}}"
$BIN run $P --until pairs > "$OUT_DIR/prep.log" 2>&1 || { tail -20 "$OUT_DIR/prep.log"; exit 1; }
$BIN run $P --until teacher_onestep_fid >> "$OUT_DIR/prep.log" 2>&1 || { tail -20 "$OUT_DIR/prep.log"; exit 1; }
(realpath "$($BIN path $P teacher_onestep_fid)" | xargs -I{} cat {}/metrics.json) > "$OUT_DIR/teacher_onestep_fid.json" 2>/dev/null
k=0
for spec in "$@"; do
  IFS=: read -r name batch lr flr warm fu reg ema gan <<< "$spec"
  d=/tmp/sweep/$name; rm -rf $d; mkdir -p $d
  cp -r pipelines models data cache $d/
  python3 - "$d/$P" "$secs" "$batch" "$lr" "$flr" "$warm" "$fu" "$reg" "${ema:-0}" "${gan:-0}" <<'PY'
import re, sys
p, secs, batch, lr, flr, warm, fu, reg, ema, gan = sys.argv[1:]
s = open(p).read()
head, train = s.split("[stages.dmd.train]", 1)
train, tail = train.split("[stages.student_fid]", 1)
def put(train, k, v):
    if re.search(rf"(?m)^{k} = ", train):
        return re.sub(rf"(?m)^{k} = .*$", f"{k} = {v}", train)
    return train.replace("bf16 = true\n", f"bf16 = true\n{k} = {v}\n", 1)
for k, v in [("batch", batch), ("max_seconds", secs), ("lr", lr), ("fake_lr", flr), ("warmup_steps", warm),
             ("fake_updates_per_g", fu), ("regression_weight", reg), ("gan_generator_weight", gan)]:
    train = put(train, k, v)
if float(ema) > 0:
    train = put(train, "ema_halflife_images", ema)
    if "export_ema" not in head:
        head = head.replace("grid_every = ", "export_ema = true\ngrid_every = ", 1)
else:
    train = re.sub(r"(?m)^ema_halflife_images = .*\n", "", train)
open(p, "w").write(head + "[stages.dmd.train]" + train + "[stages.student_fid]" + tail)
PY
  if [ ${#gpus[@]} -gt 0 ]; then export CUDA_VISIBLE_DEVICES=${gpus[$((k % ${#gpus[@]}))]}; fi
  k=$((k + 1))
  (cd $d && $BIN run $P -v > run.log 2>&1; echo "exit $?" >> run.log) &
done
wait
for spec in "$@"; do
  name=${spec%%:*}; d=/tmp/sweep/$name
  tail -3 $d/run.log
  stage_dir() { (cd $d && realpath "$($BIN path $P $1 2>/dev/null)"); }
  dd=$(stage_dir dmd); sf=$(stage_dir student_fid); sg=$(stage_dir student_grid)
  mkdir -p /tmp/res/$name
  cp $d/run.log $d/$P /tmp/res/$name/ 2>/dev/null
  for f in "$dd"/*.csv "$dd"/*.png "$dd"/metrics.json; do [ -f "$f" ] && cp "$f" /tmp/res/$name/dmd_$(basename $f); done
  for f in "$sf"/metrics.json; do [ -f "$f" ] && cp "$f" /tmp/res/$name/student_fid.json; done
  for f in "$sg"/*.png; do [ -f "$f" ] && cp "$f" /tmp/res/$name/student_$(basename $f); done
  [ -f /tmp/res/$name/student_fid.json ] && echo "$name $(cat /tmp/res/$name/student_fid.json | head -c 300)"
  [ -f "$dd/fid_curve.csv" ] && cat "$dd/fid_curve.csv" | tr '\n' ' ' && echo
done
cp "$OUT_DIR/teacher_onestep_fid.json" /tmp/res/ 2>/dev/null
tar -C /tmp/res -czf "$OUT_DIR/sweep.tgz" .
