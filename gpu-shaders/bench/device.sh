#!/usr/bin/env bash
# The real-GPU run, from the repository root, in one command:
#   device.sh tests   the cross-check suite on the NVIDIA adapter: the optimizer and merge kernels
#                     bit-identical to merge-core, the model kernels, the GPU model and its
#                     generation against the CPU model
#   device.sh bench   gpu-bench: copy, OnDARE, OnTIES at 16M, 64M and the Qwen1.5-1.8B shapes
#   device.sh torch   the PyTorch port of the official ODAdamW/OTAdamW on the same GPU
#   device.sh train   a DPO training step at SmolLM2-135M shapes (sequence 512, 4 pairs):
#                     `host bench` on the GPU, then PyTorch eager float32 on the same GPU
#   device.sh all     the four in order, each under its own time limit (STAGE_LIMIT_S,
#                     default 140 s), inside one 10-minute device command
# Everything each stage prints goes to stdout and, unprocessed, to
# $OUT/device-<stage>.txt ($OUT or /tmp), so a failing test's reason (the adapter
# error, the first differing index and values) is kept. The exit status is
# non-zero when any stage failed or timed out.
#
# With cargo on the machine, the stages build and run from source. Without it (the
# device tool's machines): run gpu-shaders/bench/build-device-bins.sh here, carry
# devbin.tar.xz and .gl/ (the Vulkan loader's .debs, see the device tool's README);
# this script unpacks both when the machine lacks them and points Vulkan at the
# NVIDIA driver. BIN_DIR (default devbin) and GOLDEN_DIR (default tests/golden)
# can be overridden.
set -euo pipefail
cd "$(dirname "$0")/../.."
stage="${1:-all}"
out_dir="${OUT:-/tmp}"
bin_dir="${BIN_DIR:-devbin}"
limit="${STAGE_LIMIT_S:-140}"
export MERGE_GPU_ADAPTER="${MERGE_GPU_ADAPTER:-nvidia}"
export GOLDEN_DIR="${GOLDEN_DIR:-$PWD/tests/golden}"
export PYTHONUNBUFFERED=1

export PATH="$PATH:/usr/sbin:/sbin"
have_vulkan_loader() {
    ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1' || compgen -G "/usr/lib/*/libvulkan.so.1" >/dev/null
}
if ! have_vulkan_loader; then
    if compgen -G ".gl/*.deb" >/dev/null; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    else
        echo "device.sh: no Vulkan loader (libvulkan.so.1) and no .gl/*.deb to unpack; see the device tool's README" >&2
        exit 1
    fi
fi
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$nvidia_icd" ]; then
    export VK_DRIVER_FILES="$nvidia_icd"
fi
if [ -n "${VK_DRIVER_FILES:-}" ] && [ ! -f "$VK_DRIVER_FILES" ]; then
    echo "device.sh: VK_DRIVER_FILES=$VK_DRIVER_FILES does not exist" >&2
    exit 1
fi

have_cargo() { command -v cargo >/dev/null; }

if ! have_cargo && [ ! -d "$bin_dir" ] && [ -f devbin.tar.xz ]; then
    # python's tarfile: the machine may lack xz
    python3 -c 'import tarfile; tarfile.open("devbin.tar.xz").extractall()'
fi

need_bin() {
    if [ ! -x "$1" ]; then
        echo "device.sh: $1 is missing: run gpu-shaders/bench/build-device-bins.sh and carry $bin_dir, or set BIN_DIR" >&2
        return 1
    fi
}

tests() {
    echo "== (a) cross-check suite"
    if have_cargo; then
        cargo test --release -p gpu-shaders
        cargo test --release -p host --test gpu_layers --test gpu_model
    else
        local status=0 t
        for t in primitives optimizer onties topk offline golden gpu_layers gpu_model; do
            need_bin "$bin_dir/deps/$t" || { status=1; continue; }
            echo "-- $t"
            "$bin_dir/deps/$t" || status=1
        done
        return $status
    fi
}

bench() {
    echo "== (b) gpu-bench"
    if have_cargo; then
        cargo run --release -p gpu-shaders --bin gpu-bench -- --sizes 16,64 --reps 20 --qwen
    else
        need_bin "$bin_dir/gpu-bench"
        "$bin_dir/gpu-bench" --sizes 16,64 --reps 20 --qwen
    fi
}

torch() {
    echo "== (c) official optimizer, PyTorch port"
    python3 gpu-shaders/bench/official_torch.py --sizes 16,64 --qwen --steps 10
}

train() {
    echo "== (d) DPO training step, SmolLM2-135M shapes: host (GPU, resident steps), then PyTorch"
    local shape=(--shape smollm2-135m --seq 512 --pairs 4 --steps 3)
    if have_cargo; then
        cargo run --release -p host -- bench --paths gpu "${shape[@]}"
    else
        need_bin "$bin_dir/host"
        "$bin_dir/host" bench --paths gpu "${shape[@]}"
    fi
    python3 host/benches/dpo_step_torch.py "${shape[@]}" --device cuda
}

# Runs one stage under the time limit, its whole output kept in $out_dir.
run_stage() {
    local name=$1 log="$out_dir/device-$1.txt" status=0
    echo "== $(date -u) stage $name on $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'), VK_DRIVER_FILES=${VK_DRIVER_FILES:-unset}" | tee "$log"
    timeout --kill-after=10 "$limit" bash -c "$(declare -f have_cargo need_bin "$name"); bin_dir='$bin_dir'; $name" 2>&1 | tee -a "$log" || status=$?
    [ "$status" = 124 ] && echo "== stage $name: timed out after $limit s" | tee -a "$log"
    echo "== stage $name: exit $status" | tee -a "$log"
    return "$status"
}

failed=()
case "$stage" in
    tests | bench | torch | train) run_stage "$stage" || failed+=("$stage") ;;
    all) for s in tests bench torch train; do run_stage "$s" || failed+=("$s"); done ;;
    *) echo "usage: device.sh tests|bench|torch|train|all" >&2; exit 2 ;;
esac
if [ ${#failed[@]} -gt 0 ]; then
    echo "== failed stages: ${failed[*]}"
    exit 1
fi
echo "== all stages passed"
