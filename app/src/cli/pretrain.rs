//! `mtp pretrain`: a small Llama-architecture model from scratch, optionally with its own
//! byte-level BPE tokenizer, saved as a Hugging Face folder.

use std::path::PathBuf;

use mtp_core::DeviceSpec;
use mtp_core::train::pretrain::{ArchConfig, PretrainConfig, TokenizerPlan, pretrain, read_recipe};
use mtp_core::train::{Control, DataSource, OptimConfig, Schedule, TrainEvent};

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
    /// Optimizer steps (with --resume: the new total).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Peak learning rate (cosine decay after warmup).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Warmup steps.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Validate every N steps.
    #[arg(long, default_value_t = 100)]
    pub val_every: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
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
        let data = self.data.iter().map(|d| d.parse::<DataSource>()).collect::<Result<Vec<_>, _>>()?;
        Ok(PretrainConfig {
            data,
            arch,
            tokenizer: match &self.tokenizer_from {
                Some(path) => TokenizerPlan::From { path: path.clone() },
                None => TokenizerPlan::Train { vocab_size: self.vocab_size.unwrap_or(4096) },
            },
            optim: OptimConfig {
                lr: self.lr,
                warmup: self.warmup,
                schedule: Schedule::Cosine,
                weight_decay: self.weight_decay,
                beta2: 0.95,
                ..OptimConfig::default()
            },
            steps: self.steps.unwrap_or(1000),
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            seq_len: self.seq_len,
            val_fraction: 0.02,
            val_every: self.val_every,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
            device: self.device,
        })
    }
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let control = Control::new();
    cancel_on_ctrl_c(&control);
    let (config, out, resume) = match &args.resume {
        Some(dir) => {
            let mut c = read_recipe(dir)?;
            if let Some(s) = args.steps {
                c.steps = s;
            }
            (c, dir.clone(), true)
        }
        None => (args.config()?, args.out.clone().unwrap_or_default(), false),
    };
    let mut reporter = Reporter::new(args.json);
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
        "{:?} at step {} after {:.0} s: {} parameters; model folder {}",
        summary.outcome,
        summary.step,
        start.elapsed().as_secs_f64(),
        summary.parameters,
        summary.model_dir.display()
    );
    Ok(())
}
