#!/usr/bin/env bash
# Device machine, one call of five to ten minutes (binary only): the DMD iteration (generator +
# fake-score step) of dmdpipe against PyTorch eager and torch.compile's reduce-overhead mode, for
# one network and batch (the 8.8M at 56 by default: session 10's closest ratio, 1.05x), timed in
# the same call. For a short device budget; bench/gpu_vs_compile.sh times every network and batch.
# 1. Inductor's cache for that PyTorch configuration is filled first, alone (cold: 179 s for the
#    8.8M at 56 in session 14, over 200 s for the 55.7M).
#    Session 13 overlapped this with dmdpipe's bench to save device time. The compiling process
#    also ran work on the GPU, and dmdpipe's 8.8M at 56 read 25.1 it/s, 9% under session 10's
#    27.5, while every uncontended figure rose 6-7%. So nothing is timed beside it now.
# 2. Then, one after another on the idle GPU: `dmdpipe bench gpu --networks-only --fused-only
#    --dmd` (each figure logged and saved as measured), followed by bench/pytorch_dmd.py eager and
#    compiled from the warm cache.
# Usage: bash bench/gpu_dmd_quick.sh BIN OUT [NET] [BATCH]
# Env: WARM_LIMIT, RUST_LIMIT, TORCH_LIMIT (seconds; 280, 150, 150 by default, 580 in all so that
# one call stays under a command's 600 s. Session 14 took 86-115 s for dmdpipe's bench and 103 s
# for the 55.7M's timed PyTorch step, then with 20 timed iterations per mode; now 40 after 10.)
set -uo pipefail
bin=$1; out=$2; net=${3:-speedrun9m}; batch=${4:-56}
mkdir -p "$out"
. "$(dirname "$0")/device_steps.sh" "$out"
step warm timeout -k 10 "${WARM_LIMIT:-280}" python3 bench/pytorch_dmd.py --nets "$net" --batches "$batch" \
  --compile reduce-overhead --iters 3 --out "$out/warm.json" > "$out/warm.log" 2>&1
step rust_bench timeout "${RUST_LIMIT:-150}" "$bin" bench gpu --device cuda --networks-only --fused-only --dmd \
  --out "$out/rust.json" > "$out/rust.log" 2>&1
step torch_dmd timeout "${TORCH_LIMIT:-150}" python3 bench/pytorch_dmd.py --nets "$net" --batches "$batch" \
  --compile none,reduce-overhead --out "$out/torch_dmd.json" > "$out/torch_dmd.log" 2>&1
touch "$out/DONE"
