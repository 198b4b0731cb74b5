//! The SwiGLU MLP of a decoder layer.

use tch::Tensor;

use super::config::ModelConfig;
use super::linear::{Gated, Linear, Proj, project};
use super::weights::Weights;
use crate::error::Result;

/// `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    layer: usize,
}

impl Mlp {
    /// Load layer `layer`'s MLP from `w` (= `model.layers.N.mlp`).
    pub fn load(w: &Weights, c: &ModelConfig, layer: usize) -> Result<Self> {
        let (d, i, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(&w.pp("gate_proj"), d, i, bias)?,
            up_proj: Linear::load(&w.pp("up_proj"), d, i, bias)?,
            down_proj: Linear::load(&w.pp("down_proj"), i, d, bias)?,
            layer,
        })
    }

    /// # Shapes
    /// `x`: `[b, t, d]` -> `[b, t, d]`.
    pub fn forward(&self, x: &Tensor, adapter: Option<&Gated>) -> Tensor {
        let gate = project(&self.gate_proj, x, adapter, self.layer, Proj::Gate).silu();
        let up = project(&self.up_proj, x, adapter, self.layer, Proj::Up);
        project(&self.down_proj, &(gate * up), adapter, self.layer, Proj::Down)
    }
}
