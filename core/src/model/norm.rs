//! RMSNorm, computed the way transformers does: in f32, cast back, then scaled.

use tch::{Kind, Tensor};

use super::weights::Weights;
use crate::error::Result;

/// Root-mean-square normalisation over the last dimension with a learned scale.
#[derive(Debug)]
pub struct RmsNorm {
    /// Scale, `[d]`.
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Load `weight` of width `dim` under `w`.
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.get("weight", &[dim as i64])?, eps })
    }

    /// Normalise `x`.
    ///
    /// # Shapes
    /// `x`: `[..., d]` -> `[..., d]`, same dtype as `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let variance = xf.square().mean_dim(-1, true, Kind::Float);
        let normed = xf * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(kind)
    }
}
