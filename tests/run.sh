#!/usr/bin/env bash
# The whole test suite: fetches ONNX Runtime's library (tests compare against it), then runs every
# test of the workspace. Needs only cargo and python3 with pip (for the download).
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_DYLIB_PATH="$(runtime/install-ort.sh)"
export ORT_DYLIB_PATH
cargo test --workspace --all-targets "$@"
