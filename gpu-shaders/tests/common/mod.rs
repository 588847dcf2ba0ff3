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

pub use merge_core::rng::SplitMix64;

use gpu_shaders::optim::{StoredTau, TaskInput, task_vectors};
use merge_core::dtype::{Dtype, Src};
use merge_core::optim::{Merge, OnlineConfig};

/// Each tensor's values as merge-core's binary32 source.
pub fn f32_srcs(tensors: &[Vec<f32>]) -> Vec<Src<'_>> {
    tensors.iter().map(|t| Src::F32(t)).collect()
}

/// `τ'` of each tensor as `config` merges them (none for plain AdamW), computed
/// once by merge-core as the trainer does, stored as `dtype`.
pub fn taus(config: OnlineConfig, names: &[&str], base: &[Src<'_>], sft: &[Src<'_>], dtype: Dtype) -> Vec<Option<StoredTau>> {
    if matches!(config.merge, Merge::None) {
        return names.iter().map(|_| None).collect();
    }
    let inputs: Vec<TaskInput> = (0..names.len()).map(|i| TaskInput { name: names[i], base: base[i], sft: sft[i], dtype }).collect();
    task_vectors(config, &inputs).unwrap().into_iter().map(Some).collect()
}

/// Test-input distributions over the workspace's one SplitMix64.
pub trait TestInputs {
    /// A finite f32 with a random sign, random significand and an exponent in
    /// [2^lo, 2^hi).
    fn f32_exp(&mut self, lo: i32, hi: i32) -> f32;
}

impl TestInputs for SplitMix64 {
    fn f32_exp(&mut self, lo: i32, hi: i32) -> f32 {
        let e = lo + self.below((hi - lo) as u64) as i32;
        let bits = (((e + 127) as u32) << 23) | (self.next_u32() & 0x807f_ffff);
        f32::from_bits(bits)
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
