//! merge-core's golden-vector check as a WebAssembly module (`run.mjs` drives it).
//!
//! The host writes a golden file's text into the input buffer, calls
//! `golden_check`, and reads the report from the output buffer. Buffers live in
//! statics so the interface needs no allocator exports and no `unsafe`.

use std::sync::Mutex;

static INPUT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static OUTPUT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Makes the input buffer `len` bytes long and returns where the host writes them.
#[unsafe(no_mangle)]
pub extern "C" fn golden_input(len: u32) -> *mut u8 {
    let mut input = INPUT.lock().unwrap();
    input.clear();
    input.resize(len as usize, 0);
    input.as_mut_ptr()
}

/// Checks the golden file in the input buffer: 0 all cases reproduced, 1 some
/// differ, 2 the file is malformed. The report (case count or the differences)
/// is left in the output buffer.
#[unsafe(no_mangle)]
pub extern "C" fn golden_check() -> u32 {
    let input = INPUT.lock().unwrap();
    let (code, report) = check(&input);
    *OUTPUT.lock().unwrap() = report.into_bytes();
    code
}

#[unsafe(no_mangle)]
pub extern "C" fn golden_output_ptr() -> *const u8 {
    OUTPUT.lock().unwrap().as_ptr()
}

#[unsafe(no_mangle)]
pub extern "C" fn golden_output_len() -> u32 {
    OUTPUT.lock().unwrap().len() as u32
}

fn check(input: &[u8]) -> (u32, String) {
    let text = match std::str::from_utf8(input) {
        Ok(t) => t,
        Err(e) => return (2, format!("not UTF-8: {e}")),
    };
    match golden_runner::check_file(text) {
        Ok(r) if r.failures.is_empty() => (0, format!("{} cases reproduced", r.cases)),
        Ok(r) => (1, format!("{} of {} cases differ:\n{}", r.failures.len(), r.cases, r.failures.join("\n"))),
        Err(e) => (2, e),
    }
}
