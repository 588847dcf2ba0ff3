//! Offline merges on the GPU (merge_core::offline, SPEC.md §6): linear,
//! SFT↔RLHF interpolation and generalized task arithmetic (task arithmetic, TIES
//! with GPU radix-select trimming, DARE linear, DARE-TIES), at most four models
//! per merge. Hyperparameters are validated by merge-core itself (its functions
//! run on empty slices first), so the errors are its errors; the per-element
//! arithmetic is the kernel's, bit for bit the same. SLERP stays on the CPU.

use merge_core::arith::{add, flush};
use merge_core::dtype::{store_error, Dst, Src};
use merge_core::error::tensor_name;
use merge_core::offline::{self, Gta, GtaPlan, ModelParams, Sparsify};
use merge_core::rng::{check_extent, tensor_id, Keep, MaskKey};
use merge_core::topk::{keep_count, Threshold};

use crate::context::{GpuContext, GpuError, WORKGROUP};
use crate::kernel::Kernel;
use crate::tensor::{load_f32, GpuArray, Storage};
use crate::topk::GpuTopK;

/// Models one GPU merge takes (the kernel binds each model separately).
pub const GPU_MAX_MODELS: usize = 4;

const MODEL_NAMES: [&str; GPU_MAX_MODELS] = ["model 0 weights", "model 1 weights", "model 2 weights", "model 3 weights"];

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct OffU {
    head: [u32; 4],
    cfg: [u32; 4],
    cfg2: [u32; 4],
    scope: [u32; 4],
    fl: [f32; 4],
    w: [f32; 4],
    scale: [f32; 4],
    keep_t: [u32; 4],
    tkey: [u32; 4],
    tcut_lo: [u32; 4],
    tcut_hi: [u32; 4],
}

pub struct GpuMerger {
    ctx: GpuContext,
    kernel: Kernel,
    topk: GpuTopK,
}

fn upload(ctx: &GpuContext, src: Src<'_>) -> GpuArray {
    match src {
        Src::F32(v) => GpuArray::from_f32(ctx, "merge input", v),
        Src::Bf16(v) => GpuArray::from_u16(ctx, "merge input", Storage::Bf16, v),
        Src::F16(v) => GpuArray::from_u16(ctx, "merge input", Storage::F16, v),
    }
}

fn empty(src: &Src<'_>) -> Src<'static> {
    match src {
        Src::F32(_) => Src::F32(&[]),
        Src::Bf16(_) => Src::Bf16(&[]),
        Src::F16(_) => Src::F16(&[]),
    }
}

fn empty_dst(out: &Dst<'_>) -> Dst<'static> {
    match out {
        Dst::F32(_) => Dst::F32(&mut []),
        Dst::Bf16(_) => Dst::Bf16(&mut []),
        Dst::F16(_) => Dst::F16(&mut []),
    }
}

fn too_many(n: usize) -> GpuError {
    GpuError::Invalid(format!("GPU offline merges take 1 to {GPU_MAX_MODELS} models, got {n} (merge-core's CPU merge takes up to 16)"))
}

fn to_f32(x: f64) -> f32 {
    flush(x as f32)
}

impl GpuMerger {
    pub fn new(ctx: GpuContext) -> GpuMerger {
        let kernel = Kernel::new(&ctx, "offline merge", include_str!("offline.wgsl"), "main");
        let topk = GpuTopK::new(&ctx);
        GpuMerger { ctx, kernel, topk }
    }

    /// mergekit `linear` (`merge_core::offline::linear` on the whole tensor).
    pub fn linear(&self, name: &str, models: &[Src<'_>], weights: &[f64], normalize: bool, out: &mut Dst<'_>) -> Result<(), GpuError> {
        let empties: Vec<Src> = models.iter().map(empty).collect();
        offline::linear(name, 0, &empties, weights, normalize, &mut empty_dst(out))?;
        self.check_inputs(name, models, None, out.len())?;
        let w: Vec<f32> = weights.iter().map(|&x| to_f32(x)).collect();
        let wsum = w[1..].iter().fold(w[0], |a, &x| add(a, x));
        let mut u = OffU { head: [0, 0, 0, models.len() as u32], ..OffU::default() };
        u.cfg[0] = u32::from(normalize);
        u.fl[2] = wsum;
        u.w[..w.len()].copy_from_slice(&w);
        self.run(name, u, None, models, out)
    }

    /// The paper's SFT↔RLHF interpolation (`merge_core::offline::interpolate`).
    pub fn interpolate(&self, name: &str, sft: Src<'_>, rlhf: Src<'_>, weight: f64, out: &mut Dst<'_>) -> Result<(), GpuError> {
        offline::interpolate(name, 0, empty(&sft), empty(&rlhf), weight, &mut empty_dst(out))?;
        for (what, s) in [("SFT weights", &sft), ("RLHF weights", &rlhf)] {
            if s.len() != out.len() {
                return Err(GpuError::Core(merge_core::Error::LengthMismatch {
                    tensor: tensor_name(name),
                    what,
                    expected: out.len() as u64,
                    found: s.len() as u64,
                }));
            }
        }
        let mut u = OffU { head: [0, 0, 1, 2], ..OffU::default() };
        u.fl[3] = to_f32(weight);
        self.run_with(name, u, None, &[sft, rlhf], out, &["SFT weights", "RLHF weights"])
    }

    /// The TIES trim threshold of one model over its tensors (one tensor: per-tensor
    /// scope; the model's tensors in name order: global), by GPU radix select.
    pub fn task_vector_threshold(&self, scope: &str, density: f64, bases: &[Src<'_>], models: &[Src<'_>]) -> Result<Threshold, GpuError> {
        let eb: Vec<Src> = bases.iter().map(empty).collect();
        let em: Vec<Src> = models.iter().map(empty).collect();
        offline::task_vector_threshold(scope, density, &eb, &em)?;
        let n: u64 = bases.iter().map(|b| b.len() as u64).sum();
        let k = keep_count("density", density as f32, n)?;
        let f32_of = |s: &Src<'_>| GpuArray::from_f32(&self.ctx, "task vector input", &load_f32(s));
        let b: Vec<GpuArray> = bases.iter().map(f32_of).collect();
        let m: Vec<GpuArray> = models.iter().map(f32_of).collect();
        let pairs: Vec<(&GpuArray, &GpuArray)> = m.iter().zip(&b).collect();
        self.topk.select_task_vectors(&self.ctx, scope, &pairs, k)
    }

    /// Generalized task arithmetic of one tensor (`GtaPlan::new` + `apply`):
    /// `thresholds` one per model for magnitude trimming (from
    /// [`Self::task_vector_threshold`]), empty otherwise; `scope_start` the tensor's
    /// first index in the trimming scope.
    #[allow(clippy::too_many_arguments)]
    pub fn gta(
        &self,
        config: &Gta,
        name: &str,
        seed: u64,
        params: &[ModelParams],
        thresholds: &[Threshold],
        scope_start: u64,
        base: Src<'_>,
        models: &[Src<'_>],
        out: &mut Dst<'_>,
    ) -> Result<(), GpuError> {
        GtaPlan::new(config, name, seed, params, thresholds, scope_start)?;
        if models.len() != params.len() {
            return Err(GpuError::Core(merge_core::Error::LengthMismatch {
                tensor: tensor_name(name),
                what: "per-model parameters (one per model)",
                expected: models.len() as u64,
                found: params.len() as u64,
            }));
        }
        self.check_inputs(name, models, Some(&base), out.len())?;
        if config.sparsify == Sparsify::Random {
            check_extent(name, 0, out.len())?;
        }
        let w: Vec<f32> = params.iter().map(|p| to_f32(p.weight)).collect();
        let s = w[1..].iter().fold(w[0], |a, &x| add(a, x));
        let divisor = if f64::from(s).abs() < 1e-8 { 1.0 } else { s };
        let key = MaskKey::new(seed, tensor_id(name), 0);
        let mut u = OffU { head: [0, 0, 2, models.len() as u32], ..OffU::default() };
        u.cfg = [
            u32::from(config.normalize),
            u32::from(config.consensus),
            match config.sparsify {
                Sparsify::None => 0,
                Sparsify::Magnitude => 1,
                Sparsify::Random => 2,
            },
            0,
        ];
        u.cfg2[0] = key.0[0];
        u.cfg2[1] = key.0[1];
        u.scope[1] = scope_start as u32;
        u.scope[2] = (scope_start >> 32) as u32;
        u.fl[0] = to_f32(config.lambda);
        u.fl[1] = divisor;
        u.w[..w.len()].copy_from_slice(&w);
        for (m, p) in params.iter().enumerate() {
            if config.sparsify == Sparsify::Random {
                let d = p.density as f32;
                let keep = Keep::new(d)?;
                u.scale[m] = (1.0 / f64::from(d)) as f32;
                match keep.threshold() {
                    Some(t) => u.keep_t[m] = t,
                    None => u.cfg[3] |= 1 << m,
                }
            }
            if config.sparsify == Sparsify::Magnitude {
                let t = thresholds[m];
                u.tkey[m] = t.key;
                u.tcut_lo[m] = t.cutoff as u32;
                u.tcut_hi[m] = (t.cutoff >> 32) as u32;
            }
        }
        self.run(name, u, Some(base), models, out)
    }

    fn check_inputs(&self, name: &str, models: &[Src<'_>], base: Option<&Src<'_>>, n: usize) -> Result<(), GpuError> {
        if models.is_empty() || models.len() > GPU_MAX_MODELS {
            return Err(too_many(models.len()));
        }
        if let Some(b) = base && b.len() != n {
            return Err(GpuError::Core(merge_core::Error::LengthMismatch {
                tensor: tensor_name(name),
                what: "base weights",
                expected: n as u64,
                found: b.len() as u64,
            }));
        }
        Ok(())
    }

    fn run(&self, name: &str, u: OffU, base: Option<Src<'_>>, models: &[Src<'_>], out: &mut Dst<'_>) -> Result<(), GpuError> {
        self.run_with(name, u, base, models, out, &MODEL_NAMES[..models.len()])
    }

    /// Uploads, merges chunk by chunk, reports the first bad value (lowest index;
    /// at one index the base, then the models in order, then the result) and stores
    /// the result in `out` only if every element can be stored.
    fn run_with(&self, name: &str, mut u: OffU, base: Option<Src<'_>>, models: &[Src<'_>], out: &mut Dst<'_>, what: &[&'static str]) -> Result<(), GpuError> {
        let ctx = &self.ctx;
        let n = out.len();
        let dev_models: Vec<GpuArray> = models.iter().map(|m| upload(ctx, *m)).collect();
        let dev_base = base.map(|b| upload(ctx, b));
        let code = |s: &GpuArray| s.storage.code();
        u.cfg2[2] = dev_base.as_ref().map_or(0, code);
        u.cfg2[3] = dev_models.iter().enumerate().fold(0, |acc, (m, a)| acc | (code(a) << (2 * m)));
        let result = GpuArray::zeros(ctx, "merged", Storage::F32, n as u64);
        let status = ctx.storage("merge status", 8 * 4);
        ctx.write_buffer(&status, 0, bytemuck::cast_slice(&[u32::MAX; 8]));
        let dummy = ctx.storage("no input", 4);
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let mut keep = Vec::new();
        for (ci, ch) in result.chunks.iter().enumerate() {
            let mut cu = u;
            cu.head[1] = ch.len as u32;
            cu.scope[0] = ch.start as u32;
            let ub = ctx.uniform_init("merge", bytemuck::bytes_of(&cu));
            let m = |j: usize| dev_models.get(j).map_or(&dummy, |a| &a.chunks[ci].buf);
            let b = dev_base.as_ref().map_or(&dummy, |a| &a.chunks[ci].buf);
            let bg = self.kernel.bind(ctx, &[&ub, b, m(0), m(1), m(2), m(3), &ch.buf, &status]);
            self.kernel.dispatch(ctx, &mut enc, &bg, ch.len.div_ceil(WORKGROUP as u64) as u32);
            keep.push(ub);
        }
        ctx.submit(enc);
        let st = ctx.read_u32(&status, 8)?;
        let values = result.read_f32(ctx)?;
        // The first element that fails, in merge-core's order.
        let mut first: Option<(u64, usize)> = None;
        for (codeix, &w) in st.iter().enumerate().take(6) {
            if w != u32::MAX {
                let cand = (u64::from(w), codeix);
                first = Some(first.map_or(cand, |c| c.min(cand)));
            }
        }
        let dtype = out.dtype();
        let limit = first.map_or(n as u64, |(i, _)| i);
        for (j, &x) in values.iter().enumerate().take(limit as usize) {
            if let Err(e) = out.check(x) {
                return Err(GpuError::Core(store_error(name, "merged weights", j as u64, e, dtype)));
            }
        }
        if let Some((index, codeix)) = first {
            let err = match codeix {
                0 => merge_core::Error::NonFinite { tensor: tensor_name(name), what: "base weights", index },
                5 => {
                    let x = values[index as usize];
                    let e = out.check(x).err().unwrap_or(merge_core::dtype::StoreError::NonFinite);
                    store_error(name, "merged weights", index, e, dtype)
                }
                m => merge_core::Error::NonFinite { tensor: tensor_name(name), what: what[m - 1], index },
            };
            return Err(GpuError::Core(err));
        }
        for (j, &x) in values.iter().enumerate() {
            out.store(j, x).map_err(|e| GpuError::Core(store_error(name, "merged weights", j as u64, e, dtype)))?;
        }
        Ok(())
    }
}
