//! An estimate of the memory MTP training needs, shown before anything starts: frozen
//! weights, trainable parameters with gradients and AdamW state, activations kept for the
//! backward pass, the logits of the two heads (a chunk of rows at a time), and the
//! framework's own memory. Each term counts the tensors our implementation keeps; the two
//! constants not read off the code (the runtime's own memory, the share of the activations
//! the CPU's allocator keeps) were measured, and the whole estimate is checked against
//! measured peaks (`scripts/bench_memory.sh`, docs/BENCHMARKS.md).

use serde::{Deserialize, Serialize};

use crate::device::{DType, DeviceSpec};
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
    /// One chunk of the heads' logits while their cross-entropy runs, and the gradients it
    /// leaves for the backward pass.
    pub logits: u64,
    /// The framework's own memory (thread pools, kernels' buffers) and, on the CPU, what its
    /// allocator keeps of the memory the backward pass frees.
    #[serde(default)]
    pub runtime: u64,
}

impl MemoryEstimate {
    /// The sum.
    pub fn total(&self) -> u64 {
        self.weights + self.trainable + self.activations + self.logits + self.runtime
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
    /// Activation checkpointing (only each layer's input is kept).
    pub checkpointing: bool,
    /// Where it trains.
    pub device: DeviceSpec,
}

/// Copies of one chunk of f32 logits alive at once while the heads' cross-entropy runs
/// ([`crate::mtp::loss::head_cross_entropy`]: the logits, then softmax - onehot and its
/// share of the mean); the whole `[rows, vocab]` logits never exist.
const CHUNK_COPIES: u64 = 3;

/// Host memory the framework takes once it runs (thread pools, kernel workspaces), measured
/// on the CPU. On CUDA the context (about 500 MB) is outside any process measurement of
/// allocated memory and is not counted.
const RUNTIME_BYTES: u64 = 64 << 20;

/// On the CPU, the share of the layers' activations that the process keeps on top of what
/// is alive: the C allocator returns the blocks each layer's backward pass frees to its
/// heap, not to the system, and the next layer's requests fit them only in part (the heap
/// grows through the first step's backward pass, then stays). Measured: a third of the
/// layers' activations, with and without checkpointing, on the demo and the SmolLM2-135M
/// shape (`scripts/bench_memory.sh`, docs/BENCHMARKS.md).
const CPU_RETAINED: f64 = 0.3;

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
    let per_seq_rows = (x.seq_len * (x.k + 1)) as u64;
    let rows = per_seq_rows * x.batch_size as u64;
    let (q, kv, i) = (config.q_dim() as u64, config.kv_dim() as u64, config.intermediate_size as u64);
    // Per layer and row, the tensors the backward pass keeps: the layer's input, the two
    // norms' outputs with their unscaled forms and the residual between them (6d); q/k/v,
    // the rotated q and k with their half-swapped copy, the attention output and its
    // reshaped copy (5q + 4kv); gate/up, the SiLU output and the product (4i); the gated
    // LoRA's rank-r intermediate before and after the gate, per target.
    let r = x.lora.rank as u64 * x.lora.targets.len() as u64;
    let per_row_layer = 6 * d + 5 * q + 4 * kv + 4 * i + 2 * r;
    let cuda = matches!(x.device, DeviceSpec::Cuda(_));
    let layer = rows * per_row_layer * act;
    // One additive attention mask per batch, shared by every layer.
    let mask = x.batch_size as u64 * per_seq_rows * per_seq_rows * act;
    let layers = config.num_layers as u64;
    let activations = mask
        + if x.checkpointing {
            // Every layer's input, plus one layer's activations while it is recomputed.
            layers * rows * d * act + layer
        } else {
            layers * layer
        };

    // Base logits on mask rows and sampler logits on all labelled rows: one chunk of f32
    // logits at a time, and each head's gradient with respect to its rows' hidden states
    // (`[rows, d]`), kept for the backward pass.
    let vocab = info.vocab_size as u64;
    let mask_rows = (x.seq_len * x.k * x.batch_size) as u64;
    let sampler_rows = if x.sampler { rows } else { 0 };
    let chunk_rows = (crate::mtp::loss::CHUNK_LOGITS as u64 / vocab.max(1)).max(1).min(mask_rows.max(sampler_rows));
    let logits = chunk_rows * vocab * 4 * CHUNK_COPIES + (mask_rows + sampler_rows) * d * act;
    let runtime = if cuda { 0 } else { RUNTIME_BYTES + (CPU_RETAINED * (layers * layer) as f64) as u64 };
    MemoryEstimate { weights, trainable, activations, logits, runtime }
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
        let base = MemoryInputs {
            k: 4,
            lora: &lora,
            sampler: true,
            batch_size: 1,
            seq_len: 256,
            dtype: DType::Bf16,
            checkpointing: false,
            device: DeviceSpec::Cpu,
        };
        let e = estimate(&info, &cfg, &base);
        assert_eq!(e.weights, 134_515_008 * 2);
        assert!(e.total() > e.weights);
        let more_k = estimate(&info, &cfg, &MemoryInputs { k: 8, ..base.clone() });
        let more_batch = estimate(&info, &cfg, &MemoryInputs { batch_size: 4, ..base.clone() });
        assert!(more_k.activations > e.activations && more_k.logits > e.logits);
        assert!(more_batch.total() > 3 * (e.total() - e.weights - e.trainable));
        let ckpt = estimate(&info, &cfg, &MemoryInputs { checkpointing: true, ..base.clone() });
        assert!(ckpt.activations * 5 < e.activations && ckpt.weights == e.weights);
        Ok(())
    }
}
