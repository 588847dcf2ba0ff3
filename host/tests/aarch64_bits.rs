//! The CPU model gives the same bits on aarch64 as here. `host` is built for
//! aarch64-unknown-linux-gnu and runs, under QEMU's user-mode emulator, a seeded
//! pipeline (pretrain, SFT, align with AdamW, OnDARE and OnTIES, eval) in
//! portable math and in fused math, where aarch64 runs its own NEON kernel;
//! every model it writes and the evaluation record must equal this build's byte
//! for byte (SPEC §10: portable bits are the same on every machine, fused bits
//! depend only on whether the CPU has FMA, which every aarch64 CPU has).
#![cfg(target_arch = "x86_64")]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "aarch64-unknown-linux-gnu";
const LINKER: &str = "aarch64-linux-gnu-gcc";
/// Where Debian's cross packages put aarch64's C library and dynamic loader.
const SYSROOT: &str = "/usr/aarch64-linux-gnu";
const PACKAGES: &str = "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user";

/// Runs `cmd`; panics with what it printed when it fails, or with `missing`
/// when the program does not exist.
fn run(cmd: &mut Command, missing: &str) -> String {
    let shown = format!("{cmd:?}");
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{shown}: not found: {missing}"),
        Err(e) => panic!("{shown}: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{shown} failed ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

fn aarch64_host() -> PathBuf {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = run(Command::new(rustc).args(["--print", "sysroot"]), "rustc");
    let std_lib = Path::new(sysroot.trim()).join("lib/rustlib").join(TARGET).join("lib");
    assert!(std_lib.is_dir(), "the Rust standard library for {TARGET} is not installed: run `rustup target add {TARGET}`");
    run(Command::new(LINKER).arg("--version"), &format!("the aarch64 cross linker: {PACKAGES}"));
    run(Command::new("qemu-aarch64").arg("--version"), &format!("QEMU's aarch64 user-mode emulator: {PACKAGES}"));
    assert!(Path::new(SYSROOT).join("lib").is_dir(), "{SYSROOT}/lib missing: {PACKAGES}");

    let target_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("aarch64");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ is in the workspace");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace)
            .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", LINKER)
            .args(["build", "-p", "host", "--bin", "host", "--target", TARGET, "--target-dir"])
            .arg(&target_dir),
        "cargo",
    );
    target_dir.join(TARGET).join("debug").join("host")
}

/// The models the pipeline writes (name, bytes) and the evaluation's record.
fn pipeline(host: &[OsString], out: &Path, portable: bool) -> (Vec<(&'static str, Vec<u8>)>, String) {
    let _ = std::fs::remove_dir_all(out);
    let dir = |name: &str| out.join(name).into_os_string().into_string().unwrap();
    let model = |name: &str| out.join(name).join("model").into_os_string().into_string().unwrap();
    let host_run = |args: &[&str]| {
        let mut cmd = Command::new(&host[0]);
        cmd.args(&host[1..]).args(args).args(["--backend", "cpu"]);
        if portable {
            cmd.arg("--portable-math");
        }
        run(&mut cmd, "the host binary")
    };
    let arch = ["--hidden-size", "64", "--intermediate-size", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2"];
    let mut pretrain = vec!["pretrain", "--builtin", "64", "--steps", "6", "--batch-size", "4", "--seed", "3"];
    pretrain.extend(arch);
    let base = dir("base");
    pretrain.extend(["--out", &base]);
    host_run(&pretrain);
    let sft = dir("sft");
    host_run(&["sft", "--model", &model("base"), "--builtin", "16", "--steps", "4", "--batch-size", "4", "--seed", "4", "--out", &sft]);
    let optimizers = ["adamw", "ondare", "onties"];
    for opt in optimizers {
        let to = dir(opt);
        host_run(&[
            "align", "--model", &model("sft"), "--base", &model("base"), "--builtin", "12", "--steps", "4", "--batch-size", "2", "--grad-accum",
            "2", "--optimizer", opt, "--p", "0.5", "--alpha", "0.1", "--lr", "1e-3", "--seed", "9", "--out", &to,
        ]);
    }
    let record = host_run(&["eval", "--model", &model("onties"), "--ref-model", &model("sft"), "--builtin", "6", "--task", "preference"]);
    let models = ["base", "sft"]
        .into_iter()
        .chain(optimizers)
        .map(|name| {
            let path = out.join(name).join("model").join("model.safetensors");
            (name, std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        })
        .collect();
    (models, record)
}

#[test]
fn aarch64_trains_the_same_bits_in_portable_and_fused_math() {
    let elf = aarch64_host();
    let native = vec![OsString::from(env!("CARGO_BIN_EXE_host"))];
    let emulated = vec!["qemu-aarch64".into(), "-L".into(), SYSROOT.into(), elf.into_os_string()];
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("aarch64-runs");
    // without FMA here, this machine's fused math is portable and aarch64's is not
    let fma = std::arch::is_x86_feature_detected!("fma");
    for portable in [true, false] {
        let math = if portable { "portable" } else { "fused" };
        let (here, here_record) = pipeline(&native, &work.join(format!("x86_64-{math}")), portable);
        let (there, there_record) = pipeline(&emulated, &work.join(format!("aarch64-{math}")), portable);
        if !portable && !fma {
            println!("fused math not compared: this x86-64 CPU has no FMA, so its fused products are the portable ones");
            continue;
        }
        for ((name, a), (_, b)) in here.iter().zip(&there) {
            assert!(a == b, "{math} math: the {name} model written on aarch64 differs from this machine's");
        }
        assert_eq!(there_record, here_record, "{math} math: the evaluation record");
        println!("{math} math: {} models and the evaluation record identical on aarch64", here.len());
    }
    std::fs::remove_dir_all(&work).unwrap();
}
