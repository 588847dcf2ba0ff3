//! Writes the golden vectors of `tests/golden/` from merge-core.
//!
//! usage: `cargo run -p workspace-tests --bin make-golden [-- <output dir>]`
//!
//! The inputs are built in `workspace_tests::cases`, the expected outputs are
//! whatever merge-core computes now. Rerun it only when SPEC.md changes on purpose,
//! and review the diff: the committed files are what catches an unintended change
//! in the arithmetic.

use std::path::PathBuf;

use golden_runner::file_json;
use workspace_tests::cases::golden_sets;

fn main() {
    let dir = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(workspace_tests::golden_dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    for (name, about, cases) in golden_sets(0) {
        let text = file_json(about, &cases).unwrap_or_else(|e| panic!("{name}: {e}"));
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        println!("wrote {} ({} cases)", path.display(), cases.len());
    }
}
