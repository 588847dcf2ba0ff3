//! Top-k thresholds by magnitude (SPEC.md §4) on the GPU: the histograms of each
//! radix-select pass come from a kernel, the pass logic is merge-core's own
//! `RadixSelect`, so both sides pick the same `(T, c)` by construction.

use merge_core::error::tensor_name;
use merge_core::topk::{Pass, RadixSelect, Threshold, BUCKETS};

use crate::context::{GpuContext, GpuError, WORKGROUP};
use crate::kernel::Kernel;
use crate::tensor::{GpuArray, Storage};

pub struct GpuTopK {
    kernel: Kernel,
}

impl GpuTopK {
    pub fn new(ctx: &GpuContext) -> GpuTopK {
        GpuTopK { kernel: Kernel::new(ctx, "topk histogram", include_str!("topk.wgsl"), "main") }
    }

    /// The threshold keeping the `k` largest magnitudes of `arrays` concatenated in
    /// the order given (one array: per-tensor scope; all tensors in name order:
    /// global scope). `scope` names it in errors.
    pub fn select(&self, ctx: &GpuContext, scope: &str, arrays: &[&GpuArray], k: u64) -> Result<Threshold, GpuError> {
        let pairs: Vec<(&GpuArray, Option<&GpuArray>)> = arrays.iter().map(|a| (*a, None)).collect();
        self.select_inner(ctx, scope, &pairs, k)
    }

    /// The threshold over the task vectors `model ⊖ base` (offline TIES trimming,
    /// `merge_core::offline::task_vector_threshold`): pairs in scope order.
    pub fn select_task_vectors(&self, ctx: &GpuContext, scope: &str, pairs: &[(&GpuArray, &GpuArray)], k: u64) -> Result<Threshold, GpuError> {
        for (m, b) in pairs {
            if m.n != b.n {
                return Err(GpuError::Core(merge_core::Error::LengthMismatch {
                    tensor: tensor_name(scope),
                    what: "model weights",
                    expected: b.n,
                    found: m.n,
                }));
            }
        }
        let pairs: Vec<(&GpuArray, Option<&GpuArray>)> = pairs.iter().map(|(m, b)| (*m, Some(*b))).collect();
        self.select_inner(ctx, scope, &pairs, k)
    }

    fn select_inner(&self, ctx: &GpuContext, scope: &str, arrays: &[(&GpuArray, Option<&GpuArray>)], k: u64) -> Result<Threshold, GpuError> {
        let n: u64 = arrays.iter().map(|a| a.0.n).sum();
        if n >= 1 << 32 {
            return Err(GpuError::Invalid(format!(
                "top-k scope `{scope}`: {n} elements; the GPU histograms count in u32 (at most 2^32 - 1)"
            )));
        }
        if let Some(a) = arrays.iter().flat_map(|(a, b)| [Some(*a), *b]).flatten().find(|a| a.storage != Storage::F32) {
            return Err(GpuError::Invalid(format!("top-k scope `{scope}`: input stored as {:?}, expected f32", a.storage)));
        }
        let mut sel = RadixSelect::new(scope, n, k)?;
        // (global offset of the chunk, chunk) for every chunk of the scope.
        let mut chunks = Vec::new();
        let mut offset = 0u64;
        for (a, b) in arrays {
            for (ci, c) in a.chunks.iter().enumerate() {
                chunks.push((offset + c.start, c, b.map(|b| &b.chunks[ci].buf)));
            }
            offset += a.n;
        }
        let no_base = ctx.storage("no base", 4);
        let diff = arrays.iter().any(|(_, b)| b.is_some());
        let hist = ctx.storage("topk histogram", BUCKETS as u64 * 4);
        let words = 2 * chunks.len().max(1);
        let status = ctx.storage_init("topk status", bytemuck::cast_slice(&vec![u32::MAX; words]));
        let pass_u = ctx.uniform_init("topk pass", bytemuck::cast_slice(&[0u32; 8]));
        // Every pass reads the same chunks: their uniforms and bind groups are made
        // once, and only the pass's digit and prefix change between passes.
        let binds: Vec<(wgpu::BindGroup, u32)> = chunks
            .iter()
            .enumerate()
            .map(|(slot, (start, c, base))| {
                let u = [0u32, c.len as u32, *start as u32, (*start >> 32) as u32, slot as u32, u32::from(diff), 0, 0];
                let ub = ctx.uniform_init("topk chunk", bytemuck::cast_slice(&u));
                let bg = self.kernel.bind(ctx, &[&ub, &c.buf, &hist, &status, base.unwrap_or(&no_base), &pass_u]);
                (bg, c.len.div_ceil(WORKGROUP as u64) as u32)
            })
            .collect();
        let mut first = true;
        while let Some(pass) = sel.pass() {
            let (mode, shift, bits, key, prefix) = match pass {
                Pass::Key { shift, bits, prefix } => (0u32, shift, bits, 0u32, u64::from(prefix)),
                Pass::Index { key, shift, bits, prefix } => (1, shift, bits, key, prefix),
            };
            let p = [mode, shift, bits, key, prefix as u32, (prefix >> 32) as u32, 0, 0];
            ctx.write_buffer(&pass_u, 0, bytemuck::cast_slice(&p));
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            enc.clear_buffer(&hist, 0, None);
            for (bg, groups) in &binds {
                self.kernel.dispatch(ctx, &mut enc, bg, *groups);
            }
            ctx.submit(enc);
            if first {
                // Every element is read in the first pass: refuse non-finite input there,
                // naming the lowest index (the base before the model at equal index).
                let st = ctx.read_u32(&status, words as u64)?;
                let mut worst: Option<(u64, usize)> = None;
                for (slot, (start, _, _)) in chunks.iter().enumerate() {
                    for which in 0..2 {
                        let w = st[2 * slot + which];
                        if w != u32::MAX {
                            let cand = (start + u64::from(w), which);
                            worst = Some(worst.map_or(cand, |c| c.min(cand)));
                        }
                    }
                }
                if let Some((index, which)) = worst {
                    let what = match (diff, which) {
                        (false, _) => "top-k input",
                        (true, 0) => "base weights",
                        (true, _) => "model weights",
                    };
                    return Err(GpuError::Core(merge_core::Error::NonFinite { tensor: tensor_name(scope), what, index }));
                }
                first = false;
            }
            let counts = ctx.read_u32(&hist, pass.buckets() as u64)?;
            sel.add_histogram(&counts)?;
            sel.finish_pass()?;
        }
        Ok(sel.threshold().unwrap_or(Threshold::NOTHING))
    }
}
