#!/usr/bin/env bash
# Device machine, one call of about five minutes (binary only): the DMD iteration (generator +
# fake-score step) of dmdpipe against PyTorch eager and torch.compile's reduce-overhead mode, for
# one network and batch (the 8.8M at 56 by default: session 10's closest ratio, 1.05x), timed in
# the same call. For a short device budget; bench/gpu_vs_compile.sh times every network and batch.
# 1. Inductor's cache for that PyTorch configuration is filled first, alone (about 140 s cold).
#    Session 13 overlapped this with dmdpipe's bench to save device time. The compiling process
#    also ran work on the GPU, and dmdpipe's 8.8M at 56 read 25.1 it/s, 9% under session 10's
#    27.5, while every uncontended figure rose 6-7%. So nothing is timed beside it now.
# 2. Then, one after another on the idle GPU: `dmdpipe bench gpu --networks-only --fused-only
#    --dmd` (each figure logged and saved as measured), followed by bench/pytorch_dmd.py eager and
#    compiled from the warm cache.
# Usage: bash bench/gpu_dmd_quick.sh BIN OUT [NET] [BATCH]
# Env: WARM_LIMIT, RUST_LIMIT, TORCH_LIMIT (seconds; 300, 180, 120 by default; the 55.7M's warm-up
# compile ran past 200 s in session 14).
set -uo pipefail
bin=$1; out=$2; net=${3:-speedrun9m}; batch=${4:-56}
mkdir -p "$out"
. "$(dirname "$0")/device_steps.sh" "$out"
step warm timeout -k 10 "${WARM_LIMIT:-300}" python3 bench/pytorch_dmd.py --nets "$net" --batches "$batch" \
  --compile reduce-overhead --iters 3 --out "$out/warm.json" > "$out/warm.log" 2>&1
step rust_bench timeout "${RUST_LIMIT:-180}" "$bin" bench gpu --device cuda --networks-only --fused-only --dmd \
  --out "$out/rust.json" > "$out/rust.log" 2>&1
step torch_dmd timeout "${TORCH_LIMIT:-120}" python3 bench/pytorch_dmd.py --nets "$net" --batches "$batch" \
  --compile none,reduce-overhead --out "$out/torch_dmd.json" > "$out/torch_dmd.log" 2>&1
touch "$out/DONE"
