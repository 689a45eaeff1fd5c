#!/usr/bin/env bash
# Device machine, one call of about seven minutes (binary only): the four network rows of issue
# 19 (bf16 training at batch 512, one-step sampling at 1024, 55.7M and 8.8M) against PyTorch eager
# and torch.compile's default mode, all timed in the same call. For a short device budget; the
# whole comparison (DMD iterations, max-autotune) is bench/gpu_vs_compile.sh.
# 1. Inductor's on-disk cache is filled by one process per network, in parallel (their timings
#    are discarded; their logs give the cold compile times).
# 2. Timed one after another on the idle GPU: `dmdpipe bench gpu --networks-only --fused-only`
#    (each figure logged and saved as it is measured), then bench/pytorch_ddpmpp.py eager and
#    default, compiled again from the warm cache.
# Usage: bash bench/gpu_compile_quick.sh BIN OUT
# Env: WARM_LIMIT, RUST_LIMIT, TORCH_LIMIT (seconds; 210, 150, 110 by default). Session 12: warm-ups
# 145 s (55.7M) and 116 s, PyTorch timed 71 s; the whole bench (without --fused-only) ran past 100 s.
set -uo pipefail
bin=$1; out=$2
mkdir -p "$out/warm"
. "$(dirname "$0")/device_steps.sh" "$out"
for net in edm55m speedrun9m; do
  TORCHINDUCTOR_COMPILE_THREADS=8 step "warm_$net" timeout -k 10 "${WARM_LIMIT:-210}" python3 bench/pytorch_ddpmpp.py \
    --bf16-only --nets "$net" --compile default --out "$out/warm/$net.json" > "$out/warm/$net.log" 2>&1 &
done
wait
step rust_bench timeout "${RUST_LIMIT:-150}" "$bin" bench gpu --device cuda --networks-only --fused-only --out "$out/rust.json" \
  > "$out/rust.log" 2>&1
step torch_networks timeout "${TORCH_LIMIT:-110}" python3 bench/pytorch_ddpmpp.py --bf16-only --compile none,default \
  --out "$out/torch_networks.json" > "$out/torch_networks.log" 2>&1
touch "$out/DONE"
