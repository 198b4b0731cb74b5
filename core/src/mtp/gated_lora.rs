//! Gated LoRA: `y = W x + g * (alpha / r) * B (A x)` on chosen projections of every layer,
//! where the gate g is 1 on mask rows and 0 on NTP rows (METHOD.md section 1.2). The gate is
//! applied by the model ([`crate::model::Gated`]); this module holds A and B.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use crate::model::{ModelConfig, Proj, ProjDelta};

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: usize,
    /// Scale numerator: the delta is multiplied by alpha / r.
    pub alpha: f64,
    /// The projections adapted in every layer.
    pub targets: Vec<Proj>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 16, alpha: 32.0, targets: Proj::ALL.to_vec() }
    }
}

/// The input and output widths of a projection.
pub fn proj_dims(c: &ModelConfig, proj: Proj) -> (usize, usize) {
    let (d, i) = (c.hidden_size, c.intermediate_size);
    match proj {
        Proj::Q => (d, c.q_dim()),
        Proj::K | Proj::V => (d, c.kv_dim()),
        Proj::O => (c.q_dim(), d),
        Proj::Gate | Proj::Up => (d, i),
        Proj::Down => (i, d),
    }
}

/// A (`[r, in]`, random) and B (`[out, r]`, zero): at initialisation the delta is zero and
/// the adapted model equals the base model.
#[derive(Debug)]
struct Pair {
    a: Tensor,
    b: Tensor,
}

/// The low-rank factors of every adapted projection.
#[derive(Debug)]
pub struct Lora {
    pairs: BTreeMap<(usize, Proj), Pair>,
    scale: f64,
}

impl Lora {
    /// Create the factors under `p` (`lora.layers.N.q_proj.{A,B}`). A is initialised like
    /// PyTorch's default Linear init (Kaiming uniform, bound 1/sqrt(in)), B with zeros.
    pub fn new(p: &nn::Path, model: &ModelConfig, cfg: &LoraConfig) -> Self {
        let r = cfg.rank as i64;
        let mut pairs = BTreeMap::new();
        for layer in 0..model.num_layers {
            let lp = p / "layers" / layer;
            for &proj in &cfg.targets {
                let (inp, out) = proj_dims(model, proj);
                let pp = &lp / proj.module();
                let bound = 1.0 / (inp as f64).sqrt();
                let a = pp.var("A", &[r, inp as i64], nn::Init::Uniform { lo: -bound, up: bound });
                let b = pp.var("B", &[out as i64, r], nn::Init::Const(0.0));
                pairs.insert((layer, proj), Pair { a, b });
            }
        }
        Self { pairs, scale: cfg.alpha / cfg.rank as f64 }
    }
}

impl Lora {
    /// alpha / r.
    pub fn scale(&self) -> f64 {
        self.scale
    }
}

impl ProjDelta for Lora {
    fn delta(&self, layer: usize, proj: Proj, x: &Tensor, gate: Option<&Tensor>) -> Option<Tensor> {
        let pair = self.pairs.get(&(layer, proj))?;
        // The factors stay in f32 (trainable); activations may be bf16. The gate (scale
        // included) multiplies the rank-r intermediate: r columns, not `out`.
        let kind = x.kind();
        let h = if kind == Kind::Float {
            x.linear::<Tensor>(&pair.a, None)
        } else {
            x.to_kind(Kind::Float).linear::<Tensor>(&pair.a, None)
        };
        let h = match gate {
            Some(g) => h * g,
            None => h * self.scale,
        };
        let y = h.linear::<Tensor>(&pair.b, None);
        Some(if kind == Kind::Float { y } else { y.to_kind(kind) })
    }
}
