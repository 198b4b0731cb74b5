//! A model's summary read from its files without loading any weights: what `mtp inspect`
//! prints and the Model tab shows.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::device::DType;
use crate::error::Result;
use crate::model::{Family, Llama, ModelConfig};

/// Facts about a model folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `model_type` of config.json.
    pub model_type: String,
    /// The architecture.
    pub family: Family,
    /// Exact parameter count (a tied LM head counted once).
    pub num_parameters: u64,
    /// Model width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence in positions.
    pub context_length: usize,
    /// The LM head shares the embedding.
    pub tie_word_embeddings: bool,
    /// The dtype most parameters are stored in.
    pub stored_dtype: DType,
    /// Bytes of the weights as stored.
    pub stored_bytes: u64,
    /// Bytes the weights need in each dtype they can run in.
    pub weight_bytes: BTreeMap<DType, u64>,
}

impl ModelInfo {
    /// Inspect the model folder `dir`: config validated, every tensor's name, shape and
    /// dtype checked against the checkpoint headers.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        let specs = Llama::tensor_specs(&config, Some(&checkpoint))?;
        let mut by_dtype: BTreeMap<DType, u64> = BTreeMap::new();
        for s in &specs {
            *by_dtype.entry(s.stored.unwrap_or_default()).or_default() += s.shape.iter().product::<i64>() as u64;
        }
        let num_parameters: u64 = by_dtype.values().sum();
        let stored_dtype = by_dtype.iter().max_by_key(|(_, n)| **n).map(|(d, _)| *d).unwrap_or_default();
        let stored_bytes = by_dtype.iter().map(|(d, n)| n * d.size_in_bytes() as u64).sum();
        let weight_bytes = [DType::F32, DType::Bf16, DType::F16]
            .into_iter()
            .map(|d| (d, num_parameters * d.size_in_bytes() as u64))
            .collect();
        Ok(Self {
            model_type: config.family.model_type().into(),
            family: config.family,
            num_parameters,
            hidden_size: config.hidden_size,
            num_layers: config.num_layers,
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            vocab_size: config.vocab_size,
            context_length: config.context_length(),
            tie_word_embeddings: config.tie_word_embeddings,
            stored_dtype,
            stored_bytes,
            weight_bytes,
        })
    }
}

/// Bytes as a short human string (`1.2 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}
