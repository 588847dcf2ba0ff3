// One optimizer step of one chunk of one tensor: merge_core::step, element for
// element (AdamW in both forms, step-K accumulate/rollback, OnDARE reference and
// paper variants, OnTIES, weight decay). Entry points sharing the arithmetic:
//   scan  — validates, and writes the 256-block tree sums of |D| and |D'| (L1 rescale);
//   hist  — one radix-select histogram pass over the magnitude keys of D (OnTIES);
//   check — validates every output, writes nothing;
//   write — stores θ, m, v (and Δ_c).
// Validation records, per tensor slot and per kind of value, the lowest
// non-finite element index (atomicMin: independent of thread order).

struct StepU {
    zero: u32, n: u32, start: u32, block0: u32,
    k0: u32, k1: u32, threshold: u32, keep_all: u32,
    kind: u32, torch: u32, accumulate: u32, has_cached: u32,
    tau_dtype: u32, do_rescale: u32, slot: u32, nb_total: u32,
    beta1: f32, beta2: f32, c1: f32, c2: f32,
    eps: f32, neg_step: f32, bc2_sqrt: f32, decay_before: f32,
    decay_after: f32, scale: f32, alpha: f32, omega: f32,
    factor: f32, clip: f32, ties_variant: u32, hist_base: u32,
    // OnTIES: the update's threshold (T, c) over the scope, the tensor's first
    // index in the scope, and the histogram pass of the radix select.
    thr_key: u32, cut_lo: u32, cut_hi: u32, off_lo: u32,
    off_hi: u32, h_mode: u32, h_shift: u32, h_bits: u32,
    h_key: u32, h_prefix_lo: u32, h_prefix_hi: u32, tau_entries: u32,
    // Global-scope norms (gnorm): the segment's offset within its first global
    // 256-block, that block's index, the scope's block count, the slots of shared
    // first/last blocks (0xffffffff: not shared), where the shared leaves live.
    g_shift: u32, g_block0: u32, g_nb_total: u32, g_first_slot: u32,
    g_last_slot: u32, g_bl_base: u32, g_nslots: u32, pad1: u32,
}

// The kernel kinds (PLAIN, DARE_REF, DARE_PAPER, TIES), the pass modes (SCAN,
// CHECK, WRITE) and HIST_ITEMS are prepended from the Rust constants in mod.rs.

// Slots per tensor in STATUS, in merge-core's reporting order (step.rs first_non_finite).
const NCODES: u32 = 16u;

@group(0) @binding(0) var<uniform> U: StepU;
@group(0) @binding(1) var<storage, read> G: array<f32>;
@group(0) @binding(2) var<storage, read_write> THETA: array<f32>;
@group(0) @binding(3) var<storage, read_write> M: array<f32>;
@group(0) @binding(4) var<storage, read_write> V: array<f32>;
@group(0) @binding(5) var<storage, read_write> C: array<f32>;
@group(0) @binding(6) var<storage, read> TAU: array<u32>;
@group(0) @binding(7) var<storage, read_write> STATUS: array<atomic<u32>>;
@group(0) @binding(8) var<storage, read_write> NB: array<f32>;
@group(0) @binding(9) var<storage, read_write> HIST: array<atomic<u32>>;

fn flag(x: f32, code: u32, idx: u32) {
    if (is_nf(x)) {
        atomicMin(&STATUS[U.slot * NCODES + code], idx);
    }
}

// Compact task vectors (tau_dtype 3): the block's non-zero entries are
// scattered into workgroup memory, every other lane reads +0.
var<workgroup> TAUW: array<f32, 256>;

fn load_tau_compact(gi: u32, lid: u32) -> f32 {
    TAUW[lid] = 0.0;
    workgroupBarrier();
    if (gi * WG < U.n) {
        let s0 = TAU[gi];
        let count = TAU[gi + 1u] - s0;
        if (lid < count) {
            let e = U.tau_entries + 2u * (s0 + lid);
            TAUW[TAU[e] & 0xffu] = bitcast<f32>(TAU[e + 1u]);
        }
    }
    workgroupBarrier();
    return TAUW[lid];
}

fn load_tau(i: u32) -> f32 {
    if (U.tau_dtype == 0u) {
        return fb(bitcast<f32>(TAU[i]));
    }
    let h = half_word(TAU[i >> 1u], i);
    if (U.tau_dtype == 1u) {
        return fb(bf16_to_f32(h));
    }
    return fb(f16_to_f32(h));
}

// merge_core::dare::clamp
fn clampc(x: f32, c: f32) -> f32 {
    var lo = x;
    if (x < -c) {
        lo = -c;
    }
    if (lo > c) {
        return c;
    }
    return lo;
}

// Index of chunk element i in the OnTIES scope (64-bit).
fn scope_index(i: u32) -> vec2<u32> {
    let t = index64(U.start, 0u, i);
    let lo = t.x + U.off_lo;
    return vec2<u32>(lo, t.y + U.off_hi + select(0u, 1u, lo < t.x));
}

// merge_core::topk::Threshold::keeps on 64-bit indices.
fn ties_keeps(key: u32, idx: vec2<u32>) -> bool {
    if (key > U.thr_key) {
        return true;
    }
    if (key != U.thr_key) {
        return false;
    }
    return idx.y < U.cut_hi || (idx.y == U.cut_hi && idx.x < U.cut_lo);
}

// merge_core::onties::combine, on flushed operands.
fn combine(variant: u32, tau: f32, delta: f32, alpha: f32, omega: f32) -> f32 {
    if (variant == 0u) {
        let positive = add(tau, delta) >= 0.0;
        var a = 0.0;
        if (tau != 0.0 && (tau > 0.0) == positive) {
            a = mul(alpha, tau);
        }
        var b = 0.0;
        if (delta != 0.0 && (delta > 0.0) == positive) {
            b = mul(omega, delta);
        }
        return add(a, b);
    }
    let a = mul(alpha, tau);
    let b = mul(omega, delta);
    if ((a > 0.0 && b < 0.0) || (a < 0.0 && b > 0.0)) {
        let ka = bitcast<u32>(a) & 0x7fffffffu;
        let kb = bitcast<u32>(b) & 0x7fffffffu;
        if (ka > kb) {
            return a;
        }
        if (kb > ka) {
            return b;
        }
        return select(b, a, a > 0.0);
    }
    return add(a, b);
}

// The Adam update of element i after rollback: D = Δ ⊕ Δ_c (merge phase).
fn update_d(i: u32) -> f32 {
    let g = fb(G[i]);
    let m = fb(M[i]);
    let v = fb(V[i]);
    var c = 0.0;
    if (U.has_cached != 0u) {
        c = fb(C[i]);
    }
    let m1 = add(mul(U.beta1, m), mul(U.c1, g));
    let v1 = add(mul(U.beta2, v), mul(U.c2, mul(g, g)));
    var root = sqrt_cr(v1);
    if (U.torch != 0u) {
        root = div(root, U.bc2_sqrt);
    }
    let delta = mul(U.neg_step, div(m1, add(root, U.eps)));
    return add(delta, c);
}

fn step_main(mode: u32, wid: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    ZB = U.zero;
    let gi = linear_group(wid, nwg);
    let i = gi * WG + lid;
    let live = i < U.n;
    let idx = U.start + i;
    var d = 0.0;
    var sp = 0.0;
    var tau_c = 0.0;
    if (U.tau_dtype == 3u && U.kind != PLAIN) {
        tau_c = load_tau_compact(gi, lid);
    }
    if (live) {
        let g = fb(G[i]);
        let th_in = fb(THETA[i]);
        let m = fb(M[i]);
        let v = fb(V[i]);
        var c = 0.0;
        if (U.has_cached != 0u) {
            c = fb(C[i]);
        }
        var tau = 0.0;
        if (U.kind != PLAIN) {
            if (U.tau_dtype == 3u) {
                tau = fb(tau_c);
            } else {
                tau = load_tau(i);
            }
        }
        var theta = th_in;
        if (U.torch != 0u) {
            theta = mul(th_in, U.decay_before);
        }
        let m1 = add(mul(U.beta1, m), mul(U.c1, g));
        let v1 = add(mul(U.beta2, v), mul(U.c2, mul(g, g)));
        var root = sqrt_cr(v1);
        if (U.torch != 0u) {
            root = div(root, U.bc2_sqrt);
        }
        let delta = mul(U.neg_step, div(m1, add(root, U.eps)));
        var theta1 = 0.0;
        var cached1 = 0.0;
        if (U.kind == PLAIN && U.accumulate != 0u) {
            theta1 = add(theta, delta);
            cached1 = add(c, delta);
            d = delta;
            sp = delta;
        } else {
            let theta0 = sub(theta, c);
            d = add(delta, c);
            if (U.kind == PLAIN) {
                theta1 = add(theta0, d);
                sp = d;
            } else {
                var applied = 0.0;
                if (U.kind != TIES) {
                    let kept = keep(U.k0, U.k1, 0u, idx, U.threshold, U.keep_all);
                    if (U.kind == DARE_REF) {
                        sp = select(0.0, mul(d, U.scale), kept);
                    } else {
                        sp = select(0.0, mul(d, 1.0), kept);
                    }
                    applied = sp;
                    if (mode != SCAN && U.do_rescale != 0u) {
                        applied = clampc(mul(sp, U.factor), U.clip);
                    }
                }
                if (U.kind == TIES) {
                    let kept = ties_keeps(bitcast<u32>(d) & 0x7fffffffu, scope_index(i));
                    sp = select(0.0, mul(d, U.factor), kept);
                    theta1 = add(theta0, combine(U.ties_variant, tau, sp, U.alpha, U.omega));
                } else if (U.kind == DARE_REF) {
                    theta1 = add(add(theta0, mul(U.alpha, tau)), mul(U.omega, applied));
                } else {
                    let tkept = keep(U.k0, U.k1, 1u, idx, U.threshold, U.keep_all);
                    let t2 = select(0.0, tau, tkept);
                    theta1 = add(theta0, add(mul(U.alpha, t2), mul(U.omega, applied)));
                }
            }
        }
        var theta2 = theta1;
        if (U.torch == 0u) {
            theta2 = sub(theta1, mul(U.decay_after, theta1));
        }
        flag(g, 0u, idx);
        flag(th_in, 1u, idx);
        flag(m, 2u, idx);
        flag(v, 3u, idx);
        flag(c, 4u, idx);
        flag(tau, 5u, idx);
        flag(m1, 6u, idx);
        flag(v1, 7u, idx);
        flag(d, 8u, idx);
        flag(sp, 9u, idx);
        flag(cached1, 10u, idx);
        if (mode != SCAN) {
            flag(theta2, 11u, idx);
        }
        if (mode == WRITE) {
            THETA[i] = theta2;
            M[i] = m1;
            V[i] = v1;
            if (U.has_cached != 0u) {
                C[i] = cached1;
            }
        }
    }
    if (mode == SCAN) {
        // Lanes past the end are the +0 leaves of SPEC §3.1.
        let s1 = tree256(lid, abs_bits(d));
        let s2 = tree256(lid, abs_bits(sp));
        if (lid == 0u && gi * WG < U.n) {
            NB[U.block0 + gi] = s1;
            NB[U.nb_total + U.block0 + gi] = s2;
        }
    }
}

@compute @workgroup_size(256)
fn scan(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    step_main(SCAN, wid, nwg, lid);
}

// `hist` counts HIST_ITEMS elements per invocation (the constant is prepended by
// the runtime, which sizes the dispatch with it), so clearing and flushing the
// 2048 shared counters of a workgroup is amortised over a tile.
@compute @workgroup_size(256)
fn hist(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    ZB = U.zero;
    hist_clear(lid);
    workgroupBarrier();
    let h = HistPass(U.h_mode, U.h_shift, U.h_bits, U.h_key, U.h_prefix_lo, U.h_prefix_hi);
    let tile = linear_group(wid, nwg) * WG * HIST_ITEMS;
    for (var t = 0u; t < HIST_ITEMS; t = t + 1u) {
        let i = tile + t * WG + lid;
        if (i < U.n) {
            let key = bitcast<u32>(update_d(i)) & 0x7fffffffu;
            let idx = scope_index(i);
            hist_count(h, key, idx.x, idx.y);
        }
    }
    workgroupBarrier();
    for (var j = lid; j < BUCKETS; j = j + WG) {
        let c = atomicLoad(&LHIST[j]);
        if (c != 0u) {
            atomicAdd(&HIST[U.hist_base + j], c);
        }
    }
}

// OnTIES global-scope rescale: the tree sums of |D| and |trim(D)| over the
// concatenation of all tensors need 256-blocks aligned in the scope, not in the
// chunk. Workgroup gi covers scope block g_block0 + gi; a block no other chunk
// touches is reduced here, the leaves of a shared block are written to its slot
// and reduced by boundary.wgsl once every chunk has written.
@compute @workgroup_size(256)
fn gnorm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    ZB = U.zero;
    let gi = linear_group(wid, nwg);
    let j = gi * WG + lid;
    let live = j >= U.g_shift && j - U.g_shift < U.n;
    var a = 0.0;
    var k = 0.0;
    if (live) {
        let i = j - U.g_shift;
        let d = update_d(i);
        a = abs_bits(d);
        if (ties_keeps(bitcast<u32>(d) & 0x7fffffffu, scope_index(i))) {
            k = a;
        }
    }
    let s1 = tree256(lid, a);
    let s2 = tree256(lid, k);
    let groups = (U.g_shift + U.n + WG - 1u) / WG;
    if (gi >= groups) {
        return;
    }
    var slot = 0xffffffffu;
    if (gi == 0u) {
        slot = U.g_first_slot;
    }
    if (gi == groups - 1u && U.g_last_slot != 0xffffffffu) {
        slot = U.g_last_slot;
    }
    if (slot == 0xffffffffu) {
        if (lid == 0u) {
            NB[U.g_block0 + gi] = s1;
            NB[U.g_nb_total + U.g_block0 + gi] = s2;
        }
    } else if (live) {
        NB[U.g_bl_base + slot * WG + lid] = a;
        NB[U.g_bl_base + (U.g_nslots + slot) * WG + lid] = k;
    }
}

@compute @workgroup_size(256)
fn check(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    step_main(CHECK, wid, nwg, lid);
}

@compute @workgroup_size(256)
fn write(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    step_main(WRITE, wid, nwg, lid);
}
