//! The trainable parts of the method as one unit: k mask embeddings, gated LoRA factors and
//! the sampler head, in their own VarStore (the frozen base lives elsewhere), saved to
//! `adapter.safetensors` with the method's config and the base model's identity in the
//! metadata.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use super::gated_lora::{Lora, LoraConfig, PreparedLora};
use super::sampler::SamplerHead;
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
}

impl Default for MtpConfig {
    fn default() -> Self {
        Self { k: 4, lora: LoraConfig::default(), gated: true, sampler: true, train_mask_embeddings: false }
    }
}

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
        Ok(())
    }
}

/// Which base model an adapter belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseIdentity {
    /// A readable name (the model source).
    pub name: String,
    /// SHA-256 of the validated config and every tensor's name and shape.
    pub hash: String,
}

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
        Ok(Self { name: name.into(), hash: format!("{:x}", h.finalize()) })
    }
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
        let sampler = config.sampler.then(|| SamplerHead::new(&(&root / "sampler"), model.config.hidden_size));
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
        let file = SafetensorsFile::open(path)?;
        let (config, base) = Self::header_of(&file)?;
        let ours = BaseIdentity::of(model, &base.name)?;
        if ours.hash != base.hash {
            return Err(Error::Invalid(format!(
                "{}: this adapter was trained for base model `{}` (identity {}), not for the loaded model (identity {})",
                path.display(),
                base.name,
                &base.hash[..12.min(base.hash.len())],
                &ours.hash[..12],
            )));
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
