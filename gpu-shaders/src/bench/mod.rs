//! Pieces of the `gpu-bench` binary that need the crate's internals: the device
//! copy kernel every figure is compared with.

use std::time::Instant;

use crate::context::{GpuContext, GpuError, WORKGROUP};
use crate::kernel::Kernel;
use crate::tensor::{GpuArray, Storage};

/// Copies an `n`-element f32 array chunk by chunk, `reps` times after one warm-up;
/// returns seconds per copy.
pub fn time_copy(ctx: &GpuContext, n: u64, reps: u32) -> Result<f64, GpuError> {
    let kernel = Kernel::new(ctx, "copy", include_str!("copy.wgsl"), "main");
    let x = GpuArray::zeros(ctx, "copy src", Storage::F32, n);
    let y = GpuArray::zeros(ctx, "copy dst", Storage::F32, n);
    let mut groups = Vec::new();
    for (cx, cy) in x.chunks.iter().zip(&y.chunks) {
        let u = ctx.uniform_init("copy", bytemuck::cast_slice(&[0u32, cx.len as u32, 0, 0]));
        groups.push((kernel.bind(ctx, &[&u, &cx.buf, &cy.buf]), cx.len, u));
    }
    let run = || -> Result<(), GpuError> {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for (bg, len, _) in &groups {
            kernel.dispatch(ctx, &mut enc, bg, len.div_ceil(WORKGROUP as u64) as u32);
        }
        ctx.submit(enc);
        ctx.wait()
    };
    run()?;
    let t = Instant::now();
    for _ in 0..reps {
        run()?;
    }
    Ok(t.elapsed().as_secs_f64() / f64::from(reps.max(1)))
}
