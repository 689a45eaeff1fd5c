#!/usr/bin/env bash
# Device-machine helper: copy carried parts to /tmp/stage, then (with `data`) unpack CIFAR-10
# into data/cifar-10-batches-bin of this checkout.
set -euo pipefail
mkdir -p /tmp/stage
for d in devcarry/p1 devcarry/p2 devcarry/p3 devcarry/bin devcarry/golden devcarry/i1 devcarry/i2 devcarry/t1 devcarry/t2; do
  [ -d "$d" ] && cp -r "$d"/. /tmp/stage/
done
if [ "${1:-}" = data ]; then
  mkdir -p data/cifar-10-batches-bin
  for f in /tmp/stage/*.bin.xz; do
    python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$f" "data/cifar-10-batches-bin/$(basename "$f" .xz)" &
  done
  wait
  ls -la data/cifar-10-batches-bin
fi
