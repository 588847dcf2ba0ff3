// The LM head's log-softmax and target gather over one chunk of the vocabulary
// at a time: the logits of a chunk ([rows, cols], from the tiled matmul) update a
// running maximum and a running Σ exp(l − max) per row, so no more than one
// chunk of [rows, vocab] logits ever exists.
//
// Orders: chunks in ascending vocabulary order; within a chunk, one workgroup per
// row, lane l takes columns l, l + WG, … ascending, then the prelude's fixed
// tree; the running sum is rescaled as s·exp(m_old − m_new) + chunk sum.
//
// The same pass keeps what TRL logs about the head (metrics only, nothing the
// gradient uses): Σ logits, Σ exp(l − m)·l rescaled like the sum (the entropy is
// lse − that / sum), and the id of the first largest logit (a chunk's first by a
// tree over negated ids; an earlier chunk keeps a tie).

const WG: u32 = 256u;

struct HeadParams {
    rows: u32,
    // columns of this chunk, and its first vocabulary id
    cols: u32,
    first: u32,
    vocab: u32,
}

@group(0) @binding(0) var<uniform> P: HeadParams;
@group(0) @binding(1) var<storage, read_write> LOGITS: array<f32>;
@group(0) @binding(2) var<storage, read> TARGETS: array<u32>;
// per row: [running max | running sum | target logit | Σ logits |
//           running Σ exp(l − max)·l | id of the first largest logit]
@group(0) @binding(3) var<storage, read_write> STATS: array<f32>;
@group(0) @binding(4) var<storage, read_write> LOGP: array<f32>;
@group(0) @binding(5) var<storage, read_write> LSE: array<f32>;
@group(0) @binding(6) var<storage, read> COEF: array<f32>;
// per row: the logits' mean over the vocabulary, the softmax's entropy, and 1
// when the first largest logit is the target (else 0)
@group(0) @binding(7) var<storage, read_write> MEAN_LOGIT: array<f32>;
@group(0) @binding(8) var<storage, read_write> ENTROPY: array<f32>;
@group(0) @binding(9) var<storage, read_write> ARGMAX_HIT: array<f32>;

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
    let chunk_max = tree_max(lid, mx);
    let m = max(m_old, chunk_max);
    var part = 0.0;
    var logit_part = 0.0;
    var weighted_part = 0.0;
    // −(lowest column holding the chunk's maximum), as a float (ids < 2^24)
    var first_max = LOWEST;
    for (var j = lid; j < P.cols; j = j + WG) {
        let l = LOGITS[base + j];
        let e = exp(l - m);
        part = part + e;
        logit_part = logit_part + l;
        weighted_part = weighted_part + e * l;
        if (l == chunk_max && first_max == LOWEST) {
            first_max = -f32(j);
        }
    }
    let chunk_sum = tree_sum(lid, part);
    let chunk_logits = tree_sum(lid, logit_part);
    let chunk_weighted = tree_sum(lid, weighted_part);
    let chunk_first = tree_max(lid, first_max);
    if (lid == 0u) {
        let rescale = exp(m_old - m);
        STATS[row] = m;
        STATS[P.rows + row] = STATS[P.rows + row] * rescale + chunk_sum;
        let target_id = TARGETS[row];
        if (target_id >= P.first && target_id - P.first < P.cols) {
            STATS[2u * P.rows + row] = LOGITS[base + target_id - P.first];
        }
        STATS[3u * P.rows + row] = STATS[3u * P.rows + row] + chunk_logits;
        STATS[4u * P.rows + row] = STATS[4u * P.rows + row] * rescale + chunk_weighted;
        if (chunk_max > m_old) {
            STATS[5u * P.rows + row] = f32(P.first) - chunk_first;
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
    MEAN_LOGIT[row] = STATS[3u * P.rows + row] / f32(P.vocab);
    ENTROPY[row] = lse - STATS[4u * P.rows + row] / STATS[P.rows + row];
    ARGMAX_HIT[row] = select(0.0, 1.0, u32(STATS[5u * P.rows + row]) == TARGETS[row]);
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
