//! `mtp inspect MODEL`.

use anyhow::Context;
use mtp_core::DType;
use mtp_core::inspect::{ModelInfo, human_bytes};
use mtp_core::model::ModelConfig;
use mtp_core::mtp::{LoraConfig, MtpConfig};
use mtp_core::source::{HubOptions, ModelSource};
use mtp_core::train::memory::{MemoryEstimate, MemoryInputs, estimate};

use super::progress::DownloadBar;

/// Arguments of `mtp inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model folder, a hub repo id (owner/name[@revision]) or `demo`.
    pub model: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Training memory estimate: mask tokens.
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// Training memory estimate: LoRA rank (all seven projections).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Training memory estimate: sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Training memory estimate: tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Training memory estimate: precision of the base model (default: bf16 on CUDA, f32
    /// on the CPU).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Training memory estimate: without the sampler head.
    #[arg(long)]
    pub no_sampler: bool,
    /// Training memory estimate: the device it trains on.
    #[arg(long, default_value = "cpu")]
    pub device: mtp_core::DeviceSpec,
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let source: ModelSource = args.model.parse()?;
    let dir = source.resolve(&HubOptions::from_env(), &mut DownloadBar::new())?;
    let info = ModelInfo::from_folder(&dir)?;
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let lora = LoraConfig { rank: args.rank, ..LoraConfig::default() };
    // The estimate is for a run `mtp train` would start: the same ranges.
    MtpConfig { k: args.k, lora: lora.clone(), ..MtpConfig::default() }.validate().context("--k, --rank")?;
    if args.batch_size == 0 || args.seq_len < 2 {
        anyhow::bail!("--batch-size must be at least 1 and --seq-len at least 2");
    }
    let context = config.context_length();
    if args.seq_len + args.k > context {
        anyhow::bail!(
            "--seq-len {} with --k {}: the masks reach position {}, beyond the model's context of {context} positions",
            args.seq_len,
            args.k,
            args.seq_len + args.k - 1
        );
    }
    let dtype = args.dtype.unwrap_or_else(|| DType::default_for(args.device));
    let inputs = |checkpointing| MemoryInputs {
        k: args.k,
        lora: &lora,
        sampler: !args.no_sampler,
        batch_size: args.batch_size,
        seq_len: args.seq_len,
        dtype,
        checkpointing,
        device: args.device,
    };
    let (plain, ckpt) = (estimate(&info, &config, &inputs(false)), estimate(&info, &config, &inputs(true)));
    if args.json {
        let mut v = serde_json::to_value(&info)?;
        v["path"] = dir.display().to_string().into();
        let parts = |e: &MemoryEstimate| {
            serde_json::json!({ "weights": e.weights, "trainable": e.trainable, "activations": e.activations,
                                "logits": e.logits, "runtime": e.runtime, "total": e.total() })
        };
        v["training_memory"] = serde_json::json!({
            "k": args.k, "rank": args.rank, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "dtype": dtype.to_string(), "device": args.device.to_string(), "sampler": !args.no_sampler,
            "plain": parts(&plain), "checkpointing": parts(&ckpt),
        });
        return super::print_json(&v);
    }
    match dir.display().to_string() {
        // A folder names itself; a repo id or `demo` shows where it lives.
        path if path == source.to_string() => println!("model        {path}"),
        path => println!("model        {source} ({path})"),
    }
    println!("model_type   {}", info.model_type);
    println!("parameters   {} ({:.1} M)", info.num_parameters, info.num_parameters as f64 / 1e6);
    println!("hidden_size  {}", info.hidden_size);
    println!("layers       {}", info.num_layers);
    println!("heads        {} query, {} key/value", info.num_heads, info.num_kv_heads);
    println!("vocab_size   {}", info.vocab_size);
    println!("context      {}", info.context_length);
    println!("tied head    {}", info.tie_word_embeddings);
    println!("stored as    {} ({})", info.stored_dtype, human_bytes(info.stored_bytes));
    let weights: Vec<String> = info.weight_bytes.iter().map(|(d, b)| format!("{} in {d}", human_bytes(*b))).collect();
    println!("weights      {}", weights.join(", "));
    println!(
        "training     k = {}, rank {}, batch {}, {} tokens, {}{}: about {} ({} with activation checkpointing)",
        args.k,
        args.rank,
        args.batch_size,
        args.seq_len,
        dtype,
        if args.no_sampler { ", no sampler" } else { "" },
        human_bytes(plain.total()),
        human_bytes(ckpt.total())
    );
    Ok(())
}
