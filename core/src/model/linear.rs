//! Linear projections, and the hook through which an adapter adds a gated low-rank term
//! to any of them.

use std::fmt;

use tch::Tensor;

use super::weights::Weights;
use crate::error::Result;

/// `y = x W^T + b`, with the weight laid out as in PyTorch (`[out, in]`).
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, when the layer has one.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Load `weight` (and `bias` when `bias` is true) under `w`.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get("weight", &[out_dim as i64, in_dim as i64])?;
        let bias = if bias { Some(w.get("bias", &[out_dim as i64])?) } else { None };
        Ok(Self { weight, bias })
    }

    /// # Shapes
    /// `x`: `[..., in]` -> `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// The seven projections of a decoder layer an adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    /// Attention query.
    Q,
    /// Attention key.
    K,
    /// Attention value.
    V,
    /// Attention output.
    O,
    /// MLP gate.
    Gate,
    /// MLP up.
    Up,
    /// MLP down.
    Down,
}

impl Proj {
    /// All seven, in layer order.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The Hugging Face module name (`q_proj`, ...).
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }
}

impl fmt::Display for Proj {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.module())
    }
}

/// Something that adds a term to projections' outputs: a (gated) LoRA adapter.
pub trait ProjDelta {
    /// The term to add to projection `proj` of layer `layer` for input `x` (`[b, t, in]` ->
    /// `[b, t, out]`), or `None` when this projection is not adapted. `gate` (`[b, t, 1]`,
    /// from [`ProjDelta`]'s owner, scale included) multiplies the term per row; `None`
    /// applies it to every row.
    fn delta(&self, layer: usize, proj: Proj, x: &Tensor, gate: Option<&Tensor>) -> Option<Tensor>;
}

/// An adapter and the per-row gate its term is multiplied by.
pub struct Gated<'a> {
    /// The adapter.
    pub delta: &'a dyn ProjDelta,
    /// `[b, t, 1]`: the adapter's scale on rows it applies to, 0 elsewhere (where the
    /// result is then the base output exactly). `None` applies it everywhere (plain LoRA).
    pub gate: Option<Tensor>,
}

/// Project `x` with `linear`, adding the adapter's gated term when there is one.
pub fn project(linear: &Linear, x: &Tensor, adapter: Option<&Gated>, layer: usize, proj: Proj) -> Tensor {
    let y = linear.forward(x);
    match adapter.and_then(|a| a.delta.delta(layer, proj, x, a.gate.as_ref())) {
        Some(d) => y + d,
        None => y,
    }
}
