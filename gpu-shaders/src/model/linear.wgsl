// Matrix products of the linear layers: C (+)= A·B (+ bias), tiled through
// workgroup memory. A is read as A[m, k] = A[a_off + m·a_sm + k·a_sk], B as
// B[k, n] = B[b_off + k·b_sk + n·b_sn], so the three products of a layer read
// x, dy and W (Hugging Face `[out, in]`) in place, without transposes:
//   y  = x Wᵀ + b : A = x [T, in],  B[k=i, n=o] = W[o, i]
//   dx += dy W    : A = dy [T, out], B[k=o, n=i] = W[o, i]
//   dW += dyᵀ x   : A[m=o, k=t] = dy[t, o], B = x [T, in]
// Every output is one running sum over k = 0, 1, …, K−1 in ascending order,
// then `+ bias`, then added to the old value when accumulating: the order is
// fixed by K alone, whatever the tiling or the dispatch.

const WG: u32 = 256u;
const TILE: u32 = 16u;

struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    // bit 0: C += result (else C = result); bit 1: add bias[n]
    flags: u32,
    a_off: u32,
    a_sm: u32,
    a_sk: u32,
    b_off: u32,
    b_sk: u32,
    b_sn: u32,
    c_off: u32,
    c_sm: u32,
}

@group(0) @binding(0) var<uniform> P: MatmulParams;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read> BIAS: array<f32>;
@group(0) @binding(4) var<storage, read_write> C: array<f32>;

var<workgroup> TILE_A: array<array<f32, 16>, 16>; // [m][k]
var<workgroup> TILE_B: array<array<f32, 16>, 16>; // [k][n]

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let tiles_n = (P.n + TILE - 1u) / TILE;
    let g = group_index(wid, nwg);
    let m0 = (g / tiles_n) * TILE;
    let n0 = (g % tiles_n) * TILE;
    if (m0 >= P.m) {
        return;
    }
    let row = m0 + lid.y;
    let col = n0 + lid.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < P.k; k0 = k0 + TILE) {
        // lane (y, x) loads A[row, k0 + x] and B[k0 + y, col]; outside the
        // matrices the tile keeps whatever it held, and is never read there
        let ka = k0 + lid.x;
        if (row < P.m && ka < P.k) {
            TILE_A[lid.y][lid.x] = A[P.a_off + row * P.a_sm + ka * P.a_sk];
        }
        let kb = k0 + lid.y;
        if (kb < P.k && col < P.n) {
            TILE_B[lid.y][lid.x] = B[P.b_off + kb * P.b_sk + col * P.b_sn];
        }
        workgroupBarrier();
        let kn = min(TILE, P.k - k0);
        for (var kk = 0u; kk < kn; kk = kk + 1u) {
            acc = acc + TILE_A[lid.y][kk] * TILE_B[kk][lid.x];
        }
        workgroupBarrier();
    }
    if (row < P.m && col < P.n) {
        let ci = P.c_off + row * P.c_sm + col;
        var y = acc;
        if ((P.flags & 2u) != 0u) {
            y = y + BIAS[col];
        }
        if ((P.flags & 1u) != 0u) {
            y = C[ci] + y;
        }
        C[ci] = y;
    }
}

// db[n] += Σ_t dy[t, n] with A = dy [m, n]: one invocation per column, t in
// ascending order.
@compute @workgroup_size(256)
fn bias_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let col = group_index(wid, nwg) * WG + lid;
    if (col >= P.n) {
        return;
    }
    var acc = C[col];
    for (var t = 0u; t < P.m; t = t + 1u) {
        acc = acc + A[t * P.n + col];
    }
    C[col] = acc;
}
