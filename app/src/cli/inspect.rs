//! `mtp inspect MODEL`.

use mtp_core::inspect::{ModelInfo, human_bytes};
use mtp_core::source::{HubOptions, ModelSource};

use super::progress::DownloadBar;

/// Arguments of `mtp inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model folder, a hub repo id (owner/name[@revision]) or `demo`.
    pub model: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let source: ModelSource = args.model.parse()?;
    let dir = source.resolve(&HubOptions::from_env(), &mut DownloadBar::new())?;
    let info = ModelInfo::from_folder(&dir)?;
    if args.json {
        let mut v = serde_json::to_value(&info)?;
        v["path"] = dir.display().to_string().into();
        return super::print_json(&v);
    }
    println!("model        {source} ({})", dir.display());
    println!("model_type   {}", info.model_type);
    println!("parameters   {} ({:.1} M)", info.num_parameters, info.num_parameters as f64 / 1e6);
    println!("hidden_size  {}", info.hidden_size);
    println!("layers       {}", info.num_layers);
    println!("heads        {} query, {} key/value", info.num_heads, info.num_kv_heads);
    println!("vocab_size   {}", info.vocab_size);
    println!("context      {}", info.context_length);
    println!("tied head    {}", info.tie_word_embeddings);
    println!("stored as    {} ({})", info.stored_dtype, human_bytes(info.stored_bytes));
    for (dtype, bytes) in &info.weight_bytes {
        println!("weights {dtype:<4} {}", human_bytes(*bytes));
    }
    Ok(())
}
