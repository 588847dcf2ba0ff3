#!/usr/bin/env bash
# Builds what device.sh runs on a machine without cargo (the device tool's GPU
# machines have none) and gathers it in devbin/ (git-ignored): gpu-bench and the
# cross-check test binaries, stripped (profile `device`), under the device tool's
# 64 MiB carry limit. Only the executables this build produced are copied (cargo
# names them in its JSON messages), never an older hash left in target/.
# Then, on the device, with `devbin` and the Vulkan loader's `.gl` carried (see the
# device tool's README):
#   gpu-shaders/bench/device.sh all
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf devbin
mkdir -p devbin/deps
cargo build --profile device -p gpu-shaders --tests --bins --message-format=json-render-diagnostics \
    | python3 -c '
import json, shutil, sys, os
wanted = {"primitives", "optimizer", "onties", "topk", "offline", "golden", "gpu-bench"}
copied = []
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    name = msg["target"]["name"]
    if name not in wanted:
        continue
    dest = "devbin/gpu-bench" if name == "gpu-bench" else "devbin/deps/" + name
    shutil.copy2(msg["executable"], dest)
    copied.append(name)
missing = wanted - set(copied)
if missing:
    sys.exit("build-device-bins: no executable built for " + ", ".join(sorted(missing)))
'
du -sh devbin
