#!/usr/bin/env bash
# Device-machine call: kernel profiles of the full network's bf16 one-step sampling call and
# training step, dmdpipe (fused kernels and eager ops) beside PyTorch, plus the networks-only timings.
# Usage: bash bench/gpu_profile.sh   (binary in devcarry/bin; BIN and OUT_DIR override;
# NO_TORCH_PROFILE=1 skips PyTorch's profile, NO_GRAPH=0 adds the CUDA-graph variants)
# Leaves in OUT_DIR: card.txt, prof_dmdpipe.json, prof_pytorch.json (per-call summaries),
# bench_dmdpipe.json, bench_pytorch.json and traces.tar.xz (the Chrome traces and the logs).
set -uo pipefail
OUT_DIR="${OUT_DIR:-$OUT}"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
B="${BIN:-devcarry/bin/dmdpipe}"
T=/tmp/dmdpipe-traces
mkdir -p "$OUT_DIR" "$T"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT_DIR/card.txt"
$B bench profile --out-dir "$T" --out "$OUT_DIR/prof_dmdpipe.json" > /dev/null 2> "$T/prof_dmdpipe.log"; echo "dmdpipe profile exit $?"
if [ "${NO_TORCH_PROFILE:-0}" != 1 ]; then
  python3 bench/pytorch_ddpmpp.py --profile "$T" > "$T/prof_pytorch.log" 2>&1; echo "pytorch profile exit $?"
  $B bench trace-summary "$T"/pytorch_onestep.json "$T"/pytorch_train.json --per 3 --out "$OUT_DIR/prof_pytorch.json" > /dev/null; echo "summary exit $?"
fi
DMDPIPE_BENCH_NO_GRAPH="${NO_GRAPH:-1}" $B bench gpu --networks-only --out "$OUT_DIR/bench_dmdpipe.json" > /dev/null 2> "$T/bench_dmdpipe.log"; echo "dmdpipe bench exit $?"
python3 bench/pytorch_ddpmpp.py --bf16-only --out "$OUT_DIR/bench_pytorch.json" > "$T/bench_pytorch.log" 2>&1; echo "pytorch bench exit $?"
tar cJf "$OUT_DIR/traces.tar.xz" -C "$T" .
cat "$OUT_DIR/bench_dmdpipe.json" "$OUT_DIR/bench_pytorch.json"
for f in "$T"/*.log; do tail -n 3 "$f"; done
