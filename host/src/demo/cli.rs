//! The `demo` subcommand's arguments and entry point.

use std::path::PathBuf;

use clap::Args;

use super::pipeline::{default_out_dir, run, DemoConfig, RunOptions};
use crate::cli::args::BackendChoice;
use crate::train::optim::open_device;
use crate::train::{Result, TrainError};

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// The CI smoke-test setting (same as `--preset quick`): every stage and output, tiny sizes, well under 2 minutes.
    #[arg(long, conflicts_with = "preset")]
    pub quick: bool,
    /// quick | default | large (large: bigger model and longer runs, for machines with more cores; see docs/DEMO.md).
    #[arg(long, default_value = "default")]
    pub preset: String,
    /// Output directory (default: runs/demo-<preset>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed for data, initialization, data order, masks and sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Worker threads for the model (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bars or stage messages (the table is still printed).
    #[arg(long)]
    pub no_progress: bool,
    /// Where the models train, generate and are scored: cpu (the README's table, the same bits on every machine), gpu (a wgpu adapter, software ones included; results agree with the CPU's to rounding), or auto (a hardware GPU if one works, else the CPU).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendChoice,
}

/// Runs the demo, prints the table, and names the output directory last.
pub fn demo(args: &DemoArgs) -> Result<()> {
    let mut cfg = DemoConfig::preset(if args.quick { "quick" } else { &args.preset })?;
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if let Some(t) = args.threads {
        cfg.threads = t.max(1);
    }
    let out_dir = args.out.clone().unwrap_or_else(|| default_out_dir(&cfg));
    let gpu = open_device(&args.backend.request(), "the demo runs on the CPU").map_err(|e| TrainError::msg(format!("--backend: {e}")))?;
    let device = gpu.as_ref().map(|g| gpu_shaders::context::describe(g.adapter_info()));
    let report = run(&cfg, &RunOptions { out_dir: out_dir.clone(), progress: !args.no_progress, gpu })?;
    println!("{}", report.table());
    match device {
        None => println!("total time {:.1} s ({} preset, {} threads)", report.total_seconds, cfg.preset, cfg.threads),
        Some(d) => println!("total time {:.1} s ({} preset, on {d})", report.total_seconds, cfg.preset),
    }
    println!(
        "outputs: {} (results.txt, results.csv, results.json, reward_vs_capability_tax.svg, margin_vs_perplexity_tax.svg, logs/)",
        out_dir.display()
    );
    Ok(())
}
