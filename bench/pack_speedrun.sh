#!/usr/bin/env bash
# Packs what a whole-speedrun lease needs (bench/gpu_speedrun.sh) into four git-ignored folders
# that each fit one device call beside the ~3.5 MB working tree (64 MiB in all): devcarry/r1 =
# the stripped binary (xz), CIFAR-10 batches 1-2 and 10 MB of the Inception weights; r2 =
# batches 3-4 and the next 15 MB; r3 = batch 5, the test batch and 15 MB more; r4 = the rest of
# the weights and the fused-kernel GPU tests (xz). Each call runs `cp devcarry/rN/* /tmp/stage/`;
# the fourth also starts the job.
# Usage: bash bench/pack_speedrun.sh   (SHARED overrides ../shared)
set -euo pipefail
shared=${SHARED:-../shared}
data=$shared/data/cifar10
# The GPU tests of the fused kernels ride along (r4) and run before the pipeline; built first, as
# `cargo test` relinks the binary with the dev features.
tbin=$(cargo test --release --no-run --test fused_kernels --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "fused_kernels":
        print(m["executable"])' | tail -1)
[ -x "$tbin" ] || { echo "no fused_kernels test binary" >&2; exit 1; }
cargo build --release
rm -rf devcarry/r1 devcarry/r2 devcarry/r3 devcarry/r4 && mkdir -p devcarry/r1 devcarry/r2 devcarry/r3 devcarry/r4
strip -o devcarry/dmdpipe.stripped target/release/dmdpipe
xz -T2 -6 -c devcarry/dmdpipe.stripped > devcarry/r1/dmdpipe.xz
cp "$data"/data_batch_1.bin.xz "$data"/data_batch_2.bin.xz devcarry/r1/
cp "$data"/data_batch_3.bin.xz "$data"/data_batch_4.bin.xz devcarry/r2/
cp "$data"/data_batch_5.bin.xz "$data"/test_batch.bin.xz devcarry/r3/
w=$shared/models/inception-2015-12-05.safetensors
part() {  # OFFSET BYTES DEST (BYTES 0: to the end)
  local count=""; [ "$2" = 0 ] || count="count=$2"
  dd if="$w" of="$3" bs=1M iflag=skip_bytes,count_bytes skip="$1" $count status=none
}
part 0 10000000 devcarry/r1/inception.part0
part 10000000 15000000 devcarry/r2/inception.part1
part 25000000 15000000 devcarry/r3/inception.part2
part 40000000 0 devcarry/r4/inception.part3
strip -o devcarry/fused_kernels_test.stripped "$tbin"
xz -T2 -6 -c devcarry/fused_kernels_test.stripped > devcarry/r4/fused_kernels_test.xz
cat devcarry/r*/inception.part* | cmp - "$w"
du -b devcarry/r1 devcarry/r2 devcarry/r3 devcarry/r4
