//! Pipelines built from one kernel's WGSL with the shared `common.wgsl` prepended.

use crate::context::GpuContext;

/// The shared WGSL (barrier + flush, correctly rounded division and square root,
/// Threefry, 16-bit conversions), included in every kernel.
pub const COMMON_WGSL: &str = include_str!("common.wgsl");

/// One compute entry point with its (automatic) bind group layout.
pub(crate) struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

impl Kernel {
    pub(crate) fn new(ctx: &GpuContext, label: &str, src: &str, entry: &str) -> Kernel {
        Kernel::with_prelude(ctx, label, COMMON_WGSL, src, entry)
    }

    /// As [`Kernel::new`] with another shared prelude: the model kernels do not
    /// follow the merge path's arithmetic contract, so they share their own.
    pub(crate) fn with_prelude(ctx: &GpuContext, label: &str, prelude: &str, src: &str, entry: &str) -> Kernel {
        let source = format!("{prelude}\n{src}");
        let module = ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        let layout = pipeline.get_bind_group_layout(0);
        Kernel { pipeline, layout }
    }

    /// A bind group with `buffers[i]` (whole) at binding `i`.
    pub(crate) fn bind(&self, ctx: &GpuContext, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
            .collect();
        ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &self.layout, entries: &entries })
    }

    /// A bind group with explicit `(binding, resource)` pairs, for bindings of part
    /// of a buffer.
    pub(crate) fn bind_resources(&self, ctx: &GpuContext, resources: &[(u32, wgpu::BindingResource<'_>)]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> =
            resources.iter().map(|(i, r)| wgpu::BindGroupEntry { binding: *i, resource: r.clone() }).collect();
        self.bind_entries(ctx, &entries)
    }

    /// A bind group from explicit entries, for bindings of part of a buffer.
    pub(crate) fn bind_entries(&self, ctx: &GpuContext, entries: &[wgpu::BindGroupEntry]) -> wgpu::BindGroup {
        ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &self.layout, entries })
    }

    /// Records a dispatch of `n_groups` workgroups (2-D when above the per-dimension limit).
    pub(crate) fn dispatch(&self, ctx: &GpuContext, enc: &mut wgpu::CommandEncoder, bg: &wgpu::BindGroup, n_groups: u32) {
        let (x, y) = ctx.groups(n_groups);
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, bg, &[]);
        pass.dispatch_workgroups(x, y, 1);
    }
}
