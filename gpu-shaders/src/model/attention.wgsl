// Causal grouped-query attention. Query row t sits at position past + t and sees
// keys 0 ..= past + t: for training past = 0 and queries and keys are the same T
// positions; for generation k and v are a cache whose first `past` rows hold the
// earlier positions (only the forward takes past > 0). Query head h reads
// key/value head g = h / (heads / kv_heads).
// Layouts: q, out [T, heads, d]; k, v [past + T (or more), kv_heads, d]; lse [heads, T].
//
// No [heads, T, T] array exists: the forward keeps each row's log-sum-exp, and
// the backward recomputes p = exp(s − lse) where it needs it, so memory stays
// O(T) per head at any context length.
//
// Orders (one workgroup per row, WG lanes; all fixed by the shapes):
// - a score is one running sum over d ascending, times 1/√d;
// - the row maximum and Σ exp(s − max): lane l takes keys l, l + WG, … in
//   ascending order, then the prelude's fixed tree;
// - a weighted sum over keys (out, dq) or queries (dk, dv): blocks of WG keys
//   in ascending order, lane d adds the block's terms in ascending order into
//   one running sum; dk and dv take the group's query heads in ascending order,
//   each over queries t ≥ j ascending.

const WG: u32 = 256u;

struct AttnParams {
    tokens: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scale: f32,
    past: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> P: AttnParams;
@group(0) @binding(1) var<storage, read> Q: array<f32>;
@group(0) @binding(2) var<storage, read> K: array<f32>;
@group(0) @binding(3) var<storage, read> V: array<f32>;
@group(0) @binding(4) var<storage, read_write> OUT: array<f32>;
@group(0) @binding(5) var<storage, read_write> LSE: array<f32>;
@group(0) @binding(6) var<storage, read> DOUT: array<f32>;
@group(0) @binding(7) var<storage, read_write> DELTA: array<f32>;
@group(0) @binding(8) var<storage, read_write> DQ: array<f32>;
@group(0) @binding(9) var<storage, read_write> DK: array<f32>;
@group(0) @binding(10) var<storage, read_write> DV: array<f32>;

var<workgroup> BLK: array<f32, WG>;
var<workgroup> BLK2: array<f32, WG>;

fn kv_offset(j: u32, g: u32) -> u32 {
    return (j * P.kv_heads + g) * P.head_dim;
}

fn score(qo: u32, ko: u32) -> f32 {
    var s = 0.0;
    for (var d = 0u; d < P.head_dim; d = d + 1u) {
        s = s + Q[qo + d] * K[ko + d];
    }
    return s * P.scale;
}

// dout · v, the gradient of the weight a query row gave one value row
fn dout_dot_v(qo: u32, vo: u32) -> f32 {
    var s = 0.0;
    for (var d = 0u; d < P.head_dim; d = d + 1u) {
        s = s + DOUT[qo + d] * V[vo + d];
    }
    return s;
}

// out[t, h] = Σ_{j ≤ past + t} softmax_j(q·k_j / √d) v_j; lse[h, t] = log Σ_j exp(q·k_j / √d).
@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg); // t · heads + h
    if (row >= P.tokens * P.heads) {
        return;
    }
    let t = row / P.heads;
    let h = row % P.heads;
    let g = h / (P.heads / P.kv_heads);
    let qo = row * P.head_dim;
    let visible = P.past + t + 1u;
    var mx = LOWEST;
    for (var j = lid; j < visible; j = j + WG) {
        mx = max(mx, score(qo, kv_offset(j, g)));
    }
    let m = tree_max(lid, mx);
    var sum = 0.0;
    for (var j = lid; j < visible; j = j + WG) {
        sum = sum + exp(score(qo, kv_offset(j, g)) - m);
    }
    let lse = m + log(tree_sum(lid, sum));
    var acc = 0.0;
    for (var j0 = 0u; j0 < visible; j0 = j0 + WG) {
        let j = j0 + lid;
        if (j < visible) {
            BLK[lid] = exp(score(qo, kv_offset(j, g)) - lse);
        }
        workgroupBarrier();
        if (lid < P.head_dim) {
            let n = min(WG, visible - j0);
            for (var jj = 0u; jj < n; jj = jj + 1u) {
                acc = acc + BLK[jj] * V[kv_offset(j0 + jj, g) + lid];
            }
        }
        workgroupBarrier();
    }
    if (lid < P.head_dim) {
        OUT[qo + lid] = acc;
    }
    if (lid == 0u) {
        LSE[h * P.tokens + t] = lse;
    }
}

// delta[t, h] = dout · out = Σ_j p_j (dout · v_j), the softmax backward's row term.
@compute @workgroup_size(WG)
fn attention_delta(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg) * WG + lid;
    if (row >= P.tokens * P.heads) {
        return;
    }
    let o = row * P.head_dim;
    var s = 0.0;
    for (var d = 0u; d < P.head_dim; d = d + 1u) {
        s = s + DOUT[o + d] * OUT[o + d];
    }
    DELTA[row] = s;
}

// dq[t, h] += Σ_{j ≤ t} p_j (dout·v_j − delta) / √d · k_j
@compute @workgroup_size(WG)
fn attention_backward_query(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= P.tokens * P.heads) {
        return;
    }
    let t = row / P.heads;
    let h = row % P.heads;
    let g = h / (P.heads / P.kv_heads);
    let qo = row * P.head_dim;
    let visible = t + 1u;
    let lse = LSE[h * P.tokens + t];
    let delta = DELTA[row];
    var acc = 0.0;
    for (var j0 = 0u; j0 < visible; j0 = j0 + WG) {
        let j = j0 + lid;
        if (j < visible) {
            let ko = kv_offset(j, g);
            let p = exp(score(qo, ko) - lse);
            BLK[lid] = p * (dout_dot_v(qo, ko) - delta) * P.scale;
        }
        workgroupBarrier();
        if (lid < P.head_dim) {
            let n = min(WG, visible - j0);
            for (var jj = 0u; jj < n; jj = jj + 1u) {
                acc = acc + BLK[jj] * K[kv_offset(j0 + jj, g) + lid];
            }
        }
        workgroupBarrier();
    }
    if (lid < P.head_dim) {
        DQ[qo + lid] = DQ[qo + lid] + acc;
    }
}

// For key/value row (j, g), over the group's query heads h and queries t ≥ j:
// dv += Σ p dout[t, h], dk += Σ p (dout·v_j − delta) / √d · q[t, h].
@compute @workgroup_size(WG)
fn attention_backward_key_value(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                @builtin(local_invocation_index) lid: u32) {
    let kv_row = group_index(wid, nwg); // j · kv_heads + g
    if (kv_row >= P.tokens * P.kv_heads) {
        return;
    }
    let j = kv_row / P.kv_heads;
    let g = kv_row % P.kv_heads;
    let ko = kv_row * P.head_dim;
    let group = P.heads / P.kv_heads;
    var acc_k = 0.0;
    var acc_v = 0.0;
    for (var hh = 0u; hh < group; hh = hh + 1u) {
        let h = g * group + hh;
        for (var t0 = j; t0 < P.tokens; t0 = t0 + WG) {
            let t = t0 + lid;
            if (t < P.tokens) {
                let qo = (t * P.heads + h) * P.head_dim;
                let p = exp(score(qo, ko) - LSE[h * P.tokens + t]);
                BLK[lid] = p;
                BLK2[lid] = p * (dout_dot_v(qo, ko) - DELTA[t * P.heads + h]) * P.scale;
            }
            workgroupBarrier();
            if (lid < P.head_dim) {
                let n = min(WG, P.tokens - t0);
                for (var tt = 0u; tt < n; tt = tt + 1u) {
                    let qo = ((t0 + tt) * P.heads + h) * P.head_dim + lid;
                    acc_v = acc_v + BLK[tt] * DOUT[qo];
                    acc_k = acc_k + BLK2[tt] * Q[qo];
                }
            }
            workgroupBarrier();
        }
    }
    if (lid < P.head_dim) {
        DK[ko + lid] = DK[ko + lid] + acc_k;
        DV[ko + lid] = DV[ko + lid] + acc_v;
    }
}
