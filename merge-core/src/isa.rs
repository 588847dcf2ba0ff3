//! The chunk passes of [`crate::step::TensorStep`] that the whole-tensor entries run,
//! the check pass's whole-chunk bound, and the OnTIES radix select's counting and gathering
//! ([`crate::topk::RadixSelect::feed_values`], [`crate::topk::RadixSelect::gather_candidates`]),
//! compiled again for wider x86-64 vector instructions, with the same bits.
//!
//! A default x86-64 build may only use 128-bit SSE2. The functions here are the
//! same passes with AVX2 or AVX-512F enabled, so the compiler handles 8 or 16
//! elements per instruction. No bit changes: every operation is IEEE binary32
//! (correctly rounded `+ − × ÷ √`, the flush rule on the bits), in the order
//! the code writes, and Rust never fuses a multiply and an add into an FMA, so a
//! wider register only holds more elements. Tests in the `merge-simd` crate run
//! every pass at every level the CPU has and compare the bits with the
//! portable build.
//!
//! They are safe functions, but Rust lets only code compiled with the same
//! features call them without `unsafe`, and this crate has none: a caller
//! checks that the CPU has the features and then calls them (`merge-simd` does
//! that, and implements [`crate::step::ChunkPasses`] with them).

#[cfg(target_arch = "x86_64")]
macro_rules! passes_for {
    ($level:ident, $features:literal, $what:literal) => {
        #[doc = concat!("The chunk passes with ", $what, " enabled; call only on a CPU that has it.")]
        pub mod $level {
            use crate::Error;
            use crate::dtype::Src;
            use crate::step::{AtLeast, Norms, StateBounds, StateMut, StateRef, TensorStep};
            use crate::topk::{Candidate, RadixSelect};

            /// [`TensorStep::scan_chunk`].
            ///
            /// # Safety
            /// The CPU must have the features named in the attribute.
            #[target_feature(enable = $features)]
            pub fn scan_chunk(step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>, norms: Option<&mut Norms>, delta_out: Option<&mut [f32]>) -> Result<u32, Error> {
                step.scan_chunk(offset, grad, state, tau, norms, delta_out)
            }

            /// [`TensorStep::check_chunk`].
            ///
            /// # Safety
            /// The CPU must have the features named in the attribute.
            #[target_feature(enable = $features)]
            pub fn check_chunk(step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>) -> Result<(), Error> {
                step.check_chunk(offset, grad, state, tau)
            }

            /// [`TensorStep::write_chunk_prefetching`] with the CPU's prefetch.
            ///
            /// # Safety
            /// The CPU must have the features named in the attribute.
            #[target_feature(enable = $features)]
            pub fn write_chunk(step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, stored: Option<&mut StateBounds>) -> Result<(), Error> {
                // A closure in a `target_feature` function has its features,
                // so it may call `prefetch` without `unsafe`.
                step.write_chunk_prefetching(offset, grad, state, tau, |values: &[f32]| super::prefetch(values), stored)
            }

            /// [`TensorStep::check_chunk_from_update`].
            ///
            /// # Safety
            /// The CPU must have the features named in the attribute.
            #[target_feature(enable = $features)]
            pub fn check_chunk_from_update(step: &TensorStep<'_>, offset: u64, state: StateRef<'_>, tau: Src<'_>, update: &[f32]) -> Result<(), Error> {
                step.check_chunk_from_update(offset, state, tau, update)
            }

            /// [`TensorStep::write_chunk_from_update`].
            ///
            /// # Safety
            /// The CPU must have the features named in the attribute.
            #[target_feature(enable = $features)]
            pub fn write_chunk_from_update(step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, update: &[f32], stored: Option<&mut StateBounds>) -> Result<(), Error> {
                step.write_chunk_from_update(offset, grad, state, tau, update, stored)
            }

            /// [`RadixSelect::feed_values`].
            ///
            /// # Safety
            /// The CPU must have the features named in the attribute.
            #[target_feature(enable = $features)]
            pub fn radix_feed(radix: &mut RadixSelect, offset: u64, values: &[f32]) -> Result<(), Error> {
                radix.feed_values(offset, values)
            }

            /// [`RadixSelect::gather_candidates`].
            ///
            /// # Safety
            /// The CPU must have the features named in the attribute.
            #[target_feature(enable = $features)]
            pub fn radix_gather(radix: &RadixSelect, offset: u64, values: &[f32], out: &mut [Candidate]) -> Result<Option<usize>, Error> {
                radix.gather_candidates(offset, values, out)
            }

            /// [`TensorStep::scan_chunk_at_least`].
            ///
            /// # Safety
            /// The CPU must have the features named in the attribute.
            #[target_feature(enable = $features)]
            pub fn scan_chunk_at_least(step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>, bound: u32, out: &mut [Candidate]) -> Result<Option<AtLeast>, Error> {
                step.scan_chunk_at_least(offset, grad, state, tau, bound, out)
            }

            /// [`crate::step::ChunkPasses::largest_bits`].
            ///
            /// # Safety
            /// The CPU must have the features named in the attribute.
            #[target_feature(enable = $features)]
            pub fn largest_bits(values: &[f32], mask: u32) -> u32 {
                crate::finite::largest_bits(values, mask)
            }
        }
    };
}

/// Asks the CPU to bring `values` into its first-level cache: a hint, which
/// reads nothing a program sees and changes no value. The writing pass asks it
/// for a block a few blocks ahead. A block's loads otherwise all wait on memory
/// once its arithmetic is done (the hardware prefetchers only follow the loads,
/// and there are none during the arithmetic): about 5% of a one-thread OnDARE
/// step over 16M elements on a Zen 5 core.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse")]
fn prefetch(values: &[f32]) {
    // One request per 64-byte line.
    for line in values.chunks(16) {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast());
    }
}

#[cfg(target_arch = "x86_64")]
passes_for!(avx2, "avx2", "AVX2 (256-bit vectors)");
#[cfg(target_arch = "x86_64")]
passes_for!(avx512, "avx512f", "AVX-512F (512-bit vectors)");
