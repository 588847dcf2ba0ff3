// DPO-family losses on summed log-probabilities (host/src/loss.rs, in f32): with
// h = (π_c − π_r) − (ref_c − ref_r),
//   sigmoid: −(1−ε)·logσ(βh) − ε·logσ(−βh)
//   ipo:     (h − 1/(2β))²
//   hinge:   max(0, 1 − βh)
// and the mean over pairs with its gradient w.r.t. each policy log-prob. One
// invocation walks the pairs in order, so the mean's sum has a fixed order; a
// batch is a few hundred pairs at most.

const WG: u32 = 1u;

struct LossParams {
    pairs: u32,
    // 0 sigmoid, 1 ipo, 2 hinge
    kind: u32,
    beta: f32,
    label_smoothing: f32,
}

@group(0) @binding(0) var<uniform> P: LossParams;
@group(0) @binding(1) var<storage, read> POLICY_CHOSEN: array<f32>;
@group(0) @binding(2) var<storage, read> POLICY_REJECTED: array<f32>;
@group(0) @binding(3) var<storage, read> REF_CHOSEN: array<f32>;
@group(0) @binding(4) var<storage, read> REF_REJECTED: array<f32>;
@group(0) @binding(5) var<storage, read_write> D_CHOSEN: array<f32>;
@group(0) @binding(6) var<storage, read_write> D_REJECTED: array<f32>;
@group(0) @binding(7) var<storage, read_write> MEAN_LOSS: array<f32>;

// log(1 + x) without losing x when it is far below 1 (WGSL has no log1p):
// the rounding of 1 + x is divided back out.
fn log1p_small(x: f32) -> f32 {
    let u = 1.0 + x;
    if (u == 1.0) {
        return x;
    }
    return log(u) * x / (u - 1.0);
}

fn log_sigmoid(x: f32) -> f32 {
    return min(x, 0.0) - log1p_small(exp(-abs(x)));
}

fn sigmoid(x: f32) -> f32 {
    if (x >= 0.0) {
        return 1.0 / (1.0 + exp(-x));
    }
    let e = exp(x);
    return e / (1.0 + e);
}

@compute @workgroup_size(WG)
fn preference_loss() {
    let inv = 1.0 / f32(P.pairs);
    let b = P.beta;
    var total = 0.0;
    for (var i = 0u; i < P.pairs; i = i + 1u) {
        let h = (POLICY_CHOSEN[i] - POLICY_REJECTED[i]) - (REF_CHOSEN[i] - REF_REJECTED[i]);
        var loss = 0.0;
        var dh = 0.0;
        switch P.kind {
            case 0u: {
                let z = b * h;
                let e = P.label_smoothing;
                loss = -(1.0 - e) * log_sigmoid(z) - e * log_sigmoid(-z);
                dh = b * (-(1.0 - e) * sigmoid(-z) + e * sigmoid(z));
            }
            case 1u: {
                let d = h - 1.0 / (2.0 * b);
                loss = d * d;
                dh = 2.0 * d;
            }
            default: {
                // relu's derivative at 0 is 0, as in torch
                let m = 1.0 - b * h;
                if (m > 0.0) {
                    loss = m;
                    dh = -b;
                }
            }
        }
        total = total + loss * inv;
        D_CHOSEN[i] = dh * inv;
        D_REJECTED[i] = -dh * inv;
    }
    MEAN_LOSS[0] = total;
}
