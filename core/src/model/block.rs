//! One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.

use tch::Tensor;

use super::attention::{Attention, Pass};
use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::{ProjGroup, StackedLinear};
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::row_split::RowPart;
use super::weights::Weights;
use crate::error::Result;

/// `model.layers.N`.
#[derive(Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// Load layer `layer` from `w` (= `model.layers.N`).
    pub fn load(w: &Weights, c: &ModelConfig, layer: usize) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), c.hidden_size, c.rms_norm_eps)?,
            self_attn: Attention::load(&w.pp("self_attn"), c, layer)?,
            post_attention_layernorm: RmsNorm::load(&w.pp("post_attention_layernorm"), c.hidden_size, c.rms_norm_eps)?,
            mlp: Mlp::load(&w.pp("mlp"), c, layer)?,
        })
    }

    /// The stacked weights of its projections.
    pub(crate) fn weights_mut(&mut self) -> Vec<&mut Tensor> {
        let mut weights = self.self_attn.weights_mut();
        weights.extend(self.mlp.weights_mut());
        weights
    }

    /// # Shapes
    /// `x`: `[b, t, d]` -> `[b, t, d]`.
    pub fn forward(&self, x: &Tensor, pass: &Pass, cache: Option<&mut KvCache>) -> Tensor {
        let h = residual(x, &self.self_attn.forward(&self.input_layernorm.forward(x), pass, cache));
        let m = self.mlp.forward(&self.post_attention_layernorm.forward(&h), pass.adapter);
        residual(&h, &m)
    }

    /// [`DecoderLayer::forward`] for one thread's share of a pass's rows
    /// ([`super::row_split`]): `x` holds them, `pass` describes them. `None` where the
    /// attention's in-place path does not apply.
    pub(super) fn forward_part(&self, x: &Tensor, pass: &Pass, cache: &KvCache, part: &RowPart) -> Option<Tensor> {
        let h = residual(x, &self.self_attn.forward_part(&self.input_layernorm.forward(x), pass, cache, part)?);
        let m = self.mlp.forward(&self.post_attention_layernorm.forward(&h), pass.adapter);
        Some(residual(&h, &m))
    }

    /// The stacked projections of `group`.
    pub fn group(&self, group: ProjGroup) -> &StackedLinear {
        match group {
            ProjGroup::Qkv | ProjGroup::O => self.self_attn.group(group),
            ProjGroup::GateUp | ProjGroup::Down => self.mlp.group(group),
        }
    }
}

/// `x + y`: a decoding pass's few f32 rows on the CPU in our own loop (`row_ops`), else
/// libtorch's addition.
fn residual(x: &Tensor, y: &Tensor) -> Tensor {
    super::row_ops::add(x, y).unwrap_or_else(|| x + y)
}
