//! The MTP training loop: data prepared once, AdamW on the adapter's trainable parameters
//! only, metrics every step (sink + `metrics.jsonl`), validation, atomic checkpoints, and
//! resumption that reproduces an uninterrupted run.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::control::Control;
use super::data::{self, DataReport, DataSource, Tokenized};
use super::events::{Split, StepMetrics, TrainEvent, TrainSink};
use super::memory::{MemoryInputs, estimate};
use super::optim::{AdamW, OptimConfig};
use crate::bundle::LoadedModel;
use crate::checkpoint::{SafetensorsFile, save};
use crate::device::{DType, DeviceSpec, device_memory, gpu_memory_used};
use crate::error::{Error, Result, read_json};
use crate::fsutil::write_json_atomic;
use crate::mtp::loss::{Lcm, LcmReduction, LossValues, backward_checkpointed, compute};
use crate::mtp::masks::with_noise;
use crate::mtp::{MtpAdapter, MtpConfig, Recipe, build_layout, collate};
use crate::source::ModelSource;

/// How examples become fixed-length sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// Concatenate examples and cut the stream every `seq_len` tokens.
    #[default]
    Pack,
    /// One example per sequence, cut at `seq_len`.
    Truncate,
}

/// The optimisation loop's recipe, shared by MTP training ([`TrainConfig`]) and pretraining
/// ([`super::pretrain::PretrainConfig`]); each command's defaults are its recipe's
/// `Default`, which the CLI and the GUI show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopConfig {
    /// Optimizer and learning-rate schedule.
    pub optim: OptimConfig,
    /// Optimizer steps in total.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Tokens per training sequence (for MTP training: before mask blocks).
    pub seq_len: usize,
    /// Share of examples held out for validation.
    pub val_fraction: f64,
    /// Validate every this many steps (0 = never, except at the end).
    pub val_every: usize,
    /// Most validation micro-batches per pass (pretraining recipes recorded before it was
    /// a field used 4).
    #[serde(default = "default_val_batches")]
    pub val_batches: usize,
    /// Checkpoint every this many steps (and always at the end or on stop).
    pub checkpoint_every: usize,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Where to train.
    pub device: DeviceSpec,
}

fn default_val_batches() -> usize {
    4
}

impl Default for LoopConfig {
    /// MTP training's: the paper's learning rate, constant after a short warmup.
    fn default() -> Self {
        Self {
            optim: OptimConfig::default(),
            steps: 200,
            batch_size: 4,
            grad_accum: 1,
            seq_len: 128,
            val_fraction: 0.05,
            val_every: 50,
            val_batches: default_val_batches(),
            checkpoint_every: 50,
            seed: 0,
            device: DeviceSpec::Cpu,
        }
    }
}

impl LoopConfig {
    /// Check the ranges every loop needs.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("steps", self.steps),
            ("batch size", self.batch_size),
            ("grad accumulation", self.grad_accum),
            ("checkpoint interval", self.checkpoint_every),
        ];
        crate::error::require_positive(&positive, "")?;
        if self.seq_len < 2 {
            return Err(Error::Invalid("sequence length must be at least 2".into()));
        }
        if !(0.0..0.9).contains(&self.val_fraction) {
            return Err(Error::Invalid(format!("validation fraction must be in [0, 0.9), got {}", self.val_fraction)));
        }
        if !(self.optim.lr > 0.0 && self.optim.lr.is_finite()) {
            return Err(Error::Invalid(format!("learning rate must be > 0, got {}", self.optim.lr)));
        }
        Ok(())
    }
}

/// The full recipe of a run, saved as `config.json` before step 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The base model.
    pub model: ModelSource,
    /// The dataset.
    pub data: DataSource,
    /// Fail on the first malformed dataset line instead of skipping it.
    pub strict_data: bool,
    /// The method: k, LoRA, gate, sampler, mask embeddings.
    pub method: MtpConfig,
    /// Weight of the latent-consistency loss.
    pub lcm_weight: f64,
    /// How the latent-consistency loss reduces over the hidden width (runs recorded before
    /// it was chosen summed).
    #[serde(default)]
    pub lcm_reduction: LcmReduction,
    /// The optimisation loop: steps, batches, optimizer, validation, checkpoints, seed,
    /// device (flattened: `config.json` keeps one level, as runs recorded before it was
    /// split out wrote it).
    #[serde(flatten)]
    pub training: LoopConfig,
    /// Packing or truncation.
    pub packing: Packing,
    /// Base model precision (the trainable parts and optimizer state stay f32).
    pub dtype: DType,
    /// Size of the draft vocabulary stored with the adapter: the most frequent target
    /// tokens of the training data, which drafting may restrict the sampler's chain to
    /// (0: none).
    #[serde(default)]
    pub draft_vocab: usize,
    /// Recompute each layer's activations in the backward pass instead of keeping them.
    #[serde(default)]
    pub checkpointing: Checkpointing,
    /// Every this many validation passes (and at the end), measure tokens per forward by
    /// decoding a few held-out prompts at 1..k masks (0 = never).
    #[serde(default = "default_measure_every")]
    pub measure_every: usize,
    /// Variables the chat template reads besides the conversation, as the data is rendered
    /// with them (runs recorded before had none).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub chat_template_vars: crate::tokenizer::TemplateVars,
}

fn default_measure_every() -> usize {
    4
}

/// Held-out prompts decoded by each acceptance measurement.
const MEASURE_PROMPTS: usize = 8;
/// Tokens each of them is continued by (at most: an answer stops at its end), as many as
/// `mtp bench` generates by default, whose numbers the measurement is read against.
const MEASURE_TOKENS: usize = 64;
/// The longest prompt a measurement feeds (the end of a longer context is kept).
const MEASURE_PROMPT_TOKENS: usize = 64;
/// The shortest context a measurement prefers (see [`measure_prompts`]).
const MEASURE_MIN_CONTEXT: usize = 32;

/// Activation checkpointing: keep only each layer's input in the forward pass and
/// recompute the layer in the backward pass (about a third more compute, a fraction of
/// the activation memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Checkpointing {
    /// On when the memory estimate without it exceeds the device's memory.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

impl Checkpointing {
    /// On or off for a run whose estimate without checkpointing is `plain` bytes, on a
    /// device with `available()` bytes (asked only for `Auto`; unknown means off).
    pub fn resolve(self, plain: u64, available: impl FnOnce() -> Option<u64>) -> bool {
        match self {
            Checkpointing::On => true,
            Checkpointing::Off => false,
            Checkpointing::Auto => available().is_some_and(|bytes| plain > bytes),
        }
    }
}

impl std::str::FromStr for Checkpointing {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Checkpointing::Auto),
            "on" | "true" | "yes" => Ok(Checkpointing::On),
            "off" | "false" | "no" => Ok(Checkpointing::Off),
            other => Err(Error::Invalid(format!("unknown checkpointing `{other}` (auto, on or off)"))),
        }
    }
}

impl std::fmt::Display for Checkpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Checkpointing::Auto => "auto",
            Checkpointing::On => "on",
            Checkpointing::Off => "off",
        })
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: ModelSource::Demo,
            data: DataSource::Builtin { set: data::BuiltinSet::Arith, examples: data::BUILTIN_EXAMPLES, seed: 0 },
            strict_data: false,
            method: MtpConfig::default(),
            lcm_weight: DEFAULT_LCM_WEIGHT,
            lcm_reduction: LcmReduction::Mean,
            training: LoopConfig::default(),
            packing: Packing::Pack,
            dtype: DType::F32,
            draft_vocab: DEFAULT_DRAFT_VOCAB,
            checkpointing: Checkpointing::Auto,
            measure_every: default_measure_every(),
            chat_template_vars: Default::default(),
        }
    }
}

/// The weight of the latent-consistency loss, averaged over the width: 5, the demo's 0.02
/// with the sum over its 256 dimensions (0.02 x 256 = 5.1), the weight its adapter was
/// chosen with, and about as large as one cross-entropy term at any width.
pub const DEFAULT_LCM_WEIGHT: f64 = 5.0;

/// The draft vocabulary stored with a new adapter, in tokens.
pub const DEFAULT_DRAFT_VOCAB: usize = 4096;

impl TrainConfig {
    /// Check the ranges.
    pub fn validate(&self) -> Result<()> {
        self.method.validate()?;
        self.training.validate()?;
        if !(self.lcm_weight >= 0.0 && self.lcm_weight.is_finite()) {
            return Err(Error::Invalid(format!("LCM weight must be >= 0, got {}", self.lcm_weight)));
        }
        Ok(())
    }
}

/// Files of a run folder.
#[derive(Debug, Clone)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// The recipe.
    pub fn config(&self) -> PathBuf {
        self.0.join("config.json")
    }
    /// One JSON object per step and validation pass.
    pub fn metrics(&self) -> PathBuf {
        self.0.join("metrics.jsonl")
    }
    /// Checkpoint folder.
    pub fn checkpoints(&self) -> PathBuf {
        self.0.join("checkpoints")
    }
    /// The final trainable weights.
    pub fn adapter(&self) -> PathBuf {
        self.0.join("adapter.safetensors")
    }
    /// The checkpoint file of `step`.
    pub fn checkpoint(&self, step: usize) -> PathBuf {
        self.checkpoints().join(format!("step-{step:07}.safetensors"))
    }
    /// The newest checkpoint and its step.
    pub fn latest_checkpoint(&self) -> Option<(usize, PathBuf)> {
        let entries = std::fs::read_dir(self.checkpoints()).ok()?;
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let name = p.file_name()?.to_str()?;
                let step = name.strip_prefix("step-")?.strip_suffix(".safetensors")?.parse().ok()?;
                Some((step, p))
            })
            .max_by_key(|(s, _)| *s)
    }
}

/// Checkpoints kept on disk (older ones are removed).
const KEEP_CHECKPOINTS: usize = 2;

/// Where training is in the data and the schedule; saved in every checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Current epoch over the training sequences.
    pub epoch: u64,
    /// Next sequence within the epoch's order.
    pub position: usize,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// All steps done.
    Finished,
    /// Stopped on request after a checkpoint.
    Stopped,
}

impl std::fmt::Display for Outcome {
    /// "finished" or "stopped".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Finished => "finished",
            Outcome::Stopped => "stopped",
        })
    }
}

/// The result of [`train`].
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Finished or stopped.
    pub outcome: Outcome,
    /// The last completed step.
    pub step: usize,
    /// `adapter.safetensors`.
    pub adapter: PathBuf,
    /// The last training metrics.
    pub last: Option<StepMetrics>,
}

/// Training and validation sequences with the dataset report.
pub struct PreparedData {
    /// Training sequences.
    pub train: Vec<Tokenized>,
    /// Validation sequences.
    pub val: Vec<Tokenized>,
    /// What the dataset held.
    pub report: DataReport,
}

/// Read, tokenize, split and pack the dataset of `config`.
pub fn prepare_data(config: &TrainConfig, loaded: &LoadedModel) -> Result<PreparedData> {
    let (examples, report) = data::read_examples(&config.data, config.strict_data)?;
    let (train_ex, val_ex) = data::split(&examples, config.training.val_fraction, config.training.seed);
    // Conversations rendered with the recipe's template variables, whatever the model was
    // loaded with (a run resumed renders as it started).
    let tokenizer = if loaded.tokenizer.template_vars() == &config.chat_template_vars {
        std::borrow::Cow::Borrowed(&loaded.tokenizer)
    } else {
        let mut tokenizer = loaded.tokenizer.clone();
        tokenizer.set_template_vars(config.chat_template_vars.clone());
        std::borrow::Cow::Owned(tokenizer)
    };
    // Ids given directly (a distilled set) must fit this model's embedding table.
    let tokenize = |exs: &[data::Example]| -> Result<Vec<Tokenized>> {
        exs.iter()
            .map(|e| {
                let t = data::tokenize(e, &tokenizer)?;
                loaded.model.check_ids(&t.ids).map_err(|err| {
                    Error::Invalid(format!("dataset {}: {err} (token ids written for another model?)", config.data))
                })?;
                Ok(t)
            })
            .collect()
    };
    let shape = |t: Vec<Tokenized>| match config.packing {
        Packing::Pack => data::pack(&t, config.training.seq_len),
        Packing::Truncate => data::truncate(&t, config.training.seq_len),
    };
    let train = shape(tokenize(&train_ex)?);
    let val = shape(tokenize(&val_ex)?);
    if train.is_empty() {
        return Err(Error::Invalid(format!(
            "dataset {} gives no training sequence of {} tokens with a target",
            config.data, config.training.seq_len
        )));
    }
    let vocab = loaded.model.config.vocab_size as i64;
    if let Some(bad) = train.iter().chain(&val).flat_map(|t| &t.ids).find(|&&id| id >= vocab) {
        return Err(Error::TokenId { id: *bad, vocab: vocab as usize });
    }
    Ok(PreparedData { train, val, report })
}

/// The sequence stream over epochs.
struct Batches<'a> {
    seqs: &'a [Tokenized],
    seed: u64,
    state: TrainState,
    order: Vec<usize>,
}

impl<'a> Batches<'a> {
    fn new(seqs: &'a [Tokenized], seed: u64, state: TrainState) -> Self {
        let order = data::epoch_order(seqs.len(), seed, state.epoch);
        Self { seqs, seed, state, order }
    }

    fn next(&mut self, n: usize) -> Vec<&'a Tokenized> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.state.position >= self.order.len() {
                self.state.epoch += 1;
                self.state.position = 0;
                self.order = data::epoch_order(self.seqs.len(), self.seed, self.state.epoch);
            }
            out.push(&self.seqs[self.order[self.state.position]]);
            self.state.position += 1;
        }
        out
    }
}

/// Build the device batch of some sequences.
fn batch_of(seqs: &[&Tokenized], k: usize, device: Device) -> crate::mtp::MtpLayout {
    let layouts: Vec<_> = seqs
        .iter()
        .map(|s| {
            let ids = Tensor::from_slice(&s.ids);
            let loss = Tensor::from_slice(&s.loss);
            build_layout(&ids, &loss, k as i64)
        })
        .collect();
    collate(&layouts, device)
}

/// Mean of loss values over micro-batches.
fn mean_values(values: &[LossValues]) -> LossValues {
    let n = values.len().max(1) as f64;
    let k = values.first().map_or(0, |v| v.slot_acc.len());
    let avg = |f: &dyn Fn(&LossValues) -> f64| values.iter().map(f).sum::<f64>() / n;
    LossValues {
        loss: avg(&|v| v.loss),
        loss_base: avg(&|v| v.loss_base),
        loss_sampler: avg(&|v| v.loss_sampler),
        loss_lcm: avg(&|v| v.loss_lcm),
        slot_acc: (0..k).map(|j| avg(&|v| v.slot_acc[j])).collect(),
        slot_acc_sampler: (0..k).map(|j| avg(&|v| v.slot_acc_sampler[j])).collect(),
    }
}

/// Metadata key of a checkpoint's [`TrainState`].
const META_STATE: &str = "train_state";

/// Write a checkpoint of `params` (all of the model's own parameters, trainable or not),
/// the optimizer's moments and `state`, atomically; keep only the newest few.
pub(crate) fn save_checkpoint(
    run: &RunDir,
    params: &[(String, Tensor)],
    opt: &AdamW,
    state: TrainState,
) -> Result<PathBuf> {
    let mut tensors: Vec<(String, Tensor)> =
        params.iter().map(|(n, t)| (format!("params.{n}"), t.shallow_clone())).collect();
    tensors.extend(opt.state().into_iter().map(|(n, t)| (format!("optim.{n}"), t)));
    let meta = HashMap::from([
        (META_STATE.to_string(), serde_json::to_string(&state).map_err(|e| Error::Invalid(e.to_string()))?),
        ("adam_steps".to_string(), opt.steps.to_string()),
    ]);
    let path = run.checkpoint(state.step);
    save(&path, &tensors, Some(meta))?;
    // Keep the newest few.
    if let Ok(entries) = std::fs::read_dir(run.checkpoints()) {
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        for old in files.iter().rev().skip(KEEP_CHECKPOINTS) {
            let _ = std::fs::remove_file(old);
        }
    }
    Ok(path)
}

/// Restore a checkpoint written by [`save_checkpoint`]: parameters (through `load`, which
/// receives a lookup by name), optimizer moments, and the state.
pub(crate) fn load_checkpoint(
    path: &Path,
    load: impl FnOnce(&dyn Fn(&str) -> Result<Tensor>) -> Result<()>,
    opt: &mut AdamW,
) -> Result<TrainState> {
    let file = SafetensorsFile::open(path)?;
    let meta = file.metadata().ok_or_else(|| Error::config(path, META_STATE, "missing"))?;
    let state: TrainState = meta
        .get(META_STATE)
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| Error::config(path, META_STATE, "missing or unreadable"))?;
    let adam_steps = meta.get("adam_steps").and_then(|s| s.parse().ok()).unwrap_or(state.step as u64);
    load(&|name: &str| file.read(&format!("params.{name}")))?;
    opt.restore(adam_steps, |name| file.read(&format!("optim.{name}")))?;
    Ok(state)
}

/// Append-only `metrics.jsonl`.
pub(crate) struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    /// Open for appending; on resume from `keep_through`, drop lines of later steps first
    /// (they belong to the run that was cut short and will be recomputed).
    fn open(path: &Path, keep_through: Option<usize>) -> Result<Self> {
        if let Some(last) = keep_through
            && path.exists()
        {
            let text = crate::error::read_to_string(path)?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                        .is_some_and(|s| s as usize <= last)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            crate::fsutil::write_atomic(path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self { file, path: path.to_owned() })
    }

    fn append(&mut self, m: &StepMetrics) -> Result<()> {
        let line = serde_json::to_string(m).map_err(|source| Error::Json { path: self.path.clone(), source })?;
        writeln!(self.file, "{line}").and_then(|()| self.file.flush()).map_err(|e| Error::io(&self.path, e))
    }
}

/// Read `metrics.jsonl` of a run.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<StepMetrics>> {
    read_metrics_file(&RunDir(run_dir.to_owned()).metrics())
}

/// The lines of a metrics file (a run's `metrics.jsonl`, or a copy kept beside its adapter).
pub fn read_metrics_file(path: &Path) -> Result<Vec<StepMetrics>> {
    let path = path.to_owned();
    let text = crate::error::read_to_string(&path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|source| Error::Json { path: path.clone(), source }))
        .collect()
}

/// Start a new run in `run_dir` (which must not hold one already).
pub fn train(
    loaded: &LoadedModel,
    config: &TrainConfig,
    run_dir: &Path,
    sink: &mut dyn TrainSink,
    control: &Control,
) -> Result<TrainSummary> {
    config.validate()?;
    let run = RunDir(run_dir.to_owned());
    if run.config().exists() {
        return Err(Error::Invalid(format!(
            "{} already holds a run: resume it, or choose another folder",
            run_dir.display()
        )));
    }
    let fresh = FreshRun::begin(run_dir);
    let started = std::fs::create_dir_all(run.checkpoints())
        .map_err(|e| Error::io(run.checkpoints(), e))
        .and_then(|()| write_json_atomic(&run.config(), config))
        .and_then(|()| run_loop(loaded, config, &run, false, sink, control));
    started.inspect_err(|_| fresh.discard_if_unstarted())
}

/// What a new run's folder held before the run began, so that a run that fails before its
/// first step (no usable data, a bad recipe found late) leaves nothing behind: a retry
/// with other settings would otherwise find "a run" there, and resuming it would fail
/// again the same way.
pub(crate) struct FreshRun {
    dir: PathBuf,
    existed: bool,
    entries: std::collections::HashSet<std::ffi::OsString>,
}

impl FreshRun {
    /// Note what `dir` holds now.
    pub(crate) fn begin(dir: &Path) -> Self {
        let entries = std::fs::read_dir(dir)
            .map(|it| it.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
            .unwrap_or_default();
        Self { dir: dir.to_owned(), existed: dir.exists(), entries }
    }

    /// When no step was recorded and no checkpoint written, remove what the run added
    /// (files, and folders it made), and the folder itself if the run made it and it is
    /// empty; a run that got further is kept for `--resume`.
    pub(crate) fn discard_if_unstarted(&self) {
        let run = RunDir(self.dir.clone());
        let stepped = std::fs::metadata(run.metrics()).is_ok_and(|m| m.len() > 0);
        if stepped || run.latest_checkpoint().is_some() {
            return;
        }
        let Ok(now) = std::fs::read_dir(&self.dir) else { return };
        for entry in now.filter_map(|e| e.ok()).filter(|e| !self.entries.contains(&e.file_name())) {
            let path = entry.path();
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            if let Err(e) = removed {
                tracing::warn!("could not remove {} after the run failed: {e}", path.display());
            }
        }
        if !self.existed {
            // Only if empty: `remove_dir` refuses otherwise.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Continue the run in `run_dir` from its newest checkpoint, up to `steps` in total (or
/// the steps of its recipe). Returns the recipe too, with the new step count.
pub fn resume(
    loaded: &LoadedModel,
    run_dir: &Path,
    steps: Option<usize>,
    sink: &mut dyn TrainSink,
    control: &Control,
) -> Result<(TrainConfig, TrainSummary)> {
    let run = RunDir(run_dir.to_owned());
    let mut config: TrainConfig = read_json(&run.config())?;
    if let Some(s) = steps {
        config.training.steps = s;
        write_json_atomic(&run.config(), &config)?;
    }
    config.validate()?;
    let summary = run_loop(loaded, &config, &run, true, sink, control)?;
    Ok((config, summary))
}

/// Read a run's recipe.
pub fn read_config(run_dir: &Path) -> Result<TrainConfig> {
    read_json(&RunDir(run_dir.to_owned()).config())
}

/// What the optimisation loop needs to know about the thing being trained.
pub(crate) trait Objective {
    /// Every parameter to checkpoint (trainable or not), sorted by name.
    fn named_params(&self) -> Vec<(String, Tensor)>;
    /// Overwrite the parameters from a checkpoint.
    fn load_params(&self, lookup: &dyn Fn(&str) -> Result<Tensor>) -> Result<()>;
    /// The loss values of one micro-batch; with `grad_scale`, also accumulate the
    /// gradients of `grad_scale * loss` (a batch without any labelled row has none).
    /// `draw` numbers the micro-batch within the run (the same on resumption): what random
    /// inputs it needs are drawn from it.
    fn losses(&self, seqs: &[&Tokenized], grad_scale: Option<f64>, draw: u64) -> Result<LossValues>;
    /// Tokens per forward at each mask count that validation values `v` predict.
    fn expected_acceptance(&self, _v: &LossValues) -> Option<Vec<f64>> {
        None
    }
    /// Tokens per forward at each mask count, measured by decoding `prompts`.
    fn measured_acceptance(&self, _prompts: &[Vec<i64>]) -> Result<Option<Vec<f64>>> {
        Ok(None)
    }
}

/// What the optimisation loop runs with: the recipe's loop, resolved for this run.
#[derive(Debug, Clone)]
pub(crate) struct LoopSettings {
    pub config: LoopConfig,
    /// The device the recipe's names, resolved.
    pub device: Device,
    pub checkpointing: bool,
    pub memory_estimate: Option<u64>,
    /// Every this many validation passes, measure acceptance (0: never).
    pub measure_every: usize,
}

/// The MTP objective: the adapted model's three losses.
struct MtpObjective<'a> {
    model: &'a crate::model::Llama,
    adapter: &'a MtpAdapter,
    lcm: Lcm,
    checkpointing: bool,
    /// The run's seed (UNO's noise is drawn from it).
    seed: u64,
}

impl Objective for MtpObjective<'_> {
    fn named_params(&self) -> Vec<(String, Tensor)> {
        self.adapter.named_tensors()
    }
    fn load_params(&self, lookup: &dyn Fn(&str) -> Result<Tensor>) -> Result<()> {
        self.adapter.load_tensors(lookup).map(drop)
    }
    fn losses(&self, seqs: &[&Tokenized], grad_scale: Option<f64>, draw: u64) -> Result<LossValues> {
        let batch = batch_of(seqs, self.adapter.config.k, self.model.device());
        // UNO: mask rows read random ids, fresh for every block, drawn from the run's seed
        // and the micro-batch's number (so a resumed run draws what an uninterrupted one did).
        let batch = match self.adapter.config.recipe {
            Recipe::Uno => {
                let mut rng = StdRng::seed_from_u64(self.seed ^ draw.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                with_noise(batch, &mut rng, self.model.config.vocab_size)
            }
            Recipe::Paper => batch,
        };
        match grad_scale {
            Some(scale) if self.checkpointing => {
                backward_checkpointed(self.model, self.adapter, &batch, self.lcm, scale).values()
            }
            _ => {
                let l = compute(self.model, self.adapter, &batch, self.lcm);
                if let Some(scale) = grad_scale
                    && l.total.requires_grad()
                {
                    (&l.total * scale).backward();
                }
                l.values()
            }
        }
    }

    fn expected_acceptance(&self, v: &LossValues) -> Option<Vec<f64>> {
        // The drafts come from the sampler when the adapter has one, else the LM head.
        let acc = if self.adapter.config.sampler { &v.slot_acc_sampler } else { &v.slot_acc };
        Some(super::events::expected_tokens_per_forward(acc))
    }

    fn measured_acceptance(&self, prompts: &[Vec<i64>]) -> Result<Option<Vec<f64>>> {
        use crate::decode::{Decoding, DraftOptions, Drafter, GenerateRequest, MaskCount, Mode, Strategy, generate};
        if prompts.is_empty() {
            return Ok(None);
        }
        let drafter = tch::no_grad(|| Drafter::new(self.model, self.adapter, DraftOptions::default()))?;
        let mut per_masks = Vec::with_capacity(self.adapter.config.k);
        for m in 1..=self.adapter.config.k {
            let strategy = Strategy::new(Mode::Quadratic, Some(&drafter), MaskCount::Fixed(m))?;
            let (mut tokens, mut forwards) = (0, 0);
            for prompt in prompts {
                // To the end of the answer, as decoding runs in use: what follows it in a
                // packed sequence (the next example's prompt) is no target of training.
                let req = GenerateRequest {
                    prompt_ids: prompt.clone(),
                    max_new_tokens: MEASURE_TOKENS,
                    decoding: Decoding::Greedy,
                    eos_ids: self.model.config.eos_token_ids.clone(),
                };
                let out = generate(self.model, strategy, &req, &mut ())?;
                tokens += out.token_ids.len();
                forwards += out.forwards;
            }
            per_masks.push(tokens as f64 / forwards.max(1) as f64);
        }
        Ok(Some(per_masks))
    }
}

/// Up to [`MEASURE_PROMPTS`] prompts from validation sequences, what the model continues:
/// each one's context up to the start of a run of targets (an answer's first token; in
/// plain text, where every token is a target, the window's first [`MEASURE_MIN_CONTEXT`]
/// tokens), at most its last [`MEASURE_PROMPT_TOKENS`] tokens. A packed window often begins
/// inside an answer, and its first target then follows a token or two: such windows are
/// used only when too few others have a run that starts after [`MEASURE_MIN_CONTEXT`]
/// tokens. (Continued from a one-token prompt a model writes what no answer looks like: with
/// 4 such prompts of 32 tokens the demo adapter measured 1.94 tokens per forward at 4 masks,
/// with 8 of these of 64 tokens 2.75, and 2.82 on the benchmark prompts, 64 tokens each.)
fn measure_prompts(val: &[Tokenized]) -> Vec<Vec<i64>> {
    let prompt = |t: &Tokenized, end: usize| t.ids[(end + 1).saturating_sub(MEASURE_PROMPT_TOKENS)..=end].to_vec();
    let (mut prompts, mut short) = (Vec::new(), Vec::new());
    for t in val {
        // Plain text up to here: every position before the first non-target.
        let text_until = t.loss.iter().position(|&l| !l).unwrap_or(t.loss.len());
        let starts = (MEASURE_MIN_CONTEXT - 1..t.loss.len()).find(|&i| t.loss[i] && (i < text_until || !t.loss[i - 1]));
        match starts {
            Some(end) => prompts.push(prompt(t, end)),
            None => short.extend(t.loss.iter().position(|&l| l).map(|first| (t, first))),
        }
        if prompts.len() == MEASURE_PROMPTS {
            return prompts;
        }
    }
    let missing = MEASURE_PROMPTS - prompts.len();
    prompts.extend(short.into_iter().take(missing).map(|(t, first)| prompt(t, first)));
    prompts
}

fn run_loop(
    loaded: &LoadedModel,
    config: &TrainConfig,
    run: &RunDir,
    resuming: bool,
    sink: &mut dyn TrainSink,
    control: &Control,
) -> Result<TrainSummary> {
    let model = &loaded.model;
    // Mask j after token i sits at position i + j: a sequence needs k positions beyond it.
    let (seq_len, k, context) = (config.training.seq_len, config.method.k, model.config.context_length());
    if seq_len + k > context {
        return Err(Error::Invalid(format!(
            "training sequences of {seq_len} tokens with {k} masks reach position {} but the model's context is \
             {context} positions: use sequences of at most {} tokens",
            seq_len + k - 1,
            context.saturating_sub(k)
        )));
    }
    let data = prepare_data(config, loaded)?;
    let mut adapter = crate::device::seeded(config.training.seed, || {
        MtpAdapter::new(model, config.method.clone(), &loaded.source.to_string())
    })?;
    adapter.draft_vocab = data::frequent_targets(&data.train, config.draft_vocab, model.config.vocab_size);
    let (checkpointing, memory_estimate) = plan_memory(config, loaded)?;
    let lcm = Lcm { weight: config.lcm_weight, reduction: config.lcm_reduction };
    let objective = MtpObjective { model, adapter: &adapter, lcm, checkpointing, seed: config.training.seed };
    let settings = LoopSettings {
        config: config.training.clone(),
        device: model.device(),
        checkpointing,
        memory_estimate: Some(memory_estimate),
        measure_every: config.measure_every,
    };
    let (outcome, step, last) = optimize(&objective, &data, &settings, run, resuming, sink, control)?;
    adapter.save(&run.adapter())?;
    Ok(TrainSummary { outcome, step, adapter: run.adapter(), last })
}

/// Whether the run checkpoints activations (`auto`: when the estimate without it exceeds
/// the device's memory) and the memory estimate with that choice.
fn plan_memory(config: &TrainConfig, loaded: &LoadedModel) -> Result<(bool, u64)> {
    let info = crate::inspect::ModelInfo::from_folder(&loaded.dir)?;
    let inputs = |checkpointing| MemoryInputs {
        k: config.method.k,
        lora: &config.method.lora,
        sampler: config.method.sampler,
        batch_size: config.training.batch_size,
        seq_len: config.training.seq_len,
        dtype: config.dtype,
        checkpointing,
        device: config.training.device,
    };
    let plain = estimate(&info, &loaded.model.config, &inputs(false)).total();
    let checkpointing = config.checkpointing.resolve(plain, || device_memory(loaded.model.device()));
    Ok((checkpointing, estimate(&info, &loaded.model.config, &inputs(checkpointing)).total()))
}

/// The optimisation loop: micro-batches with gradient accumulation, AdamW on the
/// parameters that require gradients, metrics every step, validation, checkpoints, pause
/// and stop. Returns how it ended, the last step and the last training metrics.
pub(crate) fn optimize(
    objective: &dyn Objective,
    data: &PreparedData,
    settings: &LoopSettings,
    run: &RunDir,
    resuming: bool,
    sink: &mut dyn TrainSink,
    control: &Control,
) -> Result<(Outcome, usize, Option<StepMetrics>)> {
    let params = objective.named_params();
    let trainable: Vec<(String, Tensor)> =
        params.iter().filter(|(_, t)| t.requires_grad()).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let trainable_parameters = trainable.iter().map(|(_, t)| t.numel() as u64).sum();
    let mut opt = AdamW::new(trainable, settings.config.optim.clone());
    let checkpoint = if resuming { run.latest_checkpoint() } else { None };
    let mut state = match &checkpoint {
        Some((_, path)) => load_checkpoint(path, |lookup| objective.load_params(lookup), &mut opt)?,
        None => TrainState::default(),
    };
    let mut metrics = MetricsLog::open(&run.metrics(), resuming.then_some(state.step))?;
    sink.event(&TrainEvent::Prepared {
        data: data.report.clone(),
        train_sequences: data.train.len(),
        val_sequences: data.val.len(),
        trainable_parameters,
        start_step: state.step,
        total_steps: settings.config.steps,
        checkpointing: settings.checkpointing,
        memory_estimate: settings.memory_estimate,
    });

    let start = Instant::now();
    let mut batches = Batches::new(&data.train, settings.config.seed, state);
    let mut last = None;
    let mut outcome = Outcome::Finished;
    while state.step < settings.config.steps {
        if control.wait_while_paused() {
            outcome = Outcome::Stopped;
            break;
        }
        let step = state.step + 1;
        let lr = settings.config.optim.lr_at(step, settings.config.steps);
        let t0 = Instant::now();
        let mut values = Vec::with_capacity(settings.config.grad_accum);
        let mut tokens = 0usize;
        for micro in 0..settings.config.grad_accum {
            let seqs = batches.next(settings.config.batch_size);
            tokens += seqs.iter().map(|s| s.ids.len()).sum::<usize>();
            let draw = (step * settings.config.grad_accum + micro) as u64;
            values.push(objective.losses(&seqs, Some(1.0 / settings.config.grad_accum as f64), draw)?);
        }
        let grad_norm = opt.step(lr);
        opt.zero_grad();
        state = TrainState { step, ..batches.state };
        let losses = mean_values(&values);
        if !losses.loss.is_finite() {
            return Err(Error::Invalid(format!(
                "step {step}: the loss is {} (diverged); lower the learning rate",
                losses.loss
            )));
        }
        let m = StepMetrics {
            step,
            split: Split::Train,
            losses,
            lr,
            grad_norm: Some(grad_norm),
            tokens_per_second: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            gpu_mem_bytes: if step % 10 == 1 { gpu_memory_used(settings.device) } else { None },
            elapsed: start.elapsed().as_secs_f64(),
            ..StepMetrics::default()
        };
        metrics.append(&m)?;
        sink.event(&TrainEvent::Step(m.clone()));
        last = Some(m);

        let end = step == settings.config.steps;
        if ((settings.config.val_every > 0 && step % settings.config.val_every == 0) || end)
            && let Some(mut v) = validate(objective, settings, &data.val, step, lr, start)?
        {
            v.expected_tokens_per_forward = objective.expected_acceptance(&v.losses);
            // By step, so that a resumed run measures where an uninterrupted one does.
            let every = settings.config.val_every.max(1) * settings.measure_every;
            if settings.measure_every > 0 && (step % every == 0 || end) {
                v.measured_tokens_per_forward = objective.measured_acceptance(&measure_prompts(&data.val))?;
            }
            metrics.append(&v)?;
            sink.event(&TrainEvent::Validation(v));
        }
        let stop = control.is_cancelled();
        if step % settings.config.checkpoint_every == 0 || end || stop {
            let path = save_checkpoint(run, &objective.named_params(), &opt, state)?;
            sink.event(&TrainEvent::Checkpoint { step, path });
        }
        if stop {
            outcome = Outcome::Stopped;
            break;
        }
    }
    if outcome == Outcome::Stopped && run.latest_checkpoint().map(|c| c.0) != Some(state.step) {
        let path = save_checkpoint(run, &objective.named_params(), &opt, state)?;
        sink.event(&TrainEvent::Checkpoint { step: state.step, path });
    }
    Ok((outcome, state.step, last))
}

/// Loss and accuracies on (up to `val_batches` micro-batches of) the validation set.
fn validate(
    objective: &dyn Objective,
    settings: &LoopSettings,
    val: &[Tokenized],
    step: usize,
    lr: f64,
    start: Instant,
) -> Result<Option<StepMetrics>> {
    if val.is_empty() {
        return Ok(None);
    }
    let t0 = Instant::now();
    let mut values = Vec::new();
    let mut tokens = 0;
    for (i, chunk) in val.chunks(settings.config.batch_size).take(settings.config.val_batches.max(1)).enumerate() {
        let seqs: Vec<&Tokenized> = chunk.iter().collect();
        tokens += seqs.iter().map(|s| s.ids.len()).sum::<usize>();
        // The same draws at every pass: validation passes differ by the weights alone.
        values.push(tch::no_grad(|| objective.losses(&seqs, None, u64::MAX - i as u64))?);
    }
    Ok(Some(StepMetrics {
        step,
        split: Split::Val,
        losses: mean_values(&values),
        lr,
        grad_norm: None,
        tokens_per_second: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        gpu_mem_bytes: None,
        elapsed: start.elapsed().as_secs_f64(),
        expected_tokens_per_forward: None,
        measured_tokens_per_forward: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acceptance is measured after whole prompts: a window that begins inside an answer is
    /// passed over for one whose answer starts after a prompt, plain text gives its first
    /// tokens, and short windows fill in only when nothing else is left.
    #[test]
    fn measurement_prompts_start_answers() {
        let window = |runs: &[(bool, usize)]| {
            let loss: Vec<bool> = runs.iter().flat_map(|&(l, n)| std::iter::repeat_n(l, n)).collect();
            Tokenized { ids: (0..loss.len() as i64).collect(), loss }
        };
        // Inside an answer for 5 positions, then a prompt whose last token (position 45)
        // predicts the next answer's first.
        let inside = window(&[(true, 5), (false, 40), (true, 83)]);
        let text = window(&[(true, 127), (false, 1)]);
        let short = window(&[(false, 3), (true, 20)]);
        let prompts = measure_prompts(&[short.clone(), inside, text]);
        assert_eq!(prompts.len(), 3);
        assert_eq!(prompts[0], (0..=45).collect::<Vec<i64>>());
        assert_eq!(prompts[1], (0..MEASURE_MIN_CONTEXT as i64).collect::<Vec<_>>());
        // The short window only after the others: its context up to its first target.
        assert_eq!(prompts[2], [0, 1, 2, 3]);
        let many = vec![window(&[(true, 128)]); MEASURE_PROMPTS + 2];
        assert_eq!(measure_prompts(&[vec![short], many].concat()).len(), MEASURE_PROMPTS);
    }

    #[test]
    fn checkpointing_turns_on_when_the_estimate_does_not_fit() {
        let gib = 1u64 << 30;
        assert!(Checkpointing::Auto.resolve(10 * gib, || Some(8 * gib)));
        assert!(!Checkpointing::Auto.resolve(6 * gib, || Some(8 * gib)));
        assert!(!Checkpointing::Auto.resolve(10 * gib, || None));
        assert!(Checkpointing::On.resolve(gib, || Some(8 * gib)));
        assert!(!Checkpointing::Off.resolve(10 * gib, || Some(8 * gib)));
        assert_eq!("on".parse::<Checkpointing>().ok(), Some(Checkpointing::On));
        assert!("sometimes".parse::<Checkpointing>().is_err());
    }

    /// `config.json` keeps one level: a run recorded before the loop was its own struct
    /// loads, and a recipe written now has the same keys at the top.
    #[test]
    fn recipes_stay_flat_on_disk() -> std::result::Result<(), serde_json::Error> {
        let recorded = serde_json::json!({
            "model": { "kind": "demo" }, "data": { "kind": "jsonl", "path": "d.jsonl" }, "strict_data": false,
            "method": serde_json::to_value(MtpConfig::default())?,
            "lcm_weight": 5.0, "optim": serde_json::to_value(OptimConfig { lr: 1e-3, ..OptimConfig::default() })?,
            "steps": 7, "batch_size": 3, "grad_accum": 2, "seq_len": 64, "packing": "pack",
            "val_fraction": 0.1, "val_every": 5, "val_batches": 2, "checkpoint_every": 4, "seed": 9,
            "device": "cpu", "dtype": "f32"
        });
        let config: TrainConfig = serde_json::from_value(recorded.clone())?;
        let t = &config.training;
        assert_eq!((t.steps, t.batch_size, t.grad_accum, t.seq_len), (7, 3, 2, 64));
        assert_eq!((t.val_every, t.val_batches, t.checkpoint_every, t.seed, t.optim.lr), (5, 2, 4, 9, 1e-3));
        let written = serde_json::to_value(&config)?;
        for (key, value) in recorded.as_object().into_iter().flatten() {
            assert_eq!(written.get(key), Some(value), "{key}");
        }
        assert!(written.get("training").is_none());
        // A pretraining recipe recorded without `val_batches` takes the 4 it used.
        let mut pre = serde_json::to_value(super::super::pretrain::PretrainConfig::default())?;
        pre.as_object_mut().map(|o| o.remove("val_batches"));
        let pre: super::super::pretrain::PretrainConfig = serde_json::from_value(pre)?;
        assert_eq!(pre.training.val_batches, 4);
        Ok(())
    }

    #[test]
    fn every_loop_is_checked_the_same_way() {
        let ok = LoopConfig::default();
        assert!(ok.validate().is_ok());
        for bad in [
            LoopConfig { steps: 0, ..ok.clone() },
            LoopConfig { batch_size: 0, ..ok.clone() },
            LoopConfig { seq_len: 1, ..ok.clone() },
            LoopConfig { val_fraction: 0.95, ..ok.clone() },
            LoopConfig { optim: OptimConfig { lr: 0.0, ..ok.optim.clone() }, ..ok.clone() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
            assert!(TrainConfig { training: bad.clone(), ..TrainConfig::default() }.validate().is_err());
        }
    }
}
