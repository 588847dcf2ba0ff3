// The bandwidth yardstick: Y = X, 4 bytes read and 4 written per element.

struct CopyU {
    zero: u32, n: u32, pad0: u32, pad1: u32,
}

@group(0) @binding(0) var<uniform> U: CopyU;
@group(0) @binding(1) var<storage, read> X: array<u32>;
@group(0) @binding(2) var<storage, read_write> Y: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    ZB = U.zero;
    let i = linear_group(wid, nwg) * WG + lid;
    if (i < U.n) {
        Y[i] = X[i];
    }
}
