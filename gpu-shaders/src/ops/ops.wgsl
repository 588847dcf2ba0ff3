// Element-wise primitives of common.wgsl, one op per dispatch: the unit under
// test for the exhaustive comparisons against merge-core, and the adapter
// self-test.

struct OpParams {
    zero: u32,
    op: u32,
    n: u32,
    k0: u32,
    k1: u32,
    stream: u32,
    threshold: u32,
    keep_all: u32,
    est_bias: i32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> P: OpParams;
@group(0) @binding(1) var<storage, read> A: array<u32>;
@group(0) @binding(2) var<storage, read> B: array<u32>;
@group(0) @binding(3) var<storage, read_write> OUT: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    ZB = P.zero;
    EST_BIAS = P.est_bias;
    let i = linear_group(wid, nwg) * WG + lid;
    if (i >= P.n) {
        return;
    }
    let a = fb(bitcast<f32>(A[i]));
    let b = fb(bitcast<f32>(B[i]));
    var r = 0u;
    switch P.op {
        case 0u: { r = bitcast<u32>(add(a, b)); }
        case 1u: { r = bitcast<u32>(sub(a, b)); }
        case 2u: { r = bitcast<u32>(mul(a, b)); }
        case 3u: { r = bitcast<u32>(div(a, b)); }
        case 4u: { r = bitcast<u32>(sqrt_cr(a)); }
        case 5u: { r = bitcast<u32>(a); }
        // The contraction probe (SPEC.md §1.2, §8.2): a*b+b must stay two roundings.
        case 6u: { r = bitcast<u32>(add(mul(a, b), b)); }
        case 7u: {
            let w = threefry(P.k0, P.k1, A[i], B[i]);
            OUT[2u * i] = w.x;
            OUT[2u * i + 1u] = w.y;
            return;
        }
        case 8u: { r = select(0u, 1u, keep(P.k0, P.k1, P.stream, A[i], P.threshold, P.keep_all)); }
        case 9u: { r = bitcast<u32>(bf16_to_f32(A[i] & 0xffffu)); }
        case 10u: { r = bitcast<u32>(f16_to_f32(A[i] & 0xffffu)); }
        case 11u: { r = f32_to_bf16(bitcast<f32>(A[i])); }
        case 12u: { r = f32_to_f16(bitcast<f32>(A[i])); }
        default: { r = 0xffffffffu; }
    }
    OUT[i] = r;
}
