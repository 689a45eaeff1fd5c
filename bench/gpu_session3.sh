#!/usr/bin/env bash
# Device-machine session 3: DMD from an exported teacher and reference statistics.
set -uo pipefail
OUT_DIR="${OUT_DIR:-$OUT}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
S=/tmp/stage
B=$S/dmdpipe
mkdir -p models data/cifar-10-batches-bin
cat $S/inception.part* > models/inception-2015-12-05.safetensors
cp $S/speedrun-teacher.safetensors $S/cifar10-train-stats.npz models/
python3 -c "import lzma; open('data/cifar-10-batches-bin/test_batch.bin','wb').write(lzma.open('$S/test_batch.bin.xz').read())"
$B run pipelines/cifar10-speedrun-distill.toml -v > "$OUT_DIR/pipeline.log" 2>&1
echo "pipeline exit $?"
for s in teacher dmd student_grid; do
  d=$($B path pipelines/cifar10-speedrun-distill.toml $s 2>/dev/null) || continue
  for f in "$d"/*.png "$d"/*.csv "$d"/metrics.json; do [ -f "$f" ] && cp "$f" "$OUT_DIR/${s}_$(basename "$f")"; done
done
echo done > "$OUT_DIR/DONE"
