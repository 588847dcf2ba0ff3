//! merge-core's step at the widest vector instructions this CPU has.
//!
//! merge-core is `no_std` and free of `unsafe`, so it cannot look at the CPU
//! or call its [`merge_core::isa`] copies of the chunk passes (compiled with
//! AVX2 or AVX-512F enabled) from code compiled without them. This crate does
//! both: [`Cpu`] is a [`ChunkPasses`] that runs the widest copy the CPU
//! supports, found at run time, for [`merge_core::parallel::step_tensors`] (on
//! threads) and [`merge_core::optim::StepPlan::step_tensors_with`] (on the
//! caller's thread). So a binary built for baseline x86-64 (SSE2 only) still
//! uses the CPU's full vector width. The bits are the portable build's at every
//! level (merge-core's isa module says why; this crate's tests compare them).
//! On other architectures there is one level, the build's own (NEON on
//! aarch64).

use merge_core::Error;
use merge_core::dtype::Src;
use merge_core::step::{AtLeast, ChunkPasses, Norms, Portable, StateBounds, StateMut, StateRef, TensorStep};
use merge_core::topk::{Candidate, RadixSelect};

/// A set of vector instructions, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// What the build targets: SSE2 on x86-64, NEON on aarch64.
    Baseline = 0,
    /// x86-64 with AVX2 (256-bit vectors).
    Avx2 = 1,
    /// x86-64 with AVX-512F (512-bit vectors).
    Avx512 = 2,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Baseline, Level::Avx2, Level::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// The level named `baseline`, `avx2` or `avx512`.
    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s)
    }

    /// The widest level this CPU supports.
    pub fn detected() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Level::Avx2;
            }
        }
        Level::Baseline
    }
}

/// The chunk passes at a level this CPU supports. The constructors are the only
/// way to get one, which is what makes calling the wider copies sound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    level: Level,
}

impl Cpu {
    /// The widest level this CPU supports.
    pub fn detect() -> Cpu {
        Cpu { level: Level::detected() }
    }

    /// The widest level this CPU supports, capped at `limit` (to compare levels;
    /// the bits are the same at each).
    pub fn at_most(limit: Level) -> Cpu {
        Cpu { level: Level::detected().min(limit) }
    }

    /// The level the passes run at.
    pub fn level(self) -> Level {
        self.level
    }
}

// SAFETY (every `unsafe` below): a `Cpu` holds a level no wider than
// `Level::detected()`, and each `isa` copy is called only at its own level, so
// the CPU has the features the copy was compiled with.
impl ChunkPasses for Cpu {
    fn scan_chunk(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>, norms: Option<&mut Norms>, delta_out: Option<&mut [f32]>) -> Result<u32, Error> {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { merge_core::isa::avx512::scan_chunk(step, offset, grad, state, tau, norms, delta_out) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { merge_core::isa::avx2::scan_chunk(step, offset, grad, state, tau, norms, delta_out) },
            _ => Portable.scan_chunk(step, offset, grad, state, tau, norms, delta_out),
        }
    }

    fn check_chunk(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>) -> Result<(), Error> {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { merge_core::isa::avx512::check_chunk(step, offset, grad, state, tau) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { merge_core::isa::avx2::check_chunk(step, offset, grad, state, tau) },
            _ => Portable.check_chunk(step, offset, grad, state, tau),
        }
    }

    fn write_chunk(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, stored: Option<&mut StateBounds>) -> Result<(), Error> {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { merge_core::isa::avx512::write_chunk(step, offset, grad, state, tau, stored) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { merge_core::isa::avx2::write_chunk(step, offset, grad, state, tau, stored) },
            _ => Portable.write_chunk(step, offset, grad, state, tau, stored),
        }
    }

    fn check_chunk_from_update(&self, step: &TensorStep<'_>, offset: u64, state: StateRef<'_>, tau: Src<'_>, update: &[f32]) -> Result<(), Error> {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { merge_core::isa::avx512::check_chunk_from_update(step, offset, state, tau, update) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { merge_core::isa::avx2::check_chunk_from_update(step, offset, state, tau, update) },
            _ => Portable.check_chunk_from_update(step, offset, state, tau, update),
        }
    }

    fn write_chunk_from_update(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, update: &[f32], stored: Option<&mut StateBounds>) -> Result<(), Error> {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { merge_core::isa::avx512::write_chunk_from_update(step, offset, grad, state, tau, update, stored) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { merge_core::isa::avx2::write_chunk_from_update(step, offset, grad, state, tau, update, stored) },
            _ => Portable.write_chunk_from_update(step, offset, grad, state, tau, update, stored),
        }
    }

    fn radix_feed(&self, radix: &mut RadixSelect, offset: u64, values: &[f32]) -> Result<(), Error> {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { merge_core::isa::avx512::radix_feed(radix, offset, values) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { merge_core::isa::avx2::radix_feed(radix, offset, values) },
            _ => Portable.radix_feed(radix, offset, values),
        }
    }

    fn radix_gather(&self, radix: &RadixSelect, offset: u64, values: &[f32], out: &mut [Candidate]) -> Result<Option<usize>, Error> {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { merge_core::isa::avx512::radix_gather(radix, offset, values, out) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { merge_core::isa::avx2::radix_gather(radix, offset, values, out) },
            _ => Portable.radix_gather(radix, offset, values, out),
        }
    }

    fn scan_chunk_at_least(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>, bound: u32, out: &mut [Candidate]) -> Result<Option<AtLeast>, Error> {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { merge_core::isa::avx512::scan_chunk_at_least(step, offset, grad, state, tau, bound, out) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { merge_core::isa::avx2::scan_chunk_at_least(step, offset, grad, state, tau, bound, out) },
            _ => Portable.scan_chunk_at_least(step, offset, grad, state, tau, bound, out),
        }
    }

    fn largest_bits(&self, values: &[f32], mask: u32) -> u32 {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { merge_core::isa::avx512::largest_bits(values, mask) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { merge_core::isa::avx2::largest_bits(values, mask) },
            _ => Portable.largest_bits(values, mask),
        }
    }
}
