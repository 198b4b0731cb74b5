//! An estimate of the memory MTP training needs, shown before anything starts: frozen
//! weights, trainable parameters with gradients and AdamW state, activations kept for the
//! backward pass, and the logits of the two heads. It is an estimate (allocator slack,
//! workspace buffers and fragmentation come on top), made to be right within tens of
//! percent and to show which knob matters.

use serde::{Deserialize, Serialize};

use crate::device::DType;
use crate::inspect::ModelInfo;
use crate::mtp::LoraConfig;
use crate::mtp::gated_lora::proj_dims;

/// The parts of the estimate, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct MemoryEstimate {
    /// Frozen base weights in the run dtype.
    pub weights: u64,
    /// Trainable parameters, their gradients and AdamW's two moments (all f32).
    pub trainable: u64,
    /// Activations saved for the backward pass.
    pub activations: u64,
    /// LM-head and sampler logits with their gradients.
    pub logits: u64,
}

impl MemoryEstimate {
    /// The sum.
    pub fn total(&self) -> u64 {
        self.weights + self.trainable + self.activations + self.logits
    }
}

/// What the estimate depends on besides the model.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryInputs<'a> {
    /// Mask tokens.
    pub k: usize,
    /// LoRA config.
    pub lora: &'a LoraConfig,
    /// With the sampler head.
    pub sampler: bool,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Base precision.
    pub dtype: DType,
}

/// Estimate training memory for a model described by `info` and its config.
pub fn estimate(info: &ModelInfo, config: &crate::model::ModelConfig, x: &MemoryInputs) -> MemoryEstimate {
    let act = x.dtype.size_in_bytes() as u64;
    let weights = info.num_parameters * act;

    let lora: u64 = x
        .lora
        .targets
        .iter()
        .map(|&p| {
            let (i, o) = proj_dims(config, p);
            (x.lora.rank * (i + o)) as u64
        })
        .sum::<u64>()
        * config.num_layers as u64;
    let d = config.hidden_size as u64;
    let sampler = if x.sampler { 3 * d * d + 6 * d } else { 0 };
    let trainable_params = lora + sampler + (x.k as u64) * d;
    // Parameter, gradient, first and second moment, all f32.
    let trainable = trainable_params * 16;

    // Rows of the MTP layout: every position plus a block of k masks (upper bound).
    let rows = (x.seq_len * (x.k + 1)) as u64 * x.batch_size as u64;
    let (q, kv, i) = (config.q_dim() as u64, config.kv_dim() as u64, config.intermediate_size as u64);
    // Per layer and row: norms and residuals, q/k/v/o, the MLP's gate, up, product and
    // down, and the gated LoRA outputs.
    let per_row_layer = 6 * d + 3 * q + 4 * kv + 4 * i + 2 * (x.lora.rank as u64) * x.lora.targets.len() as u64;
    // Attention with an explicit mask keeps its probabilities: heads x rows x rows, f32.
    let per_seq_rows = (x.seq_len * (x.k + 1)) as u64;
    let attn = config.num_heads as u64 * per_seq_rows * per_seq_rows * 4 * x.batch_size as u64;
    let activations = config.num_layers as u64 * (rows * per_row_layer * act + attn);

    // Base logits on mask rows and sampler logits on all labelled rows, f32, with the
    // softmax and gradient copies cross-entropy keeps (about 3 of each).
    let vocab = info.vocab_size as u64;
    let mask_rows = (x.seq_len * x.k * x.batch_size) as u64;
    let sampler_rows = if x.sampler { rows } else { 0 };
    let logits = (mask_rows + sampler_rows) * vocab * 4 * 3;
    MemoryEstimate { weights, trainable, activations, logits }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HfConfig;

    #[test]
    fn grows_with_the_knobs_that_matter() -> crate::Result<()> {
        let cfg = HfConfig::from_value(serde_json::json!({
            "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": true
        }))?
        .validate(std::path::Path::new("config.json"))?;
        let info = ModelInfo {
            model_type: "llama".into(),
            family: cfg.family,
            num_parameters: 134_515_008,
            hidden_size: 576,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            vocab_size: 49152,
            context_length: 2048,
            tie_word_embeddings: true,
            stored_dtype: DType::Bf16,
            stored_bytes: 0,
            weight_bytes: Default::default(),
        };
        let lora = LoraConfig::default();
        let base = MemoryInputs { k: 4, lora: &lora, sampler: true, batch_size: 1, seq_len: 256, dtype: DType::Bf16 };
        let e = estimate(&info, &cfg, &base);
        assert_eq!(e.weights, 134_515_008 * 2);
        assert!(e.total() > e.weights);
        let more_k = estimate(&info, &cfg, &MemoryInputs { k: 8, ..base.clone() });
        let more_batch = estimate(&info, &cfg, &MemoryInputs { batch_size: 4, ..base.clone() });
        assert!(more_k.activations > e.activations && more_k.logits > e.logits);
        assert!(more_batch.total() > 3 * (e.total() - e.weights - e.trainable));
        Ok(())
    }
}
