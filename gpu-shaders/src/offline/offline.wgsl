// Offline merges of one chunk (merge_core::offline, SPEC §6): linear,
// SFT↔RLHF interpolation and generalized task arithmetic (task arithmetic,
// TIES, DARE linear, DARE-TIES), up to four models. Results are written as
// binary32; the host stores them in the output dtype. Non-finite inputs and
// results record their lowest chunk index per kind (base, model 0..3, result).

struct OffU {
    head: vec4<u32>,    // zero, n, method (0 linear, 1 interpolate, 2 gta), nmodels
    cfg: vec4<u32>,     // normalize, consensus, sparsify (0 none, 1 magnitude, 2 random), keep_all mask
    cfg2: vec4<u32>,    // mask key k0, k1, dtype of base, dtypes of the models (2 bits each)
    scope: vec4<u32>,   // element index of the chunk start in the tensor, scope start lo, hi, pad
    fl: vec4<f32>,      // lambda, divisor, weight sum, interpolation weight
    w: vec4<f32>,       // model weights
    scale: vec4<f32>,   // DARE 1/density
    keep_t: vec4<u32>,  // DARE keep thresholds
    tkey: vec4<u32>,    // TIES thresholds (T, c lo, c hi)
    tcut_lo: vec4<u32>,
    tcut_hi: vec4<u32>,
}

@group(0) @binding(0) var<uniform> U: OffU;
@group(0) @binding(1) var<storage, read> BASE: array<u32>;
@group(0) @binding(2) var<storage, read> M0: array<u32>;
@group(0) @binding(3) var<storage, read> M1: array<u32>;
@group(0) @binding(4) var<storage, read> M2: array<u32>;
@group(0) @binding(5) var<storage, read> M3: array<u32>;
@group(0) @binding(6) var<storage, read_write> OUT: array<f32>;
@group(0) @binding(7) var<storage, read_write> STATUS: array<atomic<u32>>;

const RESULT: u32 = 5u;

// Element i of input m (4 = the base), converted from its dtype and flushed.
fn load(m: u32, i: u32) -> f32 {
    var dt = U.cfg2.z;
    if (m < 4u) {
        dt = (U.cfg2.w >> (2u * m)) & 3u;
    }
    let wi = select(i >> 1u, i, dt == 0u);
    var w = 0u;
    switch m {
        case 0u: { w = M0[wi]; }
        case 1u: { w = M1[wi]; }
        case 2u: { w = M2[wi]; }
        case 3u: { w = M3[wi]; }
        default: { w = BASE[wi]; }
    }
    if (dt == 0u) {
        return fb(bitcast<f32>(w));
    }
    let h = half_word(w, i);
    if (dt == 1u) {
        return fb(bf16_to_f32(h));
    }
    return fb(f16_to_f32(h));
}

fn flag(x: f32, code: u32, i: u32) {
    if (is_nf(x)) {
        atomicMin(&STATUS[code], i);
    }
}

fn ties_keeps(m: u32, key: u32, idx: vec2<u32>) -> bool {
    let t = U.tkey[m];
    if (key > t) {
        return true;
    }
    if (key != t) {
        return false;
    }
    return idx.y < U.tcut_hi[m] || (idx.y == U.tcut_hi[m] && idx.x < U.tcut_lo[m]);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    ZB = U.head.x;
    let i = linear_group(wid, nwg) * WG + lid;
    if (i >= U.head.y) {
        return;
    }
    let index = U.scope.x + i;
    let nm = U.head.w;
    var r = 0.0;
    if (U.head.z == 0u) {
        var acc = 0.0;
        for (var m = 0u; m < nm; m = m + 1u) {
            let x = load(m, i);
            flag(x, 1u + m, index);
            let t = mul(U.w[m], x);
            acc = select(add(acc, t), t, m == 0u);
        }
        r = acc;
        if (U.cfg.x != 0u) {
            r = div(acc, U.fl.z);
        }
    } else if (U.head.z == 1u) {
        let s = load(0u, i);
        let q = load(1u, i);
        flag(s, 1u, index);
        flag(q, 2u, index);
        r = add(s, mul(U.fl.w, sub(q, s)));
    } else {
        let b = load(4u, i);
        flag(b, 0u, index);
        var x = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
        let sidx = index64(U.scope.y, U.scope.z, index);
        for (var m = 0u; m < nm; m = m + 1u) {
            let xm = load(m, i);
            flag(xm, 1u + m, index);
            let tau = sub(xm, b);
            var sp = tau;
            if (U.cfg.z == 1u) {
                sp = select(0.0, tau, ties_keeps(m, bitcast<u32>(tau) & 0x7fffffffu, sidx));
            } else if (U.cfg.z == 2u) {
                let kept = keep(U.cfg2.x, U.cfg2.y, 2u + m, index, U.keep_t[m], (U.cfg.w >> m) & 1u);
                sp = select(0.0, mul(tau, U.scale[m]), kept);
            }
            x[m] = mul(U.w[m], sp);
        }
        var mixed = x[0];
        for (var m = 1u; m < nm; m = m + 1u) {
            mixed = add(mixed, x[m]);
        }
        var divisor = U.fl.y;
        if (U.cfg.y != 0u) {
            let positive = mixed >= 0.0;
            mixed = 0.0;
            divisor = 0.0;
            for (var m = 0u; m < nm; m = m + 1u) {
                if (x[m] != 0.0 && (x[m] > 0.0) == positive) {
                    mixed = add(mixed, x[m]);
                    divisor = add(divisor, U.w[m]);
                }
            }
            if (divisor == 0.0) {
                divisor = 1.0;
            }
        }
        if (U.cfg.x != 0u) {
            mixed = div(mixed, divisor);
        }
        r = add(b, mul(U.fl.x, mixed));
    }
    flag(r, RESULT, index);
    OUT[i] = r;
}
