//! The trainable parts of the method as one unit: k mask embeddings, gated LoRA factors and
//! the sampler head, in their own VarStore (the frozen base lives elsewhere), saved to
//! `adapter.safetensors` with the method's config and the base model's identity in the
//! metadata.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use super::gated_lora::{Lora, LoraConfig, PreparedLora};
use super::sampler::{SamplerForm, SamplerHead};
use crate::checkpoint::{SafetensorsFile, save};
use crate::error::{Error, Result};
use crate::model::{Gate, Gated, Llama, ProjDelta, ProjGroup};

/// The method's configuration: what an adapter is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MtpConfig {
    /// Number of mask tokens (drafts per step).
    pub k: usize,
    /// LoRA rank, alpha and targets.
    pub lora: LoraConfig,
    /// Gate the LoRA term to mask rows (the method). `false` is plain LoRA (the paper's
    /// ablation: NTP outputs change too).
    pub gated: bool,
    /// Train and use the sampler head. `false`: drafts are `argmax(W_lm z)`.
    pub sampler: bool,
    /// Train the mask embeddings (frozen by default, as in the paper).
    pub train_mask_embeddings: bool,
    /// The sampler head's form (adapters written before it was recorded: the paper's).
    #[serde(default)]
    pub sampler_form: SamplerForm,
    /// What mask rows read: the paper's mask embeddings, or UNO's random token ids
    /// (adapters written before it was recorded: the paper's).
    #[serde(default)]
    pub recipe: Recipe,
}

/// What a mask row reads, which decides where an adapter can be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipe {
    /// The paper's: k mask embeddings (frozen by default), optionally a sampler head.
    #[default]
    Paper,
    /// UNO's draft-only gated LoRA, as SGLang and vLLM serve it: a mask row reads the
    /// embedding of a uniformly random vocabulary id, drawn fresh for every block; no mask
    /// embeddings, no sampler head (drafts are the LM head's choice at each mask). Exports
    /// as a PEFT LoRA.
    Uno,
}

impl Recipe {
    /// Both, as named on the command line.
    pub const ALL: [Recipe; 2] = [Recipe::Paper, Recipe::Uno];

    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Paper => "paper",
            Recipe::Uno => "uno",
        }
    }
}

named_choices!(Recipe, "recipe");

impl Default for MtpConfig {
    fn default() -> Self {
        Self {
            k: 4,
            lora: LoraConfig::default(),
            gated: true,
            sampler: true,
            train_mask_embeddings: false,
            sampler_form: DEFAULT_SAMPLER_FORM,
            recipe: Recipe::Paper,
        }
    }
}

/// The sampler form new adapters are trained with: the residual one, which starts equal to
/// the LM head and so never drafts worse than no sampler. On SmolLM2-135M-Instruct the
/// paper's form trailed the LM head for hundreds of steps (slot 1: 0.31 against 0.48 after
/// 200), the residual one led it at every slot from step 80 (docs/BENCHMARKS.md, "A real
/// instruct model"). Adapters record their form; those written before load as the paper's.
pub const DEFAULT_SAMPLER_FORM: SamplerForm = SamplerForm::Residual;

impl MtpConfig {
    /// Check the ranges.
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 || self.k > 64 {
            return Err(Error::Invalid(format!("k must be in 1..=64, got {}", self.k)));
        }
        if self.lora.rank == 0 {
            return Err(Error::Invalid("LoRA rank must be at least 1".into()));
        }
        if !(self.lora.alpha.is_finite() && self.lora.alpha > 0.0) {
            return Err(Error::Invalid(format!("LoRA alpha must be > 0, got {}", self.lora.alpha)));
        }
        if self.recipe == Recipe::Uno {
            let conflict = [
                (self.sampler, "a sampler head"),
                (self.train_mask_embeddings, "trained mask embeddings"),
                (!self.gated, "plain (ungated) LoRA"),
            ];
            if let Some((_, what)) = conflict.iter().find(|(on, _)| *on) {
                return Err(Error::Invalid(format!(
                    "the UNO recipe has no {}: its mask rows read random token ids and its drafts are the LM \
                     head's; turn that off",
                    what.trim_start_matches("a ")
                )));
            }
        }
        Ok(())
    }
}

/// Which base model an adapter belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseIdentity {
    /// A readable name (the model source).
    pub name: String,
    /// SHA-256 of the validated config and every tensor's name and shape: the architecture.
    pub hash: String,
    /// A sample of the weights' values: two models of one architecture (a base model and
    /// its instruct variant) differ here. Absent in adapters written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f32>>,
}

/// Values sampled from each tensor the weight sample reads.
const SAMPLES_PER_TENSOR: usize = 48;

impl BaseIdentity {
    /// The identity of a loaded model.
    pub fn of(model: &Llama, name: &str) -> Result<Self> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let config = serde_json::to_string(&model.config).map_err(|e| Error::Invalid(e.to_string()))?;
        h.update(config.as_bytes());
        for spec in Llama::tensor_specs(&model.config, None)? {
            h.update(format!("\n{}:{:?}", spec.name, spec.shape).as_bytes());
        }
        Ok(Self { name: name.into(), hash: format!("{:x}", h.finalize()), weights: Some(weight_sample(model)?) })
    }

    /// How many of the sampled weight values of `other` differ from these beyond the
    /// rounding of a 16-bit float (the same model loaded in bf16 or f32 differs by less),
    /// out of how many; `None` when either identity has no sample.
    pub fn weights_differ(&self, other: &BaseIdentity) -> Option<(usize, usize)> {
        let (a, b) = (self.weights.as_ref()?, other.weights.as_ref()?);
        if a.len() != b.len() {
            return Some((a.len().max(b.len()), a.len().max(b.len())));
        }
        let differ = a.iter().zip(b).filter(|(x, y)| (*x - *y).abs() > 1e-2 * x.abs().max(y.abs()) + 1e-6).count();
        Some((differ, a.len()))
    }
}

/// [`SAMPLES_PER_TENSOR`] values at fixed, spread positions of the embedding matrix, the
/// first and last layers' stacked projections and the final norm, in f32.
fn weight_sample(model: &Llama) -> Result<Vec<f32>> {
    use crate::model::ProjGroup;
    let last = model.config.num_layers.saturating_sub(1);
    let mut tensors = vec![model.embed_tokens.shallow_clone()];
    for (layer, group) in [(0, ProjGroup::Qkv), (0, ProjGroup::Down), (last, ProjGroup::Qkv), (last, ProjGroup::GateUp)]
    {
        if let Some((w, _)) = model.group_weight(layer, group) {
            tensors.push(w);
        }
    }
    let mut out = Vec::with_capacity(tensors.len() * SAMPLES_PER_TENSOR);
    tch::no_grad(|| -> Result<()> {
        for t in &tensors {
            let n = t.numel() as u64;
            // A fixed stride through the flattened tensor (an odd multiplier of the golden
            // ratio): spread over every row, the same positions for every model of a shape.
            let idx: Vec<i64> = (0..SAMPLES_PER_TENSOR as u64)
                .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(12_345) % n.max(1)) as i64)
                .collect();
            let picked = t.flatten(0, -1).index_select(0, &Tensor::from_slice(&idx).to_device(t.device()));
            out.extend(Vec::<f32>::try_from(picked.to_kind(Kind::Float).to_device(Device::Cpu))?);
        }
        Ok(())
    })?;
    Ok(out)
}

/// How an adapter is checked against the model it is loaded onto.
#[derive(Debug, Clone, Default)]
pub struct BaseCheck {
    /// The loaded model's name, for messages.
    pub model_name: String,
    /// Load it even when the weights differ from those it was trained on (same
    /// architecture, another checkpoint): its drafts will be accepted less often.
    pub allow_other_weights: bool,
}

/// Metadata keys of `adapter.safetensors`.
const META_CONFIG: &str = "mtp_config";
const META_BASE: &str = "base_model";
const META_FORMAT: &str = "format";
const FORMAT: &str = "mtp-workbench-adapter-v1";
/// The optional tensor holding the draft vocabulary (int64 token ids).
const DRAFT_VOCAB: &str = "draft_vocab";

/// Mask embeddings, gated LoRA and sampler head, ready to train or to decode with.
pub struct MtpAdapter {
    /// The method's config.
    pub config: MtpConfig,
    /// The base model it belongs to.
    pub base: BaseIdentity,
    /// Every parameter (f32), trainable or not.
    pub vs: nn::VarStore,
    /// `[k, d]`: input embeddings of m_1..m_k.
    pub mask_embeddings: Tensor,
    lora: Lora,
    sampler: Option<SamplerHead>,
    /// The draft vocabulary: the most frequent target tokens of the training data, most
    /// frequent first. Drafting may restrict the sampler's chain to these rows of the LM
    /// head (verification always uses the whole head). `None` for adapters written before
    /// it existed, or trained with it off.
    pub draft_vocab: Option<Vec<i64>>,
}

impl std::fmt::Debug for MtpAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtpAdapter").field("config", &self.config).field("base", &self.base).finish()
    }
}

impl MtpAdapter {
    /// A fresh adapter for `model`: mask embeddings drawn like the base's embedding rows
    /// (same mean and standard deviation), LoRA B = 0 (so the adapted model starts equal
    /// to the base), sampler with PyTorch's default init. Uses torch's global RNG: call
    /// it inside [`crate::device::seeded`] for a reproducible start.
    pub fn new(model: &Llama, config: MtpConfig, base_name: &str) -> Result<Self> {
        config.validate()?;
        let device = model.device();
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let d = model.config.hidden_size as i64;
        let (mean, std) = tch::no_grad(|| {
            let e = model.embed_tokens.to_kind(Kind::Float);
            (e.mean(Kind::Float).double_value(&[]), e.std(true).double_value(&[]))
        });
        let init = Tensor::randn([config.k as i64, d], (Kind::Float, device)) * std + mean;
        let mask_embeddings = if config.train_mask_embeddings {
            root.var_copy("mask_embeddings", &init)
        } else {
            let mut t = root.zeros_no_train("mask_embeddings", &[config.k as i64, d]);
            tch::no_grad(|| t.copy_(&init));
            t
        };
        let lora = Lora::new(&(&root / "lora"), &model.config, &config.lora);
        let sampler = config
            .sampler
            .then(|| SamplerHead::new(&(&root / "sampler"), model.config.hidden_size, config.sampler_form));
        let base = BaseIdentity::of(model, base_name)?;
        Ok(Self { config, base, vs, mask_embeddings, lora, sampler, draft_vocab: None })
    }

    /// The sampler head, when the adapter has one.
    pub fn sampler(&self) -> Option<&SamplerHead> {
        self.sampler.as_ref()
    }

    /// Named parameters, sorted by name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Input embeddings for a layout: the token embedding on NTP rows, the mask embedding
    /// of the row's slot on mask rows.
    ///
    /// # Shapes
    /// `tokens`, `slot`: `[b, L]` -> `[b, L, d]` in the model's dtype.
    pub fn embed(&self, model: &Llama, tokens: &Tensor, slot: &Tensor) -> Tensor {
        let x = model.embed(tokens);
        // UNO: a mask row's token is the random id it reads ([`crate::mtp::masks::with_noise`]).
        if self.config.recipe == Recipe::Uno {
            return x;
        }
        let masks = self.mask_embeddings.to_kind(x.kind()).index_select(0, &(slot - 1).clamp_min(0).flatten(0, -1));
        let masks = masks.view_as(&x);
        masks.where_self(&slot.gt(0).unsqueeze(-1), &x)
    }

    /// Write `path` (atomically) with the config and base identity in the metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = HashMap::from([
            (META_FORMAT.to_string(), FORMAT.to_string()),
            (META_CONFIG.to_string(), serde_json::to_string(&self.config).map_err(|e| Error::Invalid(e.to_string()))?),
            (META_BASE.to_string(), serde_json::to_string(&self.base).map_err(|e| Error::Invalid(e.to_string()))?),
        ]);
        let mut tensors = self.named_tensors();
        if let Some(vocab) = &self.draft_vocab {
            tensors.push((DRAFT_VOCAB.to_string(), Tensor::from_slice(vocab)));
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
        }
        save(path, &tensors, Some(meta))
    }

    /// Read the config and base identity of an adapter file without loading it.
    pub fn read_header(path: &Path) -> Result<(MtpConfig, BaseIdentity)> {
        let file = SafetensorsFile::open(path)?;
        Self::header_of(&file)
    }

    fn header_of(file: &SafetensorsFile) -> Result<(MtpConfig, BaseIdentity)> {
        let path = file.path();
        let meta = file.metadata().ok_or_else(|| Error::config(path, "__metadata__", "missing: not an MTP adapter"))?;
        if meta.get(META_FORMAT).map(String::as_str) != Some(FORMAT) {
            return Err(Error::config(
                path,
                META_FORMAT,
                format!("not an MTP Workbench adapter (expected `{FORMAT}`)"),
            ));
        }
        let parse = |key: &str| -> Result<&String> {
            meta.get(key).ok_or_else(|| Error::config(path, key, "missing from the metadata"))
        };
        let config: MtpConfig =
            serde_json::from_str(parse(META_CONFIG)?).map_err(|e| Error::config(path, META_CONFIG, e.to_string()))?;
        let base: BaseIdentity =
            serde_json::from_str(parse(META_BASE)?).map_err(|e| Error::config(path, META_BASE, e.to_string()))?;
        Ok((config, base))
    }

    /// Load an adapter for `model`. An adapter made for another base model is an error
    /// that says so; every tensor is checked for name and shape.
    pub fn load(path: &Path, model: &Llama) -> Result<Self> {
        Self::load_checked(path, model, &BaseCheck::default())
    }

    /// [`MtpAdapter::load`], checked as `check` says: another architecture is always an
    /// error; other weights of the same architecture (a base model's adapter on its
    /// instruct variant) are an error unless allowed. Adapters written before weights were
    /// sampled load with a warning.
    pub fn load_checked(path: &Path, model: &Llama, check: &BaseCheck) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let (config, base) = Self::header_of(&file)?;
        let ours = BaseIdentity::of(model, &check.model_name)?;
        let loaded =
            if check.model_name.is_empty() { "the loaded model".to_owned() } else { format!("`{}`", check.model_name) };
        if ours.hash != base.hash {
            return Err(Error::Invalid(format!(
                "{}: this adapter was trained for base model `{}` (identity {}), not for {loaded} (identity {}): \
                 another architecture",
                path.display(),
                base.name,
                &base.hash[..12.min(base.hash.len())],
                &ours.hash[..12],
            )));
        }
        match base.weights_differ(&ours) {
            None => tracing::warn!(
                "{}: written before adapters recorded their base model's weights; cannot check that it belongs to {loaded}",
                path.display()
            ),
            Some((differ, of)) if differ * 20 > of => {
                let what = format!(
                    "{}: this adapter was trained on `{}`, whose weights differ from {loaded}'s ({differ} of {of} sampled \
                     values): same architecture, another checkpoint (a base model and its instruct variant, say), so its \
                     drafts would be trained for a model it never saw",
                    path.display(),
                    base.name,
                );
                if !check.allow_other_weights {
                    return Err(Error::OtherBase(what));
                }
                tracing::warn!("{what}; loading it as asked");
            }
            Some(_) => {}
        }
        let mut adapter = Self::new(model, config, &base.name)?;
        adapter.base = base;
        adapter.copy_from(&file)?;
        if file.info(DRAFT_VOCAB).is_some() {
            let ids = file.read(DRAFT_VOCAB)?;
            let ids = Vec::<i64>::try_from(ids.to_kind(Kind::Int64).flatten(0, -1))?;
            if ids.is_empty() {
                return Err(Error::config(path, DRAFT_VOCAB, "the draft vocabulary is empty"));
            }
            model.check_ids(&ids).map_err(|e| Error::config(path, DRAFT_VOCAB, e.to_string()))?;
            adapter.draft_vocab = Some(ids);
        }
        Ok(adapter)
    }

    /// Overwrite every parameter with the tensor of the same name in `file`, which must
    /// hold nothing else (but the draft vocabulary, read by [`MtpAdapter::load`]).
    pub fn copy_from(&self, file: &SafetensorsFile) -> Result<()> {
        let names = self.load_tensors(|name| file.read(name))?;
        let extra: Vec<String> = file.names().into_iter().filter(|n| !names.contains(n) && n != DRAFT_VOCAB).collect();
        if !extra.is_empty() {
            return Err(Error::UnexpectedTensors { path: file.path().into(), names: extra });
        }
        Ok(())
    }

    /// Overwrite every parameter with `lookup(name)`, checking shapes. Returns the names.
    pub fn load_tensors(&self, mut lookup: impl FnMut(&str) -> Result<Tensor>) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for (name, mut var) in self.named_tensors() {
            let t = lookup(&name)?;
            if t.size() != var.size() {
                return Err(Error::TensorShape {
                    path: "adapter".into(),
                    name,
                    expected: var.size(),
                    actual: t.size(),
                });
            }
            tch::no_grad(|| var.copy_(&t.to_kind(var.kind()).to_device(var.device())));
            names.push(name);
        }
        Ok(names)
    }

    /// The adapter applied to rows with `slot > 0` (mask rows) only, as the method says;
    /// for a plain-LoRA adapter (`gated: false`), to every row. `kind`: the activations'.
    ///
    /// # Shapes
    /// `slot`: `[b, t]` int64.
    pub fn gated(&self, slot: &Tensor, kind: Kind) -> Gated<'_> {
        let gate = if self.config.gated { Gate::Rows(slot.gt(0).to_kind(kind).unsqueeze(-1)) } else { Gate::All };
        Gated { delta: self, gate }
    }

    /// The LoRA factors restacked for decoding with `model` (its dtype), with merged
    /// weights when `merged` (see [`PreparedLora`]).
    pub fn prepared_lora(&self, model: &Llama, merged: bool) -> PreparedLora {
        self.lora.prepare(model, merged)
    }

    /// The device its parameters live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }
}

impl ProjDelta for MtpAdapter {
    fn add_to(&self, layer: usize, group: ProjGroup, x: &Tensor, y: Tensor, gate: &Gate) -> Tensor {
        self.lora.add_to(layer, group, x, y, gate)
    }
}
