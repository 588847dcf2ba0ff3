//! (d) merge-core builds for a Cortex-M4F (thumbv7em-none-eabihf): no_std, no
//! allocator, no OS. This proves the crate stays embeddable; it does not run there.

use std::path::PathBuf;

use workspace_tests::{cargo, require_rust_target, run};

const TARGET: &str = "thumbv7em-none-eabihf";

#[test]
fn merge_core_builds_for_cortex_m4f() {
    require_rust_target(TARGET);
    let target_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("thumbv7em");
    run(
        cargo().args(["build", "-p", "merge-core", "--release", "--target", TARGET, "--target-dir"]).arg(&target_dir),
        "cargo should be on PATH",
    );
    let rlib = target_dir.join(TARGET).join("release").join("libmerge_core.rlib");
    assert!(rlib.is_file(), "{} was not produced", rlib.display());
}
