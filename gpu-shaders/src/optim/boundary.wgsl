// The shared 256-blocks of a global-scope tree sum (see gnorm in step.wgsl):
// every chunk has written its leaves of the block into its slot (the rest stay
// +0), so each slot now holds the block's 256 leaves; reduce them in the tree
// shape and store the block sum at its scope block index.

struct BndU {
    zero: u32, nslots: u32, nb_total: u32, bl_base: u32,
}

@group(0) @binding(0) var<uniform> B: BndU;
@group(0) @binding(1) var<storage, read_write> SUMS: array<f32>;
@group(0) @binding(2) var<storage, read> MAP: array<u32>;

@compute @workgroup_size(256)
fn boundary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    ZB = B.zero;
    let g = linear_group(wid, nwg);
    let half = g / max(B.nslots, 1u);
    let s = g % max(B.nslots, 1u);
    var x = 0.0;
    if (half < 2u) {
        x = SUMS[B.bl_base + (half * B.nslots + s) * WG + lid];
    }
    let t = tree256(lid, x);
    if (lid == 0u && half < 2u) {
        SUMS[half * B.nb_total + MAP[s]] = t;
    }
}
