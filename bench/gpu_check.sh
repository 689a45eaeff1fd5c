#!/usr/bin/env bash
# Device machine, one call of about three minutes (the first of a lease, before a long job): the
# fused-kernel tests on the GPU (they print every kernel's error against float64 and the eager
# path), `bench adm` (EDM's ImageNet-64 network with and without the fused kernels) and `bench
# profile` of the 55.7M network (Kineto traces, fused path and eager ops, summarised by kind of
# work). Results in OUT as one archive (a call returns only a few files).
# Usage: bash bench/gpu_check.sh BIN TEST_BIN OUT
set -uo pipefail
bin=$1; tbin=$2; out=$3
work=/tmp/gpu_check
mkdir -p "$work" "$out"
. "$(dirname "$0")/device_steps.sh" "$work"
step kernel_tests timeout 180 env DMDPIPE_REQUIRE_CUDA=1 "$tbin" --nocapture --test-threads=1 > "$work/kernel_tests.log" 2>&1
step bench_adm timeout 240 "$bin" bench adm --out "$work/adm.json" > /dev/null 2> "$work/adm.log"
step profile timeout 180 "$bin" bench profile --out-dir "$work/traces" --out "$work/profile.json" > /dev/null 2> "$work/profile.log"
tar czf "$out/gpu_check.tgz" -C "$work" --exclude=traces .
tar cJf "$out/traces.tar.xz" -C "$work" traces 2>/dev/null
cat "$work/steps.txt"; grep -E "test result|rel " "$work/kernel_tests.log" | tail -40
