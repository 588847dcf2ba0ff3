//! The Llama decoder's layers on the GPU, each forward beside its backward, for a
//! training step that stays resident on the device, and the forward pieces
//! generation adds (attention over a key/value cache, rope from a position, one
//! row of full-vocabulary logits).
//!
//! These kernels are deterministic on one adapter (no float atomics; every
//! reduction has an order fixed by the shapes alone, SPEC.md §9) but they are not
//! the merge path: they use the hardware's `exp`, `log`, division and square
//! root and let the compiler fuse, so two devices may differ in the last bits.
//! They are tested against `host::model::layers` with tolerances.
//!
//! Every array is a [`GpuVec`]: row-major, one buffer, the layouts of the CPU
//! layers (`[rows, cols]`, weights `[out, in]` as Hugging Face stores them).
//! Backward calls accumulate (`+=`) into gradients, as the CPU layers do.

mod attention;
mod elementwise;
mod embedding;
mod linear;
mod lm_head;
mod loss;
mod rmsnorm;
mod rope;
mod sequence_sum;

pub use attention::{Attention, AttentionShape};
pub use elementwise::Elementwise;
pub use embedding::Embedding;
pub use linear::{Linear, LinearShape};
pub use lm_head::{HeadMetrics, HeadShape, LmHead};
pub use loss::{PairLogps, PreferenceLoss, PreferenceLossKind};
pub use rmsnorm::RmsNorm;
pub use rope::Rope;
pub use sequence_sum::SequenceSum;

use crate::context::{GpuContext, GpuError, WORKGROUP};
use crate::kernel::Kernel;

/// Shared by every model kernel: the workgroup index and the fixed reduction trees.
const PRELUDE_WGSL: &str = include_str!("prelude.wgsl");

fn kernel(ctx: &GpuContext, label: &str, src: &str, entry: &str) -> Kernel {
    Kernel::with_prelude(ctx, label, PRELUDE_WGSL, src, entry)
}

/// A flat array of 4-byte words (f32, or u32 token ids) in one device buffer.
pub struct GpuVec {
    buf: wgpu::Buffer,
    len: usize,
    label: String,
}

impl GpuVec {
    pub fn from_f32(ctx: &GpuContext, label: &str, data: &[f32]) -> Result<GpuVec, GpuError> {
        Self::from_words(ctx, label, bytemuck::cast_slice(data), data.len())
    }

    pub fn from_u32(ctx: &GpuContext, label: &str, data: &[u32]) -> Result<GpuVec, GpuError> {
        Self::from_words(ctx, label, bytemuck::cast_slice(data), data.len())
    }

    pub fn zeros(ctx: &GpuContext, label: &str, len: usize) -> Result<GpuVec, GpuError> {
        check_buffer(ctx, label, len)?;
        Ok(GpuVec { buf: ctx.try_storage(label, 4 * len as u64)?, len, label: label.to_string() })
    }

    fn from_words(ctx: &GpuContext, label: &str, bytes: &[u8], len: usize) -> Result<GpuVec, GpuError> {
        check_buffer(ctx, label, len)?;
        Ok(GpuVec { buf: ctx.try_storage_init(label, bytes)?, len, label: label.to_string() })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The device buffer, for device-side copies between owners (a model's
    /// gradients into the optimizer, its parameters back).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Overwrites the array from the host.
    pub fn write_f32(&self, ctx: &GpuContext, data: &[f32]) -> Result<(), GpuError> {
        if data.len() != self.len {
            return Err(GpuError::Invalid(format!("GpuVec::write_f32: {} values for an array of {}", data.len(), self.len)));
        }
        ctx.write_buffer(&self.buf, 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Sets every element to +0 on the device, without a host copy.
    pub fn clear(&self, ctx: &GpuContext) {
        ctx.record(|enc| enc.clear_buffer(&self.buf, 0, None));
    }

    /// Copies all of `src` into elements `at .. at + src.len()` on the device,
    /// behind the work recorded before (a new position's keys into a cache).
    pub fn copy_from(&self, ctx: &GpuContext, at: usize, src: &GpuVec) -> Result<(), GpuError> {
        if at + src.len > self.len {
            let (to, from) = (&self.label, &src.label);
            return Err(GpuError::Invalid(format!("copying {} elements of `{from}` to element {at} of `{to}`, which has {}", src.len, self.len)));
        }
        if !src.is_empty() {
            ctx.record(|enc| enc.copy_buffer_to_buffer(&src.buf, 0, &self.buf, 4 * at as u64, 4 * src.len as u64));
        }
        Ok(())
    }

    /// Waits for the queued work and reads the array back.
    pub fn read_f32(&self, ctx: &GpuContext) -> Result<Vec<f32>, GpuError> {
        self.read_f32_prefix(ctx, self.len)
    }

    /// Waits for the queued work and reads elements `0 .. len` back.
    pub fn read_f32_prefix(&self, ctx: &GpuContext, len: usize) -> Result<Vec<f32>, GpuError> {
        if len > self.len {
            return Err(GpuError::Invalid(format!("reading {len} elements of `{}`, which has {}", self.label, self.len)));
        }
        let mut values: Vec<f32> = bytemuck::pod_collect_to_vec(&ctx.read_bytes(&self.buf, 4 * len as u64)?);
        // the readback rounds an empty read up to one word
        values.truncate(len);
        Ok(values)
    }
}

fn check_buffer(ctx: &GpuContext, label: &str, len: usize) -> Result<(), GpuError> {
    let max = ctx.limits().max_buffer_size;
    if 4 * len as u64 > max {
        return Err(GpuError::Invalid(format!("`{label}`: {len} elements exceed the device's largest buffer ({max} bytes)")));
    }
    Ok(())
}

/// Elements `start .. start + len` of a [`GpuVec`], bound on their own so that a
/// tensor larger than one storage binding (an LM head of 152k rows) can still be
/// read chunk by chunk.
#[derive(Clone, Copy)]
struct Window<'a> {
    vec: &'a GpuVec,
    start: usize,
    len: usize,
}

impl<'a> Window<'a> {
    fn rows(vec: &'a GpuVec, row0: usize, rows: usize, cols: usize) -> Window<'a> {
        Window { vec, start: row0 * cols, len: rows * cols }
    }

    /// The binding and the element offset of `start` inside it: bindings must
    /// begin at the device's offset alignment, so the window's start is rounded
    /// down to it and the kernel adds the remainder.
    fn binding(&self, ctx: &GpuContext) -> Result<(wgpu::BindingResource<'a>, u32), GpuError> {
        let what = &self.vec.label;
        let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment.max(4));
        let first = 4 * self.start as u64;
        let offset = first / align * align;
        let size = (4 * (self.start + self.len) as u64 - offset).max(4);
        check_binding(ctx, what, size)?;
        if offset + size > self.vec.buf.size() {
            return Err(GpuError::Invalid(format!("`{what}`: elements up to {} of an array of {}", self.start + self.len, self.vec.len)));
        }
        let binding = wgpu::BufferBinding { buffer: &self.vec.buf, offset, size: wgpu::BufferSize::new(size) };
        Ok((wgpu::BindingResource::Buffer(binding), ((first - offset) / 4) as u32))
    }
}

fn check_binding(ctx: &GpuContext, what: &str, bytes: u64) -> Result<(), GpuError> {
    let max = ctx.limits().max_storage_buffer_binding_size;
    if bytes > max {
        return Err(GpuError::Invalid(format!("`{what}`: {bytes} bytes exceed the device's largest storage binding ({max} bytes)")));
    }
    Ok(())
}

/// `vec` holds exactly `len` elements.
fn expect_len(what: &str, vec: &GpuVec, len: usize) -> Result<(), GpuError> {
    if vec.len != len {
        return Err(GpuError::Invalid(format!("`{what}` has {} elements, the shape implies {len}", vec.len)));
    }
    Ok(())
}

/// One dispatch of `n_groups` workgroups with `params` as the uniform at binding 0
/// and whole arrays at the given binding numbers.
fn dispatch<P: bytemuck::Pod>(ctx: &GpuContext, kernel: &Kernel, params: &P, bindings: &[(u32, &GpuVec)], n_groups: u32) -> Result<(), GpuError> {
    let mut resources = Vec::with_capacity(bindings.len());
    for &(binding, v) in bindings {
        check_binding(ctx, &v.label, v.buf.size())?;
        resources.push((binding, v.buf.as_entire_binding()));
    }
    record(ctx, kernel, bytemuck::bytes_of(params), resources, n_groups);
    Ok(())
}

/// Records one dispatch behind the ones before it (each its own compute pass,
/// so the next kernel sees this one's results), submitted in batches by the
/// context.
fn record(ctx: &GpuContext, kernel: &Kernel, params: &[u8], resources: Vec<(u32, wgpu::BindingResource)>, n_groups: u32) {
    let uniform = ctx.uniform_init("model params", params);
    let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() }];
    entries.extend(resources.into_iter().map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource }));
    let bind_group = kernel.bind_entries(ctx, &entries);
    ctx.record(|enc| kernel.dispatch(ctx, enc, &bind_group, n_groups));
}

/// Workgroups of [`WORKGROUP`] invocations for one invocation per item.
fn groups(items: usize) -> u32 {
    items.div_ceil(WORKGROUP as usize) as u32
}
