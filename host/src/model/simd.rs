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
//! copy already uses it; its fused products have their own NEON kernel. The
//! levels are merge-simd's, which runs the optimizer step the same way;
//! [`set_limit`] caps both.
//!
//! [`Math::Fused`] is the one exception, and opt-out rather than silent: the
//! matrix products fuse each multiply with its add where the CPU has FMA, about
//! twice as fast, giving bits that depend on whether the CPU has FMA (never on
//! the vector width or the thread count). [`Math::Portable`] keeps the
//! machine-independent bits; the library defaults to it, the training commands
//! to `Fused` unless `--portable-math` (SPEC §10).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

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

/// How the CPU model's matrix products round (SPEC §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Math {
    /// Every product and sum rounded on its own, in a fixed tree of four
    /// terms: the same bits on every machine.
    Portable,
    /// `y ← fma(a, x, y)` for each term, `k` ascending, where the CPU has FMA
    /// (x86-64 with AVX2 and FMA, or AVX-512F); elsewhere [`Math::Portable`].
    Fused,
}

impl Math {
    pub fn name(self) -> &'static str {
        match self {
            Math::Portable => "portable",
            Math::Fused => "fused",
        }
    }
}

static FUSED: AtomicBool = AtomicBool::new(false);

/// Sets the products' rounding for the rest of the process (a command's
/// `--portable-math`, before any model runs).
pub fn set_math(math: Math) {
    FUSED.store(math == Math::Fused, Ordering::Relaxed);
}

/// The rounding asked for with [`set_math`] ([`Math::Portable`] until then).
pub fn math() -> Math {
    if FUSED.load(Ordering::Relaxed) { Math::Fused } else { Math::Portable }
}

/// Whether the products fuse at `level` when [`Math::Fused`] is asked for: the
/// level has a fused kernel (AVX2 or AVX-512F on x86-64, every level on
/// aarch64) and the CPU has FMA.
pub fn fuses_at(level: Level) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level >= Level::Avx2 && level <= detected() && std::arch::is_x86_feature_detected!("fma")
    }
    // NEON and its fused multiply-add are part of every aarch64 CPU, and the
    // baseline is its one level
    #[cfg(target_arch = "aarch64")]
    {
        let _ = level;
        true
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = level;
        false
    }
}

/// The rounding the products actually use at the [`active`] level: what
/// records and messages should name.
pub fn effective_math() -> Math {
    if math() == Math::Fused && fuses_at(active()) { Math::Fused } else { Math::Portable }
}
