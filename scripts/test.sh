#!/usr/bin/env bash
# The one command that runs every test of the workspace on a fresh machine.
#
# It checks for what the tests need beyond Rust and, when it runs as root with
# apt-get / rustup available, installs it; otherwise it stops and prints the exact
# command to run. Needed: the software Vulkan driver (GPU tests run on lavapipe when
# there is no GPU), python3 with numpy (the independent oracle), node (the wasm32
# run of the golden vectors), qemu-system-arm (their Cortex-M4F run), a C compiler
# `cc` (the C ABI's golden run), the rustup targets wasm32-unknown-unknown and
# thumbv7em-none-eabihf, and on x86-64 the aarch64 cross linker, QEMU's user-mode
# emulator and the target aarch64-unknown-linux-gnu (the CPU model's bits on
# aarch64, host/tests/aarch64_bits.rs). Then: the C program capi/examples/golden.c against the
# static library, the Python package's tests (pytest, in a virtual environment),
# and cargo test --workspace.
#
# --with-torch also installs torch, trl and transformers into that environment
# (python/requirements-torch.txt: about 6 GB of CUDA wheels from PyPI) and runs the
# Python tests that need them: the optimizer classes, TRL's DPOTrainer and
# torch.distributed, transformers loading host's output folders. Without it they
# are listed as not run, never skipped silently.
set -euo pipefail
cd "$(dirname "$0")/.."

with_torch=false
for arg in "$@"; do
    case "$arg" in
        --with-torch) with_torch=true ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "test.sh: unknown argument $arg (known: --with-torch)" >&2; exit 2 ;;
    esac
done

targets=(wasm32-unknown-unknown thumbv7em-none-eabihf)
cross_aarch64=false; [ "$(uname -m)" = x86_64 ] && cross_aarch64=true
$cross_aarch64 && targets+=(aarch64-unknown-linux-gnu)
is_root=false; [ "$(id -u)" = 0 ] && is_root=true
have() { command -v "$1" >/dev/null 2>&1; }
missing=()

apt_install() {
    if $is_root && have apt-get; then
        echo "test.sh: installing $* with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null \
            || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null; }
    else
        return 1
    fi
}

have_vulkan() {
    ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 \
        && { ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1' || ls /usr/lib/*/libvulkan.so.1 >/dev/null 2>&1; }
}

have_numpy() { have python3 && python3 -c 'import numpy' >/dev/null 2>&1; }

for tool in cargo rustc; do
    have "$tool" || { echo "test.sh: $tool not found: install Rust with rustup (https://rustup.rs)" >&2; exit 1; }
done

have_vulkan || apt_install mesa-vulkan-drivers libvulkan1 || true
have_vulkan || missing+=("the software Vulkan driver: sudo apt-get install mesa-vulkan-drivers libvulkan1")

if ! have_numpy; then
    apt_install python3 python3-numpy || true
fi
if ! have_numpy && have python3 && python3 -m pip --version >/dev/null 2>&1; then
    # Debian marks its Python as externally managed; a user install is still allowed there.
    python3 -m pip install --user numpy || python3 -m pip install --user --break-system-packages numpy || true
fi
have_numpy || missing+=("numpy for python3: pip install numpy (Debian: sudo apt-get install python3-numpy)")

have node || apt_install nodejs || true
have node || missing+=("Node.js 18+: sudo apt-get install nodejs")

have cc || apt_install gcc libc6-dev || true
have cc || missing+=("a C compiler for the C ABI's golden run: sudo apt-get install gcc")

have qemu-system-arm || apt_install qemu-system-arm || true
have qemu-system-arm || missing+=("QEMU for the Cortex-M run of the golden vectors: sudo apt-get install qemu-system-arm")

if $cross_aarch64; then
    have aarch64-linux-gnu-gcc || apt_install gcc-aarch64-linux-gnu libc6-dev-arm64-cross || true
    have aarch64-linux-gnu-gcc || missing+=("the aarch64 cross linker for the CPU model's aarch64 run: sudo apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross")
    have qemu-aarch64 || apt_install qemu-user || true
    have qemu-aarch64 || missing+=("QEMU's user-mode emulator for the CPU model's aarch64 run: sudo apt-get install qemu-user")
fi

# A target is installed when the toolchain's sysroot holds its standard library
# (true for rustup and for toolchains installed some other way).
sysroot=$(rustc --print sysroot)
for t in "${targets[@]}"; do
    if [ ! -d "$sysroot/lib/rustlib/$t/lib" ]; then
        if have rustup; then
            rustup target add "$t" || missing+=("the Rust target $t: rustup target add $t")
        else
            missing+=("the Rust target $t: rustup target add $t")
        fi
    fi
done

if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: missing prerequisites; install them and rerun:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
fi

# Mesa's Vulkan loader complains on every device creation when there is no
# session runtime directory (CI, containers); give it a private one.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "$XDG_RUNTIME_DIR" ]; then
    XDG_RUNTIME_DIR=$(mktemp -d)
    chmod 700 "$XDG_RUNTIME_DIR"
    export XDG_RUNTIME_DIR
fi

# The C ABI from C: the static library, then a C99 program linked against it that
# reproduces the optimizer and offline golden files bit for bit. -lm -lpthread -ldl
# are what Rust's standard library inside the static library needs from libc.
cargo build -p merge-core-capi
capi_out="${CARGO_TARGET_DIR:-target}/capi"
mkdir -p "$capi_out"
cc -std=c99 -pedantic -Wall -Wextra -Werror -O2 -Icapi/include capi/examples/golden.c \
    "${CARGO_TARGET_DIR:-target}/debug/libmerge_core_c.a" -lm -lpthread -ldl -o "$capi_out/golden"
# A difference is reported after the other tests have run too, as theirs are.
c_abi=0
"$capi_out/golden" capi/tests/golden/optimizer.txt capi/tests/golden/offline.txt || c_abi=$?

# The Python package: built with maturin into a private virtual environment, then
# its pytest suite (the torch-free part unless --with-torch; conftest.py says which).
venv=target/python-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || { apt_install python3-venv && python3 -m venv "$venv"; } || {
        echo "test.sh: cannot create a Python virtual environment: sudo apt-get install python3-venv" >&2; exit 1; }
fi
if $with_torch; then
    # --no-cache-dir: the CUDA wheels would otherwise sit on disk twice.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r python/requirements-torch.txt
    export MERGE_CORE_REQUIRE_TORCH=1
else
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r python/requirements-test.txt
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ./python
python_status=0
"$venv/bin/python" -m pytest -q python/tests || python_status=$?

# --no-fail-fast: CI reports every failing test binary, not only the first.
cargo test --workspace --no-fail-fast
$with_torch || echo "test.sh: not run: python/tests/test_optim.py, test_trl.py, test_distributed.py and test_model_folder.py need torch (about 6 GB); scripts/test.sh --with-torch runs them too"
if [ "$c_abi" != 0 ]; then
    echo "test.sh: capi/examples/golden.c failed (exit $c_abi); its differences are printed above the other tests" >&2
    exit "$c_abi"
fi
if [ "$python_status" != 0 ]; then
    echo "test.sh: the Python tests failed (exit $python_status); see the pytest report above the Rust tests" >&2
    exit "$python_status"
fi
