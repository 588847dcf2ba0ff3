//! The demo's orchestration: data, pretraining, SFT, the alignment runs, offline
//! interpolation, evaluation and the output files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::judge;
use super::plot::{Plot, Series};
use super::report::{FailedRun, Kind, Report, Row};
use crate::data::builtin::{Builtin, BuiltinConfig, END, PreferencePair, Problem};
use crate::model::config::LlamaConfig;
use crate::model::{CrossEntropy, GenerateOptions, GpuLlama, LlamaModel, Sampling, Sequence};
use crate::loss::{DpoLoss, LossKind};
use crate::params::{ParamSet, Tensor};
use crate::tokenizer::ByteTokenizer;
use crate::train::config::{AdamForm, Algorithm, OptimConfig, ScheduleKind, Scope, Variant};
use crate::train::metrics::MetricsLog;
use crate::train::optim::Optimizer;
use crate::train::objectives::{DpoObjective, LmObjective, PairSeqs};
use crate::train::run::{LoopSpec, Objective, Start, train};
use crate::train::{Result, TrainError};
use gpu_shaders::GpuContext;

const TOK: ByteTokenizer = ByteTokenizer;

fn encode(s: &str) -> Vec<u32> {
    TOK.encode(s)
}

fn decode(t: &[u32]) -> String {
    TOK.decode(t)
}

/// Every text starts with BOS, so the model predicts the first real character too
/// and prompts start the way pretraining lines do. Texts end with a newline (the
/// data's terminator), which is also where generation stops.
fn with_start(s: &str) -> Vec<u32> {
    TOK.encode_prompt(s)
}

/// One training phase's settings.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Phase {
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: u64,
}

/// A merging optimizer setting of the sweep.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MergeSetting {
    pub algorithm: String,
    pub p: f64,
    pub alpha: f64,
}

/// Everything the demo does, in one place, so a run is reproducible from its JSON.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DemoConfig {
    pub preset: String,
    pub seed: u64,
    pub digits: u32,
    pub chosen_answer_error: f64,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub pretrain_lines: usize,
    pub pretrain: Phase,
    pub sft_examples: usize,
    pub sft: Phase,
    pub preference_pairs: usize,
    pub align: Phase,
    pub beta: f64,
    pub merges: Vec<MergeSetting>,
    pub interpolation_weights: Vec<f64>,
    pub eval_pairs: usize,
    pub eval_problems: usize,
    pub eval_judge_prompts: usize,
    pub eval_text_lines: usize,
    pub threads: usize,
}

/// The default sweep, as the paper's (reserve rate `p` down to a few percent,
/// merge weight `alpha` over orders of magnitude) for both merging optimizers.
/// The miniature's scales differ from a 1.8B model's (learning rate 2e-5, not
/// 1e-6; task deltas of order 1e-2), so alpha spans 1e-6..1e-4 here.
fn sweep() -> Vec<MergeSetting> {
    let mut v = Vec::new();
    for algorithm in ["ondare", "onties"] {
        for (p, alpha) in [(0.01, 1e-6), (0.05, 1e-6), (0.2, 1e-6), (0.5, 1e-6), (0.05, 1e-5), (0.05, 1e-4)] {
            v.push(MergeSetting { algorithm: algorithm.into(), p, alpha });
        }
    }
    v
}

impl DemoConfig {
    fn base(preset: &str) -> Self {
        Self {
            preset: preset.into(),
            seed: 1,
            digits: 2,
            chosen_answer_error: BuiltinConfig::default().chosen_answer_error,
            hidden_size: 64,
            intermediate_size: 176,
            layers: 2,
            heads: 4,
            pretrain_lines: 40_000,
            pretrain: Phase { steps: 2500, batch_size: 32, lr: 3e-3, warmup_steps: 50 },
            sft_examples: 4000,
            sft: Phase { steps: 300, batch_size: 32, lr: 1e-3, warmup_steps: 20 },
            preference_pairs: 2000,
            align: Phase { steps: 150, batch_size: 16, lr: 2e-5, warmup_steps: 10 },
            beta: 0.1,
            merges: sweep(),
            interpolation_weights: vec![0.1, 0.25, 0.5, 0.75, 0.9],
            eval_pairs: 300,
            eval_problems: 200,
            eval_judge_prompts: 300,
            eval_text_lines: 400,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// The default: the whole story on a 2-core CPU within the README's budget.
    pub fn default_run() -> Self {
        Self::base("default")
    }

    /// The CI smoke test: every stage and output, tiny sizes.
    pub fn quick() -> Self {
        Self {
            digits: 1,
            hidden_size: 32,
            intermediate_size: 88,
            layers: 1,
            heads: 2,
            pretrain_lines: 4000,
            pretrain: Phase { steps: 60, batch_size: 16, lr: 3e-3, warmup_steps: 5 },
            sft_examples: 400,
            sft: Phase { steps: 20, batch_size: 16, lr: 1e-3, warmup_steps: 2 },
            preference_pairs: 200,
            align: Phase { steps: 8, batch_size: 8, lr: 2e-5, warmup_steps: 1 },
            merges: vec![
                MergeSetting { algorithm: "ondare".into(), p: 0.2, alpha: 1e-6 },
                MergeSetting { algorithm: "onties".into(), p: 0.2, alpha: 1e-6 },
            ],
            interpolation_weights: vec![0.5],
            eval_pairs: 40,
            eval_problems: 15,
            eval_judge_prompts: 20,
            eval_text_lines: 40,
            ..Self::base("quick")
        }
    }

    /// A bigger model and longer runs, for machines with more cores or time.
    pub fn large() -> Self {
        Self {
            digits: 3,
            hidden_size: 128,
            intermediate_size: 344,
            layers: 4,
            heads: 4,
            pretrain_lines: 200_000,
            pretrain: Phase { steps: 4000, batch_size: 64, lr: 2e-3, warmup_steps: 100 },
            sft_examples: 20_000,
            sft: Phase { steps: 600, batch_size: 64, lr: 5e-4, warmup_steps: 30 },
            preference_pairs: 10_000,
            align: Phase { steps: 400, batch_size: 32, lr: 2e-5, warmup_steps: 20 },
            eval_pairs: 1000,
            eval_problems: 1000,
            eval_judge_prompts: 500,
            eval_text_lines: 2000,
            ..Self::base("large")
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "quick" => Ok(Self::quick()),
            "default" => Ok(Self::default_run()),
            "large" => Ok(Self::large()),
            other => Err(TrainError::msg(format!("--preset {other}: expected quick, default or large"))),
        }
    }

    fn model_config(&self) -> LlamaConfig {
        let mut c = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE, self.hidden_size, self.intermediate_size, self.layers, self.heads, self.heads);
        c.max_position_embeddings = 128;
        c
    }

    fn optim(&self, algorithm: Algorithm, phase: &Phase, p: f64, alpha: f64) -> OptimConfig {
        OptimConfig {
            algorithm,
            adam_form: AdamForm::Torch,
            variant: Variant::Reference,
            lr: phase.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            p,
            alpha,
            k: 1,
            seed: self.seed,
            rescale: false,
            clip: 1.0,
            scope: Scope::PerTensor,
            schedule: ScheduleKind::WarmupCosine,
            warmup_steps: phase.warmup_steps,
            total_steps: phase.steps,
        }
    }
}

fn model_err(e: crate::model::ModelError) -> TrainError {
    TrainError::arch("the demo's model")(e)
}

fn model_at(cfg: &LlamaConfig, params: &ParamSet, threads: usize) -> Result<LlamaModel> {
    let mut m = LlamaModel::from_params(cfg.clone(), params.clone()).map_err(model_err)?;
    m.set_threads(threads);
    Ok(m)
}

/// A held-out preference pair with the reference (SFT) model's log-probs.
struct RefPair {
    seqs: PairSeqs,
    ref_chosen: f32,
    ref_rejected: f32,
}

fn pair_seqs(pairs: &[PreferencePair]) -> Vec<PairSeqs> {
    pairs
        .iter()
        .map(|p| {
            let prompt = with_start(&p.prompt);
            PairSeqs { chosen: Sequence::completion(&prompt, &encode(&p.chosen)), rejected: Sequence::completion(&prompt, &encode(&p.rejected)) }
        })
        .collect()
}

fn flat(pairs: impl Iterator<Item = PairSeqs>) -> Vec<Sequence> {
    pairs.flat_map(|p| [p.chosen, p.rejected]).collect()
}

fn with_reference(model: &Scorer, seqs: Vec<PairSeqs>) -> Result<Vec<RefPair>> {
    let lp = model.sequence_logps(&flat(seqs.iter().cloned()))?;
    Ok(seqs.into_iter().enumerate().map(|(i, seqs)| RefPair { seqs, ref_chosen: lp[2 * i], ref_rejected: lp[2 * i + 1] }).collect())
}

/// The held-out sets every model is measured on, built once.
struct EvalSets {
    pairs: Vec<RefPair>,
    problems: Vec<(Problem, Vec<u32>)>,
    judge_prompts: Vec<Vec<u32>>,
    text: Vec<Sequence>,
}

/// Reward and tax of one model.
struct Measured {
    pref_accuracy: f64,
    reward_margin: f64,
    judge: f64,
    capability: f64,
    perplexity: f64,
}

fn bar(len: u64, msg: &str, show: bool) -> ProgressBar {
    let b = if show { ProgressBar::new(len) } else { ProgressBar::hidden() };
    b.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} {elapsed}<{eta}").expect("static template").progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    b
}

/// The model [`measure`] scores: a CPU model, or the demo's one GPU model
/// holding the weights to measure.
enum Scorer<'a> {
    Cpu(Box<LlamaModel>),
    Gpu(&'a GpuLlama),
}

impl Scorer<'_> {
    fn sequence_logps(&self, seqs: &[Sequence]) -> Result<Vec<f32>> {
        match self {
            Scorer::Cpu(m) => m.sequence_logps(seqs).map_err(model_err),
            Scorer::Gpu(g) => g.sequence_logps(seqs).map_err(TrainError::gpu("evaluation")),
        }
    }

    fn generate_batch(&self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
        match self {
            Scorer::Cpu(m) => m.generate_batch(prompts, opts).map_err(model_err),
            Scorer::Gpu(g) => g.generate_batch(prompts, opts).map_err(TrainError::gpu("generation")),
        }
    }

    fn cross_entropy(&self, seqs: &[Sequence]) -> Result<CrossEntropy> {
        match self {
            Scorer::Cpu(m) => m.cross_entropy(seqs).map_err(model_err),
            Scorer::Gpu(g) => g.cross_entropy(seqs).map_err(TrainError::gpu("evaluation")),
        }
    }
}

fn measure(model: &Scorer, sets: &EvalSets, beta: f64, seed: u64, label: &str, show: bool) -> Result<Measured> {
    let b = bar(4, &format!("eval {label}"), show);
    let lp = model.sequence_logps(&flat(sets.pairs.iter().map(|p| p.seqs.clone())))?;
    let (mut correct, mut margin) = (0usize, 0.0);
    for (i, p) in sets.pairs.iter().enumerate() {
        let rc = beta * (lp[2 * i] as f64 - p.ref_chosen as f64);
        let rr = beta * (lp[2 * i + 1] as f64 - p.ref_rejected as f64);
        correct += usize::from(rc > rr);
        margin += rc - rr;
    }
    let npairs = sets.pairs.len().max(1) as f64;
    b.inc(1);

    let greedy = GenerateOptions { max_new_tokens: 12, sampling: Sampling::Greedy, stop_token: Some(END as u32), seed };
    let prompts: Vec<Vec<u32>> = sets.problems.iter().map(|(_, t)| t.clone()).collect();
    let outs = model.generate_batch(&prompts, &greedy)?;
    let right = sets.problems.iter().zip(&outs).filter(|((p, _), o)| judge::is_correct(p, &decode(o))).count();
    b.inc(1);

    let sampled = GenerateOptions { sampling: Sampling::Temperature { temperature: 1.0, top_k: 0 }, ..greedy };
    let outs = model.generate_batch(&sets.judge_prompts, &sampled)?;
    let judged: f64 = outs.iter().map(|o| judge::judge(&decode(o))).sum();
    b.inc(1);

    let ce = model.cross_entropy(&sets.text)?;
    b.finish_and_clear();
    Ok(Measured {
        pref_accuracy: correct as f64 / npairs,
        reward_margin: margin / npairs,
        judge: judged / sets.judge_prompts.len().max(1) as f64,
        capability: right as f64 / sets.problems.len().max(1) as f64,
        perplexity: libm::exp(ce.nll_sum / ce.tokens.max(1) as f64),
    })
}

fn row(name: String, kind: Kind, optimizer: &str, m: &Measured, train_seconds: f64) -> Row {
    Row {
        name,
        kind,
        optimizer: optimizer.into(),
        p: None,
        alpha: None,
        weight: None,
        pref_accuracy: m.pref_accuracy,
        reward_margin: m.reward_margin,
        judge: m.judge,
        capability: m.capability,
        perplexity: m.perplexity,
        train_seconds,
    }
}

/// Options that are not part of the experiment's definition.
pub struct RunOptions {
    pub out_dir: PathBuf,
    pub progress: bool,
    /// Where the models train, generate and are scored: `None` for the CPU
    /// (the README's table, the same bits on every machine), else this GPU,
    /// whose model kernels agree with the CPU's to rounding only.
    pub gpu: Option<GpuContext>,
}

struct Ctx<'a> {
    cfg: &'a DemoConfig,
    model_cfg: LlamaConfig,
    opts: &'a RunOptions,
    /// On a GPU, the one device model every evaluation uploads its weights into.
    scorer: Option<GpuLlama>,
}

impl Ctx<'_> {
    fn say(&self, s: &str) {
        if self.opts.progress {
            eprintln!("{s}");
        }
    }

    /// The CPU model at `params`, with the demo's threads.
    fn model(&self, params: &ParamSet) -> Result<LlamaModel> {
        model_at(&self.model_cfg, params, self.cfg.threads)
    }

    /// The model that measures `params`: on the CPU, or the GPU's scorer holding them.
    fn scorer(&self, params: &ParamSet) -> Result<Scorer<'_>> {
        match &self.scorer {
            None => Ok(Scorer::Cpu(Box::new(self.model(params)?))),
            Some(gpu) => {
                gpu.upload(params).map_err(TrainError::gpu("uploading the weights to measure"))?;
                Ok(Scorer::Gpu(gpu))
            }
        }
    }

    fn measure(&self, params: &ParamSet, sets: &EvalSets, label: &str) -> Result<Measured> {
        measure(&self.scorer(params)?, sets, self.cfg.beta, self.cfg.seed ^ 0xE7A1, label, self.opts.progress)
    }

    /// A language-model objective on the run's device.
    fn lm_objective(&self, params: &ParamSet, seqs: Vec<Sequence>) -> Result<LmObjective> {
        let obj = LmObjective::new(self.model(params)?, seqs, Vec::new())?;
        match &self.opts.gpu {
            None => Ok(obj),
            Some(ctx) => obj.on_gpu(ctx, 0),
        }
    }

    fn run_phase(&self, name: &str, objective: &mut dyn Objective, oc: OptimConfig, init: ParamSet, task: Option<(&ParamSet, &ParamSet)>, phase: &Phase) -> Result<ParamSet> {
        // on a GPU the optimizer steps the model's own weights in place
        let mut opt = match objective.gpu_model() {
            Some(model) => Optimizer::sharing(oc, init, task, model, 0)?,
            None => Optimizer::new(oc, init, task)?,
        };
        let spec = LoopSpec {
            steps: phase.steps,
            batch_size: phase.batch_size,
            grad_accum: 1,
            data_seed: self.cfg.seed,
            eval_every: 0,
            checkpoint_every: 0,
            keep_checkpoints: 0,
            checkpoint_root: None,
            run_config: serde_json::Value::Null,
            inputs: Vec::new(),
            resume_anyway: false,
            progress: self.opts.progress,
        };
        let mut log = MetricsLog::create(&self.opts.out_dir.join("logs").join(format!("{name}.jsonl")))?;
        train(&spec, objective, &mut opt, Start { step: 0, data_position: 0 }, &mut log, None)
    }
}

fn interpolate(sft: &ParamSet, rlhf: &ParamSet, w: f64) -> Result<ParamSet> {
    let tensors = sft
        .tensors
        .iter()
        .map(|s| {
            let r = rlhf.get(&s.name).ok_or_else(|| TrainError::msg(format!("interpolation: tensor `{}` missing in the aligned model", s.name)))?;
            let mut data = vec![0f32; s.data.len()];
            merge_core::offline::interpolate(
                &s.name,
                0,
                merge_core::dtype::Src::F32(&s.data),
                merge_core::dtype::Src::F32(&r.data),
                w,
                &mut merge_core::dtype::Dst::F32(&mut data),
            )?;
            Ok(Tensor { name: s.name.clone(), shape: s.shape.clone(), data })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ParamSet::new(tensors))
}

fn algorithm(name: &str) -> Result<Algorithm> {
    match name {
        "adamw" => Ok(Algorithm::Adamw),
        "ondare" => Ok(Algorithm::Ondare),
        "onties" => Ok(Algorithm::Onties),
        o => Err(TrainError::msg(format!("demo merge setting: unknown optimizer `{o}`"))),
    }
}

/// Runs the whole demo into `opts.out_dir` and returns its report.
pub fn run(cfg: &DemoConfig, opts: &RunOptions) -> Result<Report> {
    let t_all = Instant::now();
    std::fs::create_dir_all(opts.out_dir.join("logs")).map_err(|e| TrainError::io("creating", &opts.out_dir, e))?;
    let model_cfg = cfg.model_config();
    let base0 = LlamaModel::init(model_cfg.clone(), cfg.seed).map_err(model_err)?;
    let scorer = match &opts.gpu {
        None => None,
        Some(gpu) => Some(GpuLlama::new(gpu, &base0).map_err(TrainError::gpu("the evaluation model"))?),
    };
    let device = opts.gpu.as_ref().map_or_else(|| "cpu".to_string(), |g| gpu_shaders::context::describe(g.adapter_info()));
    let ctx = Ctx { cfg, model_cfg, opts, scorer };
    let data = Builtin::new(
        BuiltinConfig { digits: cfg.digits, chosen_answer_error: cfg.chosen_answer_error, ..BuiltinConfig::default() },
        cfg.seed,
    )
    .map_err(TrainError::msg)?;

    let where_ = match &opts.gpu {
        None => format!("{} threads, merge-core optimizer on the CPU", cfg.threads),
        Some(_) => format!("model and optimizer on {device}"),
    };
    ctx.say(&format!("demo ({}): {} parameters, {where_}", cfg.preset, base0.params.numel()));

    ctx.say("[1/4] pretraining the base model on addition facts and toy sentences");
    let t = Instant::now();
    let pretrain_seqs = data.pretrain_text(cfg.pretrain_lines).iter().map(|l| Sequence::full(with_start(l))).collect();
    let mut lm = ctx.lm_objective(&base0.params, pretrain_seqs)?;
    let base = ctx.run_phase("pretrain", &mut lm, cfg.optim(Algorithm::Adamw, &cfg.pretrain, 1.0, 0.0), base0.params, None, &cfg.pretrain)?;
    drop(lm);
    let pretrain_s = t.elapsed().as_secs_f64();

    ctx.say("[2/4] SFT into the assistant format");
    let t = Instant::now();
    let sft_seqs = data.sft(cfg.sft_examples).iter().map(|e| Sequence::completion(&with_start(&e.prompt), &encode(&e.response))).collect();
    let mut sft_obj = ctx.lm_objective(&base, sft_seqs)?;
    let sft = ctx.run_phase("sft", &mut sft_obj, cfg.optim(Algorithm::Adamw, &cfg.sft, 1.0, 0.0), base.clone(), None, &cfg.sft)?;
    drop(sft_obj);
    let sft_s = t.elapsed().as_secs_f64();

    let heldout_pairs = data.heldout_preferences(cfg.eval_pairs);
    let sets = EvalSets {
        pairs: with_reference(&ctx.scorer(&sft)?, pair_seqs(&heldout_pairs))?,
        problems: data.capability_problems(cfg.eval_problems).into_iter().map(|p| (p, with_start(&p.prompt()))).collect(),
        judge_prompts: heldout_pairs.iter().take(cfg.eval_judge_prompts).map(|p| with_start(&p.prompt)).collect(),
        text: data.heldout_text(cfg.eval_text_lines).iter().map(|l| Sequence::full(with_start(l))).collect(),
    };
    let mut rows = Vec::new();
    let base_m = ctx.measure(&base, &sets, "base")?;
    let m = ctx.measure(&sft, &sets, "sft")?;
    rows.push(row("sft".into(), Kind::Sft, "sft", &m, pretrain_s + sft_s));

    ctx.say("[3/4] aligning with DPO: AdamW, then each merging setting (same seed, data and steps)");
    let loss = DpoLoss::new(LossKind::Sigmoid, cfg.beta, 0.0).map_err(|e| TrainError::msg(format!("demo: {e}")))?;
    let train_pairs = pair_seqs(&data.preferences(cfg.preference_pairs));
    let sft_model = ctx.model(&sft)?;
    let mut dpo = match &opts.gpu {
        None => DpoObjective::new(ctx.model(&sft)?, &sft_model, loss, train_pairs, Vec::new())?,
        Some(gpu) => DpoObjective::on_gpu(ctx.model(&sft)?, &sft_model, loss, train_pairs, Vec::new(), gpu, 0)?,
    };
    let t = Instant::now();
    let adamw = ctx.run_phase("align-adamw", &mut dpo, cfg.optim(Algorithm::Adamw, &cfg.align, 1.0, 0.0), sft.clone(), None, &cfg.align)?;
    let adamw_s = t.elapsed().as_secs_f64();
    let m = ctx.measure(&adamw, &sets, "adamw")?;
    rows.push(row("adamw".into(), Kind::Online, "adamw", &m, adamw_s));

    let mut failed = Vec::new();
    for s in &cfg.merges {
        let name = format!("{} p={} a={}", s.algorithm, s.p, s.alpha);
        let t = Instant::now();
        // A sweep setting that cannot run (an optimizer this build lacks, a
        // diverged run stopped by the non-finite check) is reported, not fatal:
        // the other settings still answer the question.
        let params = match ctx.run_phase(
            &format!("align-{}-p{}-a{}", s.algorithm, s.p, s.alpha),
            &mut dpo,
            cfg.optim(algorithm(&s.algorithm)?, &cfg.align, s.p, s.alpha),
            sft.clone(),
            Some((&base, &sft)),
            &cfg.align,
        ) {
            Ok(p) => p,
            Err(e) => {
                ctx.say(&format!("  {name}: failed: {e}"));
                failed.push(FailedRun { name, error: e.to_string() });
                continue;
            }
        };
        let secs = t.elapsed().as_secs_f64();
        let m = ctx.measure(&params, &sets, &name)?;
        let mut r = row(name, Kind::Online, &s.algorithm, &m, secs);
        r.p = Some(s.p);
        r.alpha = Some(s.alpha);
        rows.push(r);
    }

    ctx.say("[4/4] offline interpolation of the AdamW model back toward SFT");
    for &w in &cfg.interpolation_weights {
        let params = interpolate(&sft, &adamw, w)?;
        let m = ctx.measure(&params, &sets, &format!("interp w={w}"))?;
        let mut r = row(format!("adamw+interp w={w}"), Kind::Offline, "adamw", &m, 0.0);
        r.weight = Some(w);
        rows.push(r);
    }

    let settings = serde_json::json!({
        "demo": cfg,
        "device": device,
        "parameters": sft.numel(),
        "base_model": { "capability": base_m.capability, "perplexity": base_m.perplexity, "judge": base_m.judge },
    });
    let report = Report { settings, rows, failed, total_seconds: t_all.elapsed().as_secs_f64() };
    report.write(&opts.out_dir).map_err(TrainError::msg)?;
    for (file, plot) in plots(&report) {
        let path = opts.out_dir.join(file);
        std::fs::write(&path, plot.svg()).map_err(|e| TrainError::io("writing", &path, e))?;
    }
    Ok(report)
}

/// The two frontier plots: judge score against capability tax, and held-out
/// reward margin against perplexity tax. Up and to the left is better.
pub fn plots(report: &Report) -> Vec<(&'static str, Plot)> {
    let Some(sft) = report.sft() else { return Vec::new() };
    let colors = |opt: &str| match opt {
        "adamw" => "#d62728",
        "ondare" => "#2ca02c",
        "onties" => "#9467bd",
        _ => "#444444",
    };
    let mk = |x: &dyn Fn(&Row) -> f64, y: &dyn Fn(&Row) -> f64| {
        let mut series = vec![Series { label: "SFT".into(), color: colors("sft").into(), points: vec![(x(sft), y(sft), "SFT".into())], line: false }];
        // AdamW last so the merging sweeps around it cannot hide it; sweep points
        // carry no labels (they crowd), the table names each one.
        for opt in ["ondare", "onties", "adamw"] {
            let pts: Vec<_> = report
                .rows
                .iter()
                .filter(|r| r.kind == Kind::Online && r.optimizer == opt)
                .map(|r| (x(r), y(r), if opt == "adamw" { "AdamW".to_string() } else { String::new() }))
                .collect();
            if !pts.is_empty() {
                series.push(Series { label: opt.into(), color: colors(opt).into(), points: pts, line: false });
            }
        }
        // The interpolation line runs from SFT (w=0) to the AdamW model (w=1).
        let mut line = vec![(x(sft), y(sft), String::new())];
        let mut offline: Vec<&Row> = report.rows.iter().filter(|r| r.kind == Kind::Offline).collect();
        offline.sort_by(|a, b| a.weight.partial_cmp(&b.weight).expect("weights are finite"));
        line.extend(offline.iter().map(|r| (x(r), y(r), format!("w={}", r.weight.unwrap_or(0.0)))));
        if let Some(a) = report.rows.iter().find(|r| r.kind == Kind::Online && r.optimizer == "adamw") {
            line.push((x(a), y(a), String::new()));
        }
        series.push(Series { label: "AdamW + offline interp.".into(), color: "#1f77b4".into(), points: line, line: true });
        series
    };
    vec![
        (
            "reward_vs_capability_tax.svg",
            Plot {
                title: "Judge reward vs. alignment tax on addition".into(),
                x_label: "capability tax: SFT accuracy minus model accuracy (percentage points)".into(),
                y_label: "judge score on sampled answers".into(),
                series: mk(&|r| r.capability_tax(sft), &|r| r.judge),
            },
        ),
        (
            "margin_vs_perplexity_tax.svg",
            Plot {
                title: "Held-out DPO reward margin vs. perplexity tax".into(),
                x_label: "perplexity increase on held-out pretraining text (%)".into(),
                y_label: "held-out reward margin (chosen - rejected)".into(),
                series: mk(&|r| r.perplexity_tax(sft), &|r| r.reward_margin),
            },
        ),
    ]
}

/// The directory a demo writes to when none is given: `runs/demo-<preset>`.
pub fn default_out_dir(cfg: &DemoConfig) -> PathBuf {
    Path::new("runs").join(format!("demo-{}", cfg.preset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_endpoints_are_the_models() {
        let a = ParamSet::new(vec![Tensor { name: "w".into(), shape: vec![3], data: vec![1.0, 2.0, -3.0] }]);
        let b = ParamSet::new(vec![Tensor { name: "w".into(), shape: vec![3], data: vec![3.0, 2.0, 1.0] }]);
        assert_eq!(interpolate(&a, &b, 0.0).unwrap(), a);
        assert_eq!(interpolate(&a, &b, 1.0).unwrap(), b);
        assert_eq!(interpolate(&a, &b, 0.5).unwrap().tensors[0].data, vec![2.0, 2.0, -1.0]);
        assert!(interpolate(&a, &b, 1.5).is_err());
    }
}
