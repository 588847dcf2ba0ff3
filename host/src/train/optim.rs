//! The optimizer driver: owns the master weights and the optimizer state, runs each
//! step on a GPU (gpu-shaders, state resident on the device, only gradients go up)
//! or on merge-core alone, and with a GPU recomputes every N-th step with merge-core
//! and compares the bits.

use std::collections::BTreeMap;
use std::time::Instant;

use merge_core::dtype::{Dst, Src};
use merge_core::optim::{Optimizer as CoreOptimizer, TaskVectorJob};
use merge_core::parallel::{self, ParallelJob, Param, StateBounds, TaskVector};
use gpu_shaders::optim::{GpuOptimizer, TensorInit, TensorStateData, Weights};
use gpu_shaders::{GpuContext, GpuOptions};

use super::config::{Algorithm, OptimConfig};
use super::{Result, TrainError};
use crate::model::{GpuLlama, simd};
use crate::params::{ParamSet, Tensor};

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

/// Checks that `other` has exactly the names, shapes and order of `params` (the
/// optimizer pairs tensors by position); `what` names the other set in the error
/// (e.g. "the step 3 gradient", "the base model").
pub fn check_layout(params: &ParamSet, other: &ParamSet, what: &str) -> Result<()> {
    match params.layout_difference(other) {
        None => Ok(()),
        Some(difference) => Err(TrainError::Layout { what: what.to_string(), difference }),
    }
}

/// Lowest non-finite element of any gradient tensor, checked before any tensor is
/// stepped so that a bad gradient leaves the whole model unchanged.
pub fn check_gradients(step: u64, grads: &ParamSet, threads: usize) -> Result<()> {
    match grads.first_non_finite(threads) {
        Some((t, index)) => {
            let t = &grads.tensors[t];
            Err(TrainError::NonFiniteGradient { step, tensor: t.name.clone(), index, bits: t.data[index].to_bits() })
        }
        None => Ok(()),
    }
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
    /// Whether the host's moments and `Δ_c` are the GPU's: the GPU's state is
    /// authoritative, the host copy is refreshed before a cross-checked step and a
    /// checkpoint.
    host_state_current: bool,
}

/// One tensor's optimizer state, owned in one place (the shape of candle's
/// `VarAdamW`): the Adam moments, the step-K cache and the stored task vector.
/// Its weights are the tensor of the same position in [`Optimizer::params`], a
/// `ParamSet` because the model and checkpoints take the weights as one set; the
/// layout checks hold both in one order.
#[derive(Clone, Debug, PartialEq)]
struct TensorState {
    name: String,
    m: Vec<f32>,
    v: Vec<f32>,
    /// `Δ_c` (step-K with `k > 1`).
    cached: Option<Vec<f32>>,
    /// `τ'` (merging optimizers).
    tau: Option<Vec<f32>>,
}

/// The optimizer and the state it owns.
pub struct Optimizer {
    cfg: OptimConfig,
    /// The validated configuration and the steps completed (the one step
    /// counter of the run; the GPU optimizer's follows it).
    core: CoreOptimizer,
    params: ParamSet,
    state: Vec<TensorState>,
    /// Threads of the CPU step (the bits do not depend on it).
    threads: usize,
    /// The CPU step's room (OnTIES's update), kept so that each step does not
    /// fault in fresh memory.
    scratch: parallel::Scratch,
    /// What the last CPU step recorded of the moments it stored, so that the
    /// next one's check pass need not read them (CPU backend only: a GPU run's
    /// host state is replaced by the device's; a checkpoint's is unknown).
    bounds: Vec<StateBounds>,
    gpu: Option<GpuSide>,
    /// `params` lag the GPU's weights: resident steps ran since the last read.
    params_stale: bool,
}

impl Optimizer {
    /// Starts at `params` (step 0). Merging optimizers need the task delta: `task`
    /// gives the base and SFT weights (same layout as `params`).
    pub fn new(cfg: OptimConfig, params: ParamSet, task: Option<(&ParamSet, &ParamSet)>) -> Result<Self> {
        cfg.validate()?;
        let core = CoreOptimizer::new(cfg.to_core())?;
        let taus = match (cfg.algorithm, task) {
            (Algorithm::Adamw, _) => None,
            (_, None) => {
                return Err(TrainError::msg(format!(
                    "--optimizer {:?}: merging needs the base model (--base) and the SFT model",
                    cfg.algorithm
                )));
            }
            (_, Some((base, sft))) => {
                check_layout(&params, base, "the base model")?;
                check_layout(&params, sft, "the SFT model")?;
                Some(task_vectors(&core, &params, base, sft)?)
            }
        };
        let mut taus = taus.map(Vec::into_iter);
        let state = params
            .tensors
            .iter()
            .map(|t| TensorState {
                name: t.name.clone(),
                m: vec![0.0; t.data.len()],
                v: vec![0.0; t.data.len()],
                cached: core.needs_cached_delta().then(|| vec![0.0; t.data.len()]),
                tau: taus.as_mut().map(|taus| taus.next().expect("one task vector per tensor")),
            })
            .collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let bounds = vec![StateBounds::UNKNOWN; params.tensors.len()];
        Ok(Self { state, threads, scratch: parallel::Scratch::default(), bounds, core, params, cfg, gpu: None, params_stale: false })
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
            .and_then(|ctx| opt.gpu_side(ctx, cross_check_every));
        match opened {
            Ok(g) => opt.gpu = Some(g),
            Err(e) if *backend == BackendRequest::Auto => {
                eprintln!("no usable GPU ({e}); running the optimizer on merge-core (CPU) alone");
            }
            Err(e) => return Err(TrainError::msg(format!("--backend gpu: {e}"))),
        }
        Ok(opt)
    }

    /// Like [`Optimizer::new`], then steps `model`'s own weight and gradient
    /// buffers on its device: the model's backward leaves the gradients where the
    /// optimizer reads them and the optimizer writes the weights where the next
    /// forward reads them, with no copies and no second copy of either on the
    /// device. `params` are uploaded into the model first.
    pub fn sharing(
        cfg: OptimConfig,
        params: ParamSet,
        task: Option<(&ParamSet, &ParamSet)>,
        model: &GpuLlama,
        cross_check_every: u64,
    ) -> Result<Self> {
        let mut opt = Self::new(cfg, params, task)?;
        model.upload(&opt.params).map_err(TrainError::gpu("uploading the optimizer's starting weights"))?;
        let gpu = opt.gpu_side_over(model.context().clone(), Some(model), cross_check_every);
        opt.gpu = Some(gpu.map_err(|e| TrainError::msg(format!("GPU optimizer: {e}")))?);
        Ok(opt)
    }

    /// The GPU optimizer over this optimizer's weights and its task vectors (τ' is
    /// computed once, in `new`, and handed over).
    fn gpu_side(&self, ctx: GpuContext, cross_check_every: u64) -> std::result::Result<GpuSide, String> {
        self.gpu_side_over(ctx, None, cross_check_every)
    }

    /// [`Optimizer::gpu_side`], with the weights and gradients in `model`'s
    /// buffers when given (every tensor of the policy; checked by name and size).
    fn gpu_side_over(&self, ctx: GpuContext, model: Option<&GpuLlama>, cross_check_every: u64) -> std::result::Result<GpuSide, String> {
        let buffers: Option<BTreeMap<&str, (&wgpu::Buffer, &wgpu::Buffer, usize)>> =
            model.map(|m| m.tensor_buffers().into_iter().map(|(name, w, g, len)| (name, (w, g, len))).collect());
        let mut inits: Vec<TensorInit<'_>> = Vec::with_capacity(self.state.len());
        for (t, s) in self.params.tensors.iter().zip(&self.state) {
            let theta = match &buffers {
                None => Weights::Host(&t.data),
                Some(b) => match b.get(t.name.as_str()) {
                    Some(&(weights, grads, len)) if len == t.data.len() => Weights::Shared { weights, grads, len },
                    _ => return Err(format!("the GPU model has no tensor `{}` of {} elements to share", t.name, t.data.len())),
                },
            };
            inits.push(TensorInit { name: &t.name, theta, tau: s.tau.as_deref().map(Src::F32) });
        }
        let g = GpuOptimizer::new(ctx, self.cfg.to_core(), &inits).map_err(|e| e.to_string())?;
        let adapter = gpu_shaders::context::describe(g.adapter_info());
        Ok(GpuSide { opt: g, adapter, every: cross_check_every, host_state_current: true })
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
        self.core.steps()
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
        let read = gpu.opt.read_params().map_err(TrainError::device(format!("after step {}: reading GPU weights", self.core.steps())))?;
        for (t, (name, data)) in self.params.tensors.iter_mut().zip(read) {
            debug_assert_eq!(t.name, name);
            t.data = data;
        }
        self.params_stale = false;
        Ok(())
    }

    /// Whether step `steps() + 1` may run resident: on a GPU and not cross-checked.
    pub fn can_step_resident(&self) -> bool {
        self.gpu.as_ref().is_some_and(|g| g.every == 0 || !(self.core.steps() + 1).is_multiple_of(g.every))
    }

    /// Runs step `steps() + 1` from the gradient `model` holds on the same device:
    /// the optimizer reads the gradients and writes the weights in the model's
    /// own buffers when it was built over them ([`Optimizer::sharing`]), and
    /// copies them on the device otherwise; only the gradient's norm (for the
    /// metrics) comes back. A non-finite
    /// gradient is refused as [`Optimizer::step`] refuses it (the GPU step's
    /// validating pass), with nothing written.
    pub fn step_resident(&mut self, model: &GpuLlama) -> Result<(StepReport, f64)> {
        let k = self.core.steps() + 1;
        let lr = self.core.plan(k)?.scalars().lr;
        let gpu = self.gpu.as_mut().expect("can_step_resident said so");
        let on = TrainError::device(format!("step {k} on {}", gpu.adapter));
        let t = Instant::now();
        gpu.opt.copy_grads_from(&model.grad_buffers()).map_err(&on)?;
        let gnorm = gpu.opt.grad_sum_squares().map_err(&on)?.iter().sum::<f64>().sqrt();
        gpu.opt.step_uploaded().map_err(&on)?;
        gpu.opt.copy_params_to(&model.weight_buffers()).map_err(&on)?;
        gpu.host_state_current = false;
        let optimizer_ms = t.elapsed().as_secs_f64() * 1e3;
        self.core.set_steps(k);
        self.params_stale = true;
        Ok((StepReport { learning_rate: lr, optimizer_ms, cross_checked: false, cross_check_ms: 0.0 }, gnorm))
    }

    /// Runs step `steps() + 1`. Gradients are checked for all tensors up front, so a
    /// non-finite gradient leaves every tensor unchanged and the step uncounted.
    pub fn step(&mut self, grads: &ParamSet) -> Result<StepReport> {
        let k = self.core.steps() + 1;
        check_layout(&self.params, grads, &format!("the step {k} gradient"))?;
        check_gradients(k, grads, self.threads)?;
        let lr = self.core.plan(k)?.scalars().lr;
        let Some(gpu) = self.gpu.as_mut() else {
            let t = Instant::now();
            self.cpu_step(k, grads)?;
            self.core.set_steps(k);
            let optimizer_ms = t.elapsed().as_secs_f64() * 1e3;
            return Ok(StepReport { learning_rate: lr, optimizer_ms, cross_checked: false, cross_check_ms: 0.0 });
        };
        let check = gpu.every > 0 && k.is_multiple_of(gpu.every);
        let mut cross_check_ms = 0.0;
        if check && !gpu.host_state_current {
            // The host's moments are stale (unchecked steps ran on the GPU only).
            let t = Instant::now();
            let state = gpu.opt.read_state().map_err(TrainError::device(format!("step {k}: reading GPU state")))?;
            install_state(&mut self.state, state)?;
            gpu.host_state_current = true;
            cross_check_ms += t.elapsed().as_secs_f64() * 1e3;
        }
        let t = Instant::now();
        let named: Vec<(&str, &[f32])> = grads.tensors.iter().map(|t| (t.name.as_str(), t.data.as_slice())).collect();
        gpu.opt.step(&named).map_err(TrainError::device(format!("step {k} on {}", gpu.adapter)))?;
        gpu.host_state_current = false;
        let gpu_params = gpu.opt.read_params().map_err(TrainError::device(format!("step {k}: reading GPU weights")))?;
        let optimizer_ms = t.elapsed().as_secs_f64() * 1e3;
        if check {
            let t = Instant::now();
            let gpu_state = gpu.opt.read_state().map_err(TrainError::device(format!("step {k}: reading GPU state")))?;
            let adapter = gpu.adapter.clone();
            self.cpu_step(k, grads)?;
            let params = self.params.tensors.iter().map(|t| (t.name.as_str(), t.data.as_slice()));
            compare(k, &adapter, "parameter", params, gpu_params.iter().map(|(n, d)| (n.as_str(), d.as_slice())))?;
            let host = |kind: fn(&TensorState) -> Option<&[f32]>| self.state.iter().filter_map(move |s| Some((s.name.as_str(), kind(s)?)));
            let device = |kind: fn(&TensorStateData) -> Option<&[f32]>| gpu_state.iter().filter_map(move |s| Some((s.name.as_str(), kind(s)?)));
            compare(k, &adapter, EXP_AVG, host(|s| Some(&s.m)), device(|s| Some(&s.m)))?;
            compare(k, &adapter, EXP_AVG_SQ, host(|s| Some(&s.v)), device(|s| Some(&s.v)))?;
            compare(k, &adapter, DELTA_C, host(|s| s.cached.as_deref()), device(|s| s.cached.as_deref()))?;
            self.gpu.as_mut().expect("gpu").host_state_current = true;
            cross_check_ms += t.elapsed().as_secs_f64() * 1e3;
        } else {
            for (t, (name, data)) in self.params.tensors.iter_mut().zip(gpu_params) {
                debug_assert_eq!(t.name, name);
                t.data = data;
            }
        }
        self.core.set_steps(k);
        Ok(StepReport { learning_rate: lr, optimizer_ms, cross_checked: check, cross_check_ms })
    }

    /// Step `k` on the CPU state (the whole run on the CPU backend; the reference
    /// recomputation on a cross-checked GPU step).
    fn cpu_step(&mut self, k: u64, grads: &ParamSet) -> Result<()> {
        let plan = self.core.plan(k)?;
        let mut jobs = Vec::with_capacity(self.state.len());
        for ((g, theta), st) in grads.tensors.iter().zip(self.params.tensors.iter_mut()).zip(self.state.iter_mut()) {
            // The layout check put the three in one order.
            debug_assert!(g.name == theta.name && theta.name == st.name);
            jobs.push(ParallelJob {
                name: &st.name,
                grad: Src::F32(&g.data),
                theta: Param::F32(&mut theta.data),
                m: &mut st.m,
                v: &mut st.v,
                cached: st.cached.as_deref_mut(),
                // Plain AdamW has no τ': merge-core accepts an empty one.
                tau: TaskVector::Dense(Src::F32(st.tau.as_deref().unwrap_or(&[]))),
            });
        }
        let bounds: &mut [StateBounds] = if self.gpu.is_none() { &mut self.bounds } else { &mut [] };
        parallel::step_tensors_tracked(&plan, &mut jobs, self.threads, &merge_simd::Cpu::at_most(simd::active()), &mut self.scratch, bounds).map_err(|source| TrainError::Step { step: k, source: Box::new(source) })
    }

    /// Threads of the CPU step (default: all cores); the bits do not depend on it.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Threads of the CPU step.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The kinds [`Optimizer::export_state`] writes, in its (sorted) order, without
    /// copying the state or reading it back from a GPU.
    fn state_kinds(&self) -> Vec<&'static str> {
        let first = self.state.first();
        let mut kinds = vec![EXP_AVG, EXP_AVG_SQ];
        if self.core.needs_cached_delta() {
            kinds.push(DELTA_C);
        }
        if self.cfg.algorithm != Algorithm::Adamw {
            kinds.push(TAU);
        }
        debug_assert!(first.is_none_or(|s| s.cached.is_some() == kinds.contains(&DELTA_C) && s.tau.is_some() == kinds.contains(&TAU)));
        kinds.sort_unstable();
        kinds
    }

    /// The optimizer state by kind, for checkpoints.
    pub fn export_state(&mut self) -> Result<BTreeMap<String, ParamSet>> {
        if let Some(gpu) = self.gpu.as_mut() && !gpu.host_state_current {
            let state = gpu.opt.read_state().map_err(TrainError::device("reading GPU state".into()))?;
            install_state(&mut self.state, state)?;
            gpu.host_state_current = true;
        }
        let mut out = BTreeMap::new();
        for kind in self.state_kinds() {
            let tensors = self
                .params
                .tensors
                .iter()
                .zip(&self.state)
                .map(|(p, s)| {
                    let data = match kind {
                        EXP_AVG => &s.m,
                        EXP_AVG_SQ => &s.v,
                        DELTA_C => s.cached.as_ref().expect("state_kinds lists Δ_c when held"),
                        _ => s.tau.as_ref().expect("state_kinds lists τ' when held"),
                    };
                    Tensor { name: p.name.clone(), shape: p.shape.clone(), data: data.clone() }
                })
                .collect();
            out.insert(kind.to_string(), ParamSet::new(tensors));
        }
        Ok(out)
    }

    /// Replaces weights and state with a checkpoint's, after checking that the saved
    /// state has exactly the kinds and layouts this configuration uses.
    pub fn restore(&mut self, step: u64, params: ParamSet, mut saved: BTreeMap<String, ParamSet>) -> Result<()> {
        check_layout(&self.params, &params, "the checkpoint's weights")?;
        let want = self.state_kinds();
        let have: Vec<&str> = saved.keys().map(String::as_str).collect();
        if want != have {
            return Err(TrainError::msg(format!(
                "checkpoint optimizer state has kinds {have:?}, this optimizer configuration uses {want:?}"
            )));
        }
        for (kind, set) in &saved {
            check_layout(&self.params, set, &format!("the checkpoint's optimizer state `{kind}`"))?;
        }
        if let Some(taus) = saved.remove(TAU) {
            // τ' was just recomputed from the base and SFT models given now; the saved
            // one must be the same bits, or those models are not the ones the
            // checkpointed run merged with.
            for (s, t) in self.state.iter().zip(&taus.tensors) {
                if let Some(i) = first_difference(s.tau.as_deref().unwrap_or(&[]), &t.data) {
                    return Err(TrainError::msg(format!(
                        "checkpoint task vector differs from the one computed from the given base and SFT models \
                         (tensor `{}`, element {i}): resume with the same --base and SFT model",
                        s.name
                    )));
                }
            }
        }
        let mut take = |kind: &str| saved.remove(kind).map(|set| set.tensors.into_iter().map(|t| t.data));
        let (mut m, mut v, mut cached) = (take(EXP_AVG).expect("kinds checked"), take(EXP_AVG_SQ).expect("kinds checked"), take(DELTA_C));
        self.bounds.fill(StateBounds::UNKNOWN);
        for s in &mut self.state {
            s.m = m.next().expect("layout checked");
            s.v = v.next().expect("layout checked");
            s.cached = cached.as_mut().map(|c| c.next().expect("layout checked"));
        }
        self.params = params;
        self.params_stale = false;
        self.core.set_steps(step);
        if let Some(gpu) = self.gpu.as_mut() {
            let named: Vec<(&str, &[f32])> = self.params.tensors.iter().map(|t| (t.name.as_str(), t.data.as_slice())).collect();
            let state: Vec<TensorStateData> = self
                .state
                .iter()
                .map(|s| TensorStateData { name: s.name.clone(), m: s.m.clone(), v: s.v.clone(), cached: s.cached.clone() })
                .collect();
            gpu.opt.load_state(step, &named, &state).map_err(TrainError::device("loading checkpoint onto the GPU".into()))?;
            gpu.host_state_current = true;
        }
        Ok(())
    }
}

/// The stored task vector `τ'` of every tensor of `params`, in its order, by
/// merge-core (OnTIES trims over a scope, so every tensor goes in one call).
fn task_vectors(core: &CoreOptimizer, params: &ParamSet, base: &ParamSet, sft: &ParamSet) -> Result<Vec<Vec<f32>>> {
    let mut taus: Vec<Vec<f32>> = params.tensors.iter().map(|t| vec![0.0; t.data.len()]).collect();
    // OnTIES holds τ before trimming it; OnDARE needs no room.
    let ties = core.ties().is_some();
    let mut scratch: Vec<Vec<f32>> = params.tensors.iter().map(|t| if ties { vec![0.0; t.data.len()] } else { Vec::new() }).collect();
    let mut jobs: Vec<TaskVectorJob<'_>> = params
        .tensors
        .iter()
        .zip(base.tensors.iter().zip(&sft.tensors))
        .zip(taus.iter_mut().zip(scratch.iter_mut()))
        .map(|((t, (b, s)), (tau, scratch))| TaskVectorJob {
            name: &t.name,
            base: Src::F32(&b.data),
            sft: Src::F32(&s.data),
            out: Dst::F32(tau),
            scratch,
        })
        .collect();
    core.init_task_vectors(&mut jobs)?;
    drop(jobs);
    Ok(taus)
}

/// Copies GPU-read moments (and Δ_c) into the host's state.
fn install_state(state: &mut [TensorState], read: Vec<TensorStateData>) -> Result<()> {
    if read.len() != state.len() {
        return Err(TrainError::msg(format!("GPU returned state for {} tensors, expected {}", read.len(), state.len())));
    }
    for (s, r) in state.iter_mut().zip(read) {
        if s.name != r.name {
            return Err(TrainError::msg(format!("GPU state order: got `{}`, expected `{}`", r.name, s.name)));
        }
        s.m = r.m;
        s.v = r.v;
        s.cached = r.cached.or(s.cached.take());
    }
    Ok(())
}

/// Bitwise comparison of the CPU result with the GPU's, both as `(name, values)`
/// in tensor order; the error names the step, adapter, state kind, tensor, first
/// differing index and both values' bits.
fn compare<'a, 'b>(
    k: u64,
    adapter: &str,
    what: &str,
    cpu: impl Iterator<Item = (&'a str, &'a [f32])>,
    gpu: impl Iterator<Item = (&'b str, &'b [f32])>,
) -> Result<()> {
    let (cpu, gpu): (Vec<_>, Vec<_>) = (cpu.collect(), gpu.collect());
    if cpu.len() != gpu.len() {
        return Err(TrainError::msg(format!("cross-check at step {k}: GPU returned {} {what} tensors, expected {}", gpu.len(), cpu.len())));
    }
    for ((name, ours), (theirs_name, theirs)) in cpu.into_iter().zip(gpu) {
        if name != theirs_name || ours.len() != theirs.len() {
            return Err(TrainError::msg(format!(
                "cross-check at step {k}: GPU {what} tensor `{theirs_name}` ({} elements) does not line up with CPU tensor `{name}` ({} elements)",
                theirs.len(),
                ours.len()
            )));
        }
        if let Some(index) = first_difference(ours, theirs) {
            return Err(TrainError::CrossCheck {
                step: k,
                adapter: adapter.to_string(),
                what: what.to_string(),
                tensor: name.to_string(),
                index,
                cpu: ours[index].to_bits(),
                gpu: theirs[index].to_bits(),
            });
        }
    }
    Ok(())
}

/// The first index where two same-length slices differ in bits.
fn first_difference(a: &[f32], b: &[f32]) -> Option<usize> {
    a.iter().zip(b).position(|(p, q)| p.to_bits() != q.to_bits())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_check_mismatch_names_step_adapter_tensor_index_and_bits() {
        let cpu = ParamSet::new(vec![
            Tensor { name: "a".into(), shape: vec![2], data: vec![1.0, 2.0] },
            Tensor { name: "b".into(), shape: vec![3], data: vec![0.5, 0.25, -1.0] },
        ]);
        let same: Vec<(String, Vec<f32>)> = cpu.tensors.iter().map(|t| (t.name.clone(), t.data.clone())).collect();
        fn rows(set: &[(String, Vec<f32>)]) -> Vec<(&str, &[f32])> {
            set.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect()
        }
        let cpu_rows = || cpu.tensors.iter().map(|t| (t.name.as_str(), t.data.as_slice()));
        compare(3, "lavapipe", "parameter", cpu_rows(), rows(&same).into_iter()).unwrap();
        let mut off = same.clone();
        off[1].1[2] = f32::from_bits((-1.0f32).to_bits() + 1);
        let err = compare(3, "lavapipe", EXP_AVG, cpu_rows(), rows(&off).into_iter()).unwrap_err().to_string();
        for want in ["step 3", "lavapipe", "exp_avg", "tensor `b`", "element 2", "0xbf800000", "0xbf800001"] {
            assert!(err.contains(want), "{want} missing: {err}");
        }
        let short = &same[..1];
        let err = compare(1, "x", "parameter", cpu_rows(), rows(short).into_iter()).unwrap_err().to_string();
        assert!(err.contains("returned 1 parameter tensors, expected 2"), "{err}");
    }
}
