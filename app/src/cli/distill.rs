//! `mtp distill`: a training set of the model's own greedy continuations (self-distillation),
//! for `mtp train --data FILE.jsonl`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use mtp_core::train::distill::{DistillConfig, distill_into};
use mtp_core::train::{Control, DataSource};

use super::common::ModelArgs;
use super::train::cancel_on_ctrl_c;

/// Arguments of `mtp distill`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model whose continuations are recorded.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where prompts come from: a JSONL, JSON or Parquet file, a text file, a folder, a hub
    /// dataset (owner/name[@revision]), builtin:NAME[:COUNT], or several joined by commas.
    #[arg(long)]
    pub data: String,
    /// Chat: take the dataset's questions (each conversation up to an assistant turn, an
    /// Alpaca instruction, a prompt) through the model's chat template and record each
    /// response to its end-of-turn token, as the instruct model answers them.
    #[arg(long)]
    pub chat: bool,
    /// The JSONL file to write (`prompt`, `completion`, `prompt_ids`, `completion_ids`); until
    /// every prompt is answered, finished batches are kept in OUT.partial, from which the
    /// same command continues after a stop or a crash.
    #[arg(long)]
    pub out: PathBuf,
    /// Prompts to continue.
    #[arg(long, default_value_t = DistillConfig::default().sequences, value_parser = super::common::at_least_one)]
    pub sequences: usize,
    /// Tokens per prompt (text prompts; chat prompts are the questions as they are).
    #[arg(long, default_value_t = DistillConfig::default().prompt_tokens)]
    pub prompt_tokens: usize,
    /// Greedy tokens per prompt (fewer when the model ends the text).
    #[arg(long, default_value_t = DistillConfig::default().new_tokens)]
    pub new_tokens: usize,
    /// Prompts decoded together.
    #[arg(long, default_value_t = DistillConfig::default().batch_size, value_parser = super::common::at_least_one)]
    pub batch_size: usize,
    /// Seed of the prompt choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `mtp distill` did.
#[derive(Debug, serde::Serialize)]
struct Summary {
    out: PathBuf,
    sequences: usize,
    new_tokens: usize,
    /// Of those, the tokens this run decoded (the rest came from an earlier run's partial
    /// file); tokens per second counts these.
    decoded_tokens: usize,
    ended_with_eos: usize,
    seconds: f64,
    tokens_per_second: f64,
    stopped_early: bool,
    /// Answers taken from an earlier run's partial file.
    reused: usize,
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let control = Control::new();
    cancel_on_ctrl_c(&control, "keeping the answers so far");
    let config = DistillConfig {
        sequences: args.sequences,
        prompt_tokens: args.prompt_tokens,
        new_tokens: args.new_tokens,
        batch_size: args.batch_size,
        seed: args.seed,
        chat: args.chat,
    };
    let source: DataSource = args.data.parse()?;
    super::common::fetch_data(&source)?;
    let (_, loaded) = args.model.load()?;
    let tok = &loaded.tokenizer;

    let bar = if std::io::stderr().is_terminal() && !args.json { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} sequences [{elapsed_precise} eta {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let outcome = distill_into(&loaded, &source, &config, &args.out, &control, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .context("distilling")?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let out = &outcome.examples;
    let new_tokens: usize = out.iter().map(|d| d.completion_ids.len()).sum();
    let summary = Summary {
        out: args.out.clone(),
        sequences: out.len(),
        new_tokens,
        decoded_tokens: outcome.decoded_tokens,
        ended_with_eos: out.iter().filter(|d| d.completion_ids.last().is_some_and(|t| tok.eos_ids.contains(t))).count(),
        seconds,
        // What this run decoded, not what it took from an earlier one.
        tokens_per_second: outcome.decoded_tokens as f64 / seconds.max(1e-9),
        stopped_early: !outcome.complete,
        reused: outcome.reused,
    };
    if !outcome.complete {
        eprintln!(
            "stopped with {} prompts answered, kept in {}: the same command continues from there",
            out.len(),
            outcome.partial.display()
        );
    }
    if args.json {
        return super::print_json(&summary);
    }
    if outcome.complete {
        println!(
            "wrote {} sequences ({} new tokens, {} ended the text{}) to {} in {:.1} s ({:.0} tokens/s)",
            summary.sequences,
            summary.new_tokens,
            summary.ended_with_eos,
            if summary.reused > 0 { format!("; {} from the unfinished run", summary.reused) } else { String::new() },
            summary.out.display(),
            summary.seconds,
            summary.tokens_per_second,
        );
    }
    Ok(())
}
