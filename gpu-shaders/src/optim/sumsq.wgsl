// Σ g² of one chunk of a gradient, for the grad-norm metric of a step whose
// gradient never leaves the device. Workgroup w covers elements
// [w·BLOCK, (w+1)·BLOCK) of the chunk, BLOCK = WG·SUMSQ_PER_LANE: lane l adds
// g[w·BLOCK + j·WG + l]² for j = 0, 1, … in order, then the lanes meet in
// tree256. The host adds the block totals in f64, in block order. The order is
// fixed by the chunk's length alone (deterministic on one adapter); this is a
// metric, not the merge path, so it uses the hardware's rounding.

const SUMSQ_PER_LANE: u32 = 64u;

struct SumsqParams {
    n: u32,
    out0: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> SP: SumsqParams;
@group(0) @binding(1) var<storage, read> SG: array<f32>;
@group(0) @binding(2) var<storage, read_write> SOUT: array<f32>;

@compute @workgroup_size(256)
fn block_sumsq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let w = linear_group(wid, nwg);
    let start = w * WG * SUMSQ_PER_LANE;
    var acc = 0.0;
    for (var j = 0u; j < SUMSQ_PER_LANE; j = j + 1u) {
        let i = start + j * WG + lid;
        if (i < SP.n) {
            let g = SG[i];
            acc = acc + g * g;
        }
    }
    let total = tree256(lid, acc);
    if (lid == 0u) {
        SOUT[SP.out0 + w] = total;
    }
}
