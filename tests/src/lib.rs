//! Workspace-level integration tests. The library holds what the test targets and
//! the `make-golden` generator share: where things are, and how to run tools.

pub mod cases;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Where the committed golden vectors live.
pub fn golden_dir() -> PathBuf {
    workspace_root().join("tests").join("golden")
}

/// The golden files, sorted by name; panics with a clear message when there are none,
/// so a missing directory can never pass as "nothing to check".
pub fn golden_files() -> Vec<PathBuf> {
    let dir = golden_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden files in {}: run `cargo run -p workspace-tests --bin make-golden`", dir.display());
    files
}

/// Runs `cmd`, returning its stdout; panics with the command, status, stdout and
/// stderr when it fails, or with `missing` when the program does not exist.
pub fn run(cmd: &mut Command, missing: &str) -> String {
    let shown = format!("{cmd:?}");
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{shown}: not found. {missing}"),
        Err(e) => panic!("{shown}: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{shown} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}", out.status);
    stdout
}

/// A `cargo` command for a nested build (the one that runs these tests).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Fails with the exact command to run when a rustup target is not installed.
pub fn require_rust_target(target: &str) {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc).args(["--print", "sysroot"]).output().expect("rustc --print sysroot");
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let libdir = Path::new(&sysroot).join("lib").join("rustlib").join(target).join("lib");
    assert!(
        libdir.is_dir(),
        "the Rust standard library for {target} is not installed ({} missing): run `rustup target add {target}`",
        libdir.display()
    );
}
