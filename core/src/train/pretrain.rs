//! Pretraining a small Llama-architecture model from scratch (every weight trained), with an
//! optional byte-level BPE tokenizer trained on the same data first, saved as a Hugging
//! Face folder that `transformers` loads. This is how the built-in demo model is made.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor, nn};

use super::control::Control;
use super::data::{self, DataReport, DataSource, Example, Tokenized};
use super::events::TrainSink;
use super::optim::{OptimConfig, Schedule};
use super::trainer::{FreshRun, LoopConfig, LoopSettings, Objective, Outcome, PreparedData, RunDir, optimize};
use crate::checkpoint::{SINGLE_FILE, save};
use crate::device::{DType, DeviceSpec};
use crate::error::{Error, Result, read_json};
use crate::fsutil::write_json_atomic;
use crate::model::weights::WeightSource;
use crate::model::{Family, Llama, ModelConfig, RopeScaling};
use crate::mtp::loss::LossValues;
use crate::mtp::masks::IGNORE;
use crate::tokenizer::TextTokenizer;

/// The architecture of a model to pretrain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchConfig {
    /// Width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Share the embedding with the LM head.
    pub tie_word_embeddings: bool,
}

impl ArchConfig {
    /// Check the shape before anything is written: positive sizes, key/value heads that
    /// divide the query heads, and a width the query heads divide.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("width", self.hidden_size),
            ("layers", self.num_layers),
            ("query heads", self.num_heads),
            ("key/value heads", self.num_kv_heads),
            ("MLP width", self.intermediate_size),
            ("context", self.max_position_embeddings),
        ];
        crate::error::require_positive(&sizes, "the model's ")?;
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::Invalid(format!(
                "{} key/value heads do not divide {} query heads (each key/value head serves a whole group)",
                self.num_kv_heads, self.num_heads
            )));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(Error::Invalid(format!(
                "{} query heads do not divide the width of {} (each head takes an equal share)",
                self.num_heads, self.hidden_size
            )));
        }
        Ok(())
    }

    /// A named size: `tiny` (tests), `demo` (the built-in model), `small`.
    pub fn preset(name: &str) -> Result<Self> {
        let (hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size) = match name {
            "tiny" => (64, 2, 4, 2, 128),
            "demo" => (256, 6, 8, 4, 704),
            "small" => (512, 8, 8, 4, 1408),
            other => return Err(Error::Invalid(format!("unknown preset `{other}` (tiny, demo, small)"))),
        };
        Ok(Self {
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            intermediate_size,
            max_position_embeddings: 1024,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
        })
    }
}

/// Where the tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenizerPlan {
    /// Train a byte-level BPE tokenizer of this many tokens on the data.
    Train {
        /// Vocabulary size, special tokens included.
        vocab_size: usize,
    },
    /// Use the `tokenizer.json` of this model folder.
    From {
        /// The folder.
        path: PathBuf,
    },
}

/// The recipe of a pretraining run, saved as `pretrain.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    /// Datasets, concatenated.
    pub data: Vec<DataSource>,
    /// Model shape.
    pub arch: ArchConfig,
    /// Tokenizer.
    pub tokenizer: TokenizerPlan,
    /// The optimisation loop (weights in f32 on its device; flattened, as in
    /// [`super::TrainConfig`]).
    #[serde(flatten)]
    pub training: LoopConfig,
}

impl Default for PretrainConfig {
    /// `mtp pretrain`'s: the demo's shape and tokenizer, and a loop for training every
    /// weight from scratch (larger batches and sequences, a higher peak learning rate
    /// with a cosine decay after a longer warmup, weight decay, AdamW's beta2 at 0.95).
    fn default() -> Self {
        Self {
            data: Vec::new(),
            arch: ArchConfig::preset("demo").expect("the demo preset exists"),
            tokenizer: TokenizerPlan::Train { vocab_size: DEFAULT_VOCAB_SIZE },
            training: LoopConfig {
                optim: OptimConfig {
                    lr: 1e-3,
                    warmup: 100,
                    schedule: Schedule::Cosine,
                    weight_decay: 0.1,
                    beta2: 0.95,
                    ..OptimConfig::default()
                },
                steps: 1000,
                batch_size: 16,
                grad_accum: 1,
                seq_len: 256,
                val_fraction: 0.02,
                val_every: 100,
                val_batches: 4,
                checkpoint_every: 100,
                seed: 0,
                device: DeviceSpec::Cpu,
            },
        }
    }
}

/// The vocabulary of a tokenizer trained for a new model (the demo's).
pub const DEFAULT_VOCAB_SIZE: usize = 4096;

/// The end-of-text token of tokenizers this project trains (also used as BOS).
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// Train a byte-level BPE tokenizer on `texts`.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let err = |e: tokenizers::Error| Error::Tokenizer { path: "tokenizer.json".into(), reason: e.to_string() };
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![tokenizers::AddedToken::from(EOS_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, false, true)))
        .with_decoder(Some(ByteLevel::default()));
    let mut wrapped = TrainerWrapper::BpeTrainer(trainer);
    tokenizer.train(&mut wrapped, texts.iter()).map_err(err)?;
    Ok(tokenizer)
}

/// Creates every weight of a new model in a VarStore: norms at 1, everything else normal
/// with standard deviation 0.02 (transformers' `initializer_range` default).
struct InitSource<'a> {
    root: nn::Path<'a>,
}

impl WeightSource for InitSource<'_> {
    fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let mut parts: Vec<&str> = name.split('.').collect();
        let leaf = parts.pop().unwrap_or(name);
        let path = parts.iter().fold(self.root.clone(), |p, c| p / *c);
        let init = if name.ends_with("norm.weight") {
            nn::Init::Const(1.0)
        } else if leaf == "bias" {
            nn::Init::Const(0.0)
        } else {
            nn::Init::Randn { mean: 0.0, stdev: 0.02 }
        };
        Ok(path.var(leaf, shape, init))
    }

    fn frozen(&self) -> bool {
        false
    }
}

/// The next-token objective over all weights.
struct LmObjective<'a> {
    model: &'a Llama,
    vs: &'a nn::VarStore,
}

impl Objective for LmObjective<'_> {
    fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn load_params(&self, lookup: &dyn Fn(&str) -> Result<Tensor>) -> Result<()> {
        for (name, mut t) in self.named_params() {
            let src = lookup(&name)?;
            tch::no_grad(|| t.copy_(&src.to_device(t.device())));
        }
        Ok(())
    }

    fn losses(&self, seqs: &[&Tokenized], grad_scale: Option<f64>, _draw: u64) -> Result<LossValues> {
        let device = self.model.device();
        let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        for s in seqs {
            for i in 0..t {
                ids.push(s.ids.get(i).copied().unwrap_or(0));
                let label = if i + 1 < s.ids.len() && s.loss[i] { s.ids[i + 1] } else { IGNORE };
                labels.push(label);
            }
        }
        let b = seqs.len() as i64;
        let ids = Tensor::from_slice(&ids).view([b, t as i64]).to_device(device);
        let labels = Tensor::from_slice(&labels).to_device(device);
        let logits = self.model.forward(&ids, None).view([b * t as i64, -1]).to_kind(Kind::Float);
        let loss = logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, IGNORE, 0.0);
        let value = f64::try_from(&loss.detach().to_device(tch::Device::Cpu))?;
        if let Some(scale) = grad_scale
            && loss.requires_grad()
        {
            (loss * scale).backward();
        }
        Ok(LossValues { loss: value, loss_base: value, ..LossValues::default() })
    }
}

/// Plain text of an example, for pretraining (every token carries loss). Token ids belong
/// to another model's tokenizer: an error.
fn plain_text(e: &Example, source: &DataSource) -> Result<String> {
    Ok(match e {
        Example::Text { text } => text.clone(),
        Example::PromptCompletion { prompt, completion } => format!("{prompt}{completion}"),
        Example::Chat { messages } => messages.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect(),
        Example::Tokens { .. } => {
            return Err(Error::Invalid(format!("{source} holds token ids (a distilled set): pretraining needs text")));
        }
    })
}

/// What pretraining produced.
#[derive(Debug, Clone)]
pub struct PretrainSummary {
    /// Finished or stopped.
    pub outcome: Outcome,
    /// Last step.
    pub step: usize,
    /// The Hugging Face folder.
    pub model_dir: PathBuf,
    /// The datasets.
    pub data: DataReport,
    /// Parameters of the model.
    pub parameters: u64,
}

/// The recipe file of a pretraining run.
pub fn recipe_path(dir: &Path) -> PathBuf {
    dir.join("pretrain.json")
}

/// Pretrain a model into `out` (the model folder; run files live next to the model files).
/// With `resume`, continues from the newest checkpoint in `out`.
pub fn pretrain(
    config: &PretrainConfig,
    out: &Path,
    resume: bool,
    sink: &mut dyn TrainSink,
    control: &Control,
) -> Result<PretrainSummary> {
    // A new run that fails before its first step leaves the folder as it found it.
    let fresh = (!resume && !recipe_path(out).exists()).then(|| FreshRun::begin(out));
    pretrain_run(config, out, resume, sink, control).inspect_err(|_| {
        if let Some(fresh) = &fresh {
            fresh.discard_if_unstarted();
        }
    })
}

fn pretrain_run(
    config: &PretrainConfig,
    out: &Path,
    resume: bool,
    sink: &mut dyn TrainSink,
    control: &Control,
) -> Result<PretrainSummary> {
    if config.data.is_empty() {
        return Err(Error::Invalid("pretraining needs at least one dataset".into()));
    }
    config.training.validate()?;
    config.arch.validate()?;
    let (seq_len, context) = (config.training.seq_len, config.arch.max_position_embeddings);
    if seq_len > context {
        return Err(Error::Invalid(format!(
            "training sequences of {seq_len} tokens are longer than the model's context of {context} positions"
        )));
    }
    let run = RunDir(out.to_owned());
    if !resume && recipe_path(out).exists() {
        return Err(Error::Invalid(format!(
            "{} already holds a pretraining run: resume it, or choose another folder",
            out.display()
        )));
    }
    std::fs::create_dir_all(run.checkpoints()).map_err(|e| Error::io(run.checkpoints(), e))?;
    write_json_atomic(&recipe_path(out), config)?;
    let device = config.training.device.resolve()?;

    // Data.
    let mut examples = Vec::new();
    let mut report: Option<DataReport> = None;
    for source in &config.data {
        let (ex, rep) = data::read_examples(source, false)?;
        for e in &ex {
            examples.push(plain_text(e, source)?);
        }
        report = Some(match report {
            None => rep,
            Some(r) => r.merge(rep),
        });
    }
    let report = report.ok_or_else(|| Error::Invalid("no data".into()))?;

    // Tokenizer: trained once (a resumed run reuses the saved one).
    let tok_path = out.join("tokenizer.json");
    let inner = match (&config.tokenizer, resume && tok_path.exists()) {
        (_, true) | (TokenizerPlan::From { .. }, _) => {
            let path = match &config.tokenizer {
                TokenizerPlan::From { path } if !(resume && tok_path.exists()) => path.join("tokenizer.json"),
                _ => tok_path.clone(),
            };
            tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer { path, reason: e.to_string() })?
        }
        (TokenizerPlan::Train { vocab_size }, false) => {
            let (train_texts, _) = data::split(&examples, config.training.val_fraction, config.training.seed);
            train_tokenizer(&train_texts, *vocab_size)?
        }
    };
    inner.save(&tok_path, true).map_err(|e| Error::Tokenizer { path: tok_path.clone(), reason: e.to_string() })?;
    let eos_id = inner.token_to_id(EOS_TOKEN).map(i64::from);
    let eos = eos_id.map(|id| (EOS_TOKEN.to_string(), id));
    let tok = TextTokenizer::from_parts(inner, eos.clone(), eos.clone());

    let tokenized: Vec<Tokenized> =
        examples.iter().map(|t| data::tokenize(&Example::Text { text: t.clone() }, &tok)).collect::<Result<_>>()?;
    let (train, val) = data::split(&tokenized, config.training.val_fraction, config.training.seed);
    let prepared = PreparedData {
        train: data::pack(&train, config.training.seq_len),
        val: data::pack(&val, config.training.seq_len),
        report,
    };
    if prepared.train.is_empty() {
        return Err(Error::Invalid("the data gives no training sequence".into()));
    }

    // Model.
    let a = &config.arch;
    let model_config = ModelConfig {
        family: Family::Llama,
        vocab_size: tok.vocab_size(),
        hidden_size: a.hidden_size,
        intermediate_size: a.intermediate_size,
        num_layers: a.num_layers,
        num_heads: a.num_heads,
        num_kv_heads: a.num_kv_heads,
        head_dim: a.hidden_size / a.num_heads.max(1),
        max_position_embeddings: a.max_position_embeddings,
        rms_norm_eps: 1e-5,
        rope_theta: a.rope_theta,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: a.tie_word_embeddings,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        sliding_window: None,
        bos_token_id: eos_id,
        eos_token_ids: eos_id.into_iter().collect(),
    };
    // Validate the shape through the same checks a loaded config.json gets.
    let model_config =
        crate::model::HfConfig::from_value(model_config.to_hf_json())?.validate(&out.join("config.json"))?;
    let vs = nn::VarStore::new(device);
    let model = crate::device::seeded(config.training.seed, || {
        Llama::load(model_config.clone(), &InitSource { root: vs.root() }, DType::F32, device)
    })?;
    let parameters = vs.trainable_variables().iter().map(|t| t.numel() as u64).sum();

    let settings = LoopSettings {
        config: config.training.clone(),
        device,
        checkpointing: false,
        memory_estimate: None,
        measure_every: 0,
    };
    let objective = LmObjective { model: &model, vs: &vs };
    let (outcome, step, _) = optimize(&objective, &prepared, &settings, &run, resume, sink, control)?;

    save_hf_folder(out, &model_config, &objective.named_params())?;
    Ok(PretrainSummary { outcome, step, model_dir: out.to_owned(), data: prepared.report, parameters })
}

/// Write config.json, model.safetensors, tokenizer_config.json and generation_config.json
/// (tokenizer.json is already there).
fn save_hf_folder(dir: &Path, config: &ModelConfig, params: &[(String, Tensor)]) -> Result<()> {
    let mut hf = config.to_hf_json();
    hf["torch_dtype"] = "float32".into();
    write_json_atomic(&dir.join("config.json"), &hf)?;
    save(&dir.join(SINGLE_FILE), params, None)?;
    let tok_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    write_json_atomic(&dir.join("tokenizer_config.json"), &tok_config)?;
    let generation = serde_json::json!({
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids.first(),
    });
    write_json_atomic(&dir.join("generation_config.json"), &generation)
}

/// Read a pretraining recipe.
pub fn read_recipe(dir: &Path) -> Result<PretrainConfig> {
    read_json(&recipe_path(dir))
}
