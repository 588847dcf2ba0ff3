//! The step uniform (`StepU` of step.wgsl) and the constants step.wgsl shares
//! with Rust: kernel kinds, pass numbers and the histogram and status sizes,
//! prepended to the WGSL so the two cannot drift.

use merge_core::dare::DareVariant;
use merge_core::hyper::AdamForm;
use merge_core::onties;
use merge_core::step::{MergePlan, Phase};
use merge_core::topk::{Pass, Threshold};

use super::buffers::Slot;

/// The element kernel a chunk runs (`U.kind` in step.wgsl).
pub(super) mod kind {
    pub const PLAIN: u32 = 0;
    pub const DARE_REF: u32 = 1;
    pub const DARE_PAPER: u32 = 2;
    pub const TIES: u32 = 3;
}

/// The passes of step.wgsl: `mode` of `step_main` for the first three, and the
/// index of each pass's kernel in `GpuOptimizer::kernels`.
pub(super) mod pass {
    pub const SCAN: usize = 0;
    pub const CHECK: usize = 1;
    pub const WRITE: usize = 2;
    pub const HIST: usize = 3;
    pub const GNORM: usize = 4;
}

/// step.wgsl's constants, from the Rust ones above so the two cannot drift.
pub(super) fn step_wgsl_constants() -> String {
    format!(
        "const HIST_ITEMS: u32 = {HIST_ITEMS}u;\n\
         const PLAIN: u32 = {}u;\nconst DARE_REF: u32 = {}u;\nconst DARE_PAPER: u32 = {}u;\nconst TIES: u32 = {}u;\n\
         const SCAN: u32 = {}u;\nconst CHECK: u32 = {}u;\nconst WRITE: u32 = {}u;\n",
        kind::PLAIN,
        kind::DARE_REF,
        kind::DARE_PAPER,
        kind::TIES,
        pass::SCAN,
        pass::CHECK,
        pass::WRITE
    )
}
/// Elements each invocation of the histogram pass counts (one workgroup clears
/// and flushes 2048 shared counters per 16 × 256 elements).
pub(super) const HIST_ITEMS: u32 = 16;

/// Status words per tensor (`NCODES` in step.wgsl).
pub(super) const NCODES: usize = 16;

/// The step uniform of step.wgsl (`StepU`), 32 words.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Default)]
pub(super) struct StepU {
    pub(super) zero: u32,
    pub(super) n: u32,
    pub(super) start: u32,
    pub(super) block0: u32,
    pub(super) k0: u32,
    pub(super) k1: u32,
    pub(super) threshold: u32,
    pub(super) keep_all: u32,
    pub(super) kind: u32,
    pub(super) torch: u32,
    pub(super) accumulate: u32,
    pub(super) has_cached: u32,
    pub(super) tau_dtype: u32,
    pub(super) do_rescale: u32,
    pub(super) slot: u32,
    pub(super) nb_total: u32,
    pub(super) beta1: f32,
    pub(super) beta2: f32,
    pub(super) c1: f32,
    pub(super) c2: f32,
    pub(super) eps: f32,
    pub(super) neg_step: f32,
    pub(super) bc2_sqrt: f32,
    pub(super) decay_before: f32,
    pub(super) decay_after: f32,
    pub(super) scale: f32,
    pub(super) alpha: f32,
    pub(super) omega: f32,
    pub(super) factor: f32,
    pub(super) clip: f32,
    pub(super) ties_variant: u32,
    pub(super) hist_base: u32,
    pub(super) thr_key: u32,
    pub(super) cut_lo: u32,
    pub(super) cut_hi: u32,
    pub(super) off_lo: u32,
    pub(super) off_hi: u32,
    pub(super) h_mode: u32,
    pub(super) h_shift: u32,
    pub(super) h_bits: u32,
    pub(super) h_key: u32,
    pub(super) h_prefix_lo: u32,
    pub(super) h_prefix_hi: u32,
    /// Compact task vectors: index of the first entry word in a chunk's buffer.
    pub(super) tau_entries: u32,
    pub(super) g_shift: u32,
    pub(super) g_block0: u32,
    pub(super) g_nb_total: u32,
    pub(super) g_first_slot: u32,
    pub(super) g_last_slot: u32,
    pub(super) g_bl_base: u32,
    pub(super) g_nslots: u32,
    pub(super) pad1: u32,
}

impl StepU {
    pub(super) fn set_threshold(&mut self, t: Threshold) {
        self.thr_key = t.key;
        self.cut_lo = t.cutoff as u32;
        self.cut_hi = (t.cutoff >> 32) as u32;
    }

    pub(super) fn set_pass(&mut self, p: Pass, base: u32) {
        self.hist_base = base;
        let (mode, shift, bits, key, prefix) = match p {
            Pass::Key { shift, bits, prefix } => (0, shift, bits, 0, u64::from(prefix)),
            Pass::Index { key, shift, bits, prefix } => (1, shift, bits, key, prefix),
        };
        self.h_mode = mode;
        self.h_shift = shift;
        self.h_bits = bits;
        self.h_key = key;
        self.h_prefix_lo = prefix as u32;
        self.h_prefix_hi = (prefix >> 32) as u32;
    }
}

/// The uniform of one tensor for this step: its scalars, merge and kernel kind,
/// before the per-chunk fields and any selection or rescale are filled in.
pub(super) fn base_uniform(ts: &merge_core::step::TensorStep<'_>, slot_ix: u32, slot: &Slot) -> StepU {
    let s = &ts.scalars;
    let mut u = StepU {
        slot: slot_ix,
        nb_total: slot.nb,
        torch: u32::from(s.form == AdamForm::Torch),
        has_cached: u32::from(slot.cached.is_some()),
        tau_dtype: slot.tau_dtype.code(),
        beta1: s.beta1,
        beta2: s.beta2,
        c1: s.one_minus_beta1,
        c2: s.one_minus_beta2,
        eps: s.eps,
        neg_step: s.neg_step_size,
        bc2_sqrt: s.bc2_sqrt,
        decay_before: s.decay_before,
        decay_after: s.decay_after,
        scale: 1.0,
        omega: 1.0,
        clip: 1.0,
        factor: 1.0,
        keep_all: 1,
        ..StepU::default()
    };
    let accumulate = ts.phase == Phase::Accumulate;
    u.accumulate = u32::from(accumulate);
    if let MergePlan::Dare { params, key } = ts.merge {
        u.kind = if accumulate {
            kind::PLAIN
        } else {
            match params.variant {
                DareVariant::Reference => kind::DARE_REF,
                DareVariant::Paper => kind::DARE_PAPER,
            }
        };
        u.k0 = key.0[0];
        u.k1 = key.0[1];
        match params.keep.threshold() {
            Some(t) => {
                u.threshold = t;
                u.keep_all = 0;
            }
            None => u.keep_all = 1,
        }
        u.scale = params.scale;
        u.alpha = params.alpha;
        u.omega = params.one_minus_alpha;
        u.clip = params.clip;
    }
    if let MergePlan::Ties { variant, alpha, one_minus_alpha, .. } = ts.merge {
        u.kind = if accumulate { kind::PLAIN } else { kind::TIES };
        u.ties_variant = match variant {
            onties::Variant::Reference => 0,
            onties::Variant::Paper => 1,
        };
        u.alpha = alpha;
        u.omega = one_minus_alpha;
        u.set_threshold(Threshold::NOTHING);
        u.off_lo = slot.offset as u32;
        u.off_hi = (slot.offset >> 32) as u32;
    }
    u
}
