//! A small deterministic generator for tests (SplitMix64), so property tests are
//! reproducible without a dev-dependency.

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in [-1, 1).
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }

    /// Random sign, significand and an exponent in 2^-20 .. 2^20.
    pub fn wide_f32(&mut self) -> f32 {
        let r = self.next_u32();
        let exp = 127 - 20 + (r % 41);
        f32::from_bits((r & 0x8000_0000) | (exp << 23) | (self.next_u32() >> 9))
    }
}
