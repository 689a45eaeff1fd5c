#!/usr/bin/env bash
# Device machine: DMD2's ImageNet-64 setting (pipelines/imagenet64-dmd2.toml) with the full-size
# ADM (EDM's ImageNet-64 network, random weights in EDM's snapshot format written by torch:
# bench/edm_snapshot.py), stand-in real images: the GAN head on the fake score's 8x8x768
# bottleneck, 5 fake updates per generator update, a few hundred iterations; it/s from the log.
# Usage: bash bench/gpu_dmd2_adm.sh BIN OUT [ITERATIONS] [BATCH]
set -euo pipefail
bin=$1; out=$2; iters=${3:-300}; batch=${4:-40}
mkdir -p "$out" models data/imagenet64 /tmp/stage
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
python3 bench/edm_snapshot.py devcarry/manifests/adm_imagenet64_cond_manifest.json /tmp/stage/adm --protocols 4 --keep > "$out/snapshot.json"
ln -sf /tmp/stage/adm_p4.pkl models/edm-imagenet-64x64-cond-adm.pkl
python3 - <<'PY'
import numpy as np
rng = np.random.default_rng(0)
np.savez("data/imagenet64/train_data_batch_1.npz", data=rng.integers(0, 256, (2000, 3 * 64 * 64), dtype=np.uint8),
         labels=rng.integers(1, 1001, 2000))
np.savez("models/imagenet-64x64.npz", mu=np.zeros(2048), sigma=np.eye(2048))
PY
sets=(--set "stages.dataset.files=[\"train_data_batch_1.npz\"]" --set stages.dmd.train.iterations=$iters
      --set stages.dmd.train.batch=$batch --set stages.dmd.train.micro_batch=$batch
      --set stages.dmd.train.log_every=50 --set stages.dmd.train.checkpoint_every=100000)
"$bin" run pipelines/imagenet64-dmd2.toml --until dmd "${sets[@]}" > "$out/run.txt" 2>&1
d=$("$bin" path pipelines/imagenet64-dmd2.toml dmd "${sets[@]}")
cp "$d/metrics.json" "$out/dmd_metrics.json"
cp "$d"/measurements/*.csv "$out/" 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
