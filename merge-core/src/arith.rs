//! The binary32 operations of SPEC.md §1: every result passes through the flush
//! rule `F`, so no value in the merge path is ever subnormal or `-0.0`.
//! Nothing here may fuse a multiply and an add into one rounding: SPEC.md §1.2.

/// Exponent field of a binary32 value.
pub const EXP_MASK: u32 = 0x7f80_0000;

/// SPEC.md §1.3: ±0 and subnormals become `+0.0`; every other value is unchanged.
///
/// Written as a mask on the bits (all ones when the exponent field is not zero)
/// rather than `if exponent == 0 { 0.0 } else { x }`: LLVM turns that select,
/// after an add, into a floating-point class test of seven vector instructions;
/// the mask is two with AVX-512 (test into a mask register, zeroing move). On
/// AVX-512 the in-cache OnDARE element arithmetic went from 44 to 33 ms per 16M
/// elements (`cargo bench -p merge-core --bench cpu_step`).
#[inline(always)]
pub fn flush(x: f32) -> f32 {
    let b = x.to_bits();
    // A non-zero exponent field is in 2^23 ..= 0x7f80_0000, so its negation has
    // the top bit set and the arithmetic shift spreads it over the word.
    let keep = ((b & EXP_MASK).wrapping_neg() as i32 >> 31) as u32;
    f32::from_bits(b & keep)
}

/// SPEC.md §1.4: Inf or NaN, decided on the bits.
#[inline(always)]
pub fn is_non_finite(x: f32) -> bool {
    x.to_bits() & EXP_MASK == EXP_MASK
}

/// [`flush`] when `FLUSH`, the identity otherwise. The operations below take
/// `FLUSH` so that one kernel serves both the SPEC arithmetic (`true`) and the
/// flush-free path (`false`), which runs only where [`crate::flushless`] has
/// proven that no flush would change a value.
#[inline(always)]
pub fn settle<const FLUSH: bool>(x: f32) -> f32 {
    if FLUSH { flush(x) } else { x }
}

/// `a ⊕ b`
#[inline(always)]
pub fn add(a: f32, b: f32) -> f32 {
    add_with::<true>(a, b)
}

/// `a ⊖ b`
#[inline(always)]
pub fn sub(a: f32, b: f32) -> f32 {
    sub_with::<true>(a, b)
}

/// `a ⊗ b`
#[inline(always)]
pub fn mul(a: f32, b: f32) -> f32 {
    mul_with::<true>(a, b)
}

/// `a ⊘ b`, correctly rounded (IEEE division is).
#[inline(always)]
pub fn div(a: f32, b: f32) -> f32 {
    div_with::<true>(a, b)
}

/// `√a`, correctly rounded.
#[inline(always)]
pub fn sqrt(a: f32) -> f32 {
    sqrt_with::<true>(a)
}

/// `a + b`, then [`settle`].
#[inline(always)]
pub fn add_with<const FLUSH: bool>(a: f32, b: f32) -> f32 {
    settle::<FLUSH>(a + b)
}

/// `a - b`, then [`settle`].
#[inline(always)]
pub fn sub_with<const FLUSH: bool>(a: f32, b: f32) -> f32 {
    settle::<FLUSH>(a - b)
}

/// `a × b`, then [`settle`].
#[inline(always)]
pub fn mul_with<const FLUSH: bool>(a: f32, b: f32) -> f32 {
    settle::<FLUSH>(a * b)
}

/// `a / b`, then [`settle`].
#[inline(always)]
pub fn div_with<const FLUSH: bool>(a: f32, b: f32) -> f32 {
    settle::<FLUSH>(a / b)
}

/// The correctly rounded square root, then [`settle`]. With the `std` feature
/// this is the compiler's square root, which vectorizes (`sqrtps`); without it,
/// `libm::sqrtf`. Both are the IEEE correctly rounded square root, so the bits
/// are the same.
#[inline(always)]
pub fn sqrt_with<const FLUSH: bool>(a: f32) -> f32 {
    #[cfg(feature = "std")]
    let r = a.sqrt();
    #[cfg(not(feature = "std"))]
    let r = libm::sqrtf(a);
    settle::<FLUSH>(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// SPEC.md §1.3 as written, the definition `flush` is checked against.
    fn flush_by_definition(x: f32) -> f32 {
        if x.to_bits() & EXP_MASK == 0 { 0.0 } else { x }
    }

    #[test]
    fn flush_matches_its_definition_for_every_exponent_and_sign() {
        let mut rng = SplitMix64::new(3);
        let edges = [0u32, 1, 2, 3, 0x3f_ffff, 0x40_0000, 0x7f_fffe, 0x7f_ffff];
        for sign in [0u32, 1 << 31] {
            for exp in 0u32..=255 {
                let random = (0..64).map(|_| rng.next_u32() & 0x7f_ffff);
                for mantissa in edges.into_iter().chain(random) {
                    let x = f32::from_bits(sign | exp << 23 | mantissa);
                    assert_eq!(flush(x).to_bits(), flush_by_definition(x).to_bits(), "{:#010x}", x.to_bits());
                }
            }
        }
    }
}
