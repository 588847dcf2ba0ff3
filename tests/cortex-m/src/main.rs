//! Runs every golden vector through merge-core on a Cortex-M4F (QEMU mps2-an386)
//! with the same evaluator as the native and wasm32 tests, prints one line per
//! file over semihosting and exits QEMU with 0 only when every case matched.
#![no_std]
#![no_main]

extern crate alloc;

use core::mem::MaybeUninit;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use embedded_alloc::LlffHeap as Heap;

include!(concat!(env!("OUT_DIR"), "/golden_files.rs"));

#[global_allocator]
static HEAP: Heap = Heap::empty();

/// Parsing the largest golden file into a JSON tree takes about three times its size.
const HEAP_SIZE: usize = 3 << 20;

#[entry]
fn main() -> ! {
    static mut HEAP_MEM: [MaybeUninit<u8>; HEAP_SIZE] = [MaybeUninit::uninit(); HEAP_SIZE];
    // SAFETY: `entry` runs once, so this is the only use of HEAP_MEM, before any allocation.
    unsafe { HEAP.init(HEAP_MEM.as_mut_ptr() as usize, HEAP_SIZE) }
    let mut failed = false;
    for (name, bytes) in GOLDEN {
        let Ok(text) = core::str::from_utf8(bytes) else {
            hprintln!("MALFORMED {}: not UTF-8", name);
            failed = true;
            continue;
        };
        match golden_runner::check_file(text) {
            Ok(r) if r.failures.is_empty() => hprintln!("ok   {}: {} cases reproduced", name, r.cases),
            Ok(r) => {
                failed = true;
                hprintln!("FAIL {}: {} of {} cases differ", name, r.failures.len(), r.cases);
                for f in &r.failures {
                    hprintln!("{}", f);
                }
            }
            Err(e) => {
                failed = true;
                hprintln!("MALFORMED {}: {}", name, e);
            }
        }
    }
    debug::exit(if failed { debug::EXIT_FAILURE } else { debug::EXIT_SUCCESS });
    loop {}
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hprintln!("panic: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    loop {}
}
