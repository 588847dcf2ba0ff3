// RMSNorm (Hugging Face LlamaRMSNorm): y = x · rstd · w, rstd = 1/√(mean(x²) + eps).
// Row sums: one workgroup per row, lane l sums columns l, l + WG, l + 2·WG, … in
// ascending order, then the lanes meet in the prelude's fixed tree. The weight
// gradient sums over rows one column per invocation, rows in ascending order.

const WG: u32 = 256u;

struct NormParams {
    rows: u32,
    cols: u32,
    eps: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> P: NormParams;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<f32>;
@group(0) @binding(3) var<storage, read_write> RSTD: array<f32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;
@group(0) @binding(5) var<storage, read> DY: array<f32>;
@group(0) @binding(6) var<storage, read_write> DX: array<f32>;
@group(0) @binding(7) var<storage, read_write> DW: array<f32>;

@compute @workgroup_size(WG)
fn rmsnorm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= P.rows) {
        return;
    }
    let base = row * P.cols;
    var ss = 0.0;
    for (var i = lid; i < P.cols; i = i + WG) {
        ss = ss + X[base + i] * X[base + i];
    }
    let r = 1.0 / sqrt(tree_sum(lid, ss) / f32(P.cols) + P.eps);
    for (var i = lid; i < P.cols; i = i + WG) {
        Y[base + i] = (X[base + i] * r) * W[i];
    }
    if (lid == 0u) {
        RSTD[row] = r;
    }
}

// dx += rstd (dy⊙w − n · mean(dy⊙w⊙n)) with n = x·rstd.
@compute @workgroup_size(WG)
fn rmsnorm_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= P.rows) {
        return;
    }
    let base = row * P.cols;
    let r = RSTD[row];
    var part = 0.0;
    for (var i = lid; i < P.cols; i = i + WG) {
        part = part + DY[base + i] * W[i] * (X[base + i] * r);
    }
    let m = tree_sum(lid, part) / f32(P.cols);
    for (var i = lid; i < P.cols; i = i + WG) {
        let xi = X[base + i];
        DX[base + i] = DX[base + i] + r * (DY[base + i] * W[i] - xi * r * m);
    }
}

// dw += Σ_t dy ⊙ x·rstd
@compute @workgroup_size(WG)
fn rmsnorm_backward_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let col = group_index(wid, nwg) * WG + lid;
    if (col >= P.cols) {
        return;
    }
    var acc = DW[col];
    for (var t = 0u; t < P.rows; t = t + 1u) {
        acc = acc + DY[t * P.cols + col] * (X[t * P.cols + col] * RSTD[t]);
    }
    DW[col] = acc;
}
