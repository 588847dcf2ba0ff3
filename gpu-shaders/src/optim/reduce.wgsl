// One level of the fixed tree sum (SPEC §3.1) over two arrays at once: X holds
// two runs of `n` partial sums (|D| then |D'|), Y receives ceil(n/256) sums of
// each. Aligned blocks of 256 are subtrees, so repeating this gives tree_sum.

struct RedU {
    zero: u32, n: u32, groups_per_half: u32, pad: u32,
}

@group(0) @binding(0) var<uniform> R: RedU;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;

@compute @workgroup_size(256)
fn level(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    ZB = R.zero;
    let g = linear_group(wid, nwg);
    let half = g / R.groups_per_half;
    let b = g % R.groups_per_half;
    let j = b * WG + lid;
    var x = 0.0;
    if (j < R.n && half < 2u) {
        x = X[half * R.n + j];
    }
    let s = tree256(lid, x);
    if (lid == 0u && half < 2u) {
        Y[half * R.groups_per_half + b] = s;
    }
}
