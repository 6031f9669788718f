#!/usr/bin/env bash
# Fetches ONNX Runtime's CPU library (the PyPI wheel onnxruntime==1.31.1 carries it) into .ort/
# and prints its path. Idempotent. Tests and CI use it through ORT_DYLIB_PATH.
set -euo pipefail
VERSION=1.31.1
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.ort"
lib="$dest/libonnxruntime.so.$VERSION"
if [ ! -f "$lib" ]; then
  mkdir -p "$dest/wheel"
  python3 -m pip download --quiet --no-deps --only-binary=:all: "onnxruntime==$VERSION" -d "$dest/wheel" >&2
  wheel=$(ls "$dest"/wheel/onnxruntime-"$VERSION"-*.whl | head -n 1)
  python3 - "$wheel" "$dest" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for n in z.namelist():
        base = os.path.basename(n)
        if n.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime"):
            with z.open(n) as src, open(os.path.join(dest, base), "wb") as dst:
                dst.write(src.read())
PY
  rm -rf "$dest/wheel"
fi
echo "$lib"
