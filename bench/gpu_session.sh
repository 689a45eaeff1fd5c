#!/usr/bin/env bash
# The device-machine session: benchmarks against PyTorch in the same call, then the speedrun
# pipeline (teacher, FIDs, grid). Writes everything under $OUT_DIR (default $OUT).
set -uo pipefail
OUT_DIR="${OUT_DIR:-$OUT}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
B=/tmp/stage/dmdpipe
mkdir -p models && cp /tmp/stage/inception-2015-12-05.safetensors models/ 2>/dev/null || cat /tmp/stage/inception.part* > models/inception-2015-12-05.safetensors
sha256sum models/inception-2015-12-05.safetensors
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== benches (Rust, then PyTorch, same machine)"
$B bench gpu --out "$OUT_DIR/rust_bench.json" > "$OUT_DIR/rust_bench.log" 2>&1
python3 bench/pytorch_ddpmpp.py --check /tmp/stage --out "$OUT_DIR/torch_bench.json" > "$OUT_DIR/torch_bench.log" 2>&1
$B bench inception --out "$OUT_DIR/rust_inception.json" > "$OUT_DIR/rust_inception.log" 2>&1
python3 bench/pytorch_inception.py --weights models/inception-2015-12-05.safetensors --data data/cifar-10-batches-bin --out "$OUT_DIR/torch_inception.json" > "$OUT_DIR/torch_inception.log" 2>&1
echo "== pipeline"
$B run pipelines/cifar10-speedrun.toml -v > "$OUT_DIR/pipeline.log" 2>&1
echo "pipeline exit $?"
for s in teacher teacher_grid; do
  d=$($B path pipelines/cifar10-speedrun.toml $s 2>/dev/null) && cp "$d"/*.png "$d"/*.csv "$OUT_DIR/" 2>/dev/null
  [ -n "${d:-}" ] && for f in "$d"/*.png; do cp "$f" "$OUT_DIR/${s}_$(basename "$f")"; done
done
$B status pipelines/cifar10-speedrun.toml > "$OUT_DIR/status.txt" 2>&1
echo done > "$OUT_DIR/DONE"
