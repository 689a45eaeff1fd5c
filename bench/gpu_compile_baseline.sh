#!/usr/bin/env bash
# Device machine, one call: dmdpipe's network throughput (`bench gpu --networks-only`) beside EDM's
# DDPM++ in PyTorch eager and under torch.compile (default mode; compile time reported apart),
# and PyTorch's DMD iteration eager and compiled. Usage: bash bench/gpu_compile_baseline.sh BIN OUT
set -uo pipefail
bin=$1; out=$2
mkdir -p "$out"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/card.txt"
s=$(date +%s); timeout 200 "$bin" bench gpu --device cuda --networks-only > "$out/rust_networks.json" 2> "$out/rust_networks.log"; echo "rust: rc=$? $(( $(date +%s) - s )) s"
s=$(date +%s); timeout 260 python3 bench/pytorch_ddpmpp.py --bf16-only --compile none,default --out "$out/torch_networks.json" > "$out/torch_networks.log" 2>&1; echo "torch networks: rc=$? $(( $(date +%s) - s )) s"
s=$(date +%s); timeout 150 python3 bench/pytorch_dmd.py --compile none,default --batches 56 --nets speedrun9m --out "$out/torch_dmd.json" > "$out/torch_dmd.log" 2>&1; echo "torch dmd: rc=$? $(( $(date +%s) - s )) s"
