#!/usr/bin/env bash
# The real-GPU run of issue 3, from the repository root:
#   device.sh tests   the cross-check suite on the NVIDIA adapter (bit-identical to merge-core)
#   device.sh bench   gpu-bench: copy, OnDARE, OnTIES at 16M, 64M and the Qwen1.5-1.8B shapes
#   device.sh torch   the PyTorch port of the official ODAdamW/OTAdamW on the same GPU
#   device.sh all     the three in order (may exceed one 10-minute device command)
# Output goes to stdout and, when $OUT is set, to $OUT/device-<stage>.txt.
# Without cargo on the machine: gpu-shaders/bench/build-device-bins.sh here, carry
# devbin/ (stripped binaries, under the 64 MiB carry limit), set BIN_DIR=devbin.
# GOLDEN_DIR defaults to the repository's tests/golden.
set -uo pipefail
cd "$(dirname "$0")/../.."
stage="${1:-all}"
export MERGE_GPU_ADAPTER="${MERGE_GPU_ADAPTER:-nvidia}"
export GOLDEN_DIR="${GOLDEN_DIR:-$PWD/tests/golden}"
log="${OUT:-/tmp}/device-$stage.txt"
exec > >(tee "$log") 2>&1
echo "== $(date -u) stage $stage on $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"

tests() {
    echo "== (a) cross-check suite"
    if command -v cargo >/dev/null; then
        cargo test --release -p gpu-shaders 2>&1 | grep -E '^test |test result|panicked|differ|FAIL'
    else
        for t in "${BIN_DIR:-target-gpu/release}"/deps/{primitives,optimizer,onties,topk,offline,golden}-*; do
            [[ -x "$t" && "$t" != *.d ]] && "$t" 2>&1 | grep -E '^test |test result|panicked|differ|FAIL'
        done
    fi
}

bench() {
    echo "== (b) gpu-bench"
    if command -v cargo >/dev/null; then
        cargo run --release -p gpu-shaders --bin gpu-bench -- --sizes 16,64 --reps 20 --qwen
    else
        "${BIN_DIR:-target-gpu/release}/gpu-bench" --sizes 16,64 --reps 20 --qwen
    fi
}

torch() {
    echo "== (c) official optimizer, PyTorch port"
    python3 gpu-shaders/bench/official_torch.py --sizes 16,64 --qwen --steps 10
}

case "$stage" in
    tests) tests ;;
    bench) bench ;;
    torch) torch ;;
    all) tests; bench; torch ;;
    *) echo "usage: device.sh tests|bench|torch|all"; exit 2 ;;
esac
