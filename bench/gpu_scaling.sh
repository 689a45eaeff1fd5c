#!/usr/bin/env bash
# Device-machine call on a multi-GPU kind: `dmdpipe bench scaling` (1 GPU, then each GPU count
# through launch). Usage: bash bench/gpu_scaling.sh [COUNTS, default 2] [EXTRA ARGS, e.g. --train-only]
# (COUNTS e.g. 2,4 on a 4-GPU kind).
# BIN overrides the binary (default devcarry/bin/dmdpipe), OUT_DIR the output folder ($OUT).
set -uo pipefail
OUT_DIR="${OUT_DIR:-$OUT}"
BIN="${BIN:-devcarry/bin/dmdpipe}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT_DIR/card.txt"
DMDPIPE_DIST_CHECK_EVERY=10 $BIN bench scaling --gpus "${1:-2}" "${@:2}" --out "$OUT_DIR/scaling.json" > "$OUT_DIR/scaling.log" 2>&1
echo "exit $?"
grep -v "^\s*\[\|^\s*\]\|^\s*[0-9.,e-]*$" "$OUT_DIR/scaling.json" 2>/dev/null | head -80
tail -20 "$OUT_DIR/scaling.log"
