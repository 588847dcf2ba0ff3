//! Helpers shared by the GPU cross-check tests.
#![allow(dead_code)] // each test binary uses a different subset

use gpu_shaders::{GpuContext, GpuOptions};

/// Opens the adapter the runtime would pick. No adapter is a failure, never a skip:
/// CI must run these on lavapipe.
pub fn ctx_with(opts: &GpuOptions) -> GpuContext {
    match GpuContext::new(opts) {
        Ok(c) => c,
        Err(e) => panic!(
            "no GPU adapter for the cross-check tests ({e}); install mesa-vulkan-drivers libvulkan1 (software Vulkan)"
        ),
    }
}

pub fn ctx() -> GpuContext {
    ctx_with(&GpuOptions::default())
}

/// SplitMix64: a fixed, seedable stream of test inputs.
pub struct Rng(pub u64);

impl Rng {
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
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// A finite f32 with a random sign, random significand and an exponent in
    /// [2^lo, 2^hi).
    pub fn f32_exp(&mut self, lo: i32, hi: i32) -> f32 {
        let e = lo + self.below((hi - lo) as u64) as i32;
        let bits = (((e + 127) as u32) << 23) | (self.next_u32() & 0x807f_ffff);
        f32::from_bits(bits)
    }
    /// Plain normal-ish values of magnitude around `scale`.
    pub fn f32_scaled(&mut self, scale: f32) -> f32 {
        let u = (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
        (u * 2.0 - 1.0) * scale
    }
}

/// Asserts equal bit patterns, reporting the first few differences with context.
pub fn assert_bits(what: &str, gpu: &[u32], cpu: &[u32], inputs: impl Fn(usize) -> String) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    let bad: Vec<usize> = (0..gpu.len()).filter(|&i| gpu[i] != cpu[i]).collect();
    if !bad.is_empty() {
        let mut msg = format!("{what}: {} of {} elements differ", bad.len(), gpu.len());
        for &i in bad.iter().take(8) {
            msg += &format!("\n  [{i}] gpu {:#010x} cpu {:#010x} inputs {}", gpu[i], cpu[i], inputs(i));
        }
        panic!("{msg}");
    }
}
