//! The SwiGLU MLP of a decoder layer.

use tch::Tensor;

use super::config::ModelConfig;
use super::linear::{Gated, ProjGroup, StackedLinear};
use super::weights::Weights;
use crate::error::Result;

/// `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    /// `gate_proj` and `up_proj` stacked.
    gate_up_proj: StackedLinear,
    down_proj: StackedLinear,
    intermediate: i64,
    layer: usize,
}

impl Mlp {
    /// The stacked weights of its projections (gate/up, down).
    pub(crate) fn weights_mut(&mut self) -> Vec<&mut Tensor> {
        [&mut self.gate_up_proj, &mut self.down_proj]
            .into_iter()
            .filter_map(StackedLinear::stacked_weight_mut)
            .collect()
    }

    /// Load layer `layer`'s MLP from `w` (= `model.layers.N.mlp`).
    pub fn load(w: &Weights, c: &ModelConfig, layer: usize) -> Result<Self> {
        let (d, i, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        Ok(Self {
            gate_up_proj: StackedLinear::load(w, &[("gate_proj", i), ("up_proj", i)], d, bias)?,
            down_proj: StackedLinear::load(w, &[("down_proj", d)], i, bias)?,
            intermediate: i as i64,
            layer,
        })
    }

    /// The stacked gate/up projections ([`ProjGroup::GateUp`]) or `down_proj` (any other
    /// group).
    pub fn group(&self, group: ProjGroup) -> &StackedLinear {
        if group == ProjGroup::GateUp { &self.gate_up_proj } else { &self.down_proj }
    }

    /// # Shapes
    /// `x`: `[b, t, d]` -> `[b, t, d]`.
    pub fn forward(&self, x: &Tensor, adapter: Option<&Gated>) -> Tensor {
        let i = self.intermediate;
        let gate_up = self.gate_up_proj.project(x, adapter, self.layer, ProjGroup::GateUp);
        self.down_proj.project(&swiglu(&gate_up, i), adapter, self.layer, ProjGroup::Down)
    }
}

/// `silu(gate) * up` of `gate_up` (`[..., 2 i]`, gate then up) -> `[..., i]`: a decoding
/// pass's few f32 rows on the CPU in one loop of our own (`row_ops`), else
/// [`swiglu_tensor_ops`].
pub fn swiglu(gate_up: &Tensor, i: i64) -> Tensor {
    super::row_ops::swiglu(gate_up, i).unwrap_or_else(|| swiglu_tensor_ops(gate_up, i))
}

/// [`swiglu`] in libtorch's operations, whatever the pass.
pub fn swiglu_tensor_ops(gate_up: &Tensor, i: i64) -> Tensor {
    gate_up.narrow(-1, 0, i).silu() * gate_up.narrow(-1, i, i)
}
