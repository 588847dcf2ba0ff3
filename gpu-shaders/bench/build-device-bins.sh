#!/usr/bin/env bash
# Builds what device.sh runs on a machine without cargo (the device tool's GPU
# machines have none) and gathers it in devbin/ (git-ignored): gpu-bench and the
# cross-check test binaries, stripped (profile `device`), about 44 MiB in all, under
# the device tool's 64 MiB carry limit. Then, on the device, with `devbin` (and the
# Vulkan loader's `.gl`, see the device tool's README) carried:
#   BIN_DIR=devbin gpu-shaders/bench/device.sh tests|bench|torch
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --profile device -p gpu-shaders --tests --bins
rm -rf devbin
mkdir -p devbin/deps
cp "$target/device/gpu-bench" devbin/
find "$target/device/deps" -maxdepth 1 -type f -executable \
    -regextype posix-extended -regex '.*/(primitives|optimizer|onties|topk|offline|golden)-[0-9a-f]+' \
    -exec cp {} devbin/deps/ \;
du -sh devbin
