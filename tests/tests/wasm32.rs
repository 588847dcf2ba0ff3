//! (c) merge-core compiled to wasm32-unknown-unknown reproduces every golden vector
//! under node: the same evaluator as the native test, on another target.

use std::path::PathBuf;
use std::process::Command;

use workspace_tests::{cargo, golden_dir, golden_files, require_rust_target, run, workspace_root};

const TARGET: &str = "wasm32-unknown-unknown";

#[test]
fn wasm32_reproduces_every_golden_vector() {
    golden_files();
    require_rust_target(TARGET);
    // A target dir of its own: the outer `cargo test` holds the lock on the main one.
    let target_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("wasm32");
    run(
        cargo().args(["build", "-p", "golden-wasm", "--target", TARGET, "--target-dir"]).arg(&target_dir),
        "cargo should be on PATH",
    );
    let wasm = target_dir.join(TARGET).join("debug").join("golden_wasm.wasm");
    assert!(wasm.is_file(), "{} was not produced", wasm.display());
    let script = workspace_root().join("tests").join("wasm").join("run.mjs");
    let out = run(
        Command::new("node").arg(&script).arg(&wasm).arg(golden_dir()),
        "install Node.js 18 or newer (Debian: `apt-get install nodejs`)",
    );
    println!("{out}");
}
