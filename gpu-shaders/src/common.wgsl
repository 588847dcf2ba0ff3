// Shared WGSL, prepended to every kernel at pipeline creation (see `kernel.rs`).
// It implements SPEC.md §1-§2 and §7 on the GPU; SPEC.md §8 explains the method.
//
// Every entry point must run `ZB = <uniform>.zero;` before any arithmetic. ZB is
// the opaque barrier: the runtime always writes 0 there, but because it is read
// from a buffer the shader compiler cannot know it, so it can neither fuse
// `a*b+c` into an FMA nor reassociate sums through it. (A `const` or `override`
// would be folded away.)

var<private> ZB: u32;

const EXP_MASK: u32 = 0x7f800000u;
const WG: u32 = 256u;

// SPEC §1.4, on the bits: a GPU may assume floats are finite, so no float test.
fn is_nf(x: f32) -> bool {
    return (bitcast<u32>(x) & EXP_MASK) == EXP_MASK;
}

// Barrier + flush rule F (SPEC §1.3) in one step: the XOR hides the value from
// the optimiser, the select maps ±0 and subnormals to +0.
fn fb(x: f32) -> f32 {
    let b = bitcast<u32>(x) ^ ZB;
    return bitcast<f32>(select(b, 0u, (b & EXP_MASK) == 0u));
}

fn add(a: f32, b: f32) -> f32 { return fb(a + b); }
fn sub(a: f32, b: f32) -> f32 { return fb(a - b); }
fn mul(a: f32, b: f32) -> f32 { return fb(a * b); }

// A quiet NaN built at run time (a NaN literal may be rejected or folded).
fn nan_value() -> f32 { return bitcast<f32>(0x7fc00000u | ZB); }

fn abs_bits(x: f32) -> f32 { return bitcast<f32>(bitcast<u32>(x) & 0x7fffffffu); }

// Test hook: shifts the float estimates below by this many units (0 in every
// real kernel: private variables start at zero). The ops kernel sets it so the
// tests exercise every correction path, which an exact `/` or `sqrt` never takes.
var<private> EST_BIAS: i32;

// ⌊ma·2^23 / mb⌋ and its remainder, for 24-bit significands with ma ∈ [mb, 2mb):
// restoring long division, 23 steps (the remainder stays below 2^25).
fn div_long(ma: u32, mb: u32) -> vec2<u32> {
    var r = ma - mb;
    var q = 1u;
    for (var k = 0u; k < 23u; k = k + 1u) {
        r = r << 1u;
        q = q << 1u;
        if (r >= mb) {
            r = r - mb;
            q = q | 1u;
        }
    }
    return vec2<u32>(q, r);
}

// The same quotient from a float estimate: WGSL's `/` is within 2.5 ULP, so the
// truncated estimate is within a few units of q. The remainder ma·2^23 − q·mb is
// then small (|r| < 2^31), so its low 32 bits, computed with wrapping u32
// arithmetic, are exact as an i32; a few exact steps correct q. Should the
// estimate be further off than that, the long division decides.
fn div_q(ma: u32, mb: u32) -> vec2<u32> {
    let qf = f32(ma) / f32(mb);
    var q = u32(i32(u32(qf * 8388608.0)) + EST_BIAS);
    var r = bitcast<i32>((ma << 23u) - q * mb);
    let imb = i32(mb);
    for (var k = 0u; k < 4u; k = k + 1u) {
        if (r < 0) {
            q = q - 1u;
            r = r + imb;
        } else if (r >= imb) {
            q = q + 1u;
            r = r - imb;
        }
    }
    if (r < 0 || r >= imb) {
        return div_long(ma, mb);
    }
    return vec2<u32>(q, u32(r));
}

// Correctly rounded a ⊘ b followed by F, for operands that already passed F.
// WGSL's `/` is only accurate to 2.5 ULP, so the quotient of the 24-bit
// significands is made exact with an integer remainder (div_q) and rounded to
// nearest-even from it. Non-finite dividends, NaN or zero divisors give NaN:
// such results are reported, never stored, so only their non-finiteness matters.
fn div(a: f32, b: f32) -> f32 {
    let ua = bitcast<u32>(a);
    let ub = bitcast<u32>(b);
    let ea = (ua >> 23u) & 0xffu;
    let eb = (ub >> 23u) & 0xffu;
    if (ea == 255u || eb == 0u || (ub & 0x7fffffffu) > EXP_MASK) {
        return nan_value();
    }
    if (ea == 0u || eb == 255u) {
        return bitcast<f32>(ZB);
    }
    let sign = (ua ^ ub) & 0x80000000u;
    var ma = (ua & 0x7fffffu) | 0x800000u;
    let mb = (ub & 0x7fffffu) | 0x800000u;
    var e = i32(ea) - i32(eb) + 127;
    if (ma < mb) {
        ma = ma << 1u;
        e = e - 1;
    }
    let qr = div_q(ma, mb);
    var q = qr.x;
    let r = qr.y;
    if (e <= 0) {
        // Below the normal range. IEEE rounds on the subnormal grid (one bit
        // coarser when e == 0), and F then flushes, unless that rounding reaches
        // 2^-126: exactly when e == 0 and the truncated quotient is all ones.
        if (e == 0 && q == 0xffffffu) {
            return bitcast<f32>(sign | 0x00800000u | ZB);
        }
        return bitcast<f32>(ZB);
    }
    let r2 = r << 1u;
    if (r2 > mb || (r2 == mb && (q & 1u) == 1u)) {
        q = q + 1u;
    }
    if (q == 0x1000000u) {
        q = 0x800000u;
        e = e + 1;
    }
    if (e >= 255) {
        return bitcast<f32>(sign | EXP_MASK | ZB);
    }
    return bitcast<f32>((sign | (u32(e) << 23u) | (q & 0x7fffffu)) ^ ZB);
}

// ⌊√T⌋ and T − ⌊√T⌋² for T = x·2^22 (x of at most 26 bits, 13 bit pairs):
// digit by digit, two radicand bits per step; the remainder stays below 2^26.
fn sqrt_digits(x: u32) -> vec2<u32> {
    var r = 0u;
    var q = 0u;
    for (var k = 0u; k < 24u; k = k + 1u) {
        var pair = 0u;
        if (k < 13u) {
            pair = (x >> (24u - 2u * k)) & 3u;
        }
        r = (r << 2u) | pair;
        let t = (q << 2u) | 1u;
        if (r >= t) {
            r = r - t;
            q = (q << 1u) | 1u;
        } else {
            q = q << 1u;
        }
    }
    return vec2<u32>(q, r);
}

// The same from a float estimate, corrected with the exact remainder T − q²
// (small, so its low 32 bits are exact as an i32), as div_q.
fn sqrt_q(x: u32) -> vec2<u32> {
    let sf = sqrt(f32(x)) * 2048.0;
    var q = u32(i32(u32(sf)) + EST_BIAS);
    var r = bitcast<i32>((x << 22u) - q * q);
    for (var k = 0u; k < 4u; k = k + 1u) {
        if (r < 0) {
            r = r + i32(2u * q - 1u);
            q = q - 1u;
        } else if (r > i32(2u * q)) {
            r = r - i32(2u * q + 1u);
            q = q + 1u;
        }
    }
    if (r < 0 || r > i32(2u * q)) {
        return sqrt_digits(x);
    }
    return vec2<u32>(q, u32(r));
}

// Correctly rounded √a followed by F, for an operand that already passed F.
// With a = m·2^e, the radicand T = m·2^24 (e even) or m·2^23 (e odd) has 48
// bits and q = ⌊√T⌋ has 24 (sqrt_q). √T is never a half-integer, so it rounds
// up iff the remainder exceeds q. Negative or non-finite operands give NaN.
fn sqrt_cr(a: f32) -> f32 {
    let ua = bitcast<u32>(a);
    let ea = (ua >> 23u) & 0xffu;
    if (ea == 0u) {
        return bitcast<f32>(ZB);
    }
    if (ea == 255u || (ua & 0x80000000u) != 0u) {
        return nan_value();
    }
    let m = (ua & 0x7fffffu) | 0x800000u;
    let e = i32(ea) - 150; // a = m · 2^e
    // T = X · 2^22 with X = 4m (e even: T = m·2^24) or 2m (e odd: T = m·2^23).
    let odd = (e & 1) != 0;
    let qr = sqrt_q(select(m << 2u, m << 1u, odd));
    var q = qr.x;
    if (qr.y > q) {
        q = q + 1u;
    }
    var eo = (e - 24 + select(0, 1, odd)) / 2 + 150;
    if (q == 0x1000000u) {
        q = 0x800000u;
        eo = eo + 1;
    }
    return bitcast<f32>((u32(eo) << 23u) | (q & 0x7fffffu) | ZB);
}

// SPEC §2.2: Threefry-2x32 with 20 rounds.
fn rotl(x: u32, r: u32) -> u32 {
    return (x << r) | (x >> (32u - r));
}

fn threefry(k0: u32, k1: u32, c0: u32, c1: u32) -> vec2<u32> {
    let rot = array<u32, 8>(13u, 15u, 26u, 6u, 17u, 29u, 16u, 24u);
    let ks = array<u32, 3>(k0, k1, 0x1BD11BDAu ^ k0 ^ k1);
    var x0 = c0 + k0;
    var x1 = c1 + k1;
    for (var r = 0u; r < 20u; r = r + 1u) {
        x0 = x0 + x1;
        x1 = rotl(x1, rot[r % 8u]);
        x1 = x1 ^ x0;
        if (r % 4u == 3u) {
            let j = (r + 1u) / 4u;
            x0 = x0 + ks[j % 3u];
            x1 = x1 + ks[(j + 1u) % 3u] + j;
        }
    }
    return vec2<u32>(x0, x1);
}

// SPEC §2.3/§2.4: the keep decision of element i under mask key (k0, k1),
// stream q, threshold t; keep_all is the p = 1 case.
fn keep(k0: u32, k1: u32, q: u32, i: u32, t: u32, keep_all: u32) -> bool {
    if (keep_all != 0u) {
        return true;
    }
    let w = threefry(k0, k1, i >> 1u, q);
    let u = select(w.x, w.y, (i & 1u) == 1u);
    return u < t;
}

// SPEC §7: 16-bit storage, two values per u32 word (element 2j in the low half).
fn half_word(words_lo: u32, i: u32) -> u32 {
    return (words_lo >> (16u * (i & 1u))) & 0xffffu;
}

fn bf16_to_f32(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let man = h & 0x3ffu;
    if (e == 0x1fu) {
        return bitcast<f32>(sign | EXP_MASK | (man << 13u));
    }
    if (e == 0u) {
        if (man == 0u) {
            return bitcast<f32>(sign);
        }
        // f16 subnormal man·2^-24 is normal in binary32: with p the position of
        // its leading one, it is 1.f · 2^(p-24).
        let p = 31u - countLeadingZeros(man);
        return bitcast<f32>(sign | ((p + 103u) << 23u) | ((man << (23u - p)) & 0x7fffffu));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (man << 13u));
}

// Round-to-nearest-even f32 → bf16, as `half::bf16::from_f32` (NaN stays NaN).
fn f32_to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > EXP_MASK) {
        return (b >> 16u) | 0x40u;
    }
    let round_bit = 0x8000u;
    if ((b & round_bit) != 0u && (b & (3u * round_bit - 1u)) != 0u) {
        return (b >> 16u) + 1u;
    }
    return b >> 16u;
}

// Round-to-nearest-even f32 → f16, as `half::f16::from_f32`.
fn f32_to_f16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = b & 0x80000000u;
    let ex = b & EXP_MASK;
    let man = b & 0x7fffffu;
    let hs = sign >> 16u;
    if (ex == EXP_MASK) {
        return hs | 0x7c00u | select(0x200u, 0u, man == 0u) | (man >> 13u);
    }
    let he = i32(ex >> 23u) - 127 + 15;
    if (he >= 0x1f) {
        return hs | 0x7c00u;
    }
    if (he <= 0) {
        if (14 - he > 24) {
            return hs;
        }
        let m = man | 0x800000u;
        var hm = m >> u32(14 - he);
        let round_bit = 1u << u32(13 - he);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) {
            hm = hm + 1u;
        }
        return hs | hm;
    }
    let v = hs | (u32(he) << 10u) | (man >> 13u);
    let round_bit = 0x1000u;
    if ((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u) {
        return v + 1u;
    }
    return v;
}

// Linear element index for a 2-D dispatch of 256-wide workgroups: chunks of
// more than 65,535 workgroups spill into the y dimension.
fn linear_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// SPEC §3.1 inside a workgroup: the perfect tree over one aligned block of 256
// leaves (node [l, l+2s) lives at TREE[l]). Every invocation must call it, in
// uniform control flow; the block's sum is returned to all.
var<workgroup> TREE: array<f32, 256>;

fn tree256(lid: u32, x: f32) -> f32 {
    TREE[lid] = x;
    workgroupBarrier();
    for (var s = 1u; s < WG; s = s << 1u) {
        if ((lid & (2u * s - 1u)) == 0u) {
            TREE[lid] = add(TREE[lid], TREE[lid + s]);
        }
        workgroupBarrier();
    }
    let r = TREE[0];
    workgroupBarrier();
    return r;
}

// SPEC §4 radix-select passes, as merge_core::topk::Pass: mode 0 counts key
// digits of candidates with the given key prefix, mode 1 counts index digits of
// elements tied at `key`. Indices are 64-bit (lo, hi) for global scopes.
struct HistPass {
    mode: u32,
    shift: u32,
    bits: u32,
    key: u32,
    prefix_lo: u32,
    prefix_hi: u32,
}

const BUCKETS: u32 = 2048u;
var<workgroup> LHIST: array<atomic<u32>, 2048>;

fn shr64(lo: u32, hi: u32, s: u32) -> vec2<u32> {
    if (s == 0u) {
        return vec2<u32>(lo, hi);
    }
    if (s >= 64u) {
        return vec2<u32>(0u, 0u);
    }
    if (s >= 32u) {
        return vec2<u32>(hi >> (s - 32u), 0u);
    }
    return vec2<u32>((lo >> s) | (hi << (32u - s)), hi >> s);
}

fn hist_clear(lid: u32) {
    for (var j = lid; j < BUCKETS; j = j + WG) {
        atomicStore(&LHIST[j], 0u);
    }
}

// Bucket of (key, index) in pass `h`, or BUCKETS when not a candidate.
fn hist_bucket(h: HistPass, key: u32, idx_lo: u32, idx_hi: u32) -> u32 {
    let mask = (1u << h.bits) - 1u;
    if (h.mode == 0u) {
        if ((key >> (h.shift + h.bits)) == h.prefix_lo) {
            return (key >> h.shift) & mask;
        }
        return BUCKETS;
    }
    if (key != h.key) {
        return BUCKETS;
    }
    let high = shr64(idx_lo, idx_hi, h.shift + h.bits);
    if (high.x != h.prefix_lo || high.y != h.prefix_hi) {
        return BUCKETS;
    }
    return shr64(idx_lo, idx_hi, h.shift).x & mask;
}

fn hist_count(h: HistPass, key: u32, idx_lo: u32, idx_hi: u32) {
    let b = hist_bucket(h, key, idx_lo, idx_hi);
    if (b < BUCKETS) {
        atomicAdd(&LHIST[b], 1u);
    }
}

// 64-bit index of element `i` of a chunk starting at `base`.
fn index64(base_lo: u32, base_hi: u32, i: u32) -> vec2<u32> {
    let lo = base_lo + i;
    return vec2<u32>(lo, base_hi + select(0u, 1u, lo < base_lo));
}
