//! Multi-head self-attention with grouped key/value heads, RoPE, optional q/k norms (Qwen3),
//! the KV cache, and PyTorch's fused scaled-dot-product attention.

use tch::Tensor;

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::{Gated, ProjGroup, StackedLinear};
use super::norm::RmsNorm;
use super::rope::RopeTables;
use super::weights::Weights;
use crate::error::Result;

/// Which keys each query may attend to.
#[derive(Debug, Clone, Copy)]
pub enum AttnMask<'a> {
    /// Every new token attends to the whole cache and causally to the new tokens.
    Causal,
    /// An explicit mask over `[t, past + t]` (or `[b, 1, t, past + t]`): boolean (`true` =
    /// attend), or additive in the activations' dtype (0 = attend, -inf = not), which
    /// saves the kernel a conversion per layer.
    Custom(&'a Tensor),
}

/// What one forward pass needs besides the activations.
#[derive(Clone, Copy)]
pub struct Pass<'a> {
    /// cos/sin of each new token's position.
    pub rope: &'a RopeTables,
    /// The attention pattern.
    pub mask: AttnMask<'a>,
    /// A (gated) adapter, when one is applied.
    pub adapter: Option<&'a Gated<'a>>,
    /// The cache positions this pass's rows are written at (`[t]`, on the device), with the
    /// whole cache attended under `mask`: a pass whose shapes never change, as a CUDA
    /// graph needs ([`Llama::forward_in_place`](super::Llama::forward_in_place)). `None`:
    /// the rows go after the cache's length and attention sees the cache up to them.
    pub write_at: Option<&'a Tensor>,
}

impl Pass<'_> {
    /// True when the activations are two halves of one sequence ([`super::linear::Gate::Halves`]).
    pub fn joins_halves(&self) -> bool {
        self.adapter.is_some_and(|a| a.gate.joins_halves())
    }
}

/// `self_attn` of one decoder layer.
#[derive(Debug)]
pub struct Attention {
    /// `q_proj`, `k_proj`, `v_proj` stacked.
    qkv_proj: StackedLinear,
    o_proj: StackedLinear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    scale: f64,
    layer: usize,
}

impl Attention {
    /// The stacked weights of its projections (q/k/v, o).
    pub(crate) fn weights_mut(&mut self) -> Vec<&mut Tensor> {
        [&mut self.qkv_proj, &mut self.o_proj].into_iter().filter_map(StackedLinear::stacked_weight_mut).collect()
    }

    /// Load layer `layer`'s attention from `w` (= `model.layers.N.self_attn`).
    pub fn load(w: &Weights, c: &ModelConfig, layer: usize) -> Result<Self> {
        let d = c.hidden_size;
        let (q_norm, k_norm) = if c.qk_norm {
            (
                Some(RmsNorm::load(&w.pp("q_norm"), c.head_dim, c.rms_norm_eps)?),
                Some(RmsNorm::load(&w.pp("k_norm"), c.head_dim, c.rms_norm_eps)?),
            )
        } else {
            (None, None)
        };
        let qkv = [("q_proj", c.q_dim()), ("k_proj", c.kv_dim()), ("v_proj", c.kv_dim())];
        Ok(Self {
            qkv_proj: StackedLinear::load(w, &qkv, d, c.qkv_bias)?,
            o_proj: StackedLinear::load(w, &[("o_proj", d)], c.q_dim(), c.o_bias)?,
            q_norm,
            k_norm,
            num_heads: c.num_heads as i64,
            num_kv_heads: c.num_kv_heads as i64,
            head_dim: c.head_dim as i64,
            scale: (c.head_dim as f64).powf(-0.5),
            layer,
        })
    }

    /// The stacked q/k/v projections ([`ProjGroup::Qkv`]) or `o_proj` (any other group).
    pub fn group(&self, group: ProjGroup) -> &StackedLinear {
        if group == ProjGroup::Qkv { &self.qkv_proj } else { &self.o_proj }
    }

    /// # Shapes
    /// `x`: `[b, t, d]` -> `[b, t, d]`.
    pub fn forward(&self, x: &Tensor, pass: &Pass, cache: Option<&mut KvCache>) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let a = pass.adapter;
        let qkv = self.qkv_proj.project(x, a, self.layer, ProjGroup::Qkv).view([b, t, h + 2 * kv, hd]);
        // [b, t, heads, hd] each.
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (
                pass.rope.apply(&qn.forward(&qkv.narrow(2, 0, h))),
                pass.rope.apply(&kn.forward(&qkv.narrow(2, h, kv))),
            ),
            // Queries and keys rotate together: one rotation for both.
            _ => {
                let qk = pass.rope.apply(&qkv.narrow(2, 0, h + kv));
                (qk.narrow(2, 0, h), qk.narrow(2, h, kv))
            }
        };
        let v = qkv.narrow(2, h + kv, kv);
        // Two halves of one sequence (`Gate::Halves`) attend as one sequence of 2t rows.
        let (q, k, v) = if pass.joins_halves() {
            let join = |x: &Tensor, heads: i64| x.reshape([1, b * t, heads, hd]);
            (join(&q, h), join(&k, kv), join(&v, kv))
        } else {
            (q, k, v)
        };
        let t_seq = q.size()[1];
        let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)); // [b, heads, t, hd]

        let past = cache.as_ref().map_or(0, |c| c.len() as i64);
        let (k, v) = match (cache, pass.write_at) {
            (Some(cache), Some(at)) => cache.write_at(self.layer, &k, &v, at),
            (Some(cache), None) => cache.append(self.layer, &k, &v),
            (None, _) => (k, v),
        };
        let y = match pass.mask {
            // One query attends to everything before it: no mask at all.
            AttnMask::Causal if t_seq == 1 => attend(&q, &k, &v, None, false, self.scale),
            AttnMask::Causal if past == 0 => attend(&q, &k, &v, None, true, self.scale),
            AttnMask::Causal => {
                attend(&q, &k, &v, Some(&super::kv_cache::causal_mask(past, t_seq, x.device())), false, self.scale)
            }
            AttnMask::Custom(mask) => attend(&q, &k, &v, Some(mask), false, self.scale),
        };
        let y = y.transpose(1, 2).reshape([b, t, h * hd]);
        self.o_proj.project(&y, a, self.layer, ProjGroup::O)
    }
}

/// Scaled-dot-product attention of `q` over `k`, `v` with grouped-query heads shared by
/// their query heads inside the kernel (no copy), masked or not. On CUDA, libtorch 2.11
/// runs this as cuDNN's fused attention, grouped heads and an additive mask included: on an
/// H200 26 to 30 us per call for the 135M and 8B head shapes, where copying the key/value
/// heads to every query head first (what the memory-efficient kernel would need) took 60 us
/// (scripts/gpu_check.py's session, docs/BENCHMARKS.md). On the CPU, f32 calls of up to
/// [`super::few_queries::MAX_ROWS`] query rows (decoding) go to our kernel
/// ([`super::few_queries`]), the rest to libtorch's, which takes both too.
///
/// # Shapes
/// `q`: `[b, h, t, hd]`; `k`, `v`: `[b, kv, s, hd]` with `h` a multiple of `kv`; `mask`:
/// broadcastable to `[b, h, t, s]` -> `[b, h, t, hd]`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: f64) -> Tensor {
    if let Some(y) = super::few_queries::attend(q, k, v, mask, causal, scale) {
        return y;
    }
    let grouped = q.size()[1] != k.size()[1];
    Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale, grouped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Grouped key/value heads give the same attention as the same heads copied to every
    /// query head, with a boolean and with an additive mask.
    #[test]
    fn grouped_heads_equal_expanded_heads() {
        tch::manual_seed(3);
        let q = Tensor::randn([1, 8, 9, 16], (Kind::Float, Device::Cpu));
        let k = Tensor::randn([1, 2, 20, 16], (Kind::Float, Device::Cpu));
        let v = Tensor::randn([1, 2, 20, 16], (Kind::Float, Device::Cpu));
        let allowed = Tensor::rand([9, 20], (Kind::Float, Device::Cpu)).gt(0.3).logical_or(&Tensor::eye_m(
            9,
            20,
            (Kind::Bool, Device::Cpu),
        ));
        let additive =
            Tensor::zeros([9, 20], (Kind::Float, Device::Cpu)).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
        let (ke, ve) = (k.repeat_interleave_self_int(4, 1, None), v.repeat_interleave_self_int(4, 1, None));
        for mask in [&allowed, &additive] {
            let grouped = attend(&q, &k, &v, Some(mask), false, 0.25);
            let expanded = attend(&q, &ke, &ve, Some(mask), false, 0.25);
            let diff = (&grouped - &expanded).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{diff}");
        }
        let bool_result = attend(&q, &k, &v, Some(&allowed), false, 0.25);
        let additive_result = attend(&q, &k, &v, Some(&additive), false, 0.25);
        assert!((&bool_result - &additive_result).abs().max().double_value(&[]) < 1e-6);
    }
}
