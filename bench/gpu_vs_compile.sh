#!/usr/bin/env bash
# Device machine, one job (start it with setsid nohup; it writes DONE when finished): dmdpipe
# against torch.compile on one GPU, every figure of issue 19 from the same job.
# 1. Warm-up, in parallel: each PyTorch configuration runs once in its own process only to fill
#    Inductor's on-disk cache (compiling is mostly single-threaded Python, so eight at once take
#    the time of the slowest instead of the sum). Their timings are discarded; their warm-up
#    seconds are the cold compile times under that contention. The fused-kernel tests run beside
#    them (correctness, not speed).
# 2. Timed, one after another on an otherwise idle GPU: `dmdpipe bench gpu --networks-only --dmd`,
#    then EDM's DDPM++ eager / default / max-autotune and the DMD iteration eager /
#    reduce-overhead, compiled again from the warm cache (compile time excluded, reported).
# Usage: bash bench/gpu_vs_compile.sh BIN TEST_BIN OUT
# Env: WARM_LIMIT (s, default 600), MODES (warm-up compile modes of DDPM++, default default,max-autotune),
#      DMD_MODES (default reduce-overhead), DMD_NETS (default edm55m,speedrun9m).
set -uo pipefail
bin=$1; tbin=$2; out=$3
mkdir -p "$out/warm"
. "$(dirname "$0")/device_steps.sh" "$out"
modes=${MODES:-default,max-autotune}; dmd_modes=${DMD_MODES:-reduce-overhead}; dmd_nets=${DMD_NETS:-edm55m,speedrun9m}
nproc > "$out/cpus.txt"

warm() {  # NAME ARGS...: one warm-up process, its own log and JSON
  local name=$1; shift
  TORCHINDUCTOR_COMPILE_THREADS=4 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step "warm_$name" timeout -k 15 "${WARM_LIMIT:-600}" python3 "$@" \
    --out "$out/warm/$name.json" > "$out/warm/$name.log" 2>&1
}
for net in edm55m speedrun9m; do
  for mode in ${modes//,/ }; do
    warm "ddpmpp_${net}_$mode" bench/pytorch_ddpmpp.py --bf16-only --nets "$net" --compile "$mode" &
  done
done
for net in ${dmd_nets//,/ }; do
  for b in 56 128; do
    for mode in ${dmd_modes//,/ }; do
      warm "dmd_${net}_b${b}_$mode" bench/pytorch_dmd.py --nets "$net" --batches "$b" --compile "$mode" --iters 3 &
    done
  done
done
step kernel_tests timeout 150 env DMDPIPE_REQUIRE_CUDA=1 "$tbin" --nocapture --test-threads=1 > "$out/kernel_tests.log" 2>&1
wait
echo "warm-up done at $(date +%T); left on the GPU:" >> "$out/steps.txt"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader >> "$out/steps.txt"

# Failing kernels make dmdpipe's timings moot; PyTorch's still run (they cost the warm-up already paid).
grep -q "kernel_tests: rc=0" "$out/steps.txt" && \
step rust_bench timeout 420 "$bin" bench gpu --device cuda --networks-only --dmd --out "$out/rust.json" > "$out/rust.log" 2>&1
step torch_networks timeout "${TORCH_NETWORKS_LIMIT:-420}" python3 bench/pytorch_ddpmpp.py --bf16-only --compile none,default \
  --out "$out/torch_networks.json" > "$out/torch_networks.log" 2>&1
# max-autotune apart, and only where its warm-up finished: a cold max-autotune compile would eat
# the time the DMD figures need.
for net in edm55m speedrun9m; do
  grep -q "onestep_bf16_compile_max-autotune_img_s" "$out/warm/ddpmpp_${net}_max-autotune.json" 2>/dev/null || continue
  step "torch_${net}_max_autotune" timeout 300 python3 bench/pytorch_ddpmpp.py --bf16-only --nets "$net" --compile max-autotune \
    --out "$out/torch_${net}_max_autotune.json" > "$out/torch_${net}_max_autotune.log" 2>&1
done
step torch_dmd timeout "${TORCH_DMD_LIMIT:-600}" python3 bench/pytorch_dmd.py --compile "none,$dmd_modes" --batches 56,128 \
  --nets "$dmd_nets" --out "$out/torch_dmd.json" > "$out/torch_dmd.log" 2>&1
touch "$out/DONE"
