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
//! copy already uses it.

use std::sync::atomic::{AtomicU8, Ordering};

/// A set of vector instructions, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// What the build targets: SSE2 on x86-64, NEON on aarch64.
    Baseline = 0,
    /// x86-64 with AVX2 (256-bit vectors).
    Avx2 = 1,
    /// x86-64 with AVX-512F (512-bit vectors).
    Avx512 = 2,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Baseline, Level::Avx2, Level::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s)
    }
}

/// The widest level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return Level::Avx2;
        }
    }
    Level::Baseline
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
