#!/usr/bin/env bash
# Device machine: pipelines/cifar10.toml as shipped, from a full-size (55.7M) EDM-format snapshot
# written here by torch (bench/edm_snapshot.py: EDM's tensor names and shapes, random weights, so
# the numbers test the path, not the paper), with the work reduced by --set: 2,000 pairs, 200 DMD
# iterations at global batch 392 (7 micro-batches of 56 on one GPU), a 10k student FID, the grid.
# Needs in /tmp/stage: dmdpipe.xz, inc.part0, inc.part1, data_batch_{1..5}.bin.xz (docs/GPU-RUNS.md).
# Usage: setsid nohup bash bench/gpu_paper_cifar10.sh /tmp/paper > /tmp/paper.log 2>&1 < /dev/null &
set -euo pipefail
out=${1:-/tmp/paper}
mkdir -p "$out" models data/cifar-10-batches-bin
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
unxz() { python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$1" "$2"; }
bin=/tmp/stage/dmdpipe
[ -x "$bin" ] || { unxz /tmp/stage/dmdpipe.xz "$bin"; chmod +x "$bin"; }
cat /tmp/stage/inc.part0 /tmp/stage/inc.part1 > models/inception-2015-12-05.safetensors
for f in /tmp/stage/data_batch_*.bin.xz; do unxz "$f" "data/cifar-10-batches-bin/$(basename "$f" .xz)" & done
wait
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
s=$(date +%s)
python3 bench/edm_snapshot.py devcarry/manifests/songunet_cifar10_cond_manifest.json /tmp/stage/cifar --protocols 4 --keep > "$out/snapshot.json"
echo "snapshot written in $(( $(date +%s) - s )) s" >> "$out/snapshot.json"
ln -sf /tmp/stage/cifar_p4.pkl models/edm-cifar10-32x32-cond-vp.pkl
sets=(--set stages.pairs.count=2000 --set stages.dmd.train.iterations=200 --set stages.dmd.train.checkpoint_every=100
      --set stages.dmd.train.log_every=20 --set stages.student_fid.num_samples=10000 --set stages.student_fid.repeats=1)
"$bin" run pipelines/cifar10.toml --dry-run "${sets[@]}" > "$out/dry-run.txt" 2>&1
"$bin" run pipelines/cifar10.toml --until student_grid "${sets[@]}" > "$out/run-grid.txt" 2>&1
"$bin" run pipelines/cifar10.toml --until student_fid "${sets[@]}" > "$out/run-fid.txt" 2>&1
for stage in teacher pairs dmd student_grid student_fid fid_ref; do
  d=$("$bin" path pipelines/cifar10.toml "$stage" "${sets[@]}")
  mkdir -p "$out/$stage"
  find "$d" -maxdepth 2 -type f \( -name '*.png' -o -name '*.json' -o -name '*.csv' \) -exec cp {} "$out/$stage/" \;
done
touch "$out/DONE"
