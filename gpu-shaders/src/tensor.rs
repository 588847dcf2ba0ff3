//! Tensors resident on the GPU, split into chunk buffers.
//!
//! Every array of a tensor is split at the same element boundaries (multiples of
//! 256, at most one binding of 4-byte words), so one bind group per chunk sees the
//! matching parts of θ, m, v, g, … and an element's global index is `start + i`.

use merge_core::dtype::Src;

use crate::context::{GpuContext, GpuError};

/// `src` as the kernels load it: binary32, flushed.
pub(crate) fn load_f32(src: &Src<'_>) -> Vec<f32> {
    let mut v = vec![0f32; src.len()];
    src.load_into(0, &mut v);
    v
}

/// Storage format of a resident array (SPEC §7). 16-bit arrays hold two elements
/// per u32 word, element `2j` in the low half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    F32,
    Bf16,
    F16,
    /// A sparse f32 array, per chunk `[offsets (blocks + 1) | entries]`: `offsets[b]`
    /// counts the non-zero entries of the chunk's earlier 256-blocks, each entry is
    /// (index within its block, f32 bits), in index order. Zeros are implicit.
    Compact,
}

impl Storage {
    pub fn code(self) -> u32 {
        match self {
            Storage::F32 => 0,
            Storage::Bf16 => 1,
            Storage::F16 => 2,
            Storage::Compact => 3,
        }
    }
    fn bytes(self, n: u64) -> u64 {
        match self {
            Storage::F32 => 4 * n,
            Storage::Bf16 | Storage::F16 => 2 * n,
            // Upper bound (every element non-zero), for zero-filled arrays.
            Storage::Compact => 4 * (n.div_ceil(256) + 1) + 8 * n,
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
        Self::dense(ctx, label, Storage::F32, data)
    }

    /// 16-bit storage from raw bits.
    pub fn from_u16(ctx: &GpuContext, label: &str, storage: Storage, data: &[u16]) -> GpuArray {
        Self::dense(ctx, label, storage, data)
    }

    /// One element of `data` per element of the array, split at the chunk boundaries.
    fn dense<T: bytemuck::Pod>(ctx: &GpuContext, label: &str, storage: Storage, data: &[T]) -> GpuArray {
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

    /// The compact layout of `values` (already flushed: no -0.0) with the same
    /// chunk boundaries as every other array of the tensor.
    pub fn compact(ctx: &GpuContext, label: &str, values: &[f32]) -> GpuArray {
        let n = values.len() as u64;
        let chunks = ctx
            .chunks(n)
            .into_iter()
            .map(|(start, len)| {
                let part = &values[start as usize..(start + len) as usize];
                let nb = part.len().div_ceil(256);
                let mut offsets = Vec::with_capacity(nb + 1);
                let mut entries = Vec::new();
                for block in part.chunks(256) {
                    offsets.push((entries.len() / 2) as u32);
                    for (j, &x) in block.iter().enumerate() {
                        if x.to_bits() != 0 {
                            entries.push(j as u32);
                            entries.push(x.to_bits());
                        }
                    }
                }
                offsets.push((entries.len() / 2) as u32);
                offsets.extend(entries);
                Chunk { start, len, buf: ctx.storage_init(label, bytemuck::cast_slice(&offsets)) }
            })
            .collect();
        GpuArray { storage: Storage::Compact, n, chunks }
    }

    /// Bytes the compact layout of `values` would take.
    pub fn compact_bytes(ctx: &GpuContext, values: &[f32]) -> u64 {
        let nnz = values.iter().filter(|x| x.to_bits() != 0).count() as u64;
        let blocks: u64 = ctx.chunks(values.len() as u64).iter().map(|(_, len)| len.div_ceil(256) + 1).sum();
        4 * blocks + 8 * nnz
    }

    /// Overwrites an f32 array from the host (the per-step gradient upload).
    pub fn write_f32(&self, ctx: &GpuContext, data: &[f32]) {
        for c in &self.chunks {
            let s = &data[c.start as usize..(c.start + c.len) as usize];
            ctx.write_buffer(&c.buf, 0, bytemuck::cast_slice(s));
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
