//! The Llama-family causal LM: embeddings, decoder layers, final norm, LM head.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::attention::{AttnMask, Pass};
use super::block::DecoderLayer;
use super::config::ModelConfig;
use super::cuda_graph::StepGraphs;
use super::kv_cache::KvCache;
use super::linear::{Gated, ProjGroup};
use super::norm::RmsNorm;
use super::rope::{Rope, RopeTables};
use super::weights::{CheckpointSource, SpecSource, TensorSpec, WeightSource, Weights};
use crate::checkpoint::Checkpoint;
use crate::device::DType;
use crate::error::{Error, Result};

/// A decoder-only causal language model of the Llama family, ready to run.
#[derive(Debug)]
pub struct Llama {
    /// The validated config.
    pub config: ModelConfig,
    /// `model.embed_tokens.weight`, `[vocab, d]`.
    pub embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, d]`: `lm_head.weight`, or the embedding matrix when tied.
    pub lm_head: Tensor,
    rope: Rope,
    dtype: DType,
    device: Device,
    /// How decoding steps run ([`Llama::step_graphs`]).
    step_graphs: StepGraphs,
    /// With fixed-shape steps: the last AR generation's cache and recorded step, kept so
    /// that the next generation replays the recording rather than making its own.
    pub(crate) kept_ar: std::cell::RefCell<Option<crate::decode::ar::KeptAr>>,
}

/// Checkpoint keys that carry no weights and are skipped on purpose.
fn ignorable(config: &ModelConfig, name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (config.tie_word_embeddings && name == "lm_head.weight")
}

impl Llama {
    /// Build the model from `source` (names as in Hugging Face checkpoints). `dtype` and
    /// `device` describe the tensors the source returns.
    pub fn load(config: ModelConfig, source: &dyn WeightSource, dtype: DType, device: Device) -> Result<Self> {
        let root = Weights::new(source);
        let m = root.pp("model");
        let embed_tokens =
            m.pp("embed_tokens").get("weight", &[config.vocab_size as i64, config.hidden_size as i64])?;
        let layers = (0..config.num_layers)
            .map(|i| DecoderLayer::load(&m.pp("layers").pp(i), &config, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&m.pp("norm"), config.hidden_size, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            root.pp("lm_head").get("weight", &[config.vocab_size as i64, config.hidden_size as i64])?
        };
        let rope = Rope::new(&config, device);
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            dtype,
            device,
            step_graphs: StepGraphs::Off,
            kept_ar: Default::default(),
        })
    }

    /// Load the model in folder `dir` (config.json + safetensors) in `dtype` on `device`.
    /// Every tensor is checked for name, shape and dtype; tensors the model does not use are
    /// an error.
    pub fn from_folder(dir: &Path, dtype: DType, device: Device) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        let mut model = Self::from_checkpoint(config, &checkpoint, dtype, device)?;
        // With the checkpoint's files unmapped: the copy then adds nothing to the peak.
        drop(checkpoint);
        if device == Device::Cpu && super::huge_pages::enabled() {
            model.pack_weights();
        }
        Ok(model)
    }

    /// Load from an opened checkpoint.
    pub fn from_checkpoint(config: ModelConfig, checkpoint: &Checkpoint, dtype: DType, device: Device) -> Result<Self> {
        let source = CheckpointSource::new(checkpoint, dtype, device);
        let model = tch::no_grad(|| Self::load(config.clone(), &source, dtype, device))?;
        source.finish(|n| ignorable(&config, n))?;
        Ok(model)
    }

    /// Move the weights decoding reads (the embedding, every layer's projections, an untied
    /// head) into one buffer on huge pages ([`super::huge_pages`]). Checkpoint weights only:
    /// they are never trained (pretraining's are leaves of their own, left as they are).
    fn pack_weights(&mut self) {
        let tied = self.config.tie_word_embeddings;
        let mut weights: Vec<&mut Tensor> = vec![&mut self.embed_tokens];
        if !tied {
            weights.push(&mut self.lm_head);
        }
        weights.extend(self.layers.iter_mut().flat_map(DecoderLayer::weights_mut));
        let bytes = super::huge_pages::pack(weights);
        if tied {
            self.lm_head = self.embed_tokens.shallow_clone();
        }
        tracing::debug!("{bytes} bytes of weights in one buffer on huge pages");
    }

    /// The tensors the model needs, checked against `checkpoint`'s headers when given
    /// (names, shapes, dtypes), without reading any data. Unused checkpoint tensors are an
    /// error, as in [`Llama::from_checkpoint`].
    pub fn tensor_specs(config: &ModelConfig, checkpoint: Option<&Checkpoint>) -> Result<Vec<TensorSpec>> {
        let source = SpecSource::new(checkpoint);
        Self::load(config.clone(), &source, DType::F32, Device::Cpu)?;
        let specs = source.into_specs();
        if let Some(ck) = checkpoint {
            let wanted: std::collections::BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            let extra: Vec<String> =
                ck.names().filter(|n| !wanted.contains(n) && !ignorable(config, n)).map(str::to_owned).collect();
            if !extra.is_empty() {
                return Err(ck.unexpected(extra));
            }
        }
        Ok(specs)
    }

    /// The dtype activations and weights compute in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model lives on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Ask for decoding steps recorded as CUDA graphs and replayed with one launch each (see
    /// [`crate::model::cuda_graph`]): AR steps, and greedy speculative steps; they apply on a
    /// CUDA device in a build that has them.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.set_step_graphs(if on { StepGraphs::Record } else { StepGraphs::Off });
    }

    /// Choose how decoding steps run ([`StepGraphs`]; `Eager` is for tests on the CPU).
    pub fn set_step_graphs(&mut self, mode: StepGraphs) {
        self.step_graphs = mode;
        self.kept_ar.take();
    }

    /// Free what decoding kept for the next generation (its cache and recorded step), for
    /// work that needs the memory more.
    pub fn release_kept(&self) {
        self.kept_ar.take();
    }

    /// How decoding steps run here: `Record` only where graphs can be recorded (asked for,
    /// on a CUDA device, in this build), else `Off`; `Eager` as asked.
    pub fn step_graphs(&self) -> StepGraphs {
        match self.step_graphs {
            StepGraphs::Record if !(self.device.is_cuda() && super::CudaGraph::AVAILABLE) => StepGraphs::Off,
            mode => mode,
        }
    }

    /// Whether decoding records its steps as CUDA graphs: asked for, on a CUDA device, and
    /// in this build.
    pub fn records_graphs(&self) -> bool {
        self.step_graphs() == StepGraphs::Record
    }

    /// Token embeddings.
    ///
    /// # Shapes
    /// `ids`: `[b, t]` int64 -> `[b, t, d]`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        // A decoding pass's few ids on the CPU: the rows copied in a loop of our own.
        super::row_ops::gather_rows(&self.embed_tokens, ids, None)
            .unwrap_or_else(|| Tensor::embedding(&self.embed_tokens, ids, -1, false, false))
    }

    /// The embeddings of `ids` (`[t]` int64) followed by the rows of `tail` (`[1, m, d]`),
    /// `[1, t + m, d]`: a speculative step's tokens and its mask rows' inputs.
    pub fn embed_then(&self, ids: &Tensor, tail: &Tensor) -> Tensor {
        super::row_ops::gather_rows(&self.embed_tokens, ids, Some(tail))
            .unwrap_or_else(|| Tensor::cat(&[self.embed(&ids.unsqueeze(0)), tail.shallow_clone()], 1))
    }

    /// Run the decoder on embeddings `x` and return the final hidden states (after the
    /// final norm: the LM head's input). With a cache, the new rows' keys and values are
    /// appended and committed. With an adapter gated by [`super::linear::Gate::Halves`],
    /// `x` is `[2, t, d]`: two halves of one sequence of `2t` rows (the cache grows by
    /// `2t`, entry 0's rows first).
    ///
    /// # Shapes
    /// `x`: `[b, t, d]`; `positions`: `[t]` or `[b, t]` int64 -> `[b, t, d]`.
    pub fn forward_embeds(
        &self,
        x: &Tensor,
        positions: &Tensor,
        mask: AttnMask,
        adapter: Option<&Gated>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let rope = self.rope_tables(positions, x.kind());
        let pass = Pass { rope: &rope, mask, adapter, write_at: None };
        // A step's rows shared out between two threads through every layer, where it applies.
        if let Some(cache) = cache.as_deref_mut()
            && let Some(h) = super::row_split::forward(&self.layers, &self.norm, &self.config, x, &pass, cache)
        {
            // Each thread's rows already through the final norm.
            cache.commit(x.size()[1] as usize);
            return h;
        }
        let mut h = x.shallow_clone();
        for layer in &self.layers {
            h = layer.forward(&h, &pass, cache.as_deref_mut());
        }
        if let Some(cache) = cache {
            let (b, t) = (x.size()[0], x.size()[1]);
            cache.commit(if pass.joins_halves() { b * t } else { t } as usize);
        }
        self.final_norm(&h)
    }

    /// One pass whose shapes never change, for decoding steps recorded as CUDA graphs: the
    /// rows of `ids` (`[1, t]`) are written at the cache positions `positions` (`[t]`, on the
    /// device) and attend to every cached position up to their own, through the whole cache
    /// (whose capacity must hold them). Nothing is committed to the cache and nothing is read
    /// back to the host. Final-normed hidden states, `[1, t, d]`.
    pub fn forward_in_place(&self, ids: &Tensor, positions: &Tensor, cache: &mut KvCache) -> Tensor {
        let x = self.embed(ids);
        let columns = Tensor::arange(cache.capacity() as i64, (Kind::Int64, self.device)).unsqueeze(0);
        let allowed = columns.le_tensor(&positions.unsqueeze(1));
        let mask = crate::mtp::masks::additive_mask(&allowed, x.kind());
        self.forward_embeds_in_place(&x, positions, positions, &mask, None, cache)
    }

    /// The general fixed-shape pass: the rows of `x` (`[b, t, d]`; two halves of one
    /// sequence with an adapter gated by [`super::linear::Gate::Halves`]) at the positions
    /// `positions` (`[t]` or `[b, t]`), their keys and values written at the cache rows
    /// `rows` (`[b * t]`, on the device), attending to the whole cache under the additive
    /// `mask` (`[b * t, capacity]`). Nothing is committed and nothing read back to the host.
    pub fn forward_embeds_in_place(
        &self,
        x: &Tensor,
        positions: &Tensor,
        rows: &Tensor,
        mask: &Tensor,
        adapter: Option<&Gated>,
        cache: &mut KvCache,
    ) -> Tensor {
        let rope = self.rope_tables(positions, x.kind());
        let pass = Pass { rope: &rope, mask: AttnMask::Custom(mask), adapter, write_at: Some(rows) };
        let mut h = x.shallow_clone();
        for layer in &self.layers {
            h = layer.forward(&h, &pass, Some(cache));
        }
        self.final_norm(&h)
    }

    /// The decoder layers, for callers that run them one at a time (activation
    /// checkpointing); [`Llama::forward_embeds`] is the same loop.
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// The weight (`[out, in]`, the group's projections stacked) and bias of projection
    /// group `group` in layer `layer`, as the forward pass multiplies by them.
    pub fn group_weight(&self, layer: usize, group: ProjGroup) -> Option<(Tensor, Option<Tensor>)> {
        self.layers.get(layer).map(|l| l.group(group).weight_and_bias())
    }

    /// cos/sin of `positions` (`[t]` or `[b, t]`) in `kind`, as a forward pass uses them.
    pub fn rope_tables(&self, positions: &Tensor, kind: tch::Kind) -> RopeTables {
        self.rope.tables(positions, kind)
    }

    /// The final norm: last layer's output -> the LM head's input.
    pub fn final_norm(&self, h: &Tensor) -> Tensor {
        self.norm.forward(h)
    }

    /// Logits from final hidden states.
    ///
    /// # Shapes
    /// `h`: `[..., d]` -> `[..., vocab]`.
    pub fn logits(&self, h: &Tensor) -> Tensor {
        super::linear::linear(h, &self.lm_head, None)
    }

    /// Check token ids against the vocabulary (a user may supply any number).
    pub fn check_ids(&self, ids: &[i64]) -> Result<()> {
        match ids.iter().find(|&&id| id < 0 || id >= self.config.vocab_size as i64) {
            Some(&id) => Err(Error::TokenId { id, vocab: self.config.vocab_size }),
            None => Ok(()),
        }
    }

    /// Plain causal forward of token ids `[b, t]` from position `cache.len()` (or 0), giving
    /// logits for every position, `[b, t, vocab]`.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        let past = cache.as_ref().map_or(0, |c| c.len() as i64);
        let t = ids.size()[1];
        let positions = Tensor::arange_start(past, past + t, (Kind::Int64, self.device));
        let h = self.forward_embeds(&self.embed(ids), &positions, AttnMask::Causal, None, cache);
        self.logits(&h)
    }

    /// A KV cache for this model with room for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.config.num_layers, capacity)
    }
}
