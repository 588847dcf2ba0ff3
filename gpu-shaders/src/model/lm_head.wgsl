// The LM head's log-softmax and target gather over one chunk of the vocabulary
// at a time: the logits of a chunk ([rows, cols], from the tiled matmul) update a
// running maximum and a running Σ exp(l − max) per row, so no more than one
// chunk of [rows, vocab] logits ever exists.
//
// Orders: chunks in ascending vocabulary order; within a chunk, one workgroup per
// row, lane l takes columns l, l + WG, … ascending, then the prelude's fixed
// tree; the running sum is rescaled as s·exp(m_old − m_new) + chunk sum.

const WG: u32 = 256u;

struct HeadParams {
    rows: u32,
    // columns of this chunk, and its first vocabulary id
    cols: u32,
    first: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> P: HeadParams;
@group(0) @binding(1) var<storage, read_write> LOGITS: array<f32>;
@group(0) @binding(2) var<storage, read> TARGETS: array<u32>;
// per row: [running max | running sum | target logit]
@group(0) @binding(3) var<storage, read_write> STATS: array<f32>;
@group(0) @binding(4) var<storage, read_write> LOGP: array<f32>;
@group(0) @binding(5) var<storage, read_write> LSE: array<f32>;
@group(0) @binding(6) var<storage, read> COEF: array<f32>;

@compute @workgroup_size(WG)
fn head_chunk_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= P.rows) {
        return;
    }
    let base = row * P.cols;
    var mx = LOWEST;
    for (var j = lid; j < P.cols; j = j + WG) {
        mx = max(mx, LOGITS[base + j]);
    }
    let m_old = STATS[row];
    let m = max(m_old, tree_max(lid, mx));
    var part = 0.0;
    for (var j = lid; j < P.cols; j = j + WG) {
        part = part + exp(LOGITS[base + j] - m);
    }
    let chunk_sum = tree_sum(lid, part);
    if (lid == 0u) {
        STATS[row] = m;
        STATS[P.rows + row] = STATS[P.rows + row] * exp(m_old - m) + chunk_sum;
        let target_id = TARGETS[row];
        if (target_id >= P.first && target_id - P.first < P.cols) {
            STATS[2u * P.rows + row] = LOGITS[base + target_id - P.first];
        }
    }
}

// lse = max + log(sum); log p(target) = logit(target) − lse
@compute @workgroup_size(WG)
fn head_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg) * WG + lid;
    if (row >= P.rows) {
        return;
    }
    let lse = STATS[row] + log(STATS[P.rows + row]);
    LSE[row] = lse;
    LOGP[row] = STATS[2u * P.rows + row] - lse;
}

// In place over the chunk: d logits = coef · (onehot(target) − softmax), the
// gradient of coef · log p(target).
@compute @workgroup_size(WG)
fn head_dlogits(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * WG + lid;
    if (i >= P.rows * P.cols) {
        return;
    }
    let row = i / P.cols;
    let coef = COEF[row];
    var d = -coef * exp(LOGITS[i] - LSE[row]);
    if (P.first + i % P.cols == TARGETS[row]) {
        d = d + coef;
    }
    LOGITS[i] = d;
}
