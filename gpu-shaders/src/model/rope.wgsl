// Rotary position embeddings, Hugging Face `rotate_half` convention: element i of
// a head pairs with i + half. The angles come as cos/sin tables `[T, half]` built
// on the host (in f64, as the CPU model does), so every rope variant that only
// changes the frequencies or scales the tables runs through this one kernel.
// The backward is the inverse rotation: the same kernel with sin negated.

const WG: u32 = 256u;

struct RopeParams {
    rows: u32,
    heads: u32,
    half: u32,
    // +1 forward, −1 backward
    sign: f32,
    // the position of row 0 (generation after a cached prefix; 0 in training)
    first: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> P: RopeParams;
@group(0) @binding(1) var<storage, read> COS: array<f32>;
@group(0) @binding(2) var<storage, read> SIN: array<f32>;
@group(0) @binding(3) var<storage, read_write> X: array<f32>;

@compute @workgroup_size(WG)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * WG + lid;
    if (i >= P.rows * P.heads * P.half) {
        return;
    }
    let j = i % P.half;
    let head = i / P.half; // t · heads + h
    let t = P.first + head / P.heads;
    let c = COS[t * P.half + j];
    let s = P.sign * SIN[t * P.half + j];
    let at = head * 2u * P.half + j;
    let a = X[at];
    let b = X[at + P.half];
    X[at] = a * c - b * s;
    X[at + P.half] = b * c + a * s;
}
