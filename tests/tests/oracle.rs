//! (b) The NumPy oracle (tests/oracle/, written from SPEC.md alone) reproduces every
//! committed golden vector bit for bit. Never skipped: without numpy it fails.

use std::process::Command;

use workspace_tests::{golden_dir, golden_files, run, workspace_root};

#[test]
fn numpy_oracle_reproduces_every_golden_vector() {
    golden_files();
    let probe = Command::new("python3").args(["-c", "import numpy"]).output();
    match probe {
        Err(e) => panic!("python3 not runnable ({e}): install Python 3 (Debian: `apt-get install python3 python3-numpy`), then `pip install numpy`"),
        Ok(o) if !o.status.success() => {
            panic!("numpy is missing for python3: run `pip install numpy` (Debian: `apt-get install python3-numpy`)\n{}", String::from_utf8_lossy(&o.stderr))
        }
        Ok(_) => {}
    }
    let script = workspace_root().join("tests").join("oracle").join("check_golden.py");
    let out = run(Command::new("python3").arg(&script).arg(golden_dir()), "install python3");
    println!("{out}");
}

/// The oracle's comparison must be able to fail: a golden file with one expected
/// bit flipped has to be reported with the case and the index.
#[test]
fn numpy_oracle_reports_a_changed_bit() {
    let src = golden_dir().join("tree_sum.json");
    let mut doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&src).unwrap()).unwrap();
    let case = &mut doc["cases"][3];
    let name = case["name"].as_str().unwrap().to_string();
    let hex = case["expected"]["outputs"]["sum"]["hex"].as_str().unwrap();
    let flipped = u32::from_str_radix(hex, 16).unwrap() ^ 0x10;
    case["expected"]["outputs"]["sum"]["hex"] = format!("{flipped:08x}").into();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("oracle-flipped");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tree_sum.json"), doc.to_string()).unwrap();
    let script = workspace_root().join("tests").join("oracle").join("check_golden.py");
    let out = Command::new("python3").arg(&script).arg(&dir).output().expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("case '{name}'")) && stdout.contains("first at index 0"), "{stdout}");
}

/// Beyond the committed files: fresh inputs of the same shapes (other generator
/// salts), expected outputs from merge-core now, and the oracle must agree on them
/// too. This catches a disagreement the fixed inputs happen to miss.
#[test]
fn numpy_oracle_agrees_with_merge_core_on_fresh_inputs() {
    let script = workspace_root().join("tests").join("oracle").join("check_golden.py");
    for salt in [0x9e37_79b9u64, 0x7f4a_7c15] {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("oracle-fresh-{salt:x}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, about, cases) in workspace_tests::cases::golden_sets(salt) {
            let text = golden_runner::file_json(about, &cases).unwrap_or_else(|e| panic!("{name}: {e}"));
            std::fs::write(dir.join(name), text).unwrap();
        }
        let out = run(Command::new("python3").arg(&script).arg(&dir), "install python3 and numpy (`pip install numpy`)");
        println!("salt {salt:#x}:\n{out}");
    }
}
