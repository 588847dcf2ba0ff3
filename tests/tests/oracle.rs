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
