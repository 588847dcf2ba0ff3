//! The optimizer driver: owns the master weights and the optimizer state, runs each
//! step on a GPU (gpu-shaders, state resident on the device, only gradients go up)
//! or on merge-core alone, and with a GPU recomputes every N-th step with merge-core
//! and compares the bits.

use std::collections::BTreeMap;
use std::time::Instant;

use merge_core::dare::{DareConfig, DareVariant};
use merge_core::dtype::{Dst, Src};
use merge_core::hyper::{AdamConfig, AdamForm as CoreAdamForm, Schedule};
use merge_core::dtype::Dtype;
use merge_core::onties::Variant as TiesVariant;
use merge_core::parallel::{self, ParallelJob, Param, TaskVector};
use merge_core::optim::{
    Merge, OnlineConfig, Optimizer as CoreOptimizer, Scope as CoreScope, TaskVectorJob, TiesConfig,
};
use gpu_shaders::optim::{GpuOptimizer, TensorInit, TensorStateData};
use gpu_shaders::{GpuContext, GpuOptions};

use super::config::{AdamForm, Algorithm, OptimConfig, ScheduleKind, Scope, Variant};
use super::{Result, TrainError};
use crate::model::GpuLlama;
use crate::params::ParamSet;

/// State kinds as stored in checkpoints (PyTorch's names where it has them).
pub const EXP_AVG: &str = "exp_avg";
pub const EXP_AVG_SQ: &str = "exp_avg_sq";
pub const DELTA_C: &str = "delta_c";
pub const TAU: &str = "tau_ref";

/// What one step cost and which learning rate it used.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepReport {
    pub learning_rate: f32,
    pub optimizer_ms: f64,
    /// Whether merge-core recomputed this GPU step and matched it bit for bit.
    pub cross_checked: bool,
    pub cross_check_ms: f64,
}

/// The merge-core configuration of `cfg`.
pub fn core_config(cfg: &OptimConfig) -> Result<OnlineConfig> {
    let adam = AdamConfig {
        form: match cfg.adam_form {
            AdamForm::Torch => CoreAdamForm::Torch,
            AdamForm::Hf => CoreAdamForm::HuggingFace,
        },
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
        schedule: match cfg.schedule {
            ScheduleKind::Constant => Schedule::Constant,
            ScheduleKind::WarmupCosine => Schedule::WarmupCosine { warmup: cfg.warmup_steps, total: cfg.total_steps },
        },
    };
    let merge = match cfg.algorithm {
        Algorithm::Adamw => Merge::None,
        Algorithm::Ondare => Merge::Dare(DareConfig {
            variant: match cfg.variant {
                Variant::Reference => DareVariant::Reference,
                Variant::Paper => DareVariant::Paper,
            },
            p: cfg.p,
            alpha: cfg.alpha,
            rescale: cfg.rescale,
            clip: cfg.clip,
        }),
        Algorithm::Onties => Merge::Ties(TiesConfig {
            variant: match cfg.variant {
                Variant::Reference => TiesVariant::Reference,
                Variant::Paper => TiesVariant::Paper,
            },
            p: cfg.p,
            alpha: cfg.alpha,
            rescale: cfg.rescale,
            scope: match cfg.scope {
                Scope::PerTensor => CoreScope::PerTensor,
                Scope::Global => CoreScope::Global,
            },
        }),
    };
    Ok(OnlineConfig { adam, merge, k: cfg.k, seed: cfg.seed })
}

/// Checks that `other` has exactly the names and shapes of `params`; `what` names the
/// other set in the error (e.g. "gradient", "base model").
pub fn check_layout(params: &ParamSet, other: &ParamSet, what: &str) -> Result<()> {
    for t in &params.tensors {
        match other.get(&t.name) {
            None => return Err(TrainError::msg(format!("{what}: tensor `{}` is missing", t.name))),
            Some(o) if o.shape != t.shape || o.data.len() != t.data.len() => {
                return Err(TrainError::msg(format!(
                    "{what}: tensor `{}` has shape {:?}, the policy has {:?}",
                    t.name, o.shape, t.shape
                )));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = other.tensors.iter().find(|o| params.get(&o.name).is_none()) {
        return Err(TrainError::msg(format!("{what}: tensor `{}` is not a parameter of the policy", extra.name)));
    }
    Ok(())
}

/// Lowest non-finite element of any gradient tensor, checked before any tensor is
/// stepped so that a bad gradient leaves the whole model unchanged.
pub fn check_gradients(step: u64, grads: &ParamSet) -> Result<()> {
    for t in &grads.tensors {
        if let Some(i) = t.data.iter().position(|x| merge_core::arith::is_non_finite(*x)) {
            return Err(TrainError::msg(format!(
                "step {step}: gradient of tensor `{}` is non-finite at element {i} (bits 0x{:08x}); nothing was updated",
                t.name,
                t.data[i].to_bits()
            )));
        }
    }
    Ok(())
}

/// Where the steps run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendRequest {
    /// merge-core on the CPU.
    Cpu,
    /// A GPU adapter (`adapter`: a substring of its name / driver / backend, else
    /// gpu-shaders' own choice); fail if none works.
    Gpu { adapter: Option<String> },
    /// The adapter at this position of `gpu_shaders::context::enumerate_adapters`
    /// (`verify` checks each adapter, and names can repeat); fail if it does not work.
    GpuAt { index: usize },
    /// A hardware GPU if one works (a software adapter only when named by
    /// `MERGE_GPU_ADAPTER`), else merge-core, said once on stderr.
    Auto,
}

/// Opens the adapter `request` asks for: `None` for `Cpu`; for `Auto`, an error
/// when the only adapter is a software one that was not named, since lavapipe runs
/// the kernels on the same CPU cores, far slower than merge-core. The optimizer and
/// `merge` both choose their adapter here.
pub fn open_gpu_context(request: &BackendRequest) -> std::result::Result<Option<GpuContext>, String> {
    let (adapter, adapter_index) = match request {
        BackendRequest::Cpu => return Ok(None),
        BackendRequest::Gpu { adapter } => (adapter.clone(), None),
        BackendRequest::GpuAt { index } => (None, Some(*index)),
        BackendRequest::Auto => (None, None),
    };
    let named = adapter.is_some() || std::env::var(gpu_shaders::context::ADAPTER_ENV).is_ok_and(|v| !v.is_empty());
    let ctx = GpuContext::new(&GpuOptions { adapter, adapter_index, max_chunk_bytes: None }).map_err(|e| e.to_string())?;
    let info = ctx.adapter_info();
    if *request == BackendRequest::Auto && !named && info.device_type == wgpu::DeviceType::Cpu {
        return Err(format!(
            "only a software adapter, {}, which is slower than merge-core on the same cores; \
             --backend gpu uses it anyway",
            gpu_shaders::context::describe(info)
        ));
    }
    Ok(Some(ctx))
}

/// [`open_gpu_context`] with `auto`'s fallback: when no usable adapter opens,
/// `Auto` gives `Ok(None)` after one line on stderr ending in `fallback` (what
/// runs instead); an explicit request keeps its error.
pub fn open_device(request: &BackendRequest, fallback: &str) -> std::result::Result<Option<GpuContext>, String> {
    match open_gpu_context(request) {
        Err(e) if *request == BackendRequest::Auto => {
            eprintln!("no usable GPU ({e}); {fallback}");
            Ok(None)
        }
        opened => opened,
    }
}

/// The GPU side: the resident optimizer and the cross-check cadence.
struct GpuSide {
    opt: GpuOptimizer,
    adapter: String,
    /// Recompute every N-th step with merge-core (0: never).
    every: u64,
    /// The step whose state the CPU mirror (`m`, `v`, `cached`) holds; the GPU's is
    /// authoritative, the mirror is refreshed before a cross-checked step.
    mirror_step: u64,
}

/// The optimizer and the state it owns.
pub struct Optimizer {
    cfg: OptimConfig,
    core: CoreOptimizer,
    step: u64,
    params: ParamSet,
    m: ParamSet,
    v: ParamSet,
    cached: Option<ParamSet>,
    tau: Option<ParamSet>,
    /// Threads of the CPU step (the bits do not depend on it).
    threads: usize,
    gpu: Option<GpuSide>,
    /// `params` lag the GPU's weights: resident steps ran since the last read.
    params_stale: bool,
}

impl Optimizer {
    /// Starts at `params` (step 0). Merging optimizers need the task delta: `task`
    /// gives the base and SFT weights (same layout as `params`).
    pub fn new(cfg: OptimConfig, params: ParamSet, task: Option<(&ParamSet, &ParamSet)>) -> Result<Self> {
        cfg.validate()?;
        let core = CoreOptimizer::new(core_config(&cfg)?)?;
        // OnTIES holds τ before trimming it.
        let mut scratch = (cfg.algorithm == Algorithm::Onties).then(|| params.zeros_like());
        let tau = match (cfg.algorithm, task) {
            (Algorithm::Adamw, _) => None,
            (_, None) => {
                return Err(TrainError::msg(format!(
                    "--optimizer {:?}: merging needs the base model (--base) and the SFT model",
                    cfg.algorithm
                )));
            }
            (_, Some((base, sft))) => {
                check_layout(&params, base, "base model")?;
                check_layout(&params, sft, "SFT model")?;
                let mut tau = params.zeros_like();
                // OnTIES needs room for τ before trimming; OnDARE none.
                let mut scratch_slices: Vec<&mut [f32]> =
                    scratch.iter_mut().flat_map(|s| s.tensors.iter_mut()).map(|t| t.data.as_mut_slice()).collect();
                scratch_slices.resize_with(tau.tensors.len(), Default::default);
                let mut jobs: Vec<TaskVectorJob<'_>> = tau
                    .tensors
                    .iter_mut()
                    .zip(scratch_slices)
                    .map(|(t, scratch)| {
                        let b = base.get(&t.name).expect("layout checked");
                        let s = sft.get(&t.name).expect("layout checked");
                        TaskVectorJob {
                            name: &t.name,
                            base: Src::F32(&b.data),
                            sft: Src::F32(&s.data),
                            out: Dst::F32(&mut t.data),
                            scratch,
                        }
                    })
                    .collect();
                core.init_task_vectors(&mut jobs)?;
                drop(jobs);
                Some(tau)
            }
        };
        let cached = core.needs_cached_delta().then(|| params.zeros_like());
        drop(scratch);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self {
            m: params.zeros_like(),
            v: params.zeros_like(),
            cached,
            tau,
            threads,
            core,
            step: 0,
            params,
            cfg,
            gpu: None,
            params_stale: false,
        })
    }

    /// Like [`Optimizer::new`], then moves the state to a GPU as `backend` asks.
    /// `cross_check_every` applies to the GPU (0: never check). `Auto` without a
    /// usable adapter continues on merge-core and says so once on stderr.
    pub fn with_backend(
        cfg: OptimConfig,
        params: ParamSet,
        task: Option<(&ParamSet, &ParamSet)>,
        backend: &BackendRequest,
        cross_check_every: u64,
    ) -> Result<Self> {
        let mut opt = Self::new(cfg, params, task)?;
        if *backend == BackendRequest::Cpu {
            return Ok(opt);
        }
        let opened = open_gpu_context(backend)
            .map(|ctx| ctx.expect("only BackendRequest::Cpu opens no adapter"))
            .and_then(|ctx| opt.gpu_side(ctx, task, cross_check_every));
        match opened {
            Ok(g) => opt.gpu = Some(g),
            Err(e) if *backend == BackendRequest::Auto => {
                eprintln!("no usable GPU ({e}); running the optimizer on merge-core (CPU) alone");
            }
            Err(e) => return Err(TrainError::msg(format!("--backend gpu: {e}"))),
        }
        Ok(opt)
    }

    /// Like [`Optimizer::new`], then moves the state to `ctx`, a device already
    /// opened by [`open_gpu_context`] (the trainer shares it with the model).
    pub fn on_device(
        cfg: OptimConfig,
        params: ParamSet,
        task: Option<(&ParamSet, &ParamSet)>,
        ctx: &GpuContext,
        cross_check_every: u64,
    ) -> Result<Self> {
        let mut opt = Self::new(cfg, params, task)?;
        let gpu = opt.gpu_side(ctx.clone(), task, cross_check_every).map_err(|e| TrainError::msg(format!("GPU optimizer: {e}")))?;
        opt.gpu = Some(gpu);
        Ok(opt)
    }

    fn gpu_side(&self, ctx: GpuContext, task: Option<(&ParamSet, &ParamSet)>, cross_check_every: u64) -> std::result::Result<GpuSide, String> {
        let inits: Vec<TensorInit<'_>> = self
            .params
            .tensors
            .iter()
            .map(|t| TensorInit {
                name: &t.name,
                theta: &t.data,
                task: task.map(|(b, s)| {
                    let b = b.get(&t.name).expect("layout checked in new");
                    let s = s.get(&t.name).expect("layout checked in new");
                    (Src::F32(&b.data), Src::F32(&s.data))
                }),
                tau_dtype: Dtype::F32,
            })
            .collect();
        let g = GpuOptimizer::new(ctx, core_config(&self.cfg).expect("validated in new"), &inits).map_err(|e| e.to_string())?;
        let adapter = gpu_shaders::context::describe(g.adapter_info());
        Ok(GpuSide { opt: g, adapter, every: cross_check_every, mirror_step: 0 })
    }

    /// Where the steps run, for logs and `verify`.
    pub fn backend_name(&self) -> String {
        match &self.gpu {
            Some(g) => format!("gpu: {}", g.adapter),
            None => "cpu: merge-core".to_string(),
        }
    }

    /// The adapter the steps run on, or `cpu`: the metrics' `optimizer_device`.
    pub fn device(&self) -> String {
        match &self.gpu {
            Some(g) => g.adapter.clone(),
            None => "cpu".to_string(),
        }
    }

    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Steps completed.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The current master weights. After resident steps they are on the GPU only:
    /// call [`Optimizer::sync_params`] first.
    pub fn params(&self) -> &ParamSet {
        assert!(!self.params_stale, "Optimizer::params after resident steps without sync_params");
        &self.params
    }

    /// The master weights if the host copy is current (no resident step since).
    pub fn fresh_params(&self) -> Option<&ParamSet> {
        (!self.params_stale).then_some(&self.params)
    }

    /// Reads the GPU's weights back after resident steps (nothing to do otherwise).
    pub fn sync_params(&mut self) -> Result<()> {
        if !self.params_stale {
            return Ok(());
        }
        let gpu = self.gpu.as_ref().expect("only a GPU optimizer takes resident steps");
        let read = gpu.opt.read_params().map_err(|e| TrainError::msg(format!("after step {}: reading GPU weights: {e}", self.step)))?;
        for (t, (name, data)) in self.params.tensors.iter_mut().zip(read) {
            debug_assert_eq!(t.name, name);
            t.data = data;
        }
        self.params_stale = false;
        Ok(())
    }

    /// Whether step `steps() + 1` may run resident: on a GPU and not cross-checked.
    pub fn can_step_resident(&self) -> bool {
        self.gpu.as_ref().is_some_and(|g| g.every == 0 || !(self.step + 1).is_multiple_of(g.every))
    }

    /// Runs step `steps() + 1` from the gradient `model` holds on the same device:
    /// the gradients are copied in and the new weights copied back on the device,
    /// and only the gradient's norm (for the metrics) comes back. A non-finite
    /// gradient is refused as [`Optimizer::step`] refuses it (the GPU step's
    /// validating pass), with nothing written.
    pub fn step_resident(&mut self, model: &GpuLlama) -> Result<(StepReport, f64)> {
        let k = self.step + 1;
        let lr = self.core.plan(k)?.scalars().lr;
        let gpu = self.gpu.as_mut().expect("can_step_resident said so");
        let on = |e: gpu_shaders::GpuError| TrainError::msg(format!("step {k} on {}: {e}", gpu.adapter));
        let t = Instant::now();
        gpu.opt.copy_grads_from(&model.grad_buffers()).map_err(on)?;
        let gnorm = gpu.opt.grad_sum_squares().map_err(on)?.iter().sum::<f64>().sqrt();
        gpu.opt.step_uploaded().map_err(on)?;
        gpu.opt.copy_params_to(&model.weight_buffers()).map_err(on)?;
        let optimizer_ms = t.elapsed().as_secs_f64() * 1e3;
        self.step = k;
        self.params_stale = true;
        Ok((StepReport { learning_rate: lr, optimizer_ms, cross_checked: false, cross_check_ms: 0.0 }, gnorm))
    }

    /// Runs step `steps() + 1`. Gradients are checked for all tensors up front, so a
    /// non-finite gradient leaves every tensor unchanged and the step uncounted.
    pub fn step(&mut self, grads: &ParamSet) -> Result<StepReport> {
        let k = self.step + 1;
        check_layout(&self.params, grads, &format!("step {k}: gradient"))?;
        check_gradients(k, grads)?;
        let lr = self.core.plan(k)?.scalars().lr;
        let Some(gpu) = self.gpu.as_mut() else {
            let t = Instant::now();
            self.cpu_step(k, grads)?;
            self.step = k;
            let optimizer_ms = t.elapsed().as_secs_f64() * 1e3;
            return Ok(StepReport { learning_rate: lr, optimizer_ms, cross_checked: false, cross_check_ms: 0.0 });
        };
        let check = gpu.every > 0 && k.is_multiple_of(gpu.every);
        let mut cross_check_ms = 0.0;
        if check && gpu.mirror_step != self.step {
            // The mirror's moments are stale (unchecked steps ran on the GPU only).
            let t = Instant::now();
            let state = gpu.opt.read_state().map_err(|e| TrainError::msg(format!("step {k}: reading GPU state: {e}")))?;
            install_state(&mut self.m, &mut self.v, self.cached.as_mut(), state)?;
            gpu.mirror_step = self.step;
            cross_check_ms += t.elapsed().as_secs_f64() * 1e3;
        }
        let t = Instant::now();
        let named: Vec<(&str, &[f32])> = grads.tensors.iter().map(|t| (t.name.as_str(), t.data.as_slice())).collect();
        gpu.opt.step(&named).map_err(|e| TrainError::msg(format!("step {k} on {}: {e}", gpu.adapter)))?;
        let gpu_params = gpu.opt.read_params().map_err(|e| TrainError::msg(format!("step {k}: reading GPU weights: {e}")))?;
        let optimizer_ms = t.elapsed().as_secs_f64() * 1e3;
        if check {
            let t = Instant::now();
            let gpu_state = gpu.opt.read_state().map_err(|e| TrainError::msg(format!("step {k}: reading GPU state: {e}")))?;
            let adapter = gpu.adapter.clone();
            self.cpu_step(k, grads)?;
            compare(k, &adapter, "parameter", &self.params, gpu_params.iter().map(|(n, d)| (n.as_str(), d.as_slice())))?;
            compare(k, &adapter, EXP_AVG, &self.m, gpu_state.iter().map(|s| (s.name.as_str(), s.m.as_slice())))?;
            compare(k, &adapter, EXP_AVG_SQ, &self.v, gpu_state.iter().map(|s| (s.name.as_str(), s.v.as_slice())))?;
            if let Some(c) = &self.cached {
                let rows = gpu_state.iter().map(|s| (s.name.as_str(), s.cached.as_deref().unwrap_or(&[])));
                compare(k, &adapter, DELTA_C, c, rows)?;
            }
            self.gpu.as_mut().expect("gpu").mirror_step = k;
            cross_check_ms += t.elapsed().as_secs_f64() * 1e3;
        } else {
            for (t, (name, data)) in self.params.tensors.iter_mut().zip(gpu_params) {
                debug_assert_eq!(t.name, name);
                t.data = data;
            }
        }
        self.step = k;
        Ok(StepReport { learning_rate: lr, optimizer_ms, cross_checked: check, cross_check_ms })
    }

    /// Step `k` on the CPU state (the whole run on the CPU backend; the reference
    /// recomputation on a cross-checked GPU step).
    fn cpu_step(&mut self, k: u64, grads: &ParamSet) -> Result<()> {
        let plan = self.core.plan(k)?;
        let n = grads.tensors.len();
        let mut cached: Vec<Option<&mut [f32]>> = match self.cached.as_mut() {
            Some(c) => c.tensors.iter_mut().map(|t| Some(t.data.as_mut_slice())).collect(),
            None => (0..n).map(|_| None).collect(),
        };
        let mut jobs = Vec::with_capacity(n);
        let state = self.params.tensors.iter_mut().zip(self.m.tensors.iter_mut()).zip(self.v.tensors.iter_mut());
        for (i, ((g, ((theta, m), v)), c)) in grads.tensors.iter().zip(state).zip(cached.drain(..)).enumerate() {
            // Plain AdamW has no τ': merge-core accepts an empty one.
            let tau = self.tau.as_ref().map_or(&[][..], |t| t.tensors[i].data.as_slice());
            jobs.push(ParallelJob {
                name: &g.name,
                grad: Src::F32(&g.data),
                theta: Param::F32(&mut theta.data),
                m: &mut m.data,
                v: &mut v.data,
                cached: c,
                tau: TaskVector::Dense(Src::F32(tau)),
            });
        }
        parallel::step_tensors(&plan, &mut jobs, self.threads).map_err(|e| TrainError::msg(format!("step {k}: {e}")))
    }

    /// Threads of the CPU step (default: all cores); the bits do not depend on it.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// The kinds [`Optimizer::export_state`] writes, in its (sorted) order, without
    /// copying the state or reading it back from a GPU.
    fn state_kinds(&self) -> Vec<&'static str> {
        let mut kinds = vec![EXP_AVG, EXP_AVG_SQ];
        if self.cached.is_some() {
            kinds.push(DELTA_C);
        }
        if self.tau.is_some() {
            kinds.push(TAU);
        }
        kinds.sort_unstable();
        kinds
    }

    /// The optimizer state by kind, for checkpoints.
    pub fn export_state(&mut self) -> Result<BTreeMap<String, ParamSet>> {
        if let Some(gpu) = self.gpu.as_mut() && gpu.mirror_step != self.step {
            let state = gpu.opt.read_state().map_err(|e| TrainError::msg(format!("reading GPU state: {e}")))?;
            install_state(&mut self.m, &mut self.v, self.cached.as_mut(), state)?;
            gpu.mirror_step = self.step;
        }
        let mut out = BTreeMap::new();
        out.insert(EXP_AVG.to_string(), self.m.clone());
        out.insert(EXP_AVG_SQ.to_string(), self.v.clone());
        if let Some(c) = &self.cached {
            out.insert(DELTA_C.to_string(), c.clone());
        }
        if let Some(t) = &self.tau {
            out.insert(TAU.to_string(), t.clone());
        }
        Ok(out)
    }

    /// Replaces weights and state with a checkpoint's, after checking that the saved
    /// state has exactly the kinds and layouts this configuration uses.
    pub fn restore(&mut self, step: u64, params: ParamSet, mut state: BTreeMap<String, ParamSet>) -> Result<()> {
        check_layout(&self.params, &params, "checkpoint weights")?;
        let want = self.state_kinds();
        let have: Vec<&str> = state.keys().map(String::as_str).collect();
        if want != have {
            return Err(TrainError::msg(format!(
                "checkpoint optimizer state has kinds {have:?}, this optimizer configuration uses {want:?}"
            )));
        }
        for (kind, set) in &state {
            check_layout(&self.params, set, &format!("checkpoint optimizer state `{kind}`"))?;
        }
        let mut take = |k: &str| state.remove(k).expect("kinds checked");
        self.m = take(EXP_AVG);
        self.v = take(EXP_AVG_SQ);
        self.cached = self.cached.is_some().then(|| take(DELTA_C));
        if let Some(tau) = &self.tau {
            // τ' was just recomputed from the base and SFT models given now; the saved
            // one must be the same bits, or those models are not the ones the
            // checkpointed run merged with.
            let saved = take(TAU);
            if let Some((name, i)) = first_difference(tau, &saved) {
                return Err(TrainError::msg(format!(
                    "checkpoint task vector differs from the one computed from the given base and SFT models \
                     (tensor `{name}`, element {i}): resume with the same --base and SFT model"
                )));
            }
        }
        self.params = params;
        self.params_stale = false;
        self.step = step;
        if let Some(gpu) = self.gpu.as_mut() {
            let named: Vec<(&str, &[f32])> = self.params.tensors.iter().map(|t| (t.name.as_str(), t.data.as_slice())).collect();
            let state: Vec<TensorStateData> = self
                .m
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| TensorStateData {
                    name: t.name.clone(),
                    m: t.data.clone(),
                    v: self.v.tensors[i].data.clone(),
                    cached: self.cached.as_ref().map(|c| c.tensors[i].data.clone()),
                })
                .collect();
            gpu.opt.load_state(step, &named, &state).map_err(|e| TrainError::msg(format!("loading checkpoint onto the GPU: {e}")))?;
            gpu.mirror_step = step;
        }
        Ok(())
    }
}

/// Copies GPU-read moments (and Δ_c) into the CPU mirror.
fn install_state(m: &mut ParamSet, v: &mut ParamSet, mut cached: Option<&mut ParamSet>, state: Vec<TensorStateData>) -> Result<()> {
    if state.len() != m.tensors.len() {
        return Err(TrainError::msg(format!("GPU returned state for {} tensors, expected {}", state.len(), m.tensors.len())));
    }
    for (i, s) in state.into_iter().enumerate() {
        if s.name != m.tensors[i].name {
            return Err(TrainError::msg(format!("GPU state order: got `{}`, expected `{}`", s.name, m.tensors[i].name)));
        }
        m.tensors[i].data = s.m;
        v.tensors[i].data = s.v;
        if let (Some(c), Some(d)) = (cached.as_deref_mut(), s.cached) {
            c.tensors[i].data = d;
        }
    }
    Ok(())
}

/// Bitwise comparison of the CPU result with the GPU's; the error names the step,
/// adapter, state kind, tensor, first differing index and both values' bits.
fn compare<'a>(
    k: u64,
    adapter: &str,
    what: &str,
    cpu: &ParamSet,
    gpu: impl Iterator<Item = (&'a str, &'a [f32])>,
) -> Result<()> {
    let mut seen = 0;
    for (t, (name, data)) in cpu.tensors.iter().zip(gpu) {
        seen += 1;
        if t.name != name || t.data.len() != data.len() {
            return Err(TrainError::msg(format!(
                "cross-check at step {k}: GPU {what} tensor `{name}` ({} elements) does not line up with CPU tensor `{}` ({} elements)",
                data.len(),
                t.name,
                t.data.len()
            )));
        }
        if let Some(i) = t.data.iter().zip(data).position(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(TrainError::msg(format!(
                "cross-check FAILED at step {k} on {adapter}: {what} of tensor `{}` differs first at element {i}: \
                 merge-core 0x{:08x} ({:e}), GPU 0x{:08x} ({:e})",
                t.name,
                t.data[i].to_bits(),
                t.data[i],
                data[i].to_bits(),
                data[i]
            )));
        }
    }
    if seen != cpu.tensors.len() {
        return Err(TrainError::msg(format!("cross-check at step {k}: GPU returned {seen} {what} tensors, expected {}", cpu.tensors.len())));
    }
    Ok(())
}

/// The first tensor name and element index where two same-layout sets differ in bits.
pub fn first_difference(a: &ParamSet, b: &ParamSet) -> Option<(String, usize)> {
    a.tensors.iter().zip(&b.tensors).find_map(|(x, y)| {
        x.data.iter().zip(&y.data).position(|(p, q)| p.to_bits() != q.to_bits()).map(|i| (x.name.clone(), i))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Tensor;

    #[test]
    fn cross_check_mismatch_names_step_adapter_tensor_index_and_bits() {
        let cpu = ParamSet::new(vec![
            Tensor { name: "a".into(), shape: vec![2], data: vec![1.0, 2.0] },
            Tensor { name: "b".into(), shape: vec![3], data: vec![0.5, 0.25, -1.0] },
        ]);
        let same: Vec<(String, Vec<f32>)> = cpu.tensors.iter().map(|t| (t.name.clone(), t.data.clone())).collect();
        compare(3, "lavapipe", "parameter", &cpu, same.iter().map(|(n, d)| (n.as_str(), d.as_slice()))).unwrap();
        let mut off = same.clone();
        off[1].1[2] = f32::from_bits((-1.0f32).to_bits() + 1);
        let err = compare(3, "lavapipe", EXP_AVG, &cpu, off.iter().map(|(n, d)| (n.as_str(), d.as_slice()))).unwrap_err().to_string();
        for want in ["step 3", "lavapipe", "exp_avg", "tensor `b`", "element 2", "0xbf800000", "0xbf800001"] {
            assert!(err.contains(want), "{want} missing: {err}");
        }
        let short = &same[..1];
        let err = compare(1, "x", "parameter", &cpu, short.iter().map(|(n, d)| (n.as_str(), d.as_slice()))).unwrap_err().to_string();
        assert!(err.contains("returned 1 parameter tensors, expected 2"), "{err}");
    }
}
