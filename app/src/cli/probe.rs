//! `mtp probe`: the paper's Figure 1 on your model.

use mtp_core::mtp::probe::probe;

use super::common::{AdapterArg, ModelArgs};

/// Arguments of `mtp probe`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The adapter.
    #[command(flatten)]
    pub adapter: AdapterArg,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// The true continuation whose tokens the masks should predict.
    #[arg(long)]
    pub continuation: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let (source, loaded) = args.model.load()?;
    let adapter = args.adapter.load(&source, &loaded.model)?;
    let tok = &loaded.tokenizer;
    let (prompt_ids, continuation_ids) = mtp_core::mtp::probe::encode(tok, &args.prompt, &args.continuation)?;
    let report = probe(&loaded.model, &adapter, &prompt_ids, &continuation_ids)?;
    if args.json {
        return super::print_json(&report);
    }
    println!("rank of the true future token (1 = the model's first choice)\n");
    println!("| position | true token | base + placeholders | tuned | tuned + sampler |\n|---|---|---|---|---|");
    for s in &report.slots {
        let name = if s.slot == 0 { "next token".to_string() } else { format!("mask {} (+{})", s.slot, s.slot + 1) };
        let text = tok.decode(&[s.token], false).unwrap_or_default();
        let sampler = s.rank_sampler.map_or("-".to_string(), |r| r.to_string());
        println!("| {name} | {text:?} | {} | {} | {sampler} |", s.rank_base, s.rank_tuned);
    }
    Ok(())
}
