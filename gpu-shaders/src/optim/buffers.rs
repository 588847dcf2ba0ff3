//! The device buffers of each tensor (`Slot`) and of the global OnTIES scope's
//! norms, and the fixed tree-sum levels above a set of 256-block sums.

use super::TensorInit;
use crate::context::{GpuContext, GpuError, WORKGROUP};
use crate::kernel::Kernel;
use crate::tensor::{GpuArray, Storage};

pub(super) struct Slot {
    pub(super) name: String,
    /// `theta` and `grad` are views of another owner's buffers ([`super::Weights::Shared`]).
    pub(super) shared: bool,
    pub(super) n: u64,
    pub(super) theta: GpuArray,
    pub(super) m: GpuArray,
    pub(super) v: GpuArray,
    pub(super) grad: GpuArray,
    pub(super) cached: Option<GpuArray>,
    pub(super) tau: Option<GpuArray>,
    pub(super) tau_dtype: Storage,
    /// 256-block sums of |D| (first `nb`) and |D'| (next `nb`).
    pub(super) nb_buf: wgpu::Buffer,
    pub(super) nb: u32,
    /// Tree levels above the blocks: (uniform, output buffer, groups per half, bind group).
    pub(super) levels: Vec<(wgpu::Buffer, wgpu::Buffer, u32, wgpu::BindGroup)>,
    pub(super) uniforms: Vec<wgpu::Buffer>,
    /// Per chunk: bind groups for scan, check, write, hist.
    pub(super) groups: Vec<[wgpu::BindGroup; 4]>,
    /// First index in the OnTIES scope (0 for per-tensor scope).
    pub(super) offset: u64,
    /// Global-scope norms: per chunk, the gnorm bind group and
    /// (shift, first scope block, first shared slot, last shared slot).
    pub(super) gnorm: Vec<(wgpu::BindGroup, [u32; 4])>,
}

/// The tree sums over the whole OnTIES scope (global scope with the rescale):
/// `buf` holds the scope's 256-block sums of |D| then |D'| (`nb_total` each), then
/// the leaves of the `nslots` blocks shared by two or more chunks.
pub(super) struct GlobalNorms {
    pub(super) buf: wgpu::Buffer,
    pub(super) nb_total: u32,
    pub(super) nslots: u32,
    pub(super) bl_base: u32,
    /// The boundary reduction (uniform and map kept alive by the bind group's owner).
    pub(super) boundary: Option<(wgpu::Buffer, wgpu::Buffer, wgpu::BindGroup)>,
    pub(super) levels: Vec<(wgpu::Buffer, wgpu::Buffer, u32, wgpu::BindGroup)>,
}

/// Lays out the global-scope tree sums: every chunk of every tensor (name order)
/// is a segment of the scope; a 256-block of the scope that two or more segments
/// touch is "shared" and gets a slot for its leaves. Returns the buffers and, per
/// tensor per chunk, (shift, first scope block, first slot, last slot).
#[allow(clippy::type_complexity)]
pub(super) fn global_norms(ctx: &GpuContext, reduce: &Kernel, boundary: &Kernel, order: &[&TensorInit<'_>]) -> Result<(GlobalNorms, Vec<Vec<[u32; 4]>>), GpuError> {
    let wg = WORKGROUP as u64;
    let n: u64 = order.iter().map(|t| t.theta.len() as u64).sum();
    if n >= 1 << 32 {
        return Err(GpuError::Invalid(format!("OnTIES global scope of {n} elements: the GPU indexes it with u32")));
    }
    let mut segs = Vec::new();
    let mut off = 0u64;
    for t in order {
        let mut per = Vec::new();
        for (start, len) in ctx.chunks(t.theta.len() as u64) {
            per.push((off + start, len));
        }
        segs.push(per);
        off += t.theta.len() as u64;
    }
    // A block is shared when a segment starts strictly inside it.
    let mut shared: Vec<u64> = segs.iter().flatten().map(|&(g0, _)| g0).filter(|g0| g0 % wg != 0).map(|g0| g0 / wg).collect();
    shared.dedup();
    let slot_of = |b: u64| shared.binary_search(&b).ok().map_or(u32::MAX, |s| s as u32);
    let layout: Vec<Vec<[u32; 4]>> = segs
        .iter()
        .map(|per| {
            per.iter()
                .map(|&(g0, len)| {
                    let first = g0 / wg;
                    let last = (g0 + len.max(1) - 1) / wg;
                    [(g0 % wg) as u32, first as u32, slot_of(first), slot_of(last)]
                })
                .collect()
        })
        .collect();
    let nb_total = n.div_ceil(wg) as u32;
    let nslots = shared.len() as u32;
    let bl_base = 2 * nb_total;
    let buf = ctx.storage("global block sums", 4 * (u64::from(bl_base) + 2 * u64::from(nslots) * wg).max(2));
    let boundary = (nslots > 0).then(|| {
        let map: Vec<u32> = shared.iter().map(|&b| b as u32).collect();
        let mb = ctx.storage_init("shared blocks", bytemuck::cast_slice(&map));
        let u = ctx.uniform_init("shared blocks", bytemuck::cast_slice(&[0u32, nslots, nb_total, bl_base]));
        let bg = boundary.bind(ctx, &[&u, &buf, &mb]);
        (u, mb, bg)
    });
    let levels = tree_levels(ctx, reduce, &buf, nb_total);
    Ok((GlobalNorms { buf, nb_total, nslots, bl_base, boundary, levels }, layout))
}

/// The levels of the fixed tree sum above `blocks` 256-block sums of |D| and |D'|
/// held in `leaves`: per level its uniform, output buffer, groups per half and bind group.
pub(super) fn tree_levels(
    ctx: &GpuContext,
    reduce: &Kernel,
    leaves: &wgpu::Buffer,
    blocks: u32,
) -> Vec<(wgpu::Buffer, wgpu::Buffer, u32, wgpu::BindGroup)> {
    let mut levels = Vec::new();
    let mut cnt = blocks;
    let mut input = leaves.clone();
    while cnt > 1 {
        let gph = cnt.div_ceil(WORKGROUP);
        let u = ctx.uniform_init("tree level", bytemuck::cast_slice(&[0u32, cnt, gph, 0]));
        let out = ctx.storage("tree level", 8 * u64::from(gph));
        let bg = reduce.bind(ctx, &[&u, &input, &out]);
        input = out.clone();
        levels.push((u, out, gph, bg));
        cnt = gph;
    }
    levels
}
