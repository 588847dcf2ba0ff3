// Shared by every model kernel (prepended by `model::kernel`). Each kernel file
// defines WG, its workgroup width, which is also the width of the reduction trees.

// Far below any logit or score, the start of a running maximum: exp(x − m) of
// it is 0, and WGSL has no portable −∞ literal.
const LOWEST: f32 = -3.0e38;

// Dispatches above the per-dimension limit spill into y (`GpuContext::groups`).
fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

var<workgroup> RED: array<f32, WG>;

// One value per lane summed over the workgroup in a fixed binary tree: lane l
// adds lane l + s for s = WG/2, WG/4, …, 1. The order depends on WG alone, never
// on timing. Every lane must call it (it holds barriers) and gets the sum.
fn tree_sum(lid: u32, x: f32) -> f32 {
    RED[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            RED[lid] = RED[lid] + RED[lid + s];
        }
        workgroupBarrier();
    }
    let total = RED[0];
    workgroupBarrier();
    return total;
}

// The same tree for the maximum (exact in any order; the tree keeps it cheap).
fn tree_max(lid: u32, x: f32) -> f32 {
    RED[lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            RED[lid] = max(RED[lid], RED[lid + s]);
        }
        workgroupBarrier();
    }
    let m = RED[0];
    workgroupBarrier();
    return m;
}
