//! The primitives of `common.wgsl`, exposed one element-wise op per dispatch so
//! that they can be compared bit for bit against merge-core (tests, self-test).

use crate::context::{GpuContext, GpuError, WORKGROUP};
use crate::kernel::Kernel;

/// An element-wise primitive. Float operands are flushed on load (SPEC §1.3),
/// exactly as every kernel loads its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Sqrt,
    Flush,
    /// `(a ⊗ b) ⊕ b`: would differ if the compiler fused it into an FMA.
    MulAdd,
    /// Threefry-2x32-20 of counter `(a, b)` under the key given to [`eval`]; two outputs per element.
    Threefry,
    /// Keep decision (SPEC §2.4) of element index `a` (1 = kept).
    Keep,
    Bf16ToF32,
    F16ToF32,
    F32ToBf16,
    F32ToF16,
}

impl Op {
    fn code(self) -> u32 {
        self as u32
    }
}

/// Key, stream and threshold for [`Op::Threefry`] and [`Op::Keep`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RngParams {
    pub k0: u32,
    pub k1: u32,
    pub stream: u32,
    pub threshold: u32,
    pub keep_all: bool,
}

/// Compiled once per context.
pub struct Ops {
    kernel: Kernel,
}

impl Ops {
    pub fn new(ctx: &GpuContext) -> Ops {
        Ops { kernel: Kernel::new(ctx, "ops", include_str!("ops.wgsl"), "main") }
    }

    /// Applies `op` to `(a[i], b[i])` (bit patterns). `b` may be empty for unary ops.
    pub fn eval(&self, ctx: &GpuContext, op: Op, a: &[u32], b: &[u32], rng: RngParams) -> Result<Vec<u32>, GpuError> {
        self.eval_biased(ctx, op, a, b, rng, 0)
    }

    /// As [`Ops::eval`], with the float estimates inside division and square root
    /// shifted by `bias` units, so that tests reach every correction path (and,
    /// beyond four units, the exact fallback) on any device.
    pub fn eval_biased(&self, ctx: &GpuContext, op: Op, a: &[u32], b: &[u32], rng: RngParams, bias: i32) -> Result<Vec<u32>, GpuError> {
        let n = a.len();
        if !b.is_empty() && b.len() != n {
            return Err(GpuError::Invalid(format!("ops::eval: operand b has {} elements, a has {n}", b.len())));
        }
        let max = (ctx.chunk_elems() / 2) as usize;
        if n > max {
            return Err(GpuError::Invalid(format!("ops::eval: {n} elements exceed one binding ({max})")));
        }
        let params = [0u32, op.code(), n as u32, rng.k0, rng.k1, rng.stream, rng.threshold, rng.keep_all as u32, bias as u32, 0, 0, 0];
        let u = ctx.uniform_init("ops params", bytemuck::cast_slice(&params));
        let ba = ctx.storage_init("ops a", bytemuck::cast_slice(a));
        let bb = if b.is_empty() { ctx.storage("ops b", 4) } else { ctx.storage_init("ops b", bytemuck::cast_slice(b)) };
        let outs = if op == Op::Threefry { 2 * n } else { n };
        let out = ctx.storage("ops out", outs as u64 * 4);
        let bg = self.kernel.bind(ctx, &[&u, &ba, &bb, &out]);
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        self.kernel.dispatch(ctx, &mut enc, &bg, (n as u32).div_ceil(WORKGROUP));
        ctx.submit(enc);
        ctx.read_u32(&out, outs as u64)
    }
}
