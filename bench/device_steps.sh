# Sourced (never run alone) by the device-machine scripts that time several steps in one call:
# libtorch's libraries, Inductor's on-disk cache in /tmp (so a warm-up process fills what the
# timed process then reads), the card in DIR/card.txt, and `step NAME CMD...`, which runs CMD
# and appends its exit code and seconds to DIR/steps.txt.
# Usage: . "$(dirname "$0")/device_steps.sh" DIR
steps_dir=$1
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$steps_dir/card.txt"
step() {
  local name=$1; shift
  local s; s=$(date +%s)
  "$@"
  echo "$name: rc=$? $(( $(date +%s) - s )) s" >> "$steps_dir/steps.txt"
}
