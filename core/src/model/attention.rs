//! Multi-head self-attention with grouped key/value heads, RoPE, optional q/k norms (Qwen3),
//! the KV cache, and PyTorch's fused scaled-dot-product attention.

use tch::Tensor;

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::{Gated, Linear, Proj, project};
use super::norm::RmsNorm;
use super::rope::RopeTables;
use super::weights::Weights;
use crate::error::Result;

/// Which keys each query may attend to.
#[derive(Debug, Clone, Copy)]
pub enum AttnMask<'a> {
    /// Every new token attends to the whole cache and causally to the new tokens.
    Causal,
    /// An explicit boolean mask (`true` = attend), `[t, past + t]` or `[b, 1, t, past + t]`.
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
}

/// `self_attn` of one decoder layer.
#[derive(Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    scale: f64,
    layer: usize,
}

impl Attention {
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
        Ok(Self {
            q_proj: Linear::load(&w.pp("q_proj"), d, c.q_dim(), c.qkv_bias)?,
            k_proj: Linear::load(&w.pp("k_proj"), d, c.kv_dim(), c.qkv_bias)?,
            v_proj: Linear::load(&w.pp("v_proj"), d, c.kv_dim(), c.qkv_bias)?,
            o_proj: Linear::load(&w.pp("o_proj"), c.q_dim(), d, c.o_bias)?,
            q_norm,
            k_norm,
            num_heads: c.num_heads as i64,
            num_kv_heads: c.num_kv_heads as i64,
            head_dim: c.head_dim as i64,
            scale: (c.head_dim as f64).powf(-0.5),
            layer,
        })
    }

    /// # Shapes
    /// `x`: `[b, t, d]` -> `[b, t, d]`.
    pub fn forward(&self, x: &Tensor, pass: &Pass, cache: Option<&mut KvCache>) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let a = pass.adapter;
        let heads = |lin: &Linear, proj: Proj, n: i64, norm: &Option<RmsNorm>| {
            let y = project(lin, x, a, self.layer, proj).view([b, t, n, self.head_dim]);
            let y = match norm {
                Some(norm) => norm.forward(&y),
                None => y,
            };
            y.transpose(1, 2) // [b, n, t, hd]
        };
        let q = pass.rope.apply(&heads(&self.q_proj, Proj::Q, self.num_heads, &self.q_norm));
        let k = pass.rope.apply(&heads(&self.k_proj, Proj::K, self.num_kv_heads, &self.k_norm));
        let v = heads(&self.v_proj, Proj::V, self.num_kv_heads, &None);

        let past = cache.as_ref().map_or(0, |c| c.len() as i64);
        let (k, v) = match cache {
            Some(cache) => cache.append(self.layer, &k, &v),
            None => (k, v),
        };
        // Grouped-query attention inside the kernel: key/value heads are never copied per
        // query head.
        let gqa = self.num_heads != self.num_kv_heads;
        let sdpa = |mask: Option<&Tensor>, causal: bool| {
            Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, self.scale, gqa)
        };
        let y = match pass.mask {
            // One query attends to everything before it: no mask at all.
            AttnMask::Causal if t == 1 => sdpa(None, false),
            AttnMask::Causal if past == 0 => sdpa(None, true),
            AttnMask::Causal => sdpa(Some(&super::kv_cache::causal_mask(past, t, x.device())), false),
            AttnMask::Custom(mask) => sdpa(Some(mask), false),
        };
        let y = y.transpose(1, 2).reshape([b, t, self.num_heads * self.head_dim]);
        project(&self.o_proj, &y, a, self.layer, Proj::O)
    }
}
