//! A model ready to use: resolved folder, weights on a device, tokenizer.

use std::path::{Path, PathBuf};

use crate::device::{DType, DeviceSpec};
use crate::error::Result;
use crate::model::Llama;
use crate::source::{DownloadProgress, HubOptions, ModelSource};
use crate::tokenizer::TextTokenizer;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where computation happens.
    pub device: DeviceSpec,
    /// The precision weights and activations use.
    pub dtype: DType,
    /// How to reach the hub for hub sources.
    pub hub: HubOptions,
    /// Record decoding steps as CUDA graphs and replay them (on a CUDA device in a build that
    /// has them; elsewhere the steps run as usual whatever this says;
    /// [`Llama::set_cuda_graphs`]). On by default: on an H200 graphed AR decoding ran 6.2x
    /// (SmolLM2-135M shape) and 1.7x (Llama-3.1-8B shape) the eager steps' speed, with the
    /// same tokens (docs/BENCHMARKS.md, 2026-12-04).
    pub cuda_graphs: bool,
    /// Variables the chat template reads besides the conversation (Qwen3's
    /// `enable_thinking`, Llama 3.x's `date_string`).
    pub template_vars: crate::tokenizer::TemplateVars,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            dtype: DType::F32,
            hub: HubOptions::from_env(),
            cuda_graphs: true,
            template_vars: Default::default(),
        }
    }
}

/// A loaded model and its tokenizer.
pub struct LoadedModel {
    /// Where it came from.
    pub source: ModelSource,
    /// Its local folder.
    pub dir: PathBuf,
    /// The network.
    pub model: Llama,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
}

impl LoadedModel {
    /// Resolve `source` (downloading when needed) and load it.
    pub fn load(source: &ModelSource, options: &LoadOptions, progress: &mut dyn DownloadProgress) -> Result<Self> {
        let dir = source.resolve(&options.hub, progress)?;
        let mut loaded = Self::from_folder(&dir, options)?;
        loaded.source = source.clone();
        Ok(loaded)
    }

    /// Load the model folder `dir`.
    pub fn from_folder(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let device = options.device.resolve()?;
        let mut model = Llama::from_folder(dir, options.dtype, device)?;
        model.set_cuda_graphs(options.cuda_graphs);
        let mut tokenizer = TextTokenizer::from_folder(dir, model.config.bos_token_id, &model.config.eos_token_ids)?;
        tokenizer.set_template_vars(options.template_vars.clone());
        Ok(Self { source: ModelSource::Local { path: dir.to_owned() }, dir: dir.to_owned(), model, tokenizer })
    }
}
