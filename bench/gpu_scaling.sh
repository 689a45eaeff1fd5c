#!/usr/bin/env bash
# Device-machine call on a 2-GPU kind: `dmdpipe bench scaling` (1 GPU, then 2 through launch).
set -uo pipefail
OUT_DIR="${OUT_DIR:-$OUT}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT_DIR/card.txt"
DMDPIPE_DIST_CHECK_EVERY=10 devcarry/bin/dmdpipe bench scaling --gpus 2 --out "$OUT_DIR/scaling.json" > "$OUT_DIR/scaling.log" 2>&1
echo "exit $?"
grep -v "^\s*\[\|^\s*\]\|^\s*[0-9.,]*$" "$OUT_DIR/scaling.json" 2>/dev/null | head -60
tail -20 "$OUT_DIR/scaling.log"
