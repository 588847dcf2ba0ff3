//! Linear layers `y = x Wᵀ + b` with `W` in Hugging Face `[out, in]` layout, and
//! their backward products, as one tiled matrix product (`linear.wgsl`) that
//! reads its operands through strides.

use super::{check_binding, dispatch, expect_len, groups, kernel, record, GpuVec, Window};
use crate::context::{GpuContext, GpuError};
use crate::kernel::Kernel;

/// Shape of one linear layer applied to `rows` rows.
#[derive(Clone, Copy, Debug)]
pub struct LinearShape {
    pub rows: usize,
    pub inputs: usize,
    pub outputs: usize,
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    flags: u32,
    a_off: u32,
    a_sm: u32,
    a_sk: u32,
    b_off: u32,
    b_sk: u32,
    b_sn: u32,
    c_off: u32,
    c_sm: u32,
}

const ACCUMULATE: u32 = 1;
const ADD_BIAS: u32 = 2;
/// Side of the square output tile one workgroup computes.
const TILE: usize = 16;

/// One operand of [`Linear::matmul`]: element `(r, s)` at `r·stride_r + s·stride_s`
/// from the window's start.
#[derive(Clone, Copy)]
pub(super) struct Strided<'a> {
    pub(super) window: Window<'a>,
    pub(super) stride_r: usize,
    pub(super) stride_s: usize,
}

/// `c (+)= a·b (+ bias)` over `m × n` outputs and `k` products each.
pub(super) struct Product<'a> {
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    /// `a[m, k]`
    pub(super) a: Strided<'a>,
    /// `b[k, n]`
    pub(super) b: Strided<'a>,
    /// row-major `[m, n]`
    pub(super) c: Window<'a>,
    pub(super) bias: Option<&'a GpuVec>,
    pub(super) accumulate: bool,
}

pub struct Linear {
    ctx: GpuContext,
    matmul: Kernel,
    bias_grad: Kernel,
}

fn u32_of(what: &str, x: usize) -> Result<u32, GpuError> {
    u32::try_from(x).map_err(|_| GpuError::Invalid(format!("{what} = {x} does not fit the kernels' 32-bit indices")))
}

impl Linear {
    pub fn new(ctx: &GpuContext) -> Linear {
        let src = include_str!("linear.wgsl");
        Linear { ctx: ctx.clone(), matmul: kernel(ctx, "matmul", src, "matmul"), bias_grad: kernel(ctx, "bias_grad", src, "bias_grad") }
    }

    /// `y = x Wᵀ + b`: `x [rows, in]`, `w [out, in]`, `b [out]`, `y [rows, out]` (overwritten).
    pub fn forward(&self, y: &GpuVec, x: &GpuVec, w: &GpuVec, b: Option<&GpuVec>, s: LinearShape) -> Result<(), GpuError> {
        self.check(s, x, w, y)?;
        if let Some(b) = b {
            expect_len("linear bias", b, s.outputs)?;
        }
        self.matmul(Product {
            m: s.rows,
            n: s.outputs,
            k: s.inputs,
            a: Strided { window: Window::rows(x, 0, s.rows, s.inputs), stride_r: s.inputs, stride_s: 1 },
            b: Strided { window: Window::rows(w, 0, s.outputs, s.inputs), stride_r: 1, stride_s: s.inputs },
            c: Window::rows(y, 0, s.rows, s.outputs),
            bias: b,
            accumulate: false,
        })
    }

    /// `dx += dy W`, `dw += dyᵀ x`, `db += Σ_t dy[t, :]`; `dx` and `db` optional.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, dx: Option<&GpuVec>, dw: &GpuVec, db: Option<&GpuVec>, dy: &GpuVec, x: &GpuVec, w: &GpuVec, s: LinearShape) -> Result<(), GpuError> {
        self.check(s, x, w, dy)?;
        expect_len("linear weight gradient", dw, s.outputs * s.inputs)?;
        if let Some(dx) = dx {
            expect_len("linear input gradient", dx, s.rows * s.inputs)?;
            self.matmul(Product {
                m: s.rows,
                n: s.inputs,
                k: s.outputs,
                a: Strided { window: Window::rows(dy, 0, s.rows, s.outputs), stride_r: s.outputs, stride_s: 1 },
                b: Strided { window: Window::rows(w, 0, s.outputs, s.inputs), stride_r: s.inputs, stride_s: 1 },
                c: Window::rows(dx, 0, s.rows, s.inputs),
                bias: None,
                accumulate: true,
            })?;
        }
        self.matmul(Product {
            m: s.outputs,
            n: s.inputs,
            k: s.rows,
            a: Strided { window: Window::rows(dy, 0, s.rows, s.outputs), stride_r: 1, stride_s: s.outputs },
            b: Strided { window: Window::rows(x, 0, s.rows, s.inputs), stride_r: s.inputs, stride_s: 1 },
            c: Window::rows(dw, 0, s.outputs, s.inputs),
            bias: None,
            accumulate: true,
        })?;
        if let Some(db) = db {
            expect_len("linear bias gradient", db, s.outputs)?;
            let p = MatmulParams { m: u32_of("rows", s.rows)?, n: u32_of("outputs", s.outputs)?, ..Default::default() };
            dispatch(&self.ctx, &self.bias_grad, &p, &[(1, dy), (4, db)], groups(s.outputs))?;
        }
        Ok(())
    }

    fn check(&self, s: LinearShape, x: &GpuVec, w: &GpuVec, y: &GpuVec) -> Result<(), GpuError> {
        expect_len("linear input", x, s.rows * s.inputs)?;
        expect_len("linear weight", w, s.outputs * s.inputs)?;
        expect_len("linear output", y, s.rows * s.outputs)
    }

    /// Records one tiled product.
    pub(super) fn matmul(&self, p: Product<'_>) -> Result<(), GpuError> {
        let ctx = &self.ctx;
        let (a, a_off) = p.a.window.binding(ctx)?;
        let (b, b_off) = p.b.window.binding(ctx)?;
        let (c, c_off) = p.c.binding(ctx)?;
        let mut flags = if p.accumulate { ACCUMULATE } else { 0 };
        // an unused binding still needs a buffer; `a`'s serves
        let bias = match p.bias {
            Some(v) => {
                flags |= ADD_BIAS;
                check_binding(ctx, &v.label, v.buf.size())?;
                v.buf.as_entire_binding()
            }
            None => p.a.window.binding(ctx)?.0,
        };
        let params = MatmulParams {
            m: u32_of("rows", p.m)?,
            n: u32_of("columns", p.n)?,
            k: u32_of("inner dimension", p.k)?,
            flags,
            a_off,
            a_sm: u32_of("stride", p.a.stride_r)?,
            a_sk: u32_of("stride", p.a.stride_s)?,
            b_off,
            b_sk: u32_of("stride", p.b.stride_r)?,
            b_sn: u32_of("stride", p.b.stride_s)?,
            c_off,
            c_sm: u32_of("columns", p.n)?,
        };
        let tiles = p.m.div_ceil(TILE) * p.n.div_ceil(TILE);
        record(ctx, &self.matmul, bytemuck::bytes_of(&params), vec![(1, a), (2, b), (3, bias), (4, c)], u32_of("tiles", tiles)?);
        Ok(())
    }
}
