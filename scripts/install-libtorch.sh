#!/usr/bin/env bash
# Installs libtorch 2.11.0 (the version tch 0.24 binds) into deps/libtorch from PyPI wheels:
# torch==2.11.0 (its lib/ and include/) plus the two CUDA runtime libraries libtorch_cpu links
# (cudart, cupti), and the CUDA runtime headers (runtime + crt wheels, no compiler) that
# the CUDA-graph shim compiles against. libtorch_cuda is left out unless DMDPIPE_WITH_CUDA=1: dmdpipe loads it at
# start-up when present and otherwise runs on the CPU.
# Skip all of this by pointing LIBTORCH at an existing libtorch 2.11 (or LIBTORCH_USE_PYTORCH=1).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="${DMDPIPE_DEPS:-$repo/deps}"
lt="$dest/libtorch"
# .complete holds the layout version: 2 added the CUDA headers.
if [ "$(cat "$lt/.complete" 2>/dev/null)" = 2 ]; then exit 0; fi
mkdir -p "$dest/wheels"
py="$(command -v python3 || command -v python)"
echo "installing libtorch 2.11.0 into $lt (one time, ~600 MB download)" >&2
"$py" -m pip download --quiet --no-deps --only-binary=:all: -d "$dest/wheels" \
  "torch==2.11.0" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cupti==13.0.*" "nvidia-cuda-crt==13.0.*"
rm -rf "$lt.tmp" && mkdir -p "$lt.tmp"
"$py" - "$dest/wheels" "$lt.tmp" "${DMDPIPE_WITH_CUDA:-0}" <<'PY'
import glob, os, sys, zipfile
wheels, out, with_cuda = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
skip_cuda = ("libtorch_cuda", "libc10_cuda", "libcaffe2_nvrtc", "libtorch_nvshmem", "libtorch_python")
for whl in glob.glob(os.path.join(wheels, "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            name = info.filename
            if name.startswith("torch/lib/") or name.startswith("torch/include/"):
                rel = name[len("torch/"):]
                base = os.path.basename(name)
                if not with_cuda and base.startswith(skip_cuda):
                    continue
            elif name.startswith("nvidia/") and "/lib/lib" in name :
                rel = "lib/" + os.path.basename(name)
            elif name.startswith("nvidia/") and "/include/" in name:
                # CUDA runtime headers: the CUDA-graph shim compiles against them (no toolkit needed).
                rel = "cuda-include/" + name.split("/include/", 1)[1]
            else:
                continue
            target = os.path.join(out, rel)
            if name.endswith("/"):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    dst.write(chunk)
PY
echo "2.11.0" > "$lt.tmp/build-version"
rm -rf "$lt" && mv "$lt.tmp" "$lt"
echo 2 > "$lt/.complete"
echo "libtorch ready in $lt" >&2
