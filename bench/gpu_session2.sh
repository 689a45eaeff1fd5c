#!/usr/bin/env bash
# Device-machine session 2: the whole speedrun pipeline (teacher, FIDs, pairs, DMD, student
# FID, grids), then the DMD throughput bench. Results under $OUT_DIR.
set -uo pipefail
OUT_DIR="${OUT_DIR:-$OUT}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
B=/tmp/stage/dmdpipe
mkdir -p models && cat /tmp/stage/inception.part* > models/inception-2015-12-05.safetensors
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$B run pipelines/cifar10-speedrun.toml -v > "$OUT_DIR/pipeline.log" 2>&1
echo "pipeline exit $?"
for s in teacher teacher_grid dmd student_grid; do
  d=$($B path pipelines/cifar10-speedrun.toml $s 2>/dev/null) || continue
  for f in "$d"/*.png "$d"/*.csv "$d"/metrics.json; do [ -f "$f" ] && cp "$f" "$OUT_DIR/${s}_$(basename "$f")"; done
done
$B status pipelines/cifar10-speedrun.toml > "$OUT_DIR/status.txt" 2>&1
$B bench gpu --out "$OUT_DIR/rust_bench.json" > "$OUT_DIR/rust_bench.log" 2>&1
echo done > "$OUT_DIR/DONE"
