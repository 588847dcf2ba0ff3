// Element-wise layers: SwiGLU h = silu(gate) ⊙ up with its backward, and the
// residual additions. One invocation per element, so nothing is reduced.

const WG: u32 = 256u;

struct ElemParams {
    n: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> P: ElemParams;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read> G: array<f32>;
@group(0) @binding(4) var<storage, read_write> OUT: array<f32>;
@group(0) @binding(5) var<storage, read_write> OUT2: array<f32>;

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

fn element_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return group_index(wid, nwg) * WG + lid;
}

// OUT = silu(A) ⊙ B with A = gate, B = up
@compute @workgroup_size(WG)
fn swiglu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = element_index(wid, nwg, lid);
    if (i >= P.n) {
        return;
    }
    let g = A[i];
    OUT[i] = g * sigmoid(g) * B[i];
}

// With G = dh: OUT = dgate = dh ⊙ up ⊙ σ(g)(1 + g(1 − σ(g))), OUT2 = dup =
// dh ⊙ silu(g); both overwritten, as the CPU layer does.
@compute @workgroup_size(WG)
fn swiglu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = element_index(wid, nwg, lid);
    if (i >= P.n) {
        return;
    }
    let g = A[i];
    let sg = sigmoid(g);
    OUT2[i] = G[i] * g * sg;
    OUT[i] = G[i] * B[i] * sg * (1.0 + g * (1.0 - sg));
}

// OUT = A + B
@compute @workgroup_size(WG)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = element_index(wid, nwg, lid);
    if (i >= P.n) {
        return;
    }
    OUT[i] = A[i] + B[i];
}

// OUT += A
@compute @workgroup_size(WG)
fn add_assign(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = element_index(wid, nwg, lid);
    if (i >= P.n) {
        return;
    }
    OUT[i] = OUT[i] + A[i];
}
