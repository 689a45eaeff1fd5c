#!/usr/bin/env bash
# Device machine: dmdpipe under the launchers users run. dist-check (rendezvous through the c10d
# store, no NCCL) under torchrun static, --standalone, c10d rendezvous across two "nodes" on one
# host, `dmdpipe launch`, and Slurm's variables; a launched `run` of a data-parallel stage (needs
# one GPU per rank: on a one-GPU machine NCCL refuses two ranks on one device, which is recorded);
# preemption: SIGTERM to torchrun mid-teacher, exit code, resume, weights against an
# uninterrupted run.
# Usage: bash bench/gpu_launchers.sh BIN OUT
set -uo pipefail
bin=$1; out=$2
mkdir -p "$out"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
trun="python3 -m torch.distributed.run"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
python3 -c "import torch; print(torch.__version__, torch.cuda.nccl.version())" >> "$out/gpu.txt"
check() { # name dir ranks
  local n=0 ids
  ids=$(cat "$2"/rank*.txt 2>/dev/null | awk '{print $3}' | sort -u | wc -l)
  n=$(ls "$2"/rank*.txt 2>/dev/null | wc -l)
  echo "$1: $n of $3 ranks wrote their file, $ids distinct id(s): $( [ "$n" = "$3" ] && [ "$ids" = 1 ] && echo PASS || echo FAIL)" | tee -a "$out/summary.txt"
}
rm -rf /tmp/dc; mkdir -p /tmp/dc/{static,standalone,c10d,launch,slurm}
timeout 120 $trun --nproc_per_node=2 --no-python "$bin" dist-check /tmp/dc/static > "$out/static.log" 2>&1; echo "rc=$?" >> "$out/static.log"
check "torchrun static" /tmp/dc/static 2
timeout 120 $trun --standalone --nproc_per_node=2 --no-python "$bin" dist-check /tmp/dc/standalone > "$out/standalone.log" 2>&1; echo "rc=$?" >> "$out/standalone.log"
check "torchrun --standalone" /tmp/dc/standalone 2
for node in 0 1; do
  timeout 120 $trun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29411 --rdzv-id=dc \
    --no-python "$bin" dist-check /tmp/dc/c10d > "$out/c10d-node$node.log" 2>&1 &
done
wait
check "torchrun c10d, 2 nodes x 1" /tmp/dc/c10d 2
timeout 120 "$bin" launch --nproc 3 -- dist-check /tmp/dc/launch > "$out/launch.log" 2>&1
check "dmdpipe launch" /tmp/dc/launch 3
for r in 0 1; do
  SLURM_PROCID=$r SLURM_NTASKS=2 SLURM_LOCALID=$r SLURM_JOB_NODELIST="localhost" SLURM_JOB_ID=4242 \
    timeout 120 "$bin" dist-check /tmp/dc/slurm > "$out/slurm-$r.log" 2>&1 &
done
wait
check "Slurm variables (srun-style)" /tmp/dc/slurm 2

# A launched run: a data-parallel teacher on 2 ranks (one GPU here).
mkdir -p /tmp/lr && cd /tmp/lr
cat > p.toml <<'TOML'
[pipeline]
device = "cuda"
[stages.data]
kind = "gmm2d"
seed = 1
count = 4000
components = [ { weight = 1.0, mean = [1.0, 0.0], std = 0.1 }, { weight = 2.0, mean = [-1.0, 0.0], std = 0.2 } ]
[stages.teacher]
kind = "teacher"
mode = "train"
dataset = "data"
network = { arch = "mlp", dim = 2, hidden = 64, layers = 3 }
train = { batch = 256, images = 12_800_000, log_every = 50, checkpoint_every = 500, lr_warmup_images = 25600 }
TOML
timeout 120 $trun --nproc_per_node=2 --no-python "$bin" run p.toml > "$out/launched-run.log" 2>&1; echo "rc=$?" >> "$out/launched-run.log"
rm -rf cache

# Preemption under torchrun: SIGTERM to the agent after the first checkpoint.
mkdir -p /tmp/pre/{whole,cut} && for d in whole cut; do cp p.toml /tmp/pre/$d/; done
(cd /tmp/pre/whole && s=$(date +%s); "$bin" run p.toml > run.log 2>&1; echo "rc=$? seconds=$(( $(date +%s) - s ))" >> run.log)
cd /tmp/pre/cut
$trun --nproc_per_node=1 --no-python "$bin" run p.toml > run1.log 2>&1 &
agent=$!
for i in $(seq 1 600); do ls cache/work/*/checkpoint.safetensors > /dev/null 2>&1 && break; sleep 0.1; done
kill -TERM $agent; wait $agent; echo "torchrun rc=$?" >> run1.log
"$bin" run p.toml -v > run2.log 2>&1; echo "rc=$?" >> run2.log
a=$("$bin" path p.toml teacher); b=$(cd /tmp/pre/whole && "$bin" path p.toml teacher)
cmp "$a/denoiser.safetensors" "/tmp/pre/whole/$b/denoiser.safetensors" && echo "preempted+resumed teacher == uninterrupted: PASS" | tee -a "$out/summary.txt" \
  || echo "preempted+resumed teacher differs from uninterrupted (GPU)" | tee -a "$out/summary.txt"
cp /tmp/pre/cut/run1.log "$out/preempt-run1.log"; cp /tmp/pre/cut/run2.log "$out/preempt-run2.log"; cp /tmp/pre/whole/run.log "$out/preempt-whole.log"
grep -h "preempted\|resumed\|rc=" /tmp/pre/cut/run*.log >> "$out/summary.txt"
