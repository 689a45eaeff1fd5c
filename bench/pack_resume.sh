#!/usr/bin/env bash
# Here, after a device machine was lost mid-job: gathers the finished stages that bench/gpu_poll.sh
# brought back (resume-*.tar.pNN in the calls' files_at folders) into git-ignored folders
# devcarry/rs1, rs2, ... of at most 60 MB each (a call carries 64 MiB with the working tree).
# Stage them after devcarry/r1..r4, one call each (`cp devcarry/rsN/* /tmp/stage/`, carry
# ["devcarry/rsN"]); bench/gpu_speedrun.sh unpacks them into the cache before `dmdpipe run`.
# Usage: bash bench/pack_resume.sh DIR...   (e.g. /work/.device/5 /work/.device/6)
set -euo pipefail
rm -rf devcarry/rs[0-9]*
n=1; used=0; limit=60000000
mkdir -p devcarry/rs1
for f in $(for d in "$@"; do ls "$d"/resume-*.tar.p* 2>/dev/null; done | sort); do
  size=$(stat -c %s "$f")
  if [ $((used + size)) -gt $limit ] && [ $used -gt 0 ]; then n=$((n + 1)); used=0; mkdir -p devcarry/rs$n; fi
  cp "$f" devcarry/rs$n/
  used=$((used + size))
done
du -b devcarry/rs[0-9]*
