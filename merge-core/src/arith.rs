//! The binary32 operations of SPEC.md §1: every result passes through the flush
//! rule `F`, so no value in the merge path is ever subnormal or `-0.0`.
//! Nothing here may fuse a multiply and an add into one rounding: SPEC.md §1.2.

/// Exponent field of a binary32 value.
pub const EXP_MASK: u32 = 0x7f80_0000;

/// SPEC.md §1.3: ±0 and subnormals become `+0.0`; every other value is unchanged.
#[inline(always)]
pub fn flush(x: f32) -> f32 {
    if x.to_bits() & EXP_MASK == 0 { 0.0 } else { x }
}

/// SPEC.md §1.4: Inf or NaN, decided on the bits.
#[inline(always)]
pub fn is_non_finite(x: f32) -> bool {
    x.to_bits() & EXP_MASK == EXP_MASK
}

/// `a ⊕ b`
#[inline(always)]
pub fn add(a: f32, b: f32) -> f32 {
    flush(a + b)
}

/// `a ⊖ b`
#[inline(always)]
pub fn sub(a: f32, b: f32) -> f32 {
    flush(a - b)
}

/// `a ⊗ b`
#[inline(always)]
pub fn mul(a: f32, b: f32) -> f32 {
    flush(a * b)
}

/// `a ⊘ b`, correctly rounded (IEEE division is).
#[inline(always)]
pub fn div(a: f32, b: f32) -> f32 {
    flush(a / b)
}

/// `√a`, correctly rounded. With the `std` feature this is the compiler's square
/// root, which vectorizes (`sqrtps`); without it, `libm::sqrtf`. Both are the IEEE
/// correctly rounded square root, so the bits are the same.
#[inline(always)]
pub fn sqrt(a: f32) -> f32 {
    #[cfg(feature = "std")]
    let r = a.sqrt();
    #[cfg(not(feature = "std"))]
    let r = libm::sqrtf(a);
    flush(r)
}
