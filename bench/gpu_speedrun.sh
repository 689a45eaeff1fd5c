#!/usr/bin/env bash
# Device-machine: the whole pipelines/cifar10-speedrun.toml (teacher training, FIDs, pairs, DMD,
# student FID and grids) in one lease, from parts staged in /tmp/stage by earlier calls
# (devcarry/r1..r4 from bench/pack_speedrun.sh, or the older bin, i1, i2, p1..p3: the binary,
# the Inception weights in parts, CIFAR-10 as xz).
# Start it in the background on its own line (the lease keeps running between calls):
#   setsid nohup bash bench/gpu_speedrun.sh /tmp/speedrun > /tmp/speedrun.log 2>&1 < /dev/null &
# It works in a copy of the project (/tmp/sr), so later calls may re-sync the checkout, and writes
# the stage metrics, grids, curves, the run report and the log to RES, then RES/DONE.
set -uo pipefail
RES="${1:-/tmp/speedrun}"
S=/tmp/stage
here=$(cd "$(dirname "$0")" && pwd)
W=/tmp/sr
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
mkdir -p "$RES" $W/models $W/data/cifar-10-batches-bin
unpack_xz() {  # SRC DEST (the device machine has python3, not necessarily xz)
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$1" "$2"
}
cp -r pipelines $W/
if [ -f $S/dmdpipe.xz ]; then  # bench/pack_speedrun.sh carries it compressed
  unpack_xz $S/dmdpipe.xz $W/dmdpipe-bin
  chmod +x $W/dmdpipe-bin
else
  cp $S/dmdpipe $W/dmdpipe-bin
fi
cat $S/inception.part* > $W/models/inception-2015-12-05.safetensors
for f in $S/*.bin.xz; do
  unpack_xz "$f" "$W/data/cifar-10-batches-bin/$(basename "$f" .xz)" &
done
wait
cd $W
if [ -f $S/fused_kernels_test.xz ]; then  # the fused kernels' GPU tests first (about 20 s)
  unpack_xz $S/fused_kernels_test.xz $W/fused_kernels_test
  chmod +x $W/fused_kernels_test
  DMDPIPE_REQUIRE_CUDA=1 timeout 120 $W/fused_kernels_test --nocapture --test-threads=1 > "$RES/kernel_tests.log" 2>&1
  echo "kernel tests rc=$?" >> "$RES/kernel_tests.log"
fi
# Stages finished on an earlier machine (brought back by bench/gpu_poll.sh, staged again): hits.
ls $S/resume-*.tar.p* > /dev/null 2>&1 && python3 "$here/cache_resume.py" unpack $S $W/cache > "$RES/resume.log" 2>&1
P=pipelines/cifar10-speedrun.toml
start=$(date +%s)
./dmdpipe-bin run $P -v > "$RES/pipeline.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" > "$RES/exit.txt"
for s in teacher teacher_fid teacher_onestep_fid fid_test pairs dmd student_fid teacher_grid student_grid; do
  d=$(./dmdpipe-bin path $P $s 2>/dev/null) || continue
  for f in "$d"/*.json "$d"/*.csv "$d"/*.png; do [ -f "$f" ] && cp "$f" "$RES/${s}_$(basename "$f")"; done
done
cp -r cache/reports "$RES/report" 2>/dev/null
./dmdpipe-bin status $P > "$RES/status.txt" 2>&1
touch "$RES/DONE"
