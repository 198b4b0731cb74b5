//! The sampler head (METHOD.md section 1.3): `logits = W_lm MLP([E(prev); z])`, MLP = two
//! blocks of Linear -> SiLU -> LayerNorm (2d -> d, d -> d). It lets a draft depend on the
//! draft before it, not only on the mask's hidden state.

use tch::{Kind, Tensor, nn, nn::Module};

/// The MLP of the sampler head (the LM head it feeds is the frozen base one).
#[derive(Debug)]
pub struct SamplerHead {
    fc1: nn::Linear,
    ln1: nn::LayerNorm,
    fc2: nn::Linear,
    ln2: nn::LayerNorm,
}

impl SamplerHead {
    /// Create it under `p` for width `d`.
    pub fn new(p: &nn::Path, d: usize) -> Self {
        let d = d as i64;
        Self {
            fc1: nn::linear(p / "fc1", 2 * d, d, Default::default()),
            ln1: nn::layer_norm(p / "ln1", vec![d], Default::default()),
            fc2: nn::linear(p / "fc2", d, d, Default::default()),
            ln2: nn::layer_norm(p / "ln2", vec![d], Default::default()),
        }
    }

    /// The hidden state the LM head turns into sampler logits.
    ///
    /// # Shapes
    /// `prev_embed`, `z`: `[..., d]` (any float dtype) -> `[..., d]` f32.
    pub fn forward(&self, prev_embed: &Tensor, z: &Tensor) -> Tensor {
        let x = Tensor::cat(&[prev_embed.to_kind(Kind::Float), z.to_kind(Kind::Float)], -1);
        let h = self.ln1.forward(&self.fc1.forward(&x).silu());
        self.ln2.forward(&self.fc2.forward(&h).silu())
    }
}
