#!/usr/bin/env bash
# Puts the official CIFAR-10 binary batches into data/cifar-10-batches-bin from a folder holding
# them xz-compressed (../shared/data/cifar10 by default) or plain, and checks each against the
# official md5. Fails, naming the file, when one is missing or differs.
# Usage: scripts/prepare-cifar10.sh [SOURCE_DIR] [DEST_DIR]
set -euo pipefail
src=${1:-../shared/data/cifar10}
dest=${2:-data/cifar-10-batches-bin}
declare -A md5=(
  [data_batch_1.bin]=5dd7e06a14cb22eb9f671a540d1b7c25 [data_batch_2.bin]=5ea93a67294ea407fff1d09f752e9692
  [data_batch_3.bin]=942cd6a4bcdd0dd3c604fbe906cb4421 [data_batch_4.bin]=ae636b3ba5c66a11e91e8cb52e771fcb
  [data_batch_5.bin]=53f37980c15c3d472c316c40844f3f0d [test_batch.bin]=803d5f7f4d78ea53de84dbe85f74fb6d
)
[ -d "$src" ] || { echo "error: $src does not exist (give the folder holding the CIFAR-10 batches)" >&2; exit 1; }
mkdir -p "$dest"
for f in "${!md5[@]}"; do
  out="$dest/$f"
  if [ -f "$src/$f.xz" ]; then
    if command -v xz > /dev/null; then xz -dc "$src/$f.xz" > "$out.part"
    else python3 -c "import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())" "$src/$f.xz" > "$out.part"; fi
  elif [ -f "$src/$f" ]; then cp "$src/$f" "$out.part"
  else echo "error: neither $src/$f.xz nor $src/$f exists" >&2; exit 1; fi
  got=$(md5sum "$out.part" | cut -d' ' -f1)
  [ "$got" = "${md5[$f]}" ] || { rm -f "$out.part"; echo "error: $f has md5 $got, the official one is ${md5[$f]}" >&2; exit 1; }
  mv "$out.part" "$out"
done
echo "CIFAR-10: 6 batches in $dest, md5s match the official ones"
