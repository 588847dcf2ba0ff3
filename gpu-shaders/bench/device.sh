#!/usr/bin/env bash
# The real-GPU run of issue 3, in one command, from the repository root:
#   (a) the cross-check suite on the NVIDIA adapter (bit-identical to merge-core),
#   (b) gpu-bench: copy, OnDARE (16M, 64M, Qwen1.5-1.8B shapes), memory,
#   (c) the PyTorch port of the official ODAdamW/OTAdamW on the same GPU.
# Output goes to stdout and, when $OUT is set, to $OUT/device-run.txt.
# Without cargo on the machine, build here first and carry the binaries:
#   cargo build --release -p gpu-shaders --tests --bins, then set BIN_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.."
export MERGE_GPU_ADAPTER="${MERGE_GPU_ADAPTER:-nvidia}"
log="${OUT:-/tmp}/device-run.txt"
exec > >(tee "$log") 2>&1
echo "== $(date -u) on $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"

if command -v cargo >/dev/null; then
    echo "== (a) cross-check suite"
    cargo test --release -p gpu-shaders 2>&1 | grep -E '^test |test result|panicked|differ' || true
    echo "== (b) gpu-bench"
    cargo run --release -p gpu-shaders --bin gpu-bench -- --sizes 16,64 --reps 20 --qwen || true
else
    BIN_DIR="${BIN_DIR:-target-gpu/release}"
    echo "== (a) cross-check suite (prebuilt in $BIN_DIR)"
    for t in "$BIN_DIR"/deps/{primitives,optimizer,topk}-*; do
        [[ -x "$t" && ! "$t" == *.d ]] && "$t" 2>&1 | grep -E '^test |test result|panicked|differ'
    done
    echo "== (b) gpu-bench"
    "$BIN_DIR/gpu-bench" --sizes 16,64 --reps 20 --qwen || true
fi

echo "== (c) official optimizer, PyTorch port"
python3 gpu-shaders/bench/official_torch.py --sizes 16,64 --qwen --steps 10 || true
