#!/usr/bin/env bash
# Device machine, one job (start it with setsid nohup; it writes DONE when finished):
# 1. the fused-kernel tests (tests/fused_kernels.rs, a test binary built here) on the GPU,
#    errors against float64 and the eager path printed;
# 2. `dmdpipe bench gpu --networks-only --dmd`: both networks with and without `fused_kernels`,
#    eager and as CUDA graphs, and DMD iterations at batches 56 and 128;
# 3. the PyTorch baselines in the same job on the same GPU: EDM's DDPM++ eager and under
#    torch.compile (default), and the DMD iteration eager and under reduce-overhead.
# Usage: bash bench/gpu_fused.sh BIN TEST_BIN OUT
set -uo pipefail
bin=$1; tbin=$2; out=$3
mkdir -p "$out"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/card.txt"
step() { local name=$1; shift; local s; s=$(date +%s); "$@"; echo "$name: rc=$? $(( $(date +%s) - s )) s" >> "$out/steps.txt"; }
step kernel_tests timeout 150 env DMDPIPE_REQUIRE_CUDA=1 "$tbin" --nocapture --test-threads=1 > "$out/kernel_tests.log" 2>&1
# Failing kernels make the timings moot: stop and keep the device time.
grep -q "kernel_tests: rc=0" "$out/steps.txt" || { touch "$out/DONE"; exit 1; }
step rust_bench timeout 360 "$bin" bench gpu --device cuda --networks-only --dmd --out "$out/rust.json" > "$out/rust.log" 2>&1
step torch_networks timeout "${TORCH_NETWORKS_LIMIT:-330}" python3 bench/pytorch_ddpmpp.py --bf16-only --compile none,default --out "$out/torch_networks.json" > "$out/torch_networks.log" 2>&1
# NO_TORCH_DMD=1 skips it (short of device time).
[ "${NO_TORCH_DMD:-0}" = 1 ] || step torch_dmd timeout 240 python3 bench/pytorch_dmd.py --compile none,reduce-overhead --batches 56,128 --nets speedrun9m --out "$out/torch_dmd.json" > "$out/torch_dmd.log" 2>&1
touch "$out/DONE"
