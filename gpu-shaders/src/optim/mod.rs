//! The online merging optimizer on the GPU: merge-core's `optim`/`step` with the
//! state resident on the device. Only gradients go up each step; parameters and
//! state come back only when asked (checkpoints, cross-checks).

use merge_core::dtype::{Dst, Dtype, Src};
use merge_core::error::tensor_name;
use merge_core::hyper::AdamForm;
use merge_core::optim::{Merge, OnlineConfig, Optimizer, Scope, TaskVectorJob, TiesConfig};
use merge_core::step::{MergePlan, Norms, Phase, Rescale};
use merge_core::dare::DareVariant;
use merge_core::onties;
use merge_core::topk::{keep_count, Pass, RadixSelect, Threshold, BUCKETS};

use crate::context::{GpuContext, GpuError, WORKGROUP};
use crate::kernel::Kernel;
use crate::tensor::{load_f32, GpuArray, Storage};

/// What the status slots record, in merge-core's reporting order.
const WHAT: [&str; 12] = merge_core::step::NON_FINITE_VALUES;

/// The element kernel a chunk runs (`U.kind` in step.wgsl).
mod resident;

pub use resident::NamedBuffer;

mod kind {
    pub const PLAIN: u32 = 0;
    pub const DARE_REF: u32 = 1;
    pub const DARE_PAPER: u32 = 2;
    pub const TIES: u32 = 3;
}

/// The passes of step.wgsl: `mode` of `step_main` for the first three, and the
/// index of each pass's kernel in `GpuOptimizer::kernels`.
mod pass {
    pub const SCAN: usize = 0;
    pub const CHECK: usize = 1;
    pub const WRITE: usize = 2;
    pub const HIST: usize = 3;
    pub const GNORM: usize = 4;
}

/// step.wgsl's constants, from the Rust ones above so the two cannot drift.
fn step_wgsl_constants() -> String {
    format!(
        "const HIST_ITEMS: u32 = {HIST_ITEMS}u;\n\
         const PLAIN: u32 = {}u;\nconst DARE_REF: u32 = {}u;\nconst DARE_PAPER: u32 = {}u;\nconst TIES: u32 = {}u;\n\
         const SCAN: u32 = {}u;\nconst CHECK: u32 = {}u;\nconst WRITE: u32 = {}u;\n",
        kind::PLAIN,
        kind::DARE_REF,
        kind::DARE_PAPER,
        kind::TIES,
        pass::SCAN,
        pass::CHECK,
        pass::WRITE
    )
}
/// Elements each invocation of the histogram pass counts (one workgroup clears
/// and flushes 2048 shared counters per 16 × 256 elements).
const HIST_ITEMS: u32 = 16;

/// Status words per tensor (`NCODES` in step.wgsl).
const NCODES: usize = 16;

/// OnTIES as the GPU needs it (alpha and 1 − α come from merge-core's plan).
#[derive(Clone, Copy, Debug)]
struct TiesParams {
    /// Kept fraction in binary32, as merge-core validates and uses it.
    p: f32,
    rescale: bool,
    global: bool,
}

impl TiesParams {
    fn from_config(t: &TiesConfig) -> Self {
        let global = t.scope == Scope::Global;
        TiesParams { p: t.p as f32, rescale: t.rescale, global }
    }
}

/// One tensor handed to [`GpuOptimizer::new`].
pub struct TensorInit<'a> {
    pub name: &'a str,
    /// Initial parameters (the SFT weights at the start of alignment).
    pub theta: &'a [f32],
    /// Base and SFT weights for the task vector; required when merging.
    pub task: Option<(Src<'a>, Src<'a>)>,
    /// Storage format of the task vector `τ'` on the device.
    pub tau_dtype: Dtype,
}

/// Moments (and `Δ_c` for step-K) of one tensor, read back for a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorStateData {
    pub name: String,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub cached: Option<Vec<f32>>,
}

struct Slot {
    name: String,
    n: u64,
    theta: GpuArray,
    m: GpuArray,
    v: GpuArray,
    grad: GpuArray,
    cached: Option<GpuArray>,
    tau: Option<GpuArray>,
    tau_dtype: Storage,
    /// 256-block sums of |D| (first `nb`) and |D'| (next `nb`).
    nb_buf: wgpu::Buffer,
    nb: u32,
    /// Tree levels above the blocks: (uniform, output buffer, groups per half, bind group).
    levels: Vec<(wgpu::Buffer, wgpu::Buffer, u32, wgpu::BindGroup)>,
    uniforms: Vec<wgpu::Buffer>,
    /// Per chunk: bind groups for scan, check, write, hist.
    groups: Vec<[wgpu::BindGroup; 4]>,
    /// First index in the OnTIES scope (0 for per-tensor scope).
    offset: u64,
    /// Global-scope norms: per chunk, the gnorm bind group and
    /// (shift, first scope block, first shared slot, last shared slot).
    gnorm: Vec<(wgpu::BindGroup, [u32; 4])>,
}

/// The tree sums over the whole OnTIES scope (global scope with the rescale):
/// `buf` holds the scope's 256-block sums of |D| then |D'| (`nb_total` each), then
/// the leaves of the `nslots` blocks shared by two or more chunks.
struct GlobalNorms {
    buf: wgpu::Buffer,
    nb_total: u32,
    nslots: u32,
    bl_base: u32,
    /// The boundary reduction (uniform and map kept alive by the bind group's owner).
    boundary: Option<(wgpu::Buffer, wgpu::Buffer, wgpu::BindGroup)>,
    levels: Vec<(wgpu::Buffer, wgpu::Buffer, u32, wgpu::BindGroup)>,
}

/// The step uniform of step.wgsl (`StepU`), 32 words.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Default)]
struct StepU {
    zero: u32,
    n: u32,
    start: u32,
    block0: u32,
    k0: u32,
    k1: u32,
    threshold: u32,
    keep_all: u32,
    kind: u32,
    torch: u32,
    accumulate: u32,
    has_cached: u32,
    tau_dtype: u32,
    do_rescale: u32,
    slot: u32,
    nb_total: u32,
    beta1: f32,
    beta2: f32,
    c1: f32,
    c2: f32,
    eps: f32,
    neg_step: f32,
    bc2_sqrt: f32,
    decay_before: f32,
    decay_after: f32,
    scale: f32,
    alpha: f32,
    omega: f32,
    factor: f32,
    clip: f32,
    ties_variant: u32,
    hist_base: u32,
    thr_key: u32,
    cut_lo: u32,
    cut_hi: u32,
    off_lo: u32,
    off_hi: u32,
    h_mode: u32,
    h_shift: u32,
    h_bits: u32,
    h_key: u32,
    h_prefix_lo: u32,
    h_prefix_hi: u32,
    /// Compact task vectors: index of the first entry word in a chunk's buffer.
    tau_entries: u32,
    g_shift: u32,
    g_block0: u32,
    g_nb_total: u32,
    g_first_slot: u32,
    g_last_slot: u32,
    g_bl_base: u32,
    g_nslots: u32,
    pad1: u32,
}

impl StepU {
    fn set_threshold(&mut self, t: Threshold) {
        self.thr_key = t.key;
        self.cut_lo = t.cutoff as u32;
        self.cut_hi = (t.cutoff >> 32) as u32;
    }

    fn set_pass(&mut self, p: Pass, base: u32) {
        self.hist_base = base;
        let (mode, shift, bits, key, prefix) = match p {
            Pass::Key { shift, bits, prefix } => (0, shift, bits, 0, u64::from(prefix)),
            Pass::Index { key, shift, bits, prefix } => (1, shift, bits, key, prefix),
        };
        self.h_mode = mode;
        self.h_shift = shift;
        self.h_bits = bits;
        self.h_key = key;
        self.h_prefix_lo = prefix as u32;
        self.h_prefix_hi = (prefix >> 32) as u32;
    }
}

/// AdamW / OnDARE with step-K, on the GPU, bit-identical to merge-core.
pub struct GpuOptimizer {
    ctx: GpuContext,
    cpu: Optimizer,
    steps: u64,
    slots: Vec<Slot>,
    kernels: [Kernel; 5],
    reduce: Kernel,
    boundary: Kernel,
    global_norms: Option<GlobalNorms>,
    ties: Option<TiesParams>,
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
        let ties = match &config.merge {
            Merge::Ties(t) => Some(TiesParams::from_config(t)),
            _ => None,
        };
        // Every buffer is allocated here, once: one out-of-memory scope around them
        // all turns a device that cannot hold the state into a named error.
        let elements: u64 = tensors.iter().map(|t| t.theta.len() as u64).sum();
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let built = Self::build(ctx, config, ties, tensors);
        match pollster::block_on(scope.pop()) {
            None => built,
            Some(_) => Err(GpuError::OutOfMemory {
                what: format!("the optimizer's parameters, moments and gradients ({} tensors)", tensors.len()),
                bytes: 16 * elements,
            }),
        }
    }

    fn build(ctx: GpuContext, config: OnlineConfig, ties: Option<TiesParams>, tensors: &[TensorInit<'_>]) -> Result<Self, GpuError> {
        let cpu = Optimizer::new(config)?;
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
        let merging = !matches!(config.merge, Merge::None) || ties.is_some();
        let host_taus = match ties {
            Some(_) => Some(ties_task_vectors(&cpu, &order)?),
            None if merging => Some(dare_task_vectors(&cpu, &order)?),
            None => None,
        };
        let selects = match ties {
            Some(tp) if !tp.global => order.len().max(1),
            _ => 1,
        };
        let hist = ctx.storage("radix histograms", (selects * BUCKETS * 4) as u64);
        let (global_norms, segments) = match ties {
            Some(tp) if tp.global && tp.rescale => {
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
            let tau = host_taus.as_ref().map(|taus| taus[ix].upload(&ctx));
            let cached = cpu.needs_cached_delta().then(|| GpuArray::zeros(&ctx, "cached delta", Storage::F32, n));
            let theta = GpuArray::from_f32(&ctx, "theta", t.theta);
            let m = GpuArray::zeros(&ctx, "exp_avg", Storage::F32, n);
            let v = GpuArray::zeros(&ctx, "exp_avg_sq", Storage::F32, n);
            let grad = GpuArray::zeros(&ctx, "grad", Storage::F32, n);
            let nb = n.div_ceil(WORKGROUP as u64) as u32;
            let nb_buf = ctx.storage("block sums", 8 * nb.max(1) as u64);
            let levels = tree_levels(&ctx, &reduce, &nb_buf, nb);
            let mut uniforms = Vec::new();
            let mut groups = Vec::new();
            let mut gnorm = Vec::new();
            for (ci, ch) in theta.chunks.iter().enumerate() {
                let u = ctx.uniform_init("step", bytemuck::bytes_of(&StepU::default()));
                let c = cached.as_ref().map_or(&dummy_c, |a| &a.chunks[ci].buf);
                let tb = tau.as_ref().map_or(&dummy_tau, |a| &a.chunks[ci].buf);
                let bufs = [&u, &grad.chunks[ci].buf, &ch.buf, &m.chunks[ci].buf, &v.chunks[ci].buf, c, tb, &status, &nb_buf];
                let hist_bg = kernels[pass::HIST].bind_at(
                    &ctx,
                    &[(0, &u), (1, &grad.chunks[ci].buf), (3, &m.chunks[ci].buf), (4, &v.chunks[ci].buf), (5, c), (9, &hist)],
                );
                groups.push([
                    kernels[pass::SCAN].bind(&ctx, &bufs),
                    kernels[pass::CHECK].bind(&ctx, &bufs),
                    kernels[pass::WRITE].bind(&ctx, &bufs),
                    hist_bg,
                ]);
                if let Some(g) = &global_norms {
                    let bg = kernels[pass::GNORM].bind_at(
                        &ctx,
                        &[(0, &u), (1, &grad.chunks[ci].buf), (3, &m.chunks[ci].buf), (4, &v.chunks[ci].buf), (5, c), (8, &g.buf)],
                    );
                    gnorm.push((bg, segments[ix][ci]));
                }
                uniforms.push(u);
            }
            slots.push(Slot {
                name: t.name.to_string(),
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
                offset: if ties.is_some_and(|t| t.global) { scope_offset } else { 0 },
                gnorm,
            });
            scope_offset += n;
        }
        let sumsq = resident::sumsq_kernel(&ctx);
        Ok(GpuOptimizer {
            ctx,
            cpu,
            steps: 0,
            slots,
            kernels,
            reduce,
            boundary,
            global_norms,
            ties,
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
        self.steps
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
        let k = self.steps + 1;
        let plan = self.cpu.plan(k)?;
        let mut us: Vec<StepU> = Vec::with_capacity(self.slots.len());
        for (ix, slot) in self.slots.iter().enumerate() {
            let ts = plan.tensor(&slot.name, slot.n)?;
            us.push(base_uniform(&ts, ix as u32, slot));
        }
        if self.ties.is_some() && plan.phase() == Phase::Merge {
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
            self.ctx.queue.submit([enc.finish()]);
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
            self.ctx.queue.submit([enc.finish()]);
            self.check_status()?;
        }
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        if !self.validate {
            self.reset_status(&mut enc);
        }
        for slot in &self.slots {
            self.encode_pass(&mut enc, slot, pass::WRITE);
        }
        self.ctx.queue.submit([enc.finish()]);
        if !self.validate {
            if let Err(e) = self.check_status() {
                self.poisoned = Some(format!("step {k} failed after writing: {e}"));
                return Err(e);
            }
        } else {
            self.ctx.wait()?;
        }
        self.steps = k;
        Ok(())
    }

    /// OnTIES, merge phase: validate (scan), radix-select the update's threshold
    /// per tensor or globally, then (with the rescale) the norms of D and D'.
    /// Leaves the threshold and factor in `us`.
    fn ties_selection(&self, us: &mut [StepU]) -> Result<(), GpuError> {
        let Some(tp) = self.ties else { return Ok(()) };
        if self.validate {
            // Refuse non-finite values before selecting on them (writes nothing).
            self.write_uniforms(us);
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            self.reset_status(&mut enc);
            for slot in &self.slots {
                self.encode_pass(&mut enc, slot, pass::SCAN);
            }
            self.ctx.queue.submit([enc.finish()]);
            self.check_status()?;
        }

        let mut sels = Vec::new();
        if tp.global {
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
        let sel_of = |ix: usize| if tp.global { 0 } else { ix };
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
            self.ctx.queue.submit([enc.finish()]);
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
            self.ctx.queue.submit([enc.finish()]);
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
            self.ctx.queue.submit([enc.finish()]);
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
                self.ctx.queue.write_buffer(&slot.uniforms[ci], 0, bytemuck::bytes_of(&cu));
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

    /// Current parameters, by name, in name order.
    pub fn read_params(&self) -> Result<Vec<(String, Vec<f32>)>, GpuError> {
        self.slots.iter().map(|s| Ok((s.name.clone(), s.theta.read_f32(&self.ctx)?))).collect()
    }

    /// Moments and Δ_c, for checkpoints and cross-checks.
    pub fn read_state(&self) -> Result<Vec<TensorStateData>, GpuError> {
        self.slots
            .iter()
            .map(|s| {
                Ok(TensorStateData {
                    name: s.name.clone(),
                    m: s.m.read_f32(&self.ctx)?,
                    v: s.v.read_f32(&self.ctx)?,
                    cached: s.cached.as_ref().map(|c| c.read_f32(&self.ctx)).transpose()?,
                })
            })
            .collect()
    }

    /// Restores parameters, moments, Δ_c and the step count from a checkpoint
    /// (also clears a failed unvalidated step).
    pub fn load_state(&mut self, steps: u64, params: &[(&str, &[f32])], state: &[TensorStateData]) -> Result<(), GpuError> {
        for slot in &self.slots {
            let p = params
                .iter()
                .find(|(n, _)| *n == slot.name)
                .ok_or_else(|| GpuError::Invalid(format!("checkpoint lacks parameters of `{}`", slot.name)))?;
            let st = state
                .iter()
                .find(|s| s.name == slot.name)
                .ok_or_else(|| GpuError::Invalid(format!("checkpoint lacks optimizer state of `{}`", slot.name)))?;
            for (what, len) in [("parameter", p.1.len()), ("exp_avg", st.m.len()), ("exp_avg_sq", st.v.len())] {
                if len as u64 != slot.n {
                    return Err(GpuError::Core(merge_core::Error::LengthMismatch {
                        tensor: tensor_name(&slot.name),
                        what,
                        expected: slot.n,
                        found: len as u64,
                    }));
                }
            }
            slot.theta.write_f32(&self.ctx, p.1);
            slot.m.write_f32(&self.ctx, &st.m);
            slot.v.write_f32(&self.ctx, &st.v);
            match (&slot.cached, &st.cached) {
                (Some(c), Some(d)) if d.len() as u64 == slot.n => c.write_f32(&self.ctx, d),
                (None, None) => {}
                _ => {
                    return Err(GpuError::Invalid(format!(
                        "tensor `{}`: checkpoint's cached delta does not match k = {}",
                        slot.name,
                        self.cpu.config().k
                    )))
                }
            }
        }
        self.steps = steps;
        self.poisoned = None;
        self.ctx.wait()
    }
}

/// OnDARE task vectors `τ'` of every tensor, by merge-core, on all CPU cores
/// (they are independent per tensor); the first failing tensor in name order
/// gives the error, as a sequential loop would.
fn dare_task_vectors(cpu: &Optimizer, order: &[&TensorInit<'_>]) -> Result<Vec<HostTau>, GpuError> {
    let one = |t: &TensorInit<'_>| -> Result<HostTau, GpuError> {
        let (base, sft) =
            t.task.ok_or_else(|| GpuError::Invalid(format!("tensor `{}`: merging needs its base and SFT weights", t.name)))?;
        let n = t.theta.len();
        Ok(match t.tau_dtype {
            Dtype::F32 => {
                let mut out = vec![0f32; n];
                cpu.init_task_vector(t.name, base, sft, &mut Dst::F32(&mut out))?;
                HostTau::F32(out)
            }
            d => {
                let mut out = vec![0u16; n];
                let mut dst = if d == Dtype::Bf16 { Dst::Bf16(&mut out) } else { Dst::F16(&mut out) };
                cpu.init_task_vector(t.name, base, sft, &mut dst)?;
                HostTau::Half(d, out)
            }
        })
    };
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let per = order.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let one = &one;
        let handles: Vec<_> =
            order.chunks(per).map(|part| s.spawn(move || part.iter().map(|t| one(t)).collect::<Vec<_>>())).collect();
        // A panic in a worker is a bug; re-raise it here.
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// The task vector as the kernels read it: dense in its dtype, or (when smaller,
/// as for the sparse τ' of OnDARE-reference and OnTIES) only its non-zero entries.
/// `values` are the stored values read back as binary32 and flushed.
fn dense_or_compact(ctx: &GpuContext, values: &[f32], dense: impl FnOnce() -> GpuArray) -> GpuArray {
    let d = dense();
    if GpuArray::compact_bytes(ctx, values) < d.device_bytes() { GpuArray::compact(ctx, "task vector", values) } else { d }
}

fn base_uniform(ts: &merge_core::step::TensorStep<'_>, slot_ix: u32, slot: &Slot) -> StepU {
    let s = &ts.scalars;
    let mut u = StepU {
        slot: slot_ix,
        nb_total: slot.nb,
        torch: u32::from(s.form == AdamForm::Torch),
        has_cached: u32::from(slot.cached.is_some()),
        tau_dtype: slot.tau_dtype.code(),
        beta1: s.beta1,
        beta2: s.beta2,
        c1: s.one_minus_beta1,
        c2: s.one_minus_beta2,
        eps: s.eps,
        neg_step: s.neg_step_size,
        bc2_sqrt: s.bc2_sqrt,
        decay_before: s.decay_before,
        decay_after: s.decay_after,
        scale: 1.0,
        omega: 1.0,
        clip: 1.0,
        factor: 1.0,
        keep_all: 1,
        ..StepU::default()
    };
    let accumulate = ts.phase == Phase::Accumulate;
    u.accumulate = u32::from(accumulate);
    if let MergePlan::Dare { params, key } = ts.merge {
        u.kind = if accumulate {
            kind::PLAIN
        } else {
            match params.variant {
                DareVariant::Reference => kind::DARE_REF,
                DareVariant::Paper => kind::DARE_PAPER,
            }
        };
        u.k0 = key.0[0];
        u.k1 = key.0[1];
        match params.keep.threshold() {
            Some(t) => {
                u.threshold = t;
                u.keep_all = 0;
            }
            None => u.keep_all = 1,
        }
        u.scale = params.scale;
        u.alpha = params.alpha;
        u.omega = params.one_minus_alpha;
        u.clip = params.clip;
    }
    if let MergePlan::Ties { variant, alpha, one_minus_alpha, .. } = ts.merge {
        u.kind = if accumulate { kind::PLAIN } else { kind::TIES };
        u.ties_variant = match variant {
            onties::Variant::Reference => 0,
            onties::Variant::Paper => 1,
        };
        u.alpha = alpha;
        u.omega = one_minus_alpha;
        u.set_threshold(Threshold::NOTHING);
        u.off_lo = slot.offset as u32;
        u.off_hi = (slot.offset >> 32) as u32;
    }
    u
}

/// A task vector computed on the host, in its storage dtype.
enum HostTau {
    F32(Vec<f32>),
    Half(Dtype, Vec<u16>),
}

impl HostTau {
    fn upload(&self, ctx: &GpuContext) -> GpuArray {
        match self {
            HostTau::F32(v) => dense_or_compact(ctx, v, || GpuArray::from_f32(ctx, "task vector", v)),
            HostTau::Half(d, bits) => {
                let src = if *d == Dtype::F16 { Src::F16(bits) } else { Src::Bf16(bits) };
                let values = load_f32(&src);
                dense_or_compact(ctx, &values, || GpuArray::from_u16(ctx, "task vector", Storage::from(*d), bits))
            }
        }
    }
}

/// OnTIES task vectors `τ'` of every tensor (name order), by merge-core itself:
/// trimmed per tensor or globally, rescaled when asked, stored in each dtype.
fn ties_task_vectors(cpu: &Optimizer, order: &[&TensorInit<'_>]) -> Result<Vec<HostTau>, GpuError> {
    let mut outs: Vec<HostTau> = order
        .iter()
        .map(|t| match t.tau_dtype {
            Dtype::F32 => HostTau::F32(vec![0.0; t.theta.len()]),
            d => HostTau::Half(d, vec![0; t.theta.len()]),
        })
        .collect();
    let mut scratch: Vec<Vec<f32>> = order.iter().map(|t| vec![0.0; t.theta.len()]).collect();
    let mut jobs = Vec::with_capacity(order.len());
    for ((t, out), sc) in order.iter().zip(outs.iter_mut()).zip(scratch.iter_mut()) {
        let (base, sft) = t
            .task
            .ok_or_else(|| GpuError::Invalid(format!("tensor `{}`: OnTIES needs its base and SFT weights", t.name)))?;
        let out = match out {
            HostTau::F32(v) => Dst::F32(v),
            HostTau::Half(Dtype::F16, v) => Dst::F16(v),
            HostTau::Half(_, v) => Dst::Bf16(v),
        };
        jobs.push(TaskVectorJob { name: t.name, base, sft, out, scratch: sc });
    }
    cpu.init_task_vectors(&mut jobs)?;
    drop(jobs);
    Ok(outs)
}

/// Lays out the global-scope tree sums: every chunk of every tensor (name order)
/// is a segment of the scope; a 256-block of the scope that two or more segments
/// touch is "shared" and gets a slot for its leaves. Returns the buffers and, per
/// tensor per chunk, (shift, first scope block, first slot, last slot).
#[allow(clippy::type_complexity)]
fn global_norms(ctx: &GpuContext, reduce: &Kernel, boundary: &Kernel, order: &[&TensorInit<'_>]) -> Result<(GlobalNorms, Vec<Vec<[u32; 4]>>), GpuError> {
    let wg = WORKGROUP as u64;
    let n: u64 = order.iter().map(|t| t.theta.len() as u64).sum();
    if n >= 1 << 32 {
        return Err(GpuError::Invalid(format!("OnTIES global scope of {n} elements: the GPU indexes it with u32")));
    }
    let mut segs = Vec::new();
    let mut off = 0u64;
    for t in order {
        let mut per = Vec::new();
        for (start, len) in ctx.chunks(t.theta.len() as u64) {
            per.push((off + start, len));
        }
        segs.push(per);
        off += t.theta.len() as u64;
    }
    // A block is shared when a segment starts strictly inside it.
    let mut shared: Vec<u64> = segs.iter().flatten().map(|&(g0, _)| g0).filter(|g0| g0 % wg != 0).map(|g0| g0 / wg).collect();
    shared.dedup();
    let slot_of = |b: u64| shared.binary_search(&b).ok().map_or(u32::MAX, |s| s as u32);
    let layout: Vec<Vec<[u32; 4]>> = segs
        .iter()
        .map(|per| {
            per.iter()
                .map(|&(g0, len)| {
                    let first = g0 / wg;
                    let last = (g0 + len.max(1) - 1) / wg;
                    [(g0 % wg) as u32, first as u32, slot_of(first), slot_of(last)]
                })
                .collect()
        })
        .collect();
    let nb_total = n.div_ceil(wg) as u32;
    let nslots = shared.len() as u32;
    let bl_base = 2 * nb_total;
    let buf = ctx.storage("global block sums", 4 * (u64::from(bl_base) + 2 * u64::from(nslots) * wg).max(2));
    let boundary = (nslots > 0).then(|| {
        let map: Vec<u32> = shared.iter().map(|&b| b as u32).collect();
        let mb = ctx.storage_init("shared blocks", bytemuck::cast_slice(&map));
        let u = ctx.uniform_init("shared blocks", bytemuck::cast_slice(&[0u32, nslots, nb_total, bl_base]));
        let bg = boundary.bind(ctx, &[&u, &buf, &mb]);
        (u, mb, bg)
    });
    let levels = tree_levels(ctx, reduce, &buf, nb_total);
    Ok((GlobalNorms { buf, nb_total, nslots, bl_base, boundary, levels }, layout))
}

/// The levels of the fixed tree sum above `blocks` 256-block sums of |D| and |D'|
/// held in `leaves`: per level its uniform, output buffer, groups per half and bind group.
fn tree_levels(
    ctx: &GpuContext,
    reduce: &Kernel,
    leaves: &wgpu::Buffer,
    blocks: u32,
) -> Vec<(wgpu::Buffer, wgpu::Buffer, u32, wgpu::BindGroup)> {
    let mut levels = Vec::new();
    let mut cnt = blocks;
    let mut input = leaves.clone();
    while cnt > 1 {
        let gph = cnt.div_ceil(WORKGROUP);
        let u = ctx.uniform_init("tree level", bytemuck::cast_slice(&[0u32, cnt, gph, 0]));
        let out = ctx.storage("tree level", 8 * u64::from(gph));
        let bg = reduce.bind(ctx, &[&u, &input, &out]);
        input = out.clone();
        levels.push((u, out, gph, bg));
        cnt = gph;
    }
    levels
}
