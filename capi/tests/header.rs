//! The committed `include/merge_core.h` is what cbindgen renders from the
//! library's source today. `MERGE_CORE_CAPI_UPDATE=1` rewrites it instead.

use std::path::Path;

#[test]
fn the_committed_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("capi/cbindgen.toml");
    let bindings = cbindgen::Builder::new().with_config(config).with_src(dir.join("src/lib.rs")).generate().expect("cbindgen renders src/lib.rs");
    let mut rendered = Vec::new();
    bindings.write(&mut rendered);
    let path = dir.join("include/merge_core.h");
    if std::env::var_os("MERGE_CORE_CAPI_UPDATE").is_some() {
        std::fs::write(&path, &rendered).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        committed == rendered,
        "{} is stale: run `MERGE_CORE_CAPI_UPDATE=1 cargo test -p merge-core-capi` and commit it",
        path.display()
    );
}
