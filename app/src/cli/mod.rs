//! The `mtp` command line: one subcommand per file, a shared progress bar, `--json` output
//! for machines, and an exit code that says whether it worked.

mod bench;
mod common;
mod distill;
mod download;
mod draft_vocab;
mod export;
mod generate;
mod inspect;
mod pretrain;
mod probe;
mod progress;
mod recipe;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Multi-token prediction workbench: inspect, download and run Llama-family models.
#[derive(Debug, Parser)]
#[command(name = "mtp", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Summarise a model: architecture, exact parameter count, dtype, memory.
    Inspect(inspect::Args),
    /// Download a model from the Hugging Face hub into the standard cache.
    Download(download::Args),
    /// Generate text from a prompt.
    Generate(generate::Args),
    /// Fine-tune a model for multi-token prediction (or --resume a run).
    Train(train::Args),
    /// Pretrain a small model from scratch (how the built-in demo is made).
    Pretrain(pretrain::Args),
    /// Record the model's own greedy continuations as a training set (self-distillation).
    Distill(distill::Args),
    /// Tokens per forward by domain and masks, tokens/s and speedup over AR.
    Bench(bench::Args),
    /// Store a draft vocabulary (a dataset's most frequent target tokens) in an adapter.
    DraftVocab(draft_vocab::Args),
    /// Rank of the true future tokens at each mask slot (the paper's Figure 1).
    Probe(probe::Args),
    /// Write an adapter for other tools: a PEFT LoRA for SGLang's and vLLM's UNO decoding.
    Export(export::Args),
}

/// Parse arguments, run, and turn any error into a message on stderr and exit code 1.
pub fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Download(a) => download::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Train(a) => train::run(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Distill(a) => distill::run(a),
        Command::Bench(a) => bench::run(a),
        Command::DraftVocab(a) => draft_vocab::run(a),
        Command::Probe(a) => probe::run(a),
        Command::Export(a) => export::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Print `value` as one line of JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout(), "{}", serde_json::to_string(value)?)?;
    Ok(())
}
