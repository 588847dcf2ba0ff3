// Token embeddings: a gather forward, and a backward that adds each token's
// gradient row into its table row without atomics. `embedding_links` finds, per
// position t, the next position holding the same token (NEXT[t], T if none) and
// whether t is that token's first position (FIRST[t]); `embedding_backward` then
// lets only first positions write, each walking its token's positions in
// ascending order: dtable[v, c] = ((dtable[v, c] + dx[t0, c]) + dx[t1, c]) + …,
// the CPU layer's order.

const WG: u32 = 256u;

struct EmbedParams {
    tokens: u32,
    cols: u32,
    vocab: u32,
    // 0x7fc00000, a quiet NaN: compilers may reject a NaN constant in the shader
    nan_bits: u32,
}

@group(0) @binding(0) var<uniform> P: EmbedParams;
@group(0) @binding(1) var<storage, read> TOKENS: array<u32>;
@group(0) @binding(2) var<storage, read> TABLE: array<f32>;
@group(0) @binding(3) var<storage, read_write> X: array<f32>;
// [NEXT (tokens) | FIRST (tokens)]
@group(0) @binding(4) var<storage, read_write> LINKS: array<u32>;
@group(0) @binding(5) var<storage, read> DX: array<f32>;
@group(0) @binding(6) var<storage, read_write> DTABLE: array<f32>;

@compute @workgroup_size(WG)
fn embedding_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * WG + lid;
    if (i >= P.tokens * P.cols) {
        return;
    }
    let tok = TOKENS[i / P.cols];
    // an id outside the table gives NaN, so it cannot pass unnoticed
    var v = bitcast<f32>(P.nan_bits);
    if (tok < P.vocab) {
        v = TABLE[tok * P.cols + i % P.cols];
    }
    X[i] = v;
}

@compute @workgroup_size(WG)
fn embedding_links(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let t = group_index(wid, nwg) * WG + lid;
    if (t >= P.tokens) {
        return;
    }
    let tok = TOKENS[t];
    var first = 1u;
    for (var u = 0u; u < t; u = u + 1u) {
        if (TOKENS[u] == tok) {
            first = 0u;
            break;
        }
    }
    var next = P.tokens;
    for (var u = t + 1u; u < P.tokens; u = u + 1u) {
        if (TOKENS[u] == tok) {
            next = u;
            break;
        }
    }
    LINKS[t] = next;
    LINKS[P.tokens + t] = first;
}

@compute @workgroup_size(WG)
fn embedding_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * WG + lid;
    if (i >= P.tokens * P.cols) {
        return;
    }
    let t = i / P.cols;
    let c = i % P.cols;
    let tok = TOKENS[t];
    if (LINKS[P.tokens + t] == 0u || tok >= P.vocab) {
        return;
    }
    let at = tok * P.cols + c;
    var acc = DTABLE[at];
    var u = t;
    while (u < P.tokens) {
        acc = acc + DX[u * P.cols + c];
        u = LINKS[u];
    }
    DTABLE[at] = acc;
}
