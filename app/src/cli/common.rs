//! Arguments and loading shared by the commands that run a model.

use std::path::{Path, PathBuf};

use anyhow::Context;
use mtp_core::decode::{DraftArithmetic, DraftOptions, Drafter, LoraForm};
use mtp_core::mtp::{BaseCheck, MtpAdapter};
use mtp_core::train::DataSource;
use mtp_core::{DType, DeviceSpec, Llama, LoadOptions, LoadedModel, ModelSource};

use super::progress::DownloadBar;

/// Which model, where, in which precision.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// A model folder, a hub repo id (owner/name[@revision]) or `demo`.
    #[arg(long, default_value = "demo")]
    pub model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// f32, bf16 or f16 (default: bf16 on CUDA, f32 on the CPU; bf16 on the CPU halves the
    /// memory and decodes faster, its greedy speculative output AR's as in f32).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Record decoding steps as CUDA graphs and replay each with one launch: the default on a
    /// CUDA device (AR steps, and greedy speculative steps, one recording per step shape; a
    /// step then costs the GPU's work, not one launch per operation). Kept for scripts that
    /// name it.
    #[arg(long)]
    pub cuda_graphs: bool,
    /// Run every decoding step eagerly on CUDA, one launch per operation (no CUDA graphs).
    #[arg(long, conflicts_with = "cuda_graphs")]
    pub no_cuda_graphs: bool,
    /// A variable the chat template reads besides the conversation, as transformers'
    /// `apply_chat_template` keyword arguments: `enable_thinking=false` (Qwen3),
    /// `date_string=26 Jul 2024` (Llama 3.x; today's date when absent). Repeatable; the
    /// value is JSON where it parses as JSON, else text.
    #[arg(long = "chat-template-var", value_name = "KEY=VALUE", value_parser = template_var)]
    pub chat_template_vars: Vec<(String, serde_json::Value)>,
}

/// `KEY=VALUE` of `--chat-template-var`.
pub fn template_var(text: &str) -> Result<(String, serde_json::Value), String> {
    mtp_core::tokenizer::parse_template_var(text).map_err(|e| e.to_string())
}

impl ModelArgs {
    /// The precision: the one given, else the device's default.
    pub fn dtype(&self) -> DType {
        self.dtype.unwrap_or_else(|| DType::default_for(self.device))
    }

    /// Resolve (downloading with a progress bar when needed) and load the model.
    pub fn load(&self) -> anyhow::Result<(ModelSource, LoadedModel)> {
        let source: ModelSource = self.model.parse()?;
        if self.cuda_graphs && !self.device.is_cuda() {
            eprintln!("note: --cuda-graphs records CUDA graphs; on {} the steps run as usual", self.device);
        }
        let options = LoadOptions {
            device: self.device,
            dtype: self.dtype(),
            cuda_graphs: !self.no_cuda_graphs,
            template_vars: self.chat_template_vars.iter().cloned().collect(),
            ..LoadOptions::default()
        };
        let loaded = LoadedModel::load(&source, &options, &mut DownloadBar::new())
            .with_context(|| format!("loading model `{source}`"))?;
        Ok((source, loaded))
    }
}

/// Bring a dataset's hub repositories into the Hugging Face cache (with a progress bar), so
/// that reading it later needs no network; nothing for local data.
pub fn fetch_data(source: &DataSource) -> anyhow::Result<()> {
    source
        .resolve(&mtp_core::source::HubOptions::from_env(), &mut DownloadBar::new())
        .with_context(|| format!("fetching dataset {source}"))?;
    Ok(())
}

/// The file `given`, or the demo's when the model is the demo and none is given.
pub fn demo_default(source: &ModelSource, given: Option<&Path>, demo: PathBuf, flag: &str) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_owned()),
        None if *source == ModelSource::Demo => Ok(demo),
        None => anyhow::bail!("give {flag} (only the demo model has a default)"),
    }
}

/// Which MTP adapter, and how to draft with it.
#[derive(Debug, clap::Args)]
pub struct AdapterArg {
    /// The MTP adapter (adapter.safetensors). Default for the demo model: its adapter.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Draft from the whole vocabulary even when the adapter has a draft vocabulary.
    #[arg(long)]
    pub full_vocab_drafts: bool,
    /// Load the adapter even when the model it was trained on has other weights than this
    /// one (same architecture: a base model and its instruct variant). Its drafts will be
    /// accepted less often.
    #[arg(long)]
    pub allow_other_base: bool,
    /// How a step applies the adapter to its mask rows: low-rank (two small products per
    /// projection group), merged (the mask rows through the weights with the adapter's
    /// delta merged in, held once more), folded (on a GPU: the A factors stacked after each
    /// base weight, held once more, one small product per group; on the CPU's own kernel
    /// the same as low-rank), or auto (merged for small layers).
    #[arg(long, default_value = "auto")]
    pub lora_form: LoraForm,
    /// The arithmetic of a step's mask rows (drafts only: the next-token rows, and so
    /// greedy output, are the same either way): exact (the model's dtype), bf16 (on a CPU
    /// with AVX-512 BF16, twice the multiply-adds of the f32 tiles), int8 (on a CPU with
    /// AVX2, an f32 model: the merged weights quantized once more, a quarter of their bytes,
    /// four times the multiply-adds with AVX-512 VNNI, about 1.7 times with AVX2 alone, 2.8
    /// for a model within 64 MiB, whose weights it holds at 32 levels; the
    /// draft chain's head and sampler too), or auto (int8 where it runs, for a model whose
    /// weights exceed 64 MiB only in steps of at least 6 mask rows on an AMD CPU before Zen
    /// 5, 12 on others).
    #[arg(long, default_value = "auto")]
    pub draft_arithmetic: DraftArithmetic,
}

impl AdapterArg {
    /// The adapter's file: `--adapter`, or the demo's own for the demo model.
    pub fn path(&self, source: &ModelSource) -> anyhow::Result<PathBuf> {
        demo_default(source, self.adapter.as_deref(), mtp_core::source::demo_adapter(), "--adapter FILE")
    }

    /// Load the adapter for `model` (from `source`), checking it was made for it.
    pub fn load(&self, source: &ModelSource, model: &Llama) -> anyhow::Result<MtpAdapter> {
        let path = self.path(source)?;
        let check = BaseCheck { model_name: source.to_string(), allow_other_weights: self.allow_other_base };
        match MtpAdapter::load_checked(&path, model, &check) {
            Err(e @ mtp_core::Error::OtherBase(_)) => {
                Err(anyhow::anyhow!("{e}; pass --allow-other-base to load it anyway"))
            }
            other => Ok(other?),
        }
    }

    /// Load the adapter and prepare it for decoding.
    pub fn drafter(&self, source: &ModelSource, model: &Llama) -> anyhow::Result<Drafter> {
        let adapter = self.load(source, model)?;
        let options = DraftOptions {
            draft_vocab: !self.full_vocab_drafts,
            lora: self.lora_form,
            arithmetic: self.draft_arithmetic,
        };
        Ok(Drafter::new(model, &adapter, options)?)
    }
}

/// A count that must be at least 1 (clap value parser).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}
