// One radix-select histogram pass (SPEC §4, merge_core::topk::Pass) over one
// chunk: workgroup-local integer histograms, then atomically added into H.
// Counts are integers, so the result is independent of thread order and of how
// the scope was chunked. Non-finite inputs record their lowest chunk index in S.

// Per chunk, fixed for a whole select: its bind group is made once.
struct ChunkU {
    zero: u32, n: u32, base_lo: u32, base_hi: u32,
    slot: u32, diff: u32, pad0: u32, pad1: u32,
}

// Per pass, shared by every chunk: one small write each pass.
struct PassU {
    mode: u32, shift: u32, bits: u32, key: u32,
    prefix_lo: u32, prefix_hi: u32, pad0: u32, pad1: u32,
}

@group(0) @binding(0) var<uniform> U: ChunkU;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> H: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read_write> S: array<atomic<u32>>;
// With `diff`, the values are the task vector X ⊖ B (offline TIES trimming).
@group(0) @binding(4) var<storage, read> B: array<f32>;
@group(0) @binding(5) var<uniform> P: PassU;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    ZB = U.zero;
    hist_clear(lid);
    workgroupBarrier();
    let i = linear_group(wid, nwg) * WG + lid;
    if (i < U.n) {
        var x = fb(X[i]);
        var bad = is_nf(x);
        if (U.diff != 0u) {
            // merge-core loads the base first, then the model: two status words.
            let b = fb(B[i]);
            if (is_nf(b)) {
                atomicMin(&S[2u * U.slot], i);
            }
            if (bad) {
                atomicMin(&S[2u * U.slot + 1u], i);
            }
            bad = bad || is_nf(b);
            x = sub(x, b);
        } else if (bad) {
            atomicMin(&S[2u * U.slot], i);
        }
        if (!bad) {
            let idx = index64(U.base_lo, U.base_hi, i);
            let h = HistPass(P.mode, P.shift, P.bits, P.key, P.prefix_lo, P.prefix_hi);
            hist_count(h, bitcast<u32>(x) & 0x7fffffffu, idx.x, idx.y);
        }
    }
    workgroupBarrier();
    for (var j = lid; j < BUCKETS; j = j + WG) {
        let c = atomicLoad(&LHIST[j]);
        if (c != 0u) {
            atomicAdd(&H[j], c);
        }
    }
}
