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
    /// Where the chunk begins in `buf`, in bytes: 0 for an array that owns its
    /// buffers, `4 · start` for a view of another owner's buffer.
    pub offset: u64,
    /// A view's bytes in `buf` (`None`: the whole buffer is the chunk's).
    view_bytes: Option<u64>,
}

impl Chunk {
    /// The chunk's bytes as a binding.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        match self.view_bytes {
            None => self.buf.as_entire_binding(),
            Some(bytes) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.buf,
                offset: self.offset,
                size: wgpu::BufferSize::new(bytes.max(4)),
            }),
        }
    }
}

/// One array of one tensor on the GPU.
pub struct GpuArray {
    pub storage: Storage,
    pub n: u64,
    pub chunks: Vec<Chunk>,
    /// Whether the buffers are this array's (not a view of another owner's).
    owned: bool,
}

impl GpuArray {
    /// A view of `n` f32 elements of another owner's `buf` (a model's weights or
    /// gradients), split at the same element boundaries as an owned array: the
    /// optimizer then steps the model's own tensors, with no copies between them.
    /// `buf` must hold the elements; every chunk begins at a multiple of 256
    /// elements, which meets the binding offset alignment of every device wgpu runs.
    pub fn view_f32(ctx: &GpuContext, label: &str, buf: &wgpu::Buffer, n: u64) -> Result<GpuArray, GpuError> {
        if buf.size() < 4 * n {
            return Err(GpuError::Invalid(format!("`{label}`: a buffer of {} bytes cannot hold {n} f32 elements", buf.size())));
        }
        let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment);
        let chunks = ctx
            .chunks(n)
            .into_iter()
            .map(|(start, len)| {
                let offset = 4 * start;
                debug_assert!(offset.is_multiple_of(align.max(1)), "chunks start at multiples of 256 elements");
                Chunk { start, len, buf: buf.clone(), offset, view_bytes: Some(4 * len) }
            })
            .collect();
        Ok(GpuArray { storage: Storage::F32, n, chunks, owned: false })
    }

    /// Zero-filled.
    pub fn zeros(ctx: &GpuContext, label: &str, storage: Storage, n: u64) -> GpuArray {
        let chunks = ctx
            .chunks(n)
            .into_iter()
            .map(|(start, len)| Chunk { start, len, buf: ctx.storage(label, storage.bytes(len)), offset: 0, view_bytes: None })
            .collect();
        GpuArray { storage, n, chunks, owned: true }
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
                offset: 0,
                view_bytes: None,
            })
            .collect();
        GpuArray { storage, n, chunks, owned: true }
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
                Chunk { start, len, buf: ctx.storage_init(label, bytemuck::cast_slice(&offsets)), offset: 0, view_bytes: None }
            })
            .collect();
        GpuArray { storage: Storage::Compact, n, chunks, owned: true }
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
            ctx.write_buffer(&c.buf, c.offset, bytemuck::cast_slice(s));
        }
    }

    /// Reads an f32 array back.
    pub fn read_f32(&self, ctx: &GpuContext) -> Result<Vec<f32>, GpuError> {
        let mut out = Vec::with_capacity(self.n as usize);
        for c in &self.chunks {
            let bytes = ctx.read_bytes_at(&c.buf, c.offset, 4 * c.len)?;
            out.extend(bytemuck::pod_collect_to_vec::<u8, f32>(&bytes));
        }
        Ok(out)
    }

    /// Bytes this array holds on the device (0 for a view: its owner holds them).
    pub fn device_bytes(&self) -> u64 {
        if self.owned { self.chunks.iter().map(|c| c.buf.size()).sum() } else { 0 }
    }
}
