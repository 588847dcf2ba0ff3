//! `exp` for the CPU model, written out rather than taken from the C library.
//!
//! glibc picks its `exp` and `expf` for the CPU at load time (FMA or not) and
//! neither is correctly rounded, so a softmax's bits depended on the machine
//! and its C library. These are fixed sequences of IEEE operations (Rust never
//! contracts `a·b + c` into an FMA), so every machine gives the same bits; and
//! having no branch or table they vectorize where the model's loops call them.
//! The model's other transcendental functions run once per row or table entry
//! and are the `libm` crate's (fdlibm's algorithms, as musl): `log`, `log1p`,
//! `pow`, `sin`, `cos`.

/// `e^x` in binary32: Cephes' `expf` (reduction by ln 2 split in two parts,
/// then a degree-6 polynomial), within 2 ulp of `e^x` where that is at least
/// 2⁻¹²⁶. `+0` for `x < −87` (where `e^x < 1.7·10⁻³⁸`), `+∞` past `f32::MAX`,
/// NaN for NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.0;
    const HI: f32 = 88.73; // e^88.73 > f32::MAX: clamped inputs still overflow
    const SHIFT: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4; // 355/512: k·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LO, HI);
    let t = xc * core::f32::consts::LOG2_E + SHIFT;
    let k = t.to_bits() as i32 - SHIFT.to_bits() as i32; // -126 ..= 128
    let kf = t - SHIFT;
    let r = (xc - kf * LN2_HI) - kf * LN2_LO;
    let poly = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5) * (r * r); // Cephes' 5.0000001201e-1, rounded
    let y = (poly + r) + 1.0;
    // 2^k as two normal factors: k = 128 and k = -126 are both in range.
    let half = k >> 1;
    let scaled = y * f32::from_bits(((half + 127) as u32) << 23) * f32::from_bits(((k - half + 127) as u32) << 23);
    if x < LO { 0.0 } else { scaled }
}

/// `e^x` in binary64: fdlibm's `exp` (reduction by ln 2 split in two parts,
/// then its rational form of `e^r`) without its branches, within 1 ulp of
/// `e^x` for `x ≥ −708`. `+0` for `x < −708` (where `e^x < 3.3·10⁻³⁰⁸`),
/// `+∞` past `f64::MAX`, NaN for NaN.
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    const LO: f64 = -708.0;
    const HI: f64 = 709.79; // e^709.79 > f64::MAX
    const SHIFT: f64 = 6_755_399_441_055_744.0; // 1.5·2⁵²
    // fdlibm's constants, by their bits.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000); // 32 bits: k·LN2_HI is exact
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    const P1: f64 = f64::from_bits(0x3fc5_5555_5555_553e);
    const P2: f64 = f64::from_bits(0xbf66_c16c_16be_bd93);
    const P3: f64 = f64::from_bits(0x3f11_566a_af25_de2c);
    const P4: f64 = f64::from_bits(0xbebb_bd41_c5d2_6bf1);
    const P5: f64 = f64::from_bits(0x3e66_3769_72be_a4d0);
    let xc = x.clamp(LO, HI);
    let t = xc * core::f64::consts::LOG2_E + SHIFT;
    // t = SHIFT + k exactly, so k is the low bits of t's significand (SHIFT's are
    // zero); taken as i32, which every vector level shifts and adds.
    let k = t.to_bits() as i32; // -1021 ..= 1024
    let kf = t - SHIFT;
    let hi = xc - kf * LN2_HI;
    let lo = kf * LN2_LO;
    let r = hi - lo;
    let r2 = r * r;
    let c = r - r2 * (P1 + r2 * (P2 + r2 * (P3 + r2 * (P4 + r2 * P5))));
    let y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi);
    let half = k >> 1;
    let scaled = y * f64::from_bits(((half + 1023) as u64) << 52) * f64::from_bits(((k - half + 1023) as u64) << 52);
    if x < LO { 0.0 } else { scaled }
}

#[cfg(test)]
mod tests {
    use super::*;
    use merge_core::rng::SplitMix64;

    /// Distance in units in the last place, over the ordered bit patterns.
    fn ulps32(a: f32, b: f32) -> u32 {
        let key = |x: f32| if x.to_bits() >> 31 == 1 { -((x.to_bits() & 0x7fff_ffff) as i64) } else { x.to_bits() as i64 };
        (key(a) - key(b)).unsigned_abs() as u32
    }

    fn ulps64(a: f64, b: f64) -> u64 {
        let key = |x: f64| if x.to_bits() >> 63 == 1 { -((x.to_bits() & 0x7fff_ffff_ffff_ffff) as i128) } else { x.to_bits() as i128 };
        (key(a) - key(b)).unsigned_abs() as u64
    }

    /// Against `libm::exp` (fdlibm, under 1 ulp) in binary64, rounded.
    #[test]
    fn exp_f32_is_within_two_ulp_over_its_range() {
        let mut rng = SplitMix64::new(11);
        let mut worst = 0;
        for i in 0..2_000_000u32 {
            let x = match i % 4 {
                0 => -87.0 + rng.unit() as f32 * (88.72 + 87.0),
                1 => -(rng.unit() as f32) * 30.0, // the softmax's arguments
                2 => (rng.unit() as f32 - 0.5) * 2.0,
                _ => (rng.unit() as f32 - 0.5) * 1e-3,
            };
            let want = libm::exp(f64::from(x)) as f32;
            let got = exp_f32(x);
            worst = worst.max(ulps32(got, want));
            assert!(ulps32(got, want) <= 2, "exp_f32({x:e}) = {got:e}, e^x = {want:e}");
        }
        assert!(worst >= 1, "the comparison saw no rounding difference at all");
    }

    #[test]
    fn exp_f64_is_within_one_ulp_over_its_range() {
        let mut rng = SplitMix64::new(12);
        for i in 0..2_000_000u32 {
            let x = match i % 4 {
                0 => -708.0 + rng.unit() * (709.78 + 708.0),
                1 => -rng.unit() * 40.0,
                2 => (rng.unit() - 0.5) * 2.0,
                _ => (rng.unit() - 0.5) * 1e-9,
            };
            let (got, want) = (exp_f64(x), libm::exp(x));
            assert!(ulps64(got, want) <= 1, "exp_f64({x:e}) = {got:e}, e^x = {want:e}");
        }
    }

    #[test]
    fn edges_are_exact() {
        for (x, want) in [(0.0f32, 1.0f32), (-0.0, 1.0), (-87.5, 0.0), (f32::NEG_INFINITY, 0.0), (88.8, f32::INFINITY), (f32::INFINITY, f32::INFINITY)] {
            assert_eq!(exp_f32(x).to_bits(), want.to_bits(), "exp_f32({x})");
        }
        assert!(exp_f32(f32::NAN).is_nan());
        // The largest finite results and the smallest normal ones.
        assert!(exp_f32(88.72).is_finite() && exp_f32(88.72) > 3.3e38);
        assert!(exp_f32(-87.0) > f32::MIN_POSITIVE);
        for (x, want) in [(0.0f64, 1.0f64), (-0.0, 1.0), (-708.5, 0.0), (f64::NEG_INFINITY, 0.0), (709.8, f64::INFINITY), (f64::INFINITY, f64::INFINITY)] {
            assert_eq!(exp_f64(x).to_bits(), want.to_bits(), "exp_f64({x})");
        }
        assert!(exp_f64(f64::NAN).is_nan());
        assert!(exp_f64(709.78).is_finite() && exp_f64(709.78) > 1.7e308);
        assert!(exp_f64(-708.0) > f64::MIN_POSITIVE);
    }
}
