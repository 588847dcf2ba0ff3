//! The online merging optimizer on the GPU: merge-core's `optim`/`step` with the
//! state resident on the device. Only gradients go up each step; parameters and
//! state come back only when asked (checkpoints, cross-checks).

use merge_core::dtype::Src;
use merge_core::error::tensor_name;
use merge_core::onties;
use merge_core::optim::{Merge, OnlineConfig, Optimizer, Scope};
use merge_core::step::{Norms, Phase, Rescale};
use merge_core::topk::{BUCKETS, RadixSelect, Threshold, keep_count};

use crate::context::{GpuContext, GpuError, WORKGROUP};
use crate::kernel::Kernel;
use crate::tensor::{GpuArray, Storage};

mod buffers;
mod resident;
mod state;
mod task_vector;
mod uniform;

pub use resident::NamedBuffer;
pub use state::TensorStateData;

use buffers::{GlobalNorms, Slot, global_norms, tree_levels};
pub use task_vector::{StoredTau, TaskInput, task_vectors};
use uniform::{HIST_ITEMS, NCODES, StepU, base_uniform, pass, step_wgsl_constants};

/// What the status slots record, in merge-core's reporting order.
const WHAT: [&str; 12] = merge_core::step::NON_FINITE_VALUES;

/// Where a tensor's weights and gradients live.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    /// The initial weights on the host, uploaded into the optimizer's own
    /// buffers; gradients go up with [`GpuOptimizer::step`] or are copied in.
    Host(&'a [f32]),
    /// Another owner's device buffers, `len` f32 elements each (a model's weights
    /// and gradients on the same device): the optimizer reads the gradients and
    /// steps the weights where they are, so nothing is copied between the two and
    /// the device holds one copy of each.
    Shared { weights: &'a wgpu::Buffer, grads: &'a wgpu::Buffer, len: usize },
}

impl Weights<'_> {
    pub fn len(&self) -> usize {
        match self {
            Weights::Host(w) => w.len(),
            Weights::Shared { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One tensor handed to [`GpuOptimizer::new`].
pub struct TensorInit<'a> {
    pub name: &'a str,
    /// The initial parameters (the SFT weights at the start of alignment).
    pub theta: Weights<'a>,
    /// The stored task vector `τ'` in its storage dtype, computed once by
    /// merge-core (the trainer's own, or [`task_vectors`]); required when merging,
    /// absent for plain AdamW.
    pub tau: Option<Src<'a>>,
}

/// AdamW / OnDARE with step-K, on the GPU, bit-identical to merge-core.
pub struct GpuOptimizer {
    ctx: GpuContext,
    cpu: Optimizer,
    slots: Vec<Slot>,
    kernels: [Kernel; 5],
    reduce: Kernel,
    boundary: Kernel,
    global_norms: Option<GlobalNorms>,
    /// Radix-select histograms, 2048 counters per select.
    hist: wgpu::Buffer,
    status: wgpu::Buffer,
    /// `status` with nothing found (every word u32::MAX), copied over it before a pass.
    status_clear: wgpu::Buffer,
    validate: bool,
    poisoned: Option<String>,
    /// `sumsq.wgsl`: the gradient's Σ g² for a resident step's metric.
    sumsq: Kernel,
}

impl GpuOptimizer {
    /// Uploads parameters and task vectors, zero moments. Tensors are kept in
    /// bytewise name order (the order the CPU front and global scopes use).
    pub fn new(ctx: GpuContext, config: OnlineConfig, tensors: &[TensorInit<'_>]) -> Result<Self, GpuError> {
        // Every buffer is allocated here, once: one out-of-memory scope around them
        // all turns a device that cannot hold the state into a named error.
        // Four f32 arrays per element, or two (m, v) when the weights and
        // gradients are shared.
        let bytes: u64 = tensors.iter().map(|t| t.theta.len() as u64 * if matches!(t.theta, Weights::Shared { .. }) { 8 } else { 16 }).sum();
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let built = Self::build(ctx, config, tensors);
        match pollster::block_on(scope.pop()) {
            None => built,
            Some(_) => Err(GpuError::OutOfMemory {
                what: format!("the optimizer's parameters, moments and gradients ({} tensors)", tensors.len()),
                bytes,
            }),
        }
    }

    fn build(ctx: GpuContext, config: OnlineConfig, tensors: &[TensorInit<'_>]) -> Result<Self, GpuError> {
        let cpu = Optimizer::new(config)?;
        let ties = cpu.ties().copied();
        let global = ties.is_some_and(|t| t.scope == Scope::Global);
        let mut order: Vec<&TensorInit> = tensors.iter().collect();
        order.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        for w in order.windows(2) {
            if w[0].name == w[1].name {
                return Err(GpuError::Invalid(format!("tensor `{}` is given twice", w[0].name)));
            }
        }
        let step_src = format!("{}{}", step_wgsl_constants(), include_str!("step.wgsl"));
        // Indexed by the `pass` constants.
        let kernels = [
            Kernel::new(&ctx, "step scan", &step_src, "scan"),
            Kernel::new(&ctx, "step check", &step_src, "check"),
            Kernel::new(&ctx, "step write", &step_src, "write"),
            Kernel::new(&ctx, "step hist", &step_src, "hist"),
            Kernel::new(&ctx, "step gnorm", &step_src, "gnorm"),
        ];
        let boundary = Kernel::new(&ctx, "shared blocks", include_str!("boundary.wgsl"), "boundary");
        let reduce = Kernel::new(&ctx, "tree level", include_str!("reduce.wgsl"), "level");
        let merging = !matches!(config.merge, Merge::None);
        for t in &order {
            match (merging, &t.tau) {
                (true, None) => return Err(GpuError::Invalid(format!("tensor `{}`: merging needs its task vector τ'", t.name))),
                (false, Some(_)) => return Err(GpuError::Invalid(format!("tensor `{}`: plain AdamW takes no task vector", t.name))),
                (true, Some(tau)) if tau.len() != t.theta.len() => {
                    return Err(GpuError::Core(merge_core::Error::LengthMismatch {
                        tensor: tensor_name(t.name),
                        what: "task vector",
                        expected: t.theta.len() as u64,
                        found: tau.len() as u64,
                    }));
                }
                _ => {}
            }
        }
        let selects = match ties {
            Some(_) if !global => order.len().max(1),
            _ => 1,
        };
        let hist = ctx.storage("radix histograms", (selects * BUCKETS * 4) as u64);
        let (global_norms, segments) = match ties {
            Some(tp) if global && tp.rescale => {
                let (g, seg) = global_norms(&ctx, &reduce, &boundary, &order)?;
                (Some(g), seg)
            }
            _ => (None, Vec::new()),
        };
        let mut scope_offset = 0u64;
        let status = ctx.storage("status", (order.len().max(1) * NCODES * 4) as u64);
        let nothing_found = vec![u32::MAX; order.len().max(1) * NCODES];
        let status_clear = ctx.storage_init("status, nothing found", bytemuck::cast_slice(&nothing_found));
        let dummy_c = ctx.storage("no cached delta", 4);
        let dummy_tau = ctx.storage("no task vector", 4);
        let mut slots = Vec::with_capacity(order.len());
        for (ix, t) in order.iter().enumerate() {
            let n = t.theta.len() as u64;
            merge_core::rng::check_extent(t.name, 0, t.theta.len())?;
            let tau = t.tau.map(|tau| task_vector::upload(&ctx, tau));
            let cached = cpu.needs_cached_delta().then(|| GpuArray::zeros(&ctx, "cached delta", Storage::F32, n));
            let (theta, grad) = match t.theta {
                Weights::Host(w) => (GpuArray::from_f32(&ctx, "theta", w), GpuArray::zeros(&ctx, "grad", Storage::F32, n)),
                Weights::Shared { weights, grads, .. } => {
                    (GpuArray::view_f32(&ctx, t.name, weights, n)?, GpuArray::view_f32(&ctx, t.name, grads, n)?)
                }
            };
            let m = GpuArray::zeros(&ctx, "exp_avg", Storage::F32, n);
            let v = GpuArray::zeros(&ctx, "exp_avg_sq", Storage::F32, n);
            let nb = n.div_ceil(WORKGROUP as u64) as u32;
            let nb_buf = ctx.storage("block sums", 8 * nb.max(1) as u64);
            let levels = tree_levels(&ctx, &reduce, &nb_buf, nb);
            let mut uniforms = Vec::new();
            let mut groups = Vec::new();
            let mut gnorm = Vec::new();
            for (ci, ch) in theta.chunks.iter().enumerate() {
                let u = ctx.uniform_init("step", bytemuck::bytes_of(&StepU::default()));
                let whole = wgpu::Buffer::as_entire_binding;
                let c = cached.as_ref().map_or(whole(&dummy_c), |a| a.chunks[ci].binding());
                let tb = tau.as_ref().map_or(whole(&dummy_tau), |a| a.chunks[ci].binding());
                let (g, th) = (grad.chunks[ci].binding(), ch.binding());
                let (mm, vv) = (m.chunks[ci].binding(), v.chunks[ci].binding());
                let all = [
                    (0, whole(&u)),
                    (1, g.clone()),
                    (2, th),
                    (3, mm.clone()),
                    (4, vv.clone()),
                    (5, c.clone()),
                    (6, tb),
                    (7, whole(&status)),
                    (8, whole(&nb_buf)),
                ];
                let hist_bg = kernels[pass::HIST]
                    .bind_resources(&ctx, &[(0, whole(&u)), (1, g.clone()), (3, mm.clone()), (4, vv.clone()), (5, c.clone()), (9, whole(&hist))]);
                groups.push([
                    kernels[pass::SCAN].bind_resources(&ctx, &all),
                    kernels[pass::CHECK].bind_resources(&ctx, &all),
                    kernels[pass::WRITE].bind_resources(&ctx, &all),
                    hist_bg,
                ]);
                if let Some(gn) = &global_norms {
                    let bg = kernels[pass::GNORM].bind_resources(&ctx, &[(0, whole(&u)), (1, g), (3, mm), (4, vv), (5, c), (8, whole(&gn.buf))]);
                    gnorm.push((bg, segments[ix][ci]));
                }
                uniforms.push(u);
            }
            slots.push(Slot {
                name: t.name.to_string(),
                shared: matches!(t.theta, Weights::Shared { .. }),
                n,
                theta,
                m,
                v,
                grad,
                cached,
                tau_dtype: tau.as_ref().map_or(Storage::F32, |a| a.storage),
                tau,
                nb_buf,
                nb,
                levels,
                uniforms,
                groups,
                offset: if global { scope_offset } else { 0 },
                gnorm,
            });
            scope_offset += n;
        }
        let sumsq = resident::sumsq_kernel(&ctx);
        Ok(GpuOptimizer {
            ctx,
            cpu,
            slots,
            kernels,
            reduce,
            boundary,
            global_norms,
            hist,
            status,
            status_clear,
            validate: true,
            poisoned: None,
            sumsq,
        })
    }

    /// With validation on (the default) a step runs a checking pass first and
    /// writes nothing when any value is non-finite, exactly as merge-core. Off, a
    /// step is one pass cheaper, and a failing step leaves the state unusable
    /// (every later step is refused) until [`GpuOptimizer::load_state`].
    pub fn set_validation(&mut self, on: bool) {
        self.validate = on;
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        self.ctx.adapter_info()
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.cpu.steps()
    }

    /// Tensor names in the optimizer's (bytewise) order.
    pub fn names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }

    /// Bytes the optimizer holds on the device (parameters, moments, gradients,
    /// task vectors, Δ_c, scratch).
    pub fn device_bytes(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| {
                s.theta.device_bytes()
                    + s.m.device_bytes()
                    + s.v.device_bytes()
                    + s.grad.device_bytes()
                    + s.cached.as_ref().map_or(0, |c| c.device_bytes())
                    + s.tau.as_ref().map_or(0, |c| c.device_bytes())
                    + s.nb_buf.size()
                    + s.levels.iter().map(|l| l.1.size()).sum::<u64>()
            })
            .sum()
    }

    /// One optimizer step. `grads` are given by tensor name (any order).
    pub fn step(&mut self, grads: &[(&str, &[f32])]) -> Result<(), GpuError> {
        self.upload_grads(grads)?;
        self.step_uploaded()
    }

    /// Uploads this step's gradients (all tensors, by name, any order).
    pub fn upload_grads(&mut self, grads: &[(&str, &[f32])]) -> Result<(), GpuError> {
        let mut by_slot: Vec<Option<&[f32]>> = vec![None; self.slots.len()];
        for (name, g) in grads {
            let ix = self
                .slots
                .binary_search_by(|s| s.name.as_bytes().cmp(name.as_bytes()))
                .map_err(|_| GpuError::Invalid(format!("gradient for unknown tensor `{name}`")))?;
            if g.len() as u64 != self.slots[ix].n {
                return Err(GpuError::Core(merge_core::Error::LengthMismatch {
                    tensor: tensor_name(name),
                    what: "gradient",
                    expected: self.slots[ix].n,
                    found: g.len() as u64,
                }));
            }
            by_slot[ix] = Some(g);
        }
        if let Some(ix) = by_slot.iter().position(|g| g.is_none()) {
            return Err(GpuError::Invalid(format!("no gradient for tensor `{}`", self.slots[ix].name)));
        }
        for (slot, g) in self.slots.iter().zip(&by_slot) {
            slot.grad.write_f32(&self.ctx, g.unwrap_or(&[]));
        }
        Ok(())
    }

    /// One step with the gradients already on the device ([`Self::upload_grads`]);
    /// benchmarks time this part alone.
    pub fn step_uploaded(&mut self) -> Result<(), GpuError> {
        if let Some(why) = &self.poisoned {
            return Err(GpuError::Poisoned(why.clone()));
        }
        let k = self.cpu.steps() + 1;
        let plan = self.cpu.plan(k)?;
        let mut us: Vec<StepU> = Vec::with_capacity(self.slots.len());
        for (ix, slot) in self.slots.iter().enumerate() {
            let ts = plan.tensor(&slot.name, slot.n)?;
            us.push(base_uniform(&ts, ix as u32, slot));
        }
        if self.cpu.ties().is_some() && plan.phase() == Phase::Merge {
            self.ties_selection(&mut us)?;
        }
        if plan.needs_norms() {
            self.write_uniforms(&us);
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.reset_status(&mut enc);
            for slot in &self.slots {
                self.encode_pass(&mut enc, slot, pass::SCAN);
                for (_, _, gph, bg) in &slot.levels {
                    // Both halves (|D| and |D'|) of the previous level in one dispatch.
                    self.reduce.dispatch(&self.ctx, &mut enc, bg, 2 * gph);
                }
            }
            self.ctx.submit(enc);
            self.check_status()?;
            for (slot, u) in self.slots.iter().zip(us.iter_mut()) {
                let (org, new) = self.norms(slot)?;
                let mut norms = Norms::default();
                norms.update.push(org);
                norms.sparse.push(new);
                if let Rescale::Apply { factor, clip } = norms.rescale(&slot.name, plan.scalars().eps, plan.clip())? {
                    u.do_rescale = 1;
                    u.factor = factor;
                    u.clip = clip;
                }
            }
        }
        self.write_uniforms(&us);
        if self.validate {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.reset_status(&mut enc);
            for slot in &self.slots {
                self.encode_pass(&mut enc, slot, pass::CHECK);
            }
            self.ctx.submit(enc);
            self.check_status()?;
        }
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        if !self.validate {
            self.reset_status(&mut enc);
        }
        for slot in &self.slots {
            self.encode_pass(&mut enc, slot, pass::WRITE);
        }
        self.ctx.submit(enc);
        if !self.validate {
            if let Err(e) = self.check_status() {
                self.poisoned = Some(format!("step {k} failed after writing: {e}"));
                return Err(e);
            }
        } else {
            self.ctx.wait()?;
        }
        self.cpu.set_steps(k);
        Ok(())
    }

    /// OnTIES, merge phase: validate (scan), radix-select the update's threshold
    /// per tensor or globally, then (with the rescale) the norms of D and D'.
    /// Leaves the threshold and factor in `us`.
    fn ties_selection(&self, us: &mut [StepU]) -> Result<(), GpuError> {
        let Some(tp) = self.cpu.ties().copied() else { return Ok(()) };
        let global = tp.scope == Scope::Global;
        if self.validate {
            // Refuse non-finite values before selecting on them (writes nothing).
            self.write_uniforms(us);
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.reset_status(&mut enc);
            for slot in &self.slots {
                self.encode_pass(&mut enc, slot, pass::SCAN);
            }
            self.ctx.submit(enc);
            self.check_status()?;
        }

        let mut sels = Vec::new();
        if global {
            let n: u64 = self.slots.iter().map(|s| s.n).sum();
            if n >= 1 << 32 {
                return Err(GpuError::Invalid(format!("OnTIES global scope of {n} elements: the GPU histograms count in u32")));
            }
            sels.push(RadixSelect::new("global", n, keep_count("p (reserve rate)", tp.p, n)?)?);
        } else {
            for s in &self.slots {
                sels.push(RadixSelect::new(&s.name, s.n, keep_count("p (reserve rate)", tp.p, s.n)?)?);
            }
        }
        let sel_of = |ix: usize| if global { 0 } else { ix };
        while sels.iter().any(|s| s.pass().is_some()) {
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            for (ix, u) in us.iter_mut().enumerate() {
                if let Some(p) = sels[sel_of(ix)].pass() {
                    u.set_pass(p, (sel_of(ix) * BUCKETS) as u32);
                }
            }
            self.write_uniforms(us);
            enc.clear_buffer(&self.hist, 0, Some((sels.len() * BUCKETS * 4) as u64));
            for (ix, slot) in self.slots.iter().enumerate() {
                if sels[sel_of(ix)].pass().is_some() {
                    self.encode_pass(&mut enc, slot, pass::HIST);
                }
            }
            self.ctx.submit(enc);
            let counts = self.ctx.read_u32(&self.hist, (sels.len() * BUCKETS) as u64)?;
            for (j, sel) in sels.iter_mut().enumerate() {
                if let Some(p) = sel.pass() {
                    sel.add_histogram(&counts[j * BUCKETS..j * BUCKETS + p.buckets()])?;
                    sel.finish_pass()?;
                }
            }
        }
        for (ix, u) in us.iter_mut().enumerate() {
            u.set_threshold(sels[sel_of(ix)].threshold().unwrap_or(Threshold::NOTHING));
            u.factor = 1.0;
        }
        if let (true, Some(g)) = (tp.rescale, &self.global_norms) {
            self.write_uniforms(us);
            let leaves = 2 * u64::from(g.nslots) * u64::from(WORKGROUP);
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            if leaves > 0 {
                enc.clear_buffer(&g.buf, u64::from(g.bl_base) * 4, Some(4 * leaves));
            }
            for slot in &self.slots {
                for ((bg, seg), ch) in slot.gnorm.iter().zip(&slot.theta.chunks) {
                    let groups = (u64::from(seg[0]) + ch.len).div_ceil(WORKGROUP as u64) as u32;
                    self.kernels[pass::GNORM].dispatch(&self.ctx, &mut enc, bg, groups);
                }
            }
            if let Some((_, _, bg)) = &g.boundary {
                self.boundary.dispatch(&self.ctx, &mut enc, bg, 2 * g.nslots);
            }
            for (_, _, gph, bg) in &g.levels {
                self.reduce.dispatch(&self.ctx, &mut enc, bg, 2 * gph);
            }
            self.ctx.submit(enc);
            let (full, kept) = if g.nb_total == 0 {
                (0.0, 0.0)
            } else {
                let last = g.levels.last().map_or(&g.buf, |l| &l.1);
                let w = self.ctx.read_bytes(last, if g.levels.is_empty() { 4 * (g.nb_total as u64 + 1) } else { 8 })?;
                let f: Vec<f32> = bytemuck::pod_collect_to_vec(&w);
                if g.levels.is_empty() { (f[0], f[g.nb_total as usize]) } else { (f[0], f[1]) }
            };
            for (x, what) in [(full, "L1 norm before trimming"), (kept, "L1 norm after trimming")] {
                if merge_core::arith::is_non_finite(x) {
                    return Err(GpuError::Core(merge_core::Error::NonFiniteReduction {
                        tensor: tensor_name("all tensors (global scope)"),
                        what,
                    }));
                }
            }
            let factor = onties::rescale_factor(full, kept);
            for u in us.iter_mut() {
                u.factor = factor;
            }
        } else if tp.rescale {
            // The scan pass with the threshold and factor 1 sums |D| and |D'|.
            self.write_uniforms(us);
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            for slot in &self.slots {
                self.encode_pass(&mut enc, slot, pass::SCAN);
                for (_, _, gph, bg) in &slot.levels {
                    self.reduce.dispatch(&self.ctx, &mut enc, bg, 2 * gph);
                }
            }
            self.ctx.submit(enc);
            for (slot, u) in self.slots.iter().zip(us.iter_mut()) {
                let (full, kept) = self.norms(slot)?;
                for (x, what) in [(full, "L1 norm before trimming"), (kept, "L1 norm after trimming")] {
                    if merge_core::arith::is_non_finite(x) {
                        return Err(GpuError::Core(merge_core::Error::NonFiniteReduction { tensor: tensor_name(&slot.name), what }));
                    }
                }
                u.factor = onties::rescale_factor(full, kept);
            }
        }
        Ok(())
    }

    /// The two tree sums of the last scan: `(‖D‖₁, ‖D'‖₁)`.
    fn norms(&self, slot: &Slot) -> Result<(f32, f32), GpuError> {
        if slot.n == 0 {
            return Ok((0.0, 0.0));
        }
        let last = slot.levels.last().map_or(&slot.nb_buf, |l| &l.1);
        let sums: Vec<f32> = bytemuck::pod_collect_to_vec(&self.ctx.read_bytes(last, 8)?);
        Ok((sums[0], sums[1]))
    }

    fn encode_pass(&self, enc: &mut wgpu::CommandEncoder, slot: &Slot, pass: usize) {
        let per_group = if pass == pass::HIST { u64::from(HIST_ITEMS * WORKGROUP) } else { u64::from(WORKGROUP) };
        for (ci, ch) in slot.theta.chunks.iter().enumerate() {
            let groups = ch.len.div_ceil(per_group) as u32;
            self.kernels[pass].dispatch(&self.ctx, enc, &slot.groups[ci][pass], groups);
        }
    }

    fn write_uniforms(&self, us: &[StepU]) {
        for (slot, u) in self.slots.iter().zip(us) {
            for (ci, ch) in slot.theta.chunks.iter().enumerate() {
                let mut cu = *u;
                cu.n = ch.len as u32;
                cu.start = ch.start as u32;
                cu.block0 = (ch.start / WORKGROUP as u64) as u32;
                cu.tau_entries = ch.len.div_ceil(WORKGROUP as u64) as u32 + 1;
                if let (Some(g), Some((_, seg))) = (&self.global_norms, slot.gnorm.get(ci)) {
                    [cu.g_shift, cu.g_block0, cu.g_first_slot, cu.g_last_slot] = *seg;
                    cu.g_nb_total = g.nb_total;
                    cu.g_bl_base = g.bl_base;
                    cu.g_nslots = g.nslots;
                }
                self.ctx.write_buffer(&slot.uniforms[ci], 0, bytemuck::bytes_of(&cu));
            }
        }
    }

    /// Records, ahead of a validating pass in `enc`, that nothing was found yet.
    fn reset_status(&self, enc: &mut wgpu::CommandEncoder) {
        enc.copy_buffer_to_buffer(&self.status_clear, 0, &self.status, 0, self.status.size());
    }

    /// The first tensor (in name order) with a non-finite value, its lowest index,
    /// and which value it was (merge-core's order among values at that index).
    fn check_status(&self) -> Result<(), GpuError> {
        let words = self.ctx.read_u32(&self.status, (self.slots.len().max(1) * NCODES) as u64)?;
        for (ix, slot) in self.slots.iter().enumerate() {
            let s = &words[ix * NCODES..ix * NCODES + WHAT.len()];
            let lowest = *s.iter().min().unwrap_or(&u32::MAX);
            if lowest != u32::MAX {
                let code = s.iter().position(|&w| w == lowest).unwrap_or(0);
                return Err(GpuError::Core(merge_core::Error::NonFinite {
                    tensor: tensor_name(&slot.name),
                    what: WHAT[code],
                    index: u64::from(lowest),
                }));
            }
        }
        Ok(())
    }

}
