//! Storage dtypes of SPEC.md §7: binary32, bfloat16 and binary16, converted on bits.
//!
//! To binary32 the conversion is exact (then `F` applies, as to every load); from
//! binary32 it rounds to nearest, ties to even, and refuses values that overflow
//! the target format (a stored `Inf` would be a silent non-finite).

use crate::arith::{flush, is_non_finite};
use crate::error::{Error, tensor_name};

/// A storage format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }
}

/// bfloat16 bits to binary32: the 16 bits become the high half (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// binary16 bits to binary32 (exact: every binary16 value, subnormals included, is
/// a normal binary32 value or zero).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from(h >> 10) & 0x1f;
    let man = u32::from(h & 0x3ff);
    let bits = if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else if exp != 0 {
        sign | ((exp + 112) << 23) | (man << 13)
    } else if man == 0 {
        sign
    } else {
        // Subnormal: man·2^-24; normalise so the leading 1 becomes implicit.
        let shift = man.leading_zeros() - 21; // leading bit to position 10
        let m = (man << shift) & 0x3ff;
        sign | ((113 - shift) << 23) | (m << 13)
    };
    f32::from_bits(bits)
}

/// Why a binary32 value cannot be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    NonFinite,
    Overflow,
}

/// binary32 to bfloat16, round to nearest even.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> Result<u16, StoreError> {
    if is_non_finite(x) {
        return Err(StoreError::NonFinite);
    }
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if rounded & 0x7f80 == 0x7f80 {
        return Err(StoreError::Overflow);
    }
    Ok(rounded as u16)
}

/// binary32 to binary16, round to nearest even, with binary16 subnormals.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> Result<u16, StoreError> {
    if is_non_finite(x) {
        return Err(StoreError::NonFinite);
    }
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    // Unbiased exponent; binary16 normals have e in -14..=15.
    let e = exp - 127;
    let mag: u32 = if exp == 0 || e < -25 {
        // Below half the smallest binary16 subnormal (2^-24): rounds to zero.
        0
    } else if e < -14 {
        // Subnormal result: significand (with its implicit 1) shifted so that one
        // unit is 2^-24, rounded to nearest even on the dropped bits.
        let full = man | 0x80_0000;
        let shift = (-1 - e) as u32; // 13 + (-14 - e)
        let q = full >> shift;
        let rem = full & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        q + u32::from(rem > half || (rem == half && q & 1 == 1))
    } else {
        let q = (((e + 15) as u32) << 10) | (man >> 13);
        let rem = man & 0x1fff;
        q + u32::from(rem > 0x1000 || (rem == 0x1000 && q & 1 == 1))
    };
    if mag >= 0x7c00 {
        return Err(StoreError::Overflow);
    }
    Ok(sign | mag as u16)
}

/// A read-only tensor in one of the storage formats.
#[derive(Clone, Copy, Debug)]
pub enum Src<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

impl<'a> Src<'a> {
    pub fn len(&self) -> usize {
        match self {
            Src::F32(s) => s.len(),
            Src::Bf16(s) | Src::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            Src::F32(_) => Dtype::F32,
            Src::Bf16(_) => Dtype::Bf16,
            Src::F16(_) => Dtype::F16,
        }
    }

    /// Element `i`, converted and flushed.
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        flush(match self {
            Src::F32(s) => s[i],
            Src::Bf16(s) => bf16_to_f32(s[i]),
            Src::F16(s) => f16_to_f32(s[i]),
        })
    }

    /// The elements `start .. start + len`.
    pub fn slice(&self, start: usize, len: usize) -> Src<'a> {
        match *self {
            Src::F32(s) => Src::F32(&s[start..start + len]),
            Src::Bf16(s) => Src::Bf16(&s[start..start + len]),
            Src::F16(s) => Src::F16(&s[start..start + len]),
        }
    }

    /// Converts `out.len()` elements from `start` into binary32 (flushed).
    #[inline]
    pub fn load_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Src::F32(s) => {
                for (o, &x) in out.iter_mut().zip(&s[start..end]) {
                    *o = flush(x);
                }
            }
            Src::Bf16(s) => {
                for (o, &h) in out.iter_mut().zip(&s[start..end]) {
                    *o = flush(bf16_to_f32(h));
                }
            }
            Src::F16(s) => {
                for (o, &h) in out.iter_mut().zip(&s[start..end]) {
                    *o = flush(f16_to_f32(h));
                }
            }
        }
    }
}

/// A writable tensor in one of the storage formats.
#[derive(Debug)]
pub enum Dst<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
    F16(&'a mut [u16]),
}

impl Dst<'_> {
    pub fn dtype(&self) -> Dtype {
        match self {
            Dst::F32(_) => Dtype::F32,
            Dst::Bf16(_) => Dtype::Bf16,
            Dst::F16(_) => Dtype::F16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Dst::F32(s) => s.len(),
            Dst::Bf16(s) | Dst::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `x` can be stored in this format (the error says why not).
    #[inline]
    pub fn check(&self, x: f32) -> Result<(), StoreError> {
        match self {
            Dst::F32(_) => if is_non_finite(x) { Err(StoreError::NonFinite) } else { Ok(()) },
            Dst::Bf16(_) => f32_to_bf16(x).map(|_| ()),
            Dst::F16(_) => f32_to_f16(x).map(|_| ()),
        }
    }

    /// Stores `x` at `i`, converted; nothing is written when it cannot be stored.
    #[inline]
    pub fn store(&mut self, i: usize, x: f32) -> Result<(), StoreError> {
        match self {
            Dst::F32(s) => {
                if is_non_finite(x) {
                    return Err(StoreError::NonFinite);
                }
                s[i] = x;
            }
            Dst::Bf16(s) => s[i] = f32_to_bf16(x)?,
            Dst::F16(s) => s[i] = f32_to_f16(x)?,
        }
        Ok(())
    }
}

/// The error for a value that cannot be stored in `dtype`.
pub fn store_error(name: &str, what: &'static str, index: u64, e: StoreError, dtype: Dtype) -> Error {
    match e {
        StoreError::NonFinite => Error::NonFinite { tensor: tensor_name(name), what, index },
        StoreError::Overflow => Error::StorageOverflow { tensor: tensor_name(name), what, index, dtype },
    }
}

/// Runs `value` for every element of `out` twice: first to validate every input
/// and result (so a failing chunk writes nothing), then to store. `offset` is the
/// chunk's start in the whole tensor, for the index an error names.
pub(crate) fn write_all(
    name: &str,
    what: &'static str,
    offset: u64,
    out: &mut Dst<'_>,
    value: impl Fn(usize) -> Result<f32, Error>,
) -> Result<(), Error> {
    let dtype = out.dtype();
    let fail = |e: StoreError, j: usize| store_error(name, what, offset + j as u64, e, dtype);
    for j in 0..out.len() {
        let x = value(j)?;
        out.check(x).map_err(|e| fail(e, j))?;
    }
    for j in 0..out.len() {
        let x = value(j)?;
        out.store(j, x).map_err(|e| fail(e, j))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use half::{bf16, f16};

    #[test]
    fn widening_agrees_with_half_on_all_patterns() {
        for h in 0..=u16::MAX {
            let a = bf16_to_f32(h);
            let b = bf16::from_bits(h).to_f32();
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "bf16 {h:#06x}");
            let a = f16_to_f32(h);
            let b = f16::from_bits(h).to_f32();
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "f16 {h:#06x}");
        }
    }

    #[test]
    fn narrowing_round_trips_every_finite_pattern() {
        for h in 0..=u16::MAX {
            let x = bf16_to_f32(h);
            if x.is_finite() {
                assert_eq!(f32_to_bf16(x), Ok(h), "bf16 {h:#06x}");
            }
            let x = f16_to_f32(h);
            if x.is_finite() {
                assert_eq!(f32_to_f16(x), Ok(h), "f16 {h:#06x}");
            }
        }
    }

    fn check_against_half(x: f32) {
        match f32_to_bf16(x) {
            Ok(h) => assert_eq!(h, bf16::from_f32(x).to_bits(), "bf16 of {:#010x}", x.to_bits()),
            Err(StoreError::Overflow) => assert!(bf16::from_f32(x).is_infinite(), "{x}"),
            Err(StoreError::NonFinite) => assert!(!x.is_finite()),
        }
        match f32_to_f16(x) {
            Ok(h) => assert_eq!(h, f16::from_f32(x).to_bits(), "f16 of {:#010x}", x.to_bits()),
            Err(StoreError::Overflow) => assert!(f16::from_f32(x).is_infinite(), "{x}"),
            Err(StoreError::NonFinite) => assert!(!x.is_finite()),
        }
    }

    #[test]
    fn narrowing_agrees_with_half_on_ties_edges_and_random_inputs() {
        // bf16: the exact midpoint between neighbours h and h+1 is h's pattern + 0x8000.
        for h in 0..0x7f80u16 {
            let mid = bf16_to_f32(h).to_bits() + 0x8000;
            for x in [mid - 1, mid, mid + 1] {
                check_against_half(f32::from_bits(x));
                check_against_half(-f32::from_bits(x));
            }
        }
        // f16 midpoints (13 dropped bits) including subnormal results.
        for h in 0..0x7c00u16 {
            let lo = f16_to_f32(h);
            let hi = f16_to_f32(h + 1);
            let mid = (f64::from(lo) + f64::from(hi)) / 2.0;
            let m = mid as f32; // exact: the midpoint needs one more bit than f16 has
            for x in [m, f32::from_bits(m.to_bits() + 1), f32::from_bits(m.to_bits() - 1)] {
                check_against_half(x);
                check_against_half(-x);
            }
        }
        let edges = [
            0.0f32, -0.0, f32::MIN_POSITIVE, f32::from_bits(1), f32::MAX, -f32::MAX,
            65504.0, 65519.99, 65520.0, 3.3895e38, 5.96e-8, 2.98e-8, 2.9802322e-8,
            f32::INFINITY, f32::NAN,
        ];
        for x in edges {
            check_against_half(x);
        }
        let mut rng = SplitMix64::new(11);
        for _ in 0..2_000_000 {
            check_against_half(f32::from_bits(rng.next_u32()));
        }
    }

    #[test]
    fn overflow_and_non_finite_are_refused() {
        assert_eq!(f32_to_f16(65520.0), Err(StoreError::Overflow));
        assert_eq!(f32_to_f16(65519.996), Ok(0x7bff));
        assert_eq!(f32_to_bf16(f32::MAX), Err(StoreError::Overflow));
        assert_eq!(f32_to_bf16(f32::NAN), Err(StoreError::NonFinite));
        assert_eq!(f32_to_f16(f32::NEG_INFINITY), Err(StoreError::NonFinite));
        // The smallest f16 subnormal, and half of it (a tie, rounds to even zero).
        assert_eq!(f32_to_f16(5.9604645e-8), Ok(1));
        assert_eq!(f32_to_f16(2.9802322e-8), Ok(0));
        assert_eq!(f32_to_f16(2.9802326e-8), Ok(1));
    }

    #[test]
    fn loads_flush_bf16_subnormals_but_not_f16_subnormals() {
        let bf = [0x0001u16, 0x8000, 0x3f80];
        let src = Src::Bf16(&bf);
        assert_eq!(src.get(0).to_bits(), 0);
        assert_eq!(src.get(1).to_bits(), 0);
        assert_eq!(src.get(2), 1.0);
        let hf = [0x0001u16];
        assert_eq!(Src::F16(&hf).get(0), 5.9604645e-8);
    }
}
