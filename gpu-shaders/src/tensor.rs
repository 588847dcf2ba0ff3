//! Tensors resident on the GPU, split into chunk buffers.
//!
//! Every array of a tensor is split at the same element boundaries (multiples of
//! 256, at most one binding of 4-byte words), so one bind group per chunk sees the
//! matching parts of θ, m, v, g, … and an element's global index is `start + i`.

use crate::context::{GpuContext, GpuError};

/// Storage format of a resident array (SPEC §7). 16-bit arrays hold two elements
/// per u32 word, element `2j` in the low half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    F32,
    Bf16,
    F16,
}

impl Storage {
    pub fn code(self) -> u32 {
        match self {
            Storage::F32 => 0,
            Storage::Bf16 => 1,
            Storage::F16 => 2,
        }
    }
    fn bytes(self, n: u64) -> u64 {
        match self {
            Storage::F32 => 4 * n,
            Storage::Bf16 | Storage::F16 => 2 * n,
        }
    }
}

impl From<merge_core::dtype::Dtype> for Storage {
    fn from(d: merge_core::dtype::Dtype) -> Self {
        match d {
            merge_core::dtype::Dtype::F32 => Storage::F32,
            merge_core::dtype::Dtype::Bf16 => Storage::Bf16,
            merge_core::dtype::Dtype::F16 => Storage::F16,
        }
    }
}

pub struct Chunk {
    pub start: u64,
    pub len: u64,
    pub buf: wgpu::Buffer,
}

/// One array of one tensor on the GPU.
pub struct GpuArray {
    pub storage: Storage,
    pub n: u64,
    pub chunks: Vec<Chunk>,
}

impl GpuArray {
    /// Zero-filled.
    pub fn zeros(ctx: &GpuContext, label: &str, storage: Storage, n: u64) -> GpuArray {
        let chunks = ctx
            .chunks(n)
            .into_iter()
            .map(|(start, len)| Chunk { start, len, buf: ctx.storage(label, storage.bytes(len)) })
            .collect();
        GpuArray { storage, n, chunks }
    }

    pub fn from_f32(ctx: &GpuContext, label: &str, data: &[f32]) -> GpuArray {
        let n = data.len() as u64;
        let chunks = ctx
            .chunks(n)
            .into_iter()
            .map(|(start, len)| Chunk {
                start,
                len,
                buf: ctx.storage_init(label, bytemuck::cast_slice(&data[start as usize..(start + len) as usize])),
            })
            .collect();
        GpuArray { storage: Storage::F32, n, chunks }
    }

    /// 16-bit storage from raw bits.
    pub fn from_u16(ctx: &GpuContext, label: &str, storage: Storage, data: &[u16]) -> GpuArray {
        let n = data.len() as u64;
        let chunks = ctx
            .chunks(n)
            .into_iter()
            .map(|(start, len)| Chunk {
                start,
                len,
                buf: ctx.storage_init(label, bytemuck::cast_slice(&data[start as usize..(start + len) as usize])),
            })
            .collect();
        GpuArray { storage, n, chunks }
    }

    /// Overwrites an f32 array from the host (the per-step gradient upload).
    pub fn write_f32(&self, ctx: &GpuContext, data: &[f32]) {
        for c in &self.chunks {
            let s = &data[c.start as usize..(c.start + c.len) as usize];
            ctx.queue.write_buffer(&c.buf, 0, bytemuck::cast_slice(s));
        }
    }

    /// Reads an f32 array back.
    pub fn read_f32(&self, ctx: &GpuContext) -> Result<Vec<f32>, GpuError> {
        let mut out = Vec::with_capacity(self.n as usize);
        for c in &self.chunks {
            let bytes = ctx.read_bytes(&c.buf, 4 * c.len)?;
            out.extend(bytemuck::pod_collect_to_vec::<u8, f32>(&bytes));
        }
        Ok(out)
    }

    /// Bytes held on the device.
    pub fn device_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.buf.size()).sum()
    }
}
