#!/usr/bin/env bash
# Device machine: waits up to SECONDS for a background job's RES/DONE (default 270: polls of 270 s
# kept their machine through a whole speedrun in session 13; polls of 540 s lost it twice), then packs
# what the job has produced so far into OUT/partial.tgz (one file: a call returns only a few):
# RES itself and the small outputs of finished stages in the speedrun's work copy (JSON, CSV,
# PNG, the pipeline log). Each poll thus brings back everything so far, so a machine lost
# between two polls (it goes back 30 s after a call ends) loses only what came after the last.
# Finished long stages come back too, as OUT/resume-*.tar.pNN (bench/cache_resume.py, each file
# once per machine): staged on a fresh machine, they are cache hits there and the job goes on.
# On a fresh machine (no RES: the job went with the last one) it says so at once, exit 3.
# Usage: bash bench/gpu_poll.sh RES OUT [SECONDS] [WORK]   (WORK: /tmp/sr by default)
set -uo pipefail
res=$1; out=$2; limit=${3:-270}; work=${4:-/tmp/sr}
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -d "$res" ]; then
  echo "NO JOB: $res is absent; this is a fresh machine. Stage again with the resume-* files brought back so far."
  exit 3
fi
start=$(date +%s)
while [ ! -f "$res/DONE" ] && [ $(( $(date +%s) - start )) -lt "$limit" ]; do sleep 10; done
mkdir -p "$out"
list=$(mktemp)
{
  [ -d "$res" ] && find "$res" -type f -size -20M
  [ -d "$work/cache" ] && find "$work/cache" -type f \( -name '*.json' -o -name '*.csv' -o -name '*.png' -o -name '*.log' \) -size -5M
} > "$list" 2>/dev/null
tar czf "$out/partial.tgz" -T "$list" 2>/dev/null
rm -f "$list"
[ -d "$work/cache/entries" ] && python3 "$here/cache_resume.py" pack "$work/cache" "$out" --sent "$res/.resume_sent"
[ -f "$res/DONE" ] && echo "DONE: $(cat "$res/exit.txt" 2>/dev/null)" || echo "still running after $(( $(date +%s) - start )) s"
log=$res/pipeline.log
[ -f "$log" ] && grep -E "INFO" "$log" | grep -E "running|done in|fid=" | tail -12 | cut -c1-220
[ -f "$log" ] && tail -c 300 "$log"
exit 0
