//! The counter-based random generator of SPEC.md §2: tensor identities,
//! Threefry-2x32-20, per-(tensor, step) mask keys and the integer keep decision.
//! Only `u32` wrapping arithmetic, rotations and xors, so WGSL can mirror it.

use crate::error::{Error, tensor_name};

/// SPEC.md §2.1: FNV-1a-32 over the UTF-8 bytes of a tensor's name.
pub fn tensor_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in name.as_bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

const ROT: [u32; 8] = [13, 15, 26, 6, 17, 29, 16, 24];
const SKEIN_PARITY: u32 = 0x1BD1_1BDA;

/// SPEC.md §2.2: Threefry-2x32 with 20 rounds (Random123's `threefry2x32_R(20, ctr, key)`).
#[inline(always)]
pub fn threefry2x32_20(key: [u32; 2], ctr: [u32; 2]) -> [u32; 2] {
    let [out] = threefry2x32_20_lanes(key, [ctr]);
    out
}

/// [`threefry2x32_20`] of `N` counters under one key, round by round in
/// lockstep: the same bits as `N` calls. Each round depends on the one before,
/// so one block is a chain of dependent operations; several independent chains
/// side by side give the CPU work to issue while each waits (two chains per
/// iteration of a vectorized loop about double its throughput).
#[inline(always)]
pub fn threefry2x32_20_lanes<const N: usize>(key: [u32; 2], ctrs: [[u32; 2]; N]) -> [[u32; 2]; N] {
    let ks = [key[0], key[1], SKEIN_PARITY ^ key[0] ^ key[1]];
    let mut x0 = ctrs.map(|c| c[0].wrapping_add(ks[0]));
    let mut x1 = ctrs.map(|c| c[1].wrapping_add(ks[1]));
    // Five groups of four rounds, each followed by a key injection; written out so
    // the rotation amounts are constants and the loop body vectorizes.
    macro_rules! round {
        ($r:expr) => {
            for i in 0..N {
                x0[i] = x0[i].wrapping_add(x1[i]);
            }
            for i in 0..N {
                x1[i] = x1[i].rotate_left($r) ^ x0[i];
            }
        };
    }
    macro_rules! group {
        ($r0:expr, $r1:expr, $r2:expr, $r3:expr, $j:expr) => {
            round!($r0);
            round!($r1);
            round!($r2);
            round!($r3);
            for i in 0..N {
                x0[i] = x0[i].wrapping_add(ks[$j % 3]);
                x1[i] = x1[i].wrapping_add(ks[($j + 1) % 3]).wrapping_add($j);
            }
        };
    }
    group!(ROT[0], ROT[1], ROT[2], ROT[3], 1);
    group!(ROT[4], ROT[5], ROT[6], ROT[7], 2);
    group!(ROT[0], ROT[1], ROT[2], ROT[3], 3);
    group!(ROT[4], ROT[5], ROT[6], ROT[7], 4);
    group!(ROT[0], ROT[1], ROT[2], ROT[3], 5);
    core::array::from_fn(|i| [x0[i], x1[i]])
}

/// Mask streams of SPEC.md §2.3.
pub mod stream {
    /// The update mask `M_k` (and the reference mask `M_ref` at step 0).
    pub const UPDATE: u32 = 0;
    /// The per-step mask of `τ` in the paper variant of OnDARE.
    pub const TAU_PAPER: u32 = 1;
    /// The DARE mask of model `j` in offline merges is stream `OFFLINE_BASE + j`.
    pub const OFFLINE_BASE: u32 = 2;
}

/// The key of one tensor's masks at one step (SPEC.md §2.3), computed once per
/// (tensor, step) so that each element costs one Threefry block per pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskKey(pub [u32; 2]);

impl MaskKey {
    /// `step` is 1-based; 0 is the once-drawn reference mask.
    pub fn new(seed: u64, tensor: u32, step: u32) -> Self {
        MaskKey(threefry2x32_20([seed as u32, (seed >> 32) as u32], [tensor, step]))
    }

    /// The uniforms of elements `2·pair` (first) and `2·pair + 1` (second).
    #[inline(always)]
    pub fn pair(&self, pair: u32, stream: u32) -> [u32; 2] {
        threefry2x32_20(self.0, [pair, stream])
    }

    /// [`MaskKey::pair`] of pairs `a` and `b`, computed side by side
    /// ([`threefry2x32_20_lanes`]).
    #[inline(always)]
    pub fn two_pairs(&self, a: u32, b: u32, stream: u32) -> [[u32; 2]; 2] {
        threefry2x32_20_lanes(self.0, [[a, stream], [b, stream]])
    }

    /// The uniform of element `index` (its index in the full tensor).
    #[inline(always)]
    pub fn uniform(&self, index: u32, stream: u32) -> u32 {
        self.pair(index >> 1, stream)[(index & 1) as usize]
    }
}

/// SPEC.md §2.4: the integer keep decision for a keep probability `p ∈ (0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep {
    threshold: u32,
    all: bool,
}

impl Keep {
    /// Keeps every element (`p = 1`).
    pub const ALL: Keep = Keep { threshold: 0, all: true };

    /// `p` is the binary32 keep probability; `p = 1` keeps every element.
    pub fn new(p: f32) -> Result<Self, Error> {
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::InvalidHyperparameter {
                name: "p (reserve rate)",
                value: f64::from(p),
                expected: "0 < p <= 1",
            });
        }
        if p == 1.0 {
            return Ok(Keep::ALL);
        }
        // p < 1, so p·2^32 < 2^32 is exact in binary64 and its floor fits a u32.
        let t = libm::floor(f64::from(p) * 4_294_967_296.0) as u32;
        Ok(Keep { threshold: t, all: false })
    }

    /// `T = ⌊p·2^32⌋`, or `None` when every element is kept.
    pub fn threshold(&self) -> Option<u32> {
        if self.all { None } else { Some(self.threshold) }
    }

    /// Whether an element with uniform `u` is kept (branchless).
    #[inline(always)]
    pub fn keeps(&self, u: u32) -> bool {
        self.all | (u < self.threshold)
    }
}

/// Largest tensor the generator can address: element indices are `u32` (SPEC.md §2.3).
pub const MAX_TENSOR_LEN: u64 = 1 << 32;

/// Refuses a chunk that reaches past index `2^32 − 1`.
pub fn check_extent(name: &str, offset: u64, len: usize) -> Result<(), Error> {
    let end = offset.saturating_add(len as u64);
    if end > MAX_TENSOR_LEN {
        return Err(Error::OutOfRange {
            tensor: tensor_name(name),
            what: "element index",
            value: end - 1,
            limit: MAX_TENSOR_LEN - 1,
        });
    }
    Ok(())
}

/// SplitMix64 (Steele, Lea, Flood 2014; Vigna's `splitmix64.c`): a tiny, fully
/// specified 64-bit generator for test inputs and generated data (the host's
/// built-in data set, model initialization, the golden cases' inputs, benches).
///
/// It is **not** part of the optimizer's arithmetic: masks are drawn from the
/// counter-based Threefry generator above (SPEC.md §2), never from this. It is
/// here so that every crate draws its inputs from one definition and the same
/// seed gives the same values everywhere.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The high 32 bits of [`SplitMix64::next_u64`].
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in `0..n` by rejection, so no value is favoured (a draw is
    /// rejected with probability below `n / 2^64`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// One of `items`, uniformly ([`SplitMix64::below`]).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `(2u − 1) · scale` with `u` uniform in `[0, 1)` on 24 bits: in
    /// `[−scale, scale)`, every step exact but the last product.
    pub fn uniform_f32(&mut self, scale: f32) -> f32 {
        let u = (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
        (2.0 * u - 1.0) * scale
    }

    /// A finite binary32 with random sign and significand and a biased exponent
    /// in `[lo, hi]` (0 gives subnormals and zeros, 254 the largest binade), all
    /// from one draw.
    pub fn spread_f32(&mut self, lo: u32, hi: u32) -> f32 {
        let r = self.next_u64();
        let exp = lo + (r as u32 % (hi - lo + 1));
        let sig = (r >> 32) as u32 & 0x007f_ffff;
        let sign = ((r >> 63) as u32) << 31;
        f32::from_bits(sign | exp << 23 | sig)
    }

    /// Standard normal by Box–Muller (the host model's initialization), with
    /// fdlibm's `log` and `cos` (`libm`): the same bits on every platform.
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        libm::sqrt(-2.0 * libm::log(u1)) * libm::cos(core::f64::consts::TAU * u2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threefry_known_answers() {
        // Random123 kat_vectors, "threefry2x32 20" lines: ctr ctr key key -> out out.
        assert_eq!(threefry2x32_20([0, 0], [0, 0]), [0x6b20_0159, 0x99ba_4efe]);
        assert_eq!(
            threefry2x32_20([u32::MAX, u32::MAX], [u32::MAX, u32::MAX]),
            [0x1cb9_96fc, 0xbb00_2be7]
        );
        assert_eq!(
            threefry2x32_20([0x1319_8a2e, 0x0370_7344], [0x243f_6a88, 0x85a3_08d3]),
            [0xc492_3a9c, 0x483d_f7a0]
        );
    }

    #[test]
    fn two_chains_give_the_bits_of_two_calls() {
        // The known answers' keys and counters, then drawn ones.
        let mut cases = [[0u32; 4]; 3].to_vec();
        cases[1] = [u32::MAX; 4];
        cases[2] = [0x1319_8a2e, 0x0370_7344, 0x243f_6a88, 0x85a3_08d3];
        let mut r = SplitMix64::new(11);
        cases.extend((0..10_000).map(|_| {
            let (x, y) = (r.next_u64(), r.next_u64());
            [x as u32, (x >> 32) as u32, y as u32, (y >> 32) as u32]
        }));
        for w in cases.windows(2) {
            let ([k0, k1, a0, a1], [_, _, b0, b1]) = (w[0], w[1]);
            let [a, b] = threefry2x32_20_lanes([k0, k1], [[a0, a1], [b0, b1]]);
            assert_eq!(a, threefry2x32_20([k0, k1], [a0, a1]));
            assert_eq!(b, threefry2x32_20([k0, k1], [b0, b1]));
        }
    }

    #[test]
    fn fnv1a_known_answers() {
        // Published FNV-1a-32 test values.
        assert_eq!(tensor_id(""), 0x811c_9dc5);
        assert_eq!(tensor_id("a"), 0xe40c_292c);
        assert_eq!(tensor_id("foobar"), 0xbf9c_f968);
    }

    #[test]
    fn uniform_picks_the_half_of_the_pair() {
        let key = MaskKey::new(0x0123_4567_89ab_cdef, tensor_id("w"), 3);
        for i in [0u32, 1, 2, 7, 1000, u32::MAX - 1, u32::MAX] {
            let pair = key.pair(i >> 1, 0);
            assert_eq!(key.uniform(i, 0), pair[(i & 1) as usize]);
        }
        // Streams, steps and tensors give different keys.
        assert_ne!(key.uniform(5, 0), key.uniform(5, 1));
        assert_ne!(key, MaskKey::new(0x0123_4567_89ab_cdef, tensor_id("w"), 4));
        assert_ne!(key, MaskKey::new(0x0123_4567_89ab_cdef, tensor_id("v"), 3));
    }

    #[test]
    fn keep_threshold_edges() {
        assert_eq!(Keep::new(1.0).unwrap().threshold(), None);
        assert!(Keep::new(1.0).unwrap().keeps(u32::MAX));
        assert_eq!(Keep::new(0.5).unwrap().threshold(), Some(1 << 31));
        let k = Keep::new(0.5).unwrap();
        assert!(k.keeps((1 << 31) - 1) && !k.keeps(1 << 31));
        // Largest p below 1: T = 2^32 − 256.
        let below_one = f32::from_bits(0x3f7f_ffff);
        assert_eq!(Keep::new(below_one).unwrap().threshold(), Some(u32::MAX - 255));
        // Tiny p: T = 0 keeps nothing (p < 2^-32).
        assert_eq!(Keep::new(1e-12).unwrap().threshold(), Some(0));
        assert_eq!(Keep::new(f32::from_bits(1) ).unwrap().threshold(), Some(0));
        for bad in [0.0, -0.5, 1.5, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                Keep::new(bad),
                Err(Error::InvalidHyperparameter { name: "p (reserve rate)", .. })
            ));
        }
    }

    #[test]
    fn keep_fraction_is_p_over_a_million_elements() {
        let n = 1u32 << 20;
        for p in [0.01f32, 0.3, 0.9] {
            let keep = Keep::new(p).unwrap();
            let key = MaskKey::new(42, tensor_id("layers.0.mlp.up_proj.weight"), 1);
            let kept = (0..n).filter(|&i| keep.keeps(key.uniform(i, 0))).count() as f64;
            let mean = f64::from(p) * f64::from(n);
            let sd = libm::sqrt(mean * (1.0 - f64::from(p)));
            // Six standard deviations: a correct generator fails this with probability ~2e-9.
            assert!((kept - mean).abs() < 6.0 * sd, "p={p}: kept {kept}, expected {mean}±{sd}");
        }
    }

    #[test]
    fn splitmix64_matches_the_published_values() {
        // splitmix64.c seeded with 0 (Vigna), as host's data set pins.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(r.next_u64(), 0x06c4_5d18_8009_454f);
    }

    /// Box–Muller as written, against the platform's own `ln` and `cos` (which
    /// may differ in the last bit), and the first moments of many draws.
    #[test]
    fn normals_follow_box_muller_and_the_standard_normal() {
        let (mut r, mut twin) = (SplitMix64::new(5), SplitMix64::new(5));
        let (mut sum, mut sq) = (0.0, 0.0);
        let n = 200_000;
        for _ in 0..n {
            let x = r.next_normal();
            let (u1, u2) = (1.0 - twin.unit(), twin.unit());
            let want = (-2.0 * u1.ln()).sqrt() * (core::f64::consts::TAU * u2).cos();
            assert!((x - want).abs() <= 1e-15 * want.abs().max(1.0), "{x} against {want}");
            sum += x;
            sq += x * x;
        }
        let mean = sum / n as f64;
        assert!(mean.abs() < 0.01 && (sq / n as f64 - mean * mean - 1.0).abs() < 0.01);
    }

    #[test]
    fn extent_limit_names_the_tensor() {
        assert!(check_extent("t", MAX_TENSOR_LEN - 4, 4).is_ok());
        let err = check_extent("t", MAX_TENSOR_LEN - 4, 5).unwrap_err();
        assert!(matches!(err, Error::OutOfRange { ref tensor, .. } if tensor.as_str() == "t"));
    }
}
