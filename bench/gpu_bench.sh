#!/usr/bin/env bash
# Device-machine benchmark call: dmdpipe's `bench gpu` and the PyTorch baselines in one call.
# Usage (device tool, binary carried in devcarry/bin): bash bench/gpu_bench.sh [INCEPTION_WEIGHTS]
# BIN overrides the binary, OUT_DIR the output folder ($OUT). On a machine with several GPUs of one
# model, TORCH_GPU=1 runs the PyTorch baselines on GPU 1 while dmdpipe runs on GPU 0 (half the time).
# TORCH_COMPILE (e.g. none,default) and TORCH_DMD_COMPILE (e.g. none,reduce-overhead) add
# torch.compile to the baselines; bench/gpu_vs_compile.sh does that within one lease's minutes.
set -uo pipefail
OUT_DIR="${OUT_DIR:-$OUT}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
B="${BIN:-devcarry/bin/dmdpipe}"
W="${1:-}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT_DIR/card.txt"
torch_baselines() {
  python3 bench/pytorch_ddpmpp.py --compile "${TORCH_COMPILE:-none}" --out "$OUT_DIR/torch_bench.json" > "$OUT_DIR/torch_bench.log" 2>&1; echo "torch bench exit $?"
  python3 bench/pytorch_dmd.py --compile "${TORCH_DMD_COMPILE:-none}" --out "$OUT_DIR/torch_dmd.json" > "$OUT_DIR/torch_dmd.log" 2>&1; echo "torch dmd exit $?"
  if [ -n "$W" ]; then
    python3 bench/pytorch_inception.py --weights "$W" --random 5000 --out "$OUT_DIR/torch_inception.json" > "$OUT_DIR/torch_inception.log" 2>&1; echo "torch inception exit $?"
  fi
}
if [ -n "${TORCH_GPU:-}" ]; then
  (export CUDA_VISIBLE_DEVICES=$TORCH_GPU; torch_baselines) &
  CUDA_VISIBLE_DEVICES=0 $B bench gpu --device cuda ${W:+--inception "$W"} > "$OUT_DIR/rust_bench.json" 2> "$OUT_DIR/rust_bench.log"; echo "rust bench exit $?"
  wait
else
  $B bench gpu --device cuda ${W:+--inception "$W"} > "$OUT_DIR/rust_bench.json" 2> "$OUT_DIR/rust_bench.log"; echo "rust bench exit $?"
  torch_baselines
fi
cat "$OUT_DIR/rust_bench.json" "$OUT_DIR/torch_bench.json" "$OUT_DIR/torch_dmd.json" "$OUT_DIR"/torch_inception.json 2>/dev/null
tail -5 "$OUT_DIR/rust_bench.log"
