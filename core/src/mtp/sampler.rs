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

/// The sampler head's weights arranged for drafting one token at a time: the first layer
/// split into its halves for `E(prev)` and for `z`, so that the `z` half runs once for a
/// whole mask block and each draft in the chain costs a few small products. f32, like
/// training; only the LM-head product that follows runs in the model's dtype.
#[derive(Debug)]
pub struct PreparedSampler {
    /// `[d, d]`: fc1's columns for `E(prev)`, transposed.
    w1_prev: Tensor,
    /// `[d, d]`: fc1's columns for `z`, transposed.
    w1_z: Tensor,
    b1: Tensor,
    ln1: (Tensor, Tensor),
    /// `[d, d]`: fc2, transposed.
    w2: Tensor,
    b2: Tensor,
    ln2: (Tensor, Tensor),
    d: i64,
}

/// PyTorch's LayerNorm default, which the head was built with.
const LAYER_NORM_EPS: f64 = 1e-5;

impl SamplerHead {
    /// Copies of the weights for drafting (see [`PreparedSampler`]).
    pub fn prepare(&self) -> PreparedSampler {
        tch::no_grad(|| {
            let d = self.fc2.ws.size()[0];
            let ln = |l: &nn::LayerNorm| -> (Tensor, Tensor) {
                let ones = || Tensor::ones([d], (Kind::Float, self.fc1.ws.device()));
                let w = l.ws.as_ref().map_or_else(ones, |w| w.detach().copy());
                let b = l.bs.as_ref().map_or_else(|| ones() * 0.0, |b| b.detach().copy());
                (w, b)
            };
            let zeros = || Tensor::zeros([d], (Kind::Float, self.fc1.ws.device()));
            PreparedSampler {
                w1_prev: self.fc1.ws.narrow(1, 0, d).tr().contiguous().detach(),
                w1_z: self.fc1.ws.narrow(1, d, d).tr().contiguous().detach(),
                b1: self.fc1.bs.as_ref().map_or_else(zeros, |b| b.detach().copy()),
                ln1: ln(&self.ln1),
                w2: self.fc2.ws.tr().contiguous().detach(),
                b2: self.fc2.bs.as_ref().map_or_else(zeros, |b| b.detach().copy()),
                ln2: ln(&self.ln2),
                d,
            }
        })
    }
}

impl PreparedSampler {
    /// The `z` half of the first layer (with its bias) for every mask of a block.
    ///
    /// # Shapes
    /// `z`: `[m, d]` (any float dtype) -> `[m, d]` f32.
    pub fn z_part(&self, z: &Tensor) -> Tensor {
        let z = if z.kind() == Kind::Float { z.shallow_clone() } else { z.to_kind(Kind::Float) };
        self.b1.addmm(&z, &self.w1_z)
    }

    /// The state the LM head turns into the draft's logits, from one mask's `z` part and
    /// the previous token's embedding: the same function as [`SamplerHead::forward`].
    ///
    /// # Shapes
    /// `z_part`: `[1, d]` f32; `prev_embed`: `[1, d]` -> `[1, d]` f32.
    pub fn step(&self, z_part: &Tensor, prev_embed: &Tensor) -> Tensor {
        let e =
            if prev_embed.kind() == Kind::Float { prev_embed.shallow_clone() } else { prev_embed.to_kind(Kind::Float) };
        let norm =
            |x: &Tensor, (w, b): &(Tensor, Tensor)| x.layer_norm([self.d], Some(w), Some(b), LAYER_NORM_EPS, false);
        let h = norm(&z_part.addmm(&e, &self.w1_prev).silu(), &self.ln1);
        norm(&self.b2.addmm(&h, &self.w2).silu(), &self.ln2)
    }
}
