//! (d) merge-core on a Cortex-M4F: the firmware in tests/cortex-m runs every golden
//! vector with the same evaluator as the native test, under QEMU's mps2-an386
//! (a Cortex-M4 with its single-precision FPU), and reports over semihosting.

use std::path::PathBuf;
use std::process::Command;

use workspace_tests::{cargo, golden_files, require_rust_target, run, workspace_root};

const TARGET: &str = "thumbv7em-none-eabihf";

#[test]
fn cortex_m4f_reproduces_every_golden_vector() {
    let files = golden_files();
    require_rust_target(TARGET);
    let qemu = Command::new("qemu-system-arm").arg("--version").output();
    assert!(
        qemu.is_ok_and(|o| o.status.success()),
        "qemu-system-arm is not installed: run `apt-get install qemu-system-arm` (or your system's QEMU ARM system emulator)"
    );
    let target_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cortex-m");
    let firmware_dir = workspace_root().join("tests").join("cortex-m");
    run(
        cargo().current_dir(&firmware_dir).args(["build", "--release", "--target", TARGET, "--target-dir"]).arg(&target_dir),
        "cargo should be on PATH",
    );
    let elf = target_dir.join(TARGET).join("release").join("golden-cortex-m");
    // `timeout` bounds a firmware that hangs instead of exiting through semihosting.
    let out = run(
        Command::new("timeout").arg("600").arg("qemu-system-arm").args([
            "-cpu",
            "cortex-m4",
            "-machine",
            "mps2-an386",
            "-nographic",
            "-monitor",
            "none",
            "-semihosting-config",
            "enable=on,target=native",
            "-kernel",
        ]).arg(&elf),
        "install coreutils (timeout) and qemu-system-arm",
    );
    println!("{out}");
    let ok = out.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(ok, files.len(), "expected one ok line per golden file:\n{out}");
}
