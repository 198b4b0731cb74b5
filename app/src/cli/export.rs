//! `mtp export`: an adapter for other tools. `--format peft` writes the PEFT LoRA folder
//! SGLang's and vLLM's UNO speculative decoding load (README, "Serving at scale");
//! `--format safetensors` copies our own file.

use std::path::PathBuf;

use anyhow::Context;
use mtp_core::mtp::export::export_peft;

/// The formats an adapter exports to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A PEFT LoRA folder (adapter_config.json, adapter_model.safetensors).
    Peft,
    /// Our own adapter file, as it is.
    Safetensors,
}

/// Arguments of `mtp export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to write.
    #[arg(long, value_enum)]
    pub format: Format,
    /// The adapter (adapter.safetensors of a run).
    pub adapter: PathBuf,
    /// A folder (peft) or a file (safetensors).
    pub out: PathBuf,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.format {
        Format::Peft => {
            let done = export_peft(&args.adapter, &args.out)?;
            if args.json {
                super::print_json(&serde_json::json!({
                    "dir": done.dir,
                    "tensors": done.tensors,
                    "config": done.config,
                    "draft_tokens": done.masks + 1,
                }))?;
            } else {
                println!(
                    "wrote a PEFT LoRA (rank {}, alpha {}, {} tensors, modules {}) to {}",
                    done.config.r,
                    done.config.lora_alpha,
                    done.tensors,
                    done.config.target_modules.join(","),
                    done.dir.display()
                );
                // README, "Serving at scale".
                let (dir, base, width) = (done.dir.display(), &done.config.base_model_name_or_path, done.masks + 1);
                println!(
                    "serve it with SGLang:\n  python -m sglang.launch_server --model-path {base} --dtype bfloat16 \\\n    --attention-backend fa3 \
                     --speculative-algorithm UNO --uno-lora-path {dir} --speculative-num-steps 1 \\\n    \
                     --speculative-eagle-topk 1 --speculative-num-draft-tokens {width}"
                );
            }
        }
        Format::Safetensors => {
            // Read it first: a file that is not an adapter is refused, not copied.
            mtp_core::mtp::MtpAdapter::read_header(&args.adapter)?;
            let bytes = std::fs::read(&args.adapter).with_context(|| format!("reading {}", args.adapter.display()))?;
            mtp_core::fsutil::write_atomic(&args.out, &bytes)?;
            if args.json {
                super::print_json(&serde_json::json!({ "file": args.out, "bytes": bytes.len() }))?;
            } else {
                println!("copied {} to {}", args.adapter.display(), args.out.display());
            }
        }
    }
    Ok(())
}
