// Per-sequence totals of per-token values over the scored tokens:
// TOTALS[slot] = Σ_{t : MASK[t] ≠ 0} VALUES[t], for one sequence of `rows`
// tokens. One workgroup: lane l sums t = l, l + WG, l + 2·WG, … in ascending
// order, then the lanes meet in `tree_sum`; the order depends on `rows` and WG
// alone. Unscored rows are skipped rather than multiplied by 0, so a row with no
// real target (a prompt token, the last token) cannot leak a NaN or ∞.

const WG: u32 = 256u;

struct SumParams {
    rows: u32,
    slot: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> P: SumParams;
@group(0) @binding(1) var<storage, read> VALUES: array<f32>;
@group(0) @binding(2) var<storage, read> MASK: array<u32>;
@group(0) @binding(3) var<storage, read_write> TOTALS: array<f32>;

@compute @workgroup_size(WG)
fn sequence_sum(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var t = lid; t < P.rows; t = t + WG) {
        if (MASK[t] != 0u) {
            acc = acc + VALUES[t];
        }
    }
    let total = tree_sum(lid, acc);
    if (lid == 0u) {
        TOTALS[P.slot] = total;
    }
}
