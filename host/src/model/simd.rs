//! Which vector instructions the CPU model's hot loops run with, chosen at run
//! time.
//!
//! The shipped binary targets baseline x86-64, where the compiler may only use
//! 128-bit SSE2. The hot loops ([`super::layers`]'s matrix product and
//! attention) are therefore compiled three times, for the baseline, with AVX2
//! and with AVX-512F enabled, and each call runs the widest copy the CPU
//! supports. This changes no bit: the loops are written so that every element's
//! operations (which products, which sums, in which order) are fixed by the code
//! and not by the vector width, and Rust never fuses a multiply and an add into
//! an FMA unless asked (`mul_add`), so a wider register only handles more
//! elements per instruction. The model's tests run every level on the same
//! inputs and compare bits. On aarch64, NEON is part of the baseline and the one
//! copy already uses it. The levels are merge-simd's, which runs the optimizer
//! step the same way; [`set_limit`] caps both.

use std::sync::atomic::{AtomicU8, Ordering};

pub use merge_simd::Level;

/// The widest level this CPU supports.
pub fn detected() -> Level {
    Level::detected()
}

static LIMIT: AtomicU8 = AtomicU8::new(Level::Avx512 as u8);

/// Caps the level the kernels use for the rest of the process (a benchmark's
/// comparison of levels; the results are the same at every level).
pub fn set_limit(level: Level) {
    LIMIT.store(level as u8, Ordering::Relaxed);
}

/// The level the kernels run at: [`detected`], at most the [`set_limit`] cap.
pub fn active() -> Level {
    let limit = Level::ALL[LIMIT.load(Ordering::Relaxed) as usize];
    detected().min(limit)
}
