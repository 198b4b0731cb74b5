//! The sampler head (METHOD.md section 1.3): `logits = W_lm MLP([E(prev); z])`, MLP = two
//! blocks of Linear -> SiLU -> LayerNorm (2d -> d, d -> d). It lets a draft depend on the
//! draft before it, not only on the mask's hidden state. The residual form (METHOD.md
//! section 1.3, decided) adds the MLP's output through a zero-initialised `W_o` to `z`:
//! `logits = W_lm (z + W_o MLP([E(prev); z]))`, so that it starts drafting exactly as the
//! LM head does and can only learn to do better.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn, nn::Module};

/// Which function the sampler head computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerForm {
    /// The paper's: the LM head reads the MLP's output (adapters written before the form
    /// was recorded are this one).
    #[default]
    Paper,
    /// `z + W_o MLP(...)` with `W_o` zero at the start: equal to the LM head at step 0.
    Residual,
}

impl SamplerForm {
    /// Both, as named on the command line.
    pub const ALL: [SamplerForm; 2] = [SamplerForm::Paper, SamplerForm::Residual];

    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            SamplerForm::Paper => "paper",
            SamplerForm::Residual => "residual",
        }
    }
}

impl std::fmt::Display for SamplerForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SamplerForm {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> crate::error::Result<Self> {
        SamplerForm::ALL
            .into_iter()
            .find(|f| f.name() == s.trim())
            .ok_or_else(|| crate::error::Error::Invalid(format!("unknown sampler form `{s}` (paper, residual)")))
    }
}

/// The MLP of the sampler head (the LM head it feeds is the frozen base one).
#[derive(Debug)]
pub struct SamplerHead {
    fc1: nn::Linear,
    ln1: nn::LayerNorm,
    fc2: nn::Linear,
    ln2: nn::LayerNorm,
    /// `W_o` of the residual form (`[d, d]`, no bias, zero at the start).
    out: Option<nn::Linear>,
}

impl SamplerHead {
    /// Create it under `p` for width `d`.
    pub fn new(p: &nn::Path, d: usize, form: SamplerForm) -> Self {
        let d = d as i64;
        let zero = nn::LinearConfig { ws_init: nn::Init::Const(0.0), bias: false, ..Default::default() };
        Self {
            fc1: nn::linear(p / "fc1", 2 * d, d, Default::default()),
            ln1: nn::layer_norm(p / "ln1", vec![d], Default::default()),
            fc2: nn::linear(p / "fc2", d, d, Default::default()),
            ln2: nn::layer_norm(p / "ln2", vec![d], Default::default()),
            out: (form == SamplerForm::Residual).then(|| nn::linear(p / "out", d, d, zero)),
        }
    }

    /// The hidden state the LM head turns into sampler logits.
    ///
    /// # Shapes
    /// `prev_embed`, `z`: `[..., d]` (any float dtype) -> `[..., d]` f32.
    pub fn forward(&self, prev_embed: &Tensor, z: &Tensor) -> Tensor {
        let z = z.to_kind(Kind::Float);
        let x = Tensor::cat(&[prev_embed.to_kind(Kind::Float), z.shallow_clone()], -1);
        let h = self.ln1.forward(&self.fc1.forward(&x).silu());
        let m = self.ln2.forward(&self.fc2.forward(&h).silu());
        match &self.out {
            Some(out) => z + out.forward(&m),
            None => m,
        }
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
    /// `[d, d]`: the residual form's `W_o`, transposed.
    wo: Option<Tensor>,
    d: i64,
}

/// One mask block's inputs to the draft chain, computed once per block.
#[derive(Debug)]
pub struct BlockInputs {
    /// `[m, d]` f32: the masks' final hidden states.
    z: Tensor,
    /// `[m, d]` f32: the `z` half of the first layer, with its bias.
    part: Tensor,
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
                wo: self.out.as_ref().map(|o| o.ws.tr().contiguous().detach()),
                d,
            }
        })
    }
}

impl PreparedSampler {
    /// What every draft of a mask block shares: its hidden states and the `z` half of the
    /// first layer.
    ///
    /// # Shapes
    /// `z`: `[m, d]` (any float dtype).
    pub fn block(&self, z: &Tensor) -> BlockInputs {
        let z = if z.kind() == Kind::Float { z.shallow_clone() } else { z.to_kind(Kind::Float) };
        BlockInputs { part: self.b1.addmm(&z, &self.w1_z), z }
    }

    /// The state the LM head turns into the logits of mask `j`'s draft, given the previous
    /// token's embedding: the same function as [`SamplerHead::forward`].
    ///
    /// # Shapes
    /// `prev_embed`: `[1, d]` -> `[1, d]` f32.
    pub fn step(&self, block: &BlockInputs, j: i64, prev_embed: &Tensor) -> Tensor {
        let e =
            if prev_embed.kind() == Kind::Float { prev_embed.shallow_clone() } else { prev_embed.to_kind(Kind::Float) };
        let norm =
            |x: &Tensor, (w, b): &(Tensor, Tensor)| x.layer_norm([self.d], Some(w), Some(b), LAYER_NORM_EPS, false);
        let h = norm(&block.part.narrow(0, j, 1).addmm(&e, &self.w1_prev).silu(), &self.ln1);
        let m = norm(&self.b2.addmm(&h, &self.w2).silu(), &self.ln2);
        match &self.wo {
            Some(wo) => block.z.narrow(0, j, 1).addmm(&m, wo),
            None => m,
        }
    }
}
