#!/usr/bin/env bash
# Device-machine helper: unpacks the parts staged in /tmp/stage from devcarry/a1..a4 (the binary as
# xz, the Inception weights in two parts, CIFAR-10's batches as xz) into DEST: DEST/dmdpipe-bin,
# DEST/models/inception-2015-12-05.safetensors, DEST/data/cifar-10-batches-bin/*.bin.
set -euo pipefail
DEST="$1"
S=/tmp/stage
unxz() { python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$1" "$2"; }
mkdir -p "$DEST/models" "$DEST/data/cifar-10-batches-bin"
unxz $S/dmdpipe.xz "$DEST/dmdpipe-bin"
chmod +x "$DEST/dmdpipe-bin"
cat $S/inception.part0 $S/inception.part1 > "$DEST/models/inception-2015-12-05.safetensors"
for f in $S/data_batch_*.bin.xz; do
  unxz "$f" "$DEST/data/cifar-10-batches-bin/$(basename "$f" .xz)" &
done
wait
