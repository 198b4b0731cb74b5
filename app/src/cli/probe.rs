//! `mtp probe`: the paper's Figure 1 on your model.

use std::path::PathBuf;

use anyhow::Context;
use mtp_core::mtp::MtpAdapter;
use mtp_core::mtp::probe::probe;
use mtp_core::{DType, DeviceSpec, LoadOptions, LoadedModel, ModelSource};

use super::progress::DownloadBar;

/// Arguments of `mtp probe`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model folder, a hub repo id or `demo`.
    #[arg(long, default_value = "demo")]
    pub model: String,
    /// The MTP adapter (default for the demo model: its adapter).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// The true continuation whose tokens the masks should predict.
    #[arg(long)]
    pub continuation: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let source: ModelSource = args.model.parse()?;
    let options = LoadOptions { device: args.device, dtype: args.dtype, ..LoadOptions::default() };
    let loaded = LoadedModel::load(&source, &options, &mut DownloadBar::new())
        .with_context(|| format!("loading model `{source}`"))?;
    let adapter_path = match (&args.adapter, source == ModelSource::Demo) {
        (Some(p), _) => p.clone(),
        (None, true) => mtp_core::source::demo_adapter(),
        (None, false) => anyhow::bail!("give --adapter FILE (only the demo model has a default)"),
    };
    let adapter = MtpAdapter::load(&adapter_path, &loaded.model)?;
    let tok = &loaded.tokenizer;
    let prompt_ids = tok.encode(&args.prompt)?;
    let continuation_ids = tok.encode_with(&args.continuation, false)?;
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
