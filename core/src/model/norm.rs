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
    /// The norm of scale `weight` (`[d]`).
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// Load `weight` of width `dim` under `w`.
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.get("weight", &[dim as i64])?, eps })
    }

    /// Normalise `x`.
    ///
    /// # Shapes
    /// `x`: `[..., d]` -> `[..., d]`, same dtype as `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // A decoding pass's few f32 rows on the CPU: our own loop (`row_ops`).
        super::row_ops::rms_norm(x, &self.weight, self.eps).unwrap_or_else(|| self.forward_tensor_ops(x))
    }

    /// [`RmsNorm::forward`] in libtorch's operations, whatever the pass.
    pub fn forward_tensor_ops(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().unwrap_or(&0);
        // One fused op. PyTorch's rms_norm normalises in f32 like transformers; for f32 it
        // also applies the weight bit for bit as transformers does. In half precision it
        // would multiply by the weight before rounding, where transformers rounds first:
        // normalise there without the weight, then scale in the activations' dtype.
        if x.kind() == Kind::Float {
            x.rms_norm([d], Some(&self.weight), self.eps)
        } else {
            &self.weight * x.rms_norm([d], None::<Tensor>, self.eps)
        }
    }
}
