//! `mtp pretrain`: a small Llama-architecture model from scratch, optionally with its own
//! byte-level BPE tokenizer, saved as a Hugging Face folder.

use std::path::PathBuf;

use anyhow::Context;

use mtp_core::train::pretrain::{ArchConfig, DEFAULT_VOCAB_SIZE, PretrainConfig, TokenizerPlan, pretrain, read_recipe};
use mtp_core::train::{Control, DataSource, TrainEvent};

use super::recipe::PretrainLoopArgs;
use super::train::{Reporter, cancel_on_ctrl_c};

/// Arguments of `mtp pretrain`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Datasets (repeat or comma-separate): JSONL, text file, folder, builtin:NAME[:COUNT].
    #[arg(long, value_delimiter = ',', required_unless_present = "resume")]
    pub data: Vec<String>,
    /// The model folder to write (run files go there too).
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the pretraining run in this folder.
    #[arg(long, conflicts_with_all = ["data", "out"])]
    pub resume: Option<PathBuf>,
    /// Size preset: tiny, demo, small (flags below override it).
    #[arg(long, default_value = "demo")]
    pub preset: String,
    /// Width.
    #[arg(long)]
    pub hidden_size: Option<usize>,
    /// Decoder layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Query heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// MLP width.
    #[arg(long)]
    pub intermediate_size: Option<usize>,
    /// Context length.
    #[arg(long)]
    pub context: Option<usize>,
    /// Train a byte-level BPE tokenizer with this many tokens (default 4096)...
    #[arg(long, conflicts_with = "tokenizer_from")]
    pub vocab_size: Option<usize>,
    /// ...or use the tokenizer of this model folder.
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
    /// The optimisation loop: steps, batches, learning rate, validation, checkpoints, seed, device.
    #[command(flatten)]
    pub training: PretrainLoopArgs,
    /// Print events as JSON lines.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    fn config(&self) -> anyhow::Result<PretrainConfig> {
        let mut arch = ArchConfig::preset(&self.preset)?;
        arch.hidden_size = self.hidden_size.unwrap_or(arch.hidden_size);
        arch.num_layers = self.layers.unwrap_or(arch.num_layers);
        arch.num_heads = self.heads.unwrap_or(arch.num_heads);
        arch.num_kv_heads = self.kv_heads.unwrap_or(arch.num_kv_heads);
        arch.intermediate_size = self.intermediate_size.unwrap_or(arch.intermediate_size);
        arch.max_position_embeddings = self.context.unwrap_or(arch.max_position_embeddings);
        arch.validate().context("--hidden-size, --layers, --heads, --kv-heads, --intermediate-size, --context")?;
        let data = self.data.iter().map(|d| d.parse::<DataSource>()).collect::<Result<Vec<_>, _>>()?;
        Ok(PretrainConfig {
            data,
            arch,
            tokenizer: match &self.tokenizer_from {
                Some(path) => TokenizerPlan::From { path: path.clone() },
                None => TokenizerPlan::Train { vocab_size: self.vocab_size.unwrap_or(DEFAULT_VOCAB_SIZE) },
            },
            training: self.training.config(),
        })
    }
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let control = Control::new();
    cancel_on_ctrl_c(&control, "saving a checkpoint");
    let (config, out, resume) = match &args.resume {
        Some(dir) => {
            let mut c = read_recipe(dir)?;
            if let Some(s) = args.training.steps {
                c.training.steps = s;
            }
            (c, dir.clone(), true)
        }
        None => (args.config()?, args.out.clone().unwrap_or_default(), false),
    };
    let mut reporter = Reporter::new(args.json).without_sampler(true);
    let mut sink = |e: &TrainEvent| reporter.event(e);
    let start = std::time::Instant::now();
    let summary = pretrain(&config, &out, resume, &mut sink, &control).map_err(|e| match e {
        mtp_core::Error::Invalid(m) if m.contains("already holds") => {
            anyhow::anyhow!("{m} (mtp pretrain --resume {})", out.display())
        }
        e => e.into(),
    })?;
    reporter.finish();
    eprintln!(
        "{} at step {} after {:.0} s: {} parameters; model folder {}",
        summary.outcome,
        summary.step,
        start.elapsed().as_secs_f64(),
        summary.parameters,
        summary.model_dir.display()
    );
    super::exit_if_stopped(summary.outcome);
    Ok(())
}
