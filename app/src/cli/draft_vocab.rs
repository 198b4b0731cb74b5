//! `mtp draft-vocab`: give an adapter a draft vocabulary (the most frequent target tokens
//! of a dataset), for adapters trained before `mtp train` stored one, or to change its size.

use anyhow::Context;
use mtp_core::train::data::{frequent_targets, read_examples, tokenize};

use super::common::{AdapterArg, ModelArgs};

/// Arguments of `mtp draft-vocab`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model the adapter belongs to.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The adapter.
    #[command(flatten)]
    pub adapter: AdapterArg,
    /// The dataset whose target tokens are counted (the adapter's training data).
    #[arg(long)]
    pub data: String,
    /// Tokens in the draft vocabulary (0 removes it).
    #[arg(long, default_value_t = mtp_core::train::trainer::DEFAULT_DRAFT_VOCAB)]
    pub size: usize,
    /// Write the adapter here (default: replace the adapter file).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let (source, loaded) = args.model.load()?;
    let path = super::common::demo_default(
        &source,
        args.adapter.adapter.as_deref(),
        mtp_core::source::demo_adapter(),
        "--adapter FILE",
    )?;
    let mut adapter = args.adapter.load(&source, &loaded.model)?;
    let vocab = loaded.model.config.vocab_size;
    // A size that is not smaller than the vocabulary would store none: refuse rather than
    // silently drop the vocabulary the adapter has (0 is how to remove it).
    if args.size >= vocab {
        anyhow::bail!(
            "--size {}: the model's vocabulary has {vocab} tokens, so a draft vocabulary must be smaller \
             (0 removes it); {} is unchanged",
            args.size,
            path.display()
        );
    }
    let data = args.data.parse().context("--data")?;
    let (examples, report) = read_examples(&data, false)?;
    let seqs = examples.iter().map(|e| tokenize(e, &loaded.tokenizer)).collect::<Result<Vec<_>, _>>()?;
    adapter.draft_vocab = frequent_targets(&seqs, args.size, vocab);
    let out = args.out.unwrap_or(path);
    adapter.save(&out)?;
    // Share of the data's target tokens the draft vocabulary holds.
    let targets: Vec<i64> = seqs
        .iter()
        .flat_map(|s| s.loss.iter().enumerate().filter(|(_, on)| **on).filter_map(|(i, _)| s.ids.get(i + 1).copied()))
        .collect();
    match &adapter.draft_vocab {
        Some(ids) => {
            let set: std::collections::HashSet<i64> = ids.iter().copied().collect();
            let covered = targets.iter().filter(|t| set.contains(t)).count();
            eprintln!(
                "{}: draft vocabulary of {} tokens (of {vocab}) from {} examples; it holds {:.1}% of their {} target tokens",
                out.display(),
                ids.len(),
                report.examples,
                100.0 * covered as f64 / targets.len().max(1) as f64,
                targets.len()
            );
        }
        None => {
            eprintln!("{}: no draft vocabulary (removed: size 0)", out.display())
        }
    }
    Ok(())
}
