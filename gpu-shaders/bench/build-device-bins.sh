#!/usr/bin/env bash
# Builds what device.sh runs on a machine without cargo (the device tool's GPU
# machines have none) and gathers it in devbin/ (git-ignored): gpu-bench, the
# cross-check test binaries (the optimizer's and the model kernels') and `host`
# (for the training bench), stripped (profile `device`), and packs it as
# devbin.tar.xz (about 15 MB; devbin/ itself, over 70 MB, is above the device
# tool's 64 MiB carry limit). Only the executables this build produced are copied
# (cargo names them in its JSON messages), never an older hash left in target/.
# Then, on the device, with `devbin.tar.xz` and the Vulkan loader's `.gl` carried
# (see the device tool's README):
#   gpu-shaders/bench/device.sh all
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf devbin devbin.tar.xz
mkdir -p devbin/deps
{
    cargo build --profile device -p gpu-shaders --tests --bins --message-format=json-render-diagnostics
    cargo build --profile device -p host --bin host --test gpu_layers --test gpu_model --message-format=json-render-diagnostics
} \
    | python3 -c '
import json, shutil, sys, os
wanted = {"primitives", "optimizer", "onties", "topk", "offline", "golden", "gpu_layers", "gpu_model", "gpu-bench", "host"}
copied = []
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    name = msg["target"]["name"]
    if name not in wanted:
        continue
    if name in ("gpu-bench", "host"):
        if msg["target"]["kind"] != ["bin"]:
            continue
        dest = "devbin/" + name
    else:
        dest = "devbin/deps/" + name
    shutil.copy2(msg["executable"], dest)
    copied.append(name)
missing = wanted - set(copied)
if missing:
    sys.exit("build-device-bins: no executable built for " + ", ".join(sorted(missing)))
'
tar -cJf devbin.tar.xz devbin
du -sh devbin devbin.tar.xz
