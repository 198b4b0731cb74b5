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
    // CPU decoding's thread count follows what the machine leaves free (OMP_NUM_THREADS fixes it).
    mtp_core::model::threads::adapt();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(e) = resume_keeps_its_recipe(&matches) {
        eprintln!("error: {}", crate::error_text(&e));
        return ExitCode::FAILURE;
    }
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
            eprintln!("error: {}", crate::error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// `train --resume` and `pretrain --resume` continue a run with the recipe saved in its
/// folder: only `--steps` (the new total) and how progress is shown may change. Any other
/// option given on the command line would be silently ignored, so it is refused, by name.
fn resume_keeps_its_recipe(matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let Some((name, sub)) = matches.subcommand() else { return Ok(()) };
    if !matches!(name, "train" | "pretrain")
        || sub.value_source("resume") != Some(clap::parser::ValueSource::CommandLine)
    {
        return Ok(());
    }
    let allowed = ["resume", "steps", "json"];
    let command = <Cli as clap::CommandFactory>::command();
    let Some(cmd) = command.find_subcommand(name) else { return Ok(()) };
    let given: Vec<String> = cmd
        .get_arguments()
        .filter(|a| !allowed.contains(&a.get_id().as_str()))
        .filter(|a| sub.value_source(a.get_id().as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|a| a.get_long().map_or_else(|| a.get_id().to_string(), |l| format!("--{l}")))
        .collect();
    if given.is_empty() {
        return Ok(());
    }
    let dir = sub.get_one::<std::path::PathBuf>("resume").map(|d| d.display().to_string()).unwrap_or_default();
    anyhow::bail!(
        "{}: a resumed run keeps the recipe in {dir} (only --steps, the new total, can change); \
         start a new run with --out to train with other settings",
        given.join(", ")
    )
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    // Colours only for a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

/// A run stopped on request (Ctrl-C) ends with status 130, as an interrupted program does,
/// so that a script can tell it from a finished run; its checkpoint is saved by then.
pub(crate) fn exit_if_stopped(outcome: mtp_core::train::Outcome) {
    if outcome == mtp_core::train::Outcome::Stopped {
        std::process::exit(130);
    }
}

/// Print `value` as one line of JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout(), "{}", serde_json::to_string(value)?)?;
    Ok(())
}
