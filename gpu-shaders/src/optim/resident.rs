//! A step whose gradients and weights never leave the device: gradients copied
//! in from another owner's buffers (a model's backward on the same device),
//! parameters copied back out to them (both unneeded for tensors built over
//! [`Weights::Shared`](super::Weights::Shared), which are skipped), and the
//! gradient's Σ g² reduced on the device so that only a few numbers come back
//! (`sumsq.wgsl`).

use super::GpuOptimizer;
use crate::context::GpuError;
use crate::kernel::Kernel;

/// Elements each workgroup of `sumsq.wgsl` reduces (WG · SUMSQ_PER_LANE).
const SUMSQ_BLOCK: u64 = 256 * 64;

pub(super) fn sumsq_kernel(ctx: &crate::context::GpuContext) -> Kernel {
    Kernel::new(ctx, "gradient sum of squares", include_str!("sumsq.wgsl"), "block_sumsq")
}

/// A device buffer of one tensor's f32 elements, by tensor name.
pub type NamedBuffer<'a> = (&'a str, &'a wgpu::Buffer);

impl GpuOptimizer {
    /// This step's gradients, copied on the device from `sources` (every tensor
    /// once, by name, each buffer holding at least its elements as f32); the
    /// buffers must belong to this optimizer's device.
    pub fn copy_grads_from(&mut self, sources: &[NamedBuffer<'_>]) -> Result<(), GpuError> {
        let by_slot = self.match_buffers(sources, "gradient")?;
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        for (slot, src) in self.slots.iter().zip(by_slot).filter(|(slot, _)| !slot.shared) {
            for c in &slot.grad.chunks {
                enc.copy_buffer_to_buffer(src, 4 * c.start, &c.buf, c.offset, 4 * c.len);
            }
        }
        self.ctx.submit(enc);
        Ok(())
    }

    /// The parameters, copied on the device into `targets` (every tensor once,
    /// by name).
    pub fn copy_params_to(&self, targets: &[NamedBuffer<'_>]) -> Result<(), GpuError> {
        let by_slot = self.match_buffers(targets, "parameter")?;
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        for (slot, dst) in self.slots.iter().zip(by_slot).filter(|(slot, _)| !slot.shared) {
            for c in &slot.theta.chunks {
                enc.copy_buffer_to_buffer(&c.buf, c.offset, dst, 4 * c.start, 4 * c.len);
            }
        }
        self.ctx.submit(enc);
        Ok(())
    }

    /// Σ g² of the gradients on the device, per tensor in the optimizer's
    /// (bytewise name) order: blocks of 16,384 elements summed on the device in a
    /// fixed tree, the block totals added here in f64 in order. Deterministic on
    /// one adapter; agrees with an f64 sum to f32 rounding of each block.
    pub fn grad_sum_squares(&self) -> Result<Vec<f64>, GpuError> {
        let blocks: Vec<Vec<u64>> =
            self.slots.iter().map(|s| s.grad.chunks.iter().map(|c| c.len.div_ceil(SUMSQ_BLOCK)).collect()).collect();
        let total: u64 = blocks.iter().flatten().sum();
        let out = self.ctx.storage("gradient block sums of squares", 4 * total.max(1));
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        let mut out0 = 0u64;
        for (slot, nb) in self.slots.iter().zip(&blocks) {
            for (c, &b) in slot.grad.chunks.iter().zip(nb) {
                let params: [u32; 4] = [c.len as u32, out0 as u32, 0, 0];
                let u = self.ctx.uniform_init("sumsq", bytemuck::cast_slice(&params));
                let bg = self.sumsq.bind_resources(&self.ctx, &[(0, u.as_entire_binding()), (1, c.binding()), (2, out.as_entire_binding())]);
                self.sumsq.dispatch(&self.ctx, &mut enc, &bg, b as u32);
                out0 += b;
            }
        }
        self.ctx.submit(enc);
        let sums: Vec<f32> = bytemuck::pod_collect_to_vec(&self.ctx.read_bytes(&out, 4 * total)?);
        let mut at = 0usize;
        Ok(blocks
            .iter()
            .map(|nb| {
                let n: usize = nb.iter().sum::<u64>() as usize;
                let s = sums[at..at + n].iter().map(|&x| f64::from(x)).sum();
                at += n;
                s
            })
            .collect())
    }

    /// `buffers` in slot order, each checked to hold its tensor's elements.
    fn match_buffers<'a>(&self, buffers: &[NamedBuffer<'a>], what: &str) -> Result<Vec<&'a wgpu::Buffer>, GpuError> {
        let mut by_slot: Vec<Option<&wgpu::Buffer>> = vec![None; self.slots.len()];
        for &(name, buf) in buffers {
            let ix = self
                .slots
                .binary_search_by(|s| s.name.as_bytes().cmp(name.as_bytes()))
                .map_err(|_| GpuError::Invalid(format!("{what} buffer for unknown tensor `{name}`")))?;
            if buf.size() < 4 * self.slots[ix].n {
                return Err(GpuError::Invalid(format!(
                    "{what} buffer for `{name}` holds {} bytes, the tensor needs {}",
                    buf.size(),
                    4 * self.slots[ix].n
                )));
            }
            if by_slot[ix].replace(buf).is_some() {
                return Err(GpuError::Invalid(format!("{what} buffer for `{name}` given twice")));
            }
        }
        by_slot
            .into_iter()
            .zip(&self.slots)
            .map(|(b, s)| b.ok_or_else(|| GpuError::Invalid(format!("no {what} buffer for tensor `{}`", s.name))))
            .collect()
    }
}
