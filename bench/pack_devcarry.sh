#!/usr/bin/env bash
# Packs what a DMD-study lease needs into three git-ignored folders of at most 64 MiB each, one
# device call each (see docs/GPU-RUNS.md): devcarry/s1 = the stripped binary (xz) and the first
# 58 MB of the Inception weights, s2 = the rest of them and the speedrun teacher, s3 = the
# reference statistics and the CIFAR-10 test batch.
# Usage: bash bench/pack_devcarry.sh TEACHER.safetensors TRAIN_STATS.npz
set -euo pipefail
teacher=$1 stats=$2
shared=${SHARED:-../shared}
cargo build --release
rm -rf devcarry/s1 devcarry/s2 devcarry/s3 && mkdir -p devcarry/s1 devcarry/s2 devcarry/s3
strip -o devcarry/dmdpipe.stripped target/release/dmdpipe
xz -T2 -3 -c devcarry/dmdpipe.stripped > devcarry/s1/dmdpipe.xz
split -b 58000000 -d -a 1 "$shared/models/inception-2015-12-05.safetensors" devcarry/inception.part
mv devcarry/inception.part0 devcarry/s1/ && mv devcarry/inception.part1 devcarry/s2/
cp "$teacher" devcarry/s2/speedrun-teacher.safetensors
cp "$stats" devcarry/s3/cifar10-train-stats.npz
cp "$shared/data/cifar10/test_batch.bin.xz" devcarry/s3/
du -b devcarry/s1 devcarry/s2 devcarry/s3
