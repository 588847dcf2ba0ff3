//! Test-input helpers over [`crate::rng::SplitMix64`], so property tests are
//! reproducible without a dev-dependency.

use crate::rng::SplitMix64;

/// Random sign, significand and an exponent in 2^-20 .. 2^20.
pub fn wide_f32(rng: &mut SplitMix64) -> f32 {
    let r = rng.next_u32();
    let exp = 127 - 20 + (r % 41);
    f32::from_bits((r & 0x8000_0000) | (exp << 23) | (rng.next_u32() >> 9))
}
