//! The sampler head (METHOD.md section 1.3): `logits = W_lm MLP([E(prev); z])`, MLP = two
//! blocks of Linear -> SiLU -> LayerNorm (2d -> d, d -> d). It lets a draft depend on the
//! draft before it, not only on the mask's hidden state. The residual form (METHOD.md
//! section 1.3, decided) adds the MLP's output through a zero-initialised `W_o` to `z`:
//! `logits = W_lm (z + W_o MLP([E(prev); z]))`, so that it starts drafting exactly as the
//! LM head does and can only learn to do better.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn, nn::Module};

use crate::model::few_rows;
use crate::model::linear::linear;

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

named_choices!(SamplerForm, "sampler form");

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
/// training; only the LM-head product that follows runs in the model's dtype. Weights are
/// `[out, in]`, as [`crate::model::linear::linear`] and the CPU's few-row kernel read them.
#[derive(Debug)]
pub struct PreparedSampler {
    /// `[d, d]`: fc1's columns for `E(prev)`.
    w1_prev: Tensor,
    /// `[d, d]`: fc1's columns for `z`.
    w1_z: Tensor,
    b1: Tensor,
    ln1: (Tensor, Tensor),
    /// `[d, d]`: fc2.
    w2: Tensor,
    b2: Tensor,
    ln2: (Tensor, Tensor),
    /// `[d, d]`: the residual form's `W_o`.
    wo: Option<Tensor>,
    d: i64,
    /// The vectors again in host memory, for the chain on the CPU ([`PreparedSampler::host_state`]).
    host: HostVectors,
}

/// The sampler head's biases and LayerNorm parameters as host vectors.
#[derive(Debug, Default)]
struct HostVectors {
    b1: Vec<f32>,
    b2: Vec<f32>,
    ln1: (Vec<f32>, Vec<f32>),
    ln2: (Vec<f32>, Vec<f32>),
}

impl HostVectors {
    /// True when every vector holds `d` values (a copy that failed holds none, and the
    /// chain then runs on tensors).
    fn fit(&self, d: usize) -> bool {
        [&self.b1, &self.b2, &self.ln1.0, &self.ln1.1, &self.ln2.0, &self.ln2.1].iter().all(|v| v.len() == d)
    }
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
            let (b1, b2) = (
                self.fc1.bs.as_ref().map_or_else(zeros, |b| b.detach().copy()),
                self.fc2.bs.as_ref().map_or_else(zeros, |b| b.detach().copy()),
            );
            let (ln1, ln2) = (ln(&self.ln1), ln(&self.ln2));
            // A copy that fails leaves its vector empty: `HostVectors::fit` then says no.
            let vector = |t: &Tensor| Vec::<f32>::try_from(t.to_kind(Kind::Float)).unwrap_or_default();
            let host = HostVectors {
                b1: vector(&b1),
                b2: vector(&b2),
                ln1: (vector(&ln1.0), vector(&ln1.1)),
                ln2: (vector(&ln2.0), vector(&ln2.1)),
            };
            PreparedSampler {
                w1_prev: self.fc1.ws.narrow(1, 0, d).contiguous().detach(),
                w1_z: self.fc1.ws.narrow(1, d, d).contiguous().detach(),
                b1,
                ln1,
                w2: self.fc2.ws.detach().contiguous(),
                b2,
                ln2,
                wo: self.out.as_ref().map(|o| o.ws.detach().contiguous()),
                d,
                host,
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
        BlockInputs { part: linear(&z, &self.w1_z, Some(&self.b1)), z }
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
        let h = norm(&(block.part.narrow(0, j, 1) + linear(&e, &self.w1_prev, None)).silu(), &self.ln1);
        let m = norm(&linear(&h, &self.w2, Some(&self.b2)).silu(), &self.ln2);
        match &self.wo {
            Some(wo) => block.z.narrow(0, j, 1) + linear(&m, wo, None),
            None => m,
        }
    }

    /// The `z` half of the first layer for a block's hidden states held in host memory
    /// (`z`: `m x d` values), into `part`; false when the CPU's few-row kernel does not run
    /// here (the chain then runs on tensors, [`PreparedSampler::block`]).
    pub fn host_block(&self, z: &[f32], part: &mut [f32]) -> bool {
        self.host.fit(self.d as usize) && few_rows::product_into(z, &self.w1_z, Some(&self.host.b1), part)
    }

    /// [`PreparedSampler::step`] in host memory on the CPU, every product through the
    /// few-row kernel: a draft costs four products and no libtorch operation. `part` and
    /// `z` are the draft's rows of [`PreparedSampler::host_block`] and of the block's hidden
    /// states, `e` the previous token's embedding; the state goes to `out` (all `d`
    /// values). False when the kernel does not run here or the lengths do not fit.
    pub fn host_state(&self, part: &[f32], z: &[f32], e: &[f32], out: &mut [f32]) -> bool {
        let d = self.d as usize;
        let mut h = vec![0f32; d];
        let sizes = self.host.fit(d) && part.len() == d && z.len() == d && out.len() == d;
        if !sizes || !few_rows::product_into(e, &self.w1_prev, None, &mut h) {
            return false;
        }
        for (h, p) in h.iter_mut().zip(part) {
            *h = silu(*h + p);
        }
        layer_norm(&mut h, &self.host.ln1);
        let mut m = vec![0f32; d];
        if !few_rows::product_into(&h, &self.w2, Some(&self.host.b2), &mut m) {
            return false;
        }
        m.iter_mut().for_each(|v| *v = silu(*v));
        layer_norm(&mut m, &self.host.ln2);
        match &self.wo {
            Some(wo) => {
                if !few_rows::product_into(&m, wo, None, out) {
                    return false;
                }
                out.iter_mut().zip(z).for_each(|(o, z)| *o += z);
            }
            None => out.copy_from_slice(&m),
        }
        true
    }
}

/// `x * sigmoid(x)`.
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// LayerNorm over `x` in place with weight and bias `wb` (mean and variance summed in f64).
fn layer_norm(x: &mut [f32], (w, b): &(Vec<f32>, Vec<f32>)) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + LAYER_NORM_EPS).sqrt();
    for ((v, w), b) in x.iter_mut().zip(w).zip(b) {
        *v = ((f64::from(*v) - mean) * inv) as f32 * w + b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, nn::VarStore};

    /// The chain's state computed on host vectors equals the tensor operations' to f32
    /// rounding, for both forms (the residual one with a non-zero `W_o`), a block's first
    /// and last draft.
    #[test]
    fn host_state_equals_the_tensor_state() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(6);
        let d = 96;
        for form in SamplerForm::ALL {
            let vs = VarStore::new(Device::Cpu);
            let head = SamplerHead::new(&vs.root(), d, form);
            if let Some(out) = &head.out {
                let mut ws = out.ws.shallow_clone();
                ws.copy_(&(Tensor::randn([d as i64, d as i64], (Kind::Float, Device::Cpu)) * 0.1));
            }
            let prepared = head.prepare();
            let (m, o) = (3, (Kind::Float, Device::Cpu));
            let (z, e) = (Tensor::randn([m, d as i64], o), Tensor::randn([1, d as i64], o));
            let host = |t: &Tensor| Vec::<f32>::try_from(t.contiguous().view([-1])).unwrap_or_default();
            let (z_host, e_host) = (host(&z), host(&e));
            let mut part = vec![0f32; m as usize * d];
            if !prepared.host_block(&z_host, &mut part) {
                assert!(!few_rows::available());
                return;
            }
            let block = prepared.block(&z);
            for j in [0, m - 1] {
                let want = host(&prepared.step(&block, j, &e));
                let rows = j as usize * d..(j as usize + 1) * d;
                let mut got = vec![0f32; d];
                assert!(prepared.host_state(&part[rows.clone()], &z_host[rows], &e_host, &mut got));
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-5, "{form}, draft {j}: max difference {diff}");
                assert!(want.iter().any(|&v| v != 0.0), "{form}: a zero state compares nothing");
            }
            let mut out = vec![0f32; d];
            assert!(!prepared.host_state(&part[..d - 1], &z_host[..d], &e_host, &mut out), "a short row was taken");
        }
    }
}
