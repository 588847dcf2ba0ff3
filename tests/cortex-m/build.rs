//! Embeds every `tests/golden/*.json` (sorted) and links with cortex-m-rt's script and memory.x.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::copy(manifest.join("memory.x"), out.join("memory.x")).unwrap();
    println!("cargo:rustc-link-search={}", out.display());
    // cortex-m-rt's linker script (it includes memory.x); set here rather than in
    // RUSTFLAGS so an environment RUSTFLAGS cannot drop it.
    println!("cargo:rustc-link-arg=-Tlink.x");
    println!("cargo:rerun-if-changed=memory.x");
    let golden = manifest.join("..").join("golden");
    println!("cargo:rerun-if-changed={}", golden.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&golden)
        .unwrap_or_else(|e| panic!("{}: {e}", golden.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden files in {}", golden.display());
    let mut list = String::from("static GOLDEN: &[(&str, &[u8])] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let name = f.file_name().unwrap().to_string_lossy();
        list += &format!("    ({name:?}, include_bytes!({:?})),\n", f.display().to_string());
    }
    list += "];\n";
    std::fs::write(out.join("golden_files.rs"), list).unwrap();
}
