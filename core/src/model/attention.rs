//! Multi-head self-attention with grouped key/value heads, RoPE, optional q/k norms (Qwen3),
//! the KV cache, and PyTorch's fused scaled-dot-product attention.

use tch::Tensor;

use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::linear::{Gated, ProjGroup, StackedLinear};
use super::norm::RmsNorm;
use super::rope::RopeTables;
use super::row_split::RowPart;
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
        let qkv = self.qkv_proj.project(x, a, self.layer, ProjGroup::Qkv);
        let cache = match self.attend_in_place(&qkv, pass, cache) {
            Ok(y) => return self.o_proj.project(&y, a, self.layer, ProjGroup::O),
            Err(cache) => cache,
        };
        let qkv = qkv.view([b, t, h + 2 * kv, hd]);
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

impl Attention {
    /// The attention of a decoding pass on the CPU (f32, up to [`super::row_ops::MAX_ROWS`]
    /// rows after the cache, one row or an explicit mask, no q/k norms), its queries, keys
    /// and values read in place: rotated from `qkv` (`[b, t, (h + 2 kv) hd]`), the new keys
    /// and values written into the cache straight from there, and our kernel reading the
    /// cache buffers; `[b, t, h hd]`. Without the dozen views of the general path (a
    /// `narrow` costs about 0.8 us, a `transpose` 0.4: 7 us of an AR step's layer of the
    /// proxy), with the same values. `Err` gives the cache back, its committed rows
    /// untouched, where this does not apply.
    fn attend_in_place<'c>(
        &self,
        qkv: &Tensor,
        pass: &Pass,
        cache: Option<&'c mut KvCache>,
    ) -> std::result::Result<Tensor, Option<&'c mut KvCache>> {
        let Some(cache) = cache else { return Err(None) };
        let Some(rotated) = self.rotate_in_place(qkv, pass) else { return Err(Some(cache)) };
        let Some((k_buf, v_buf, s)) = cache.append_rows(self.layer, rotated.keys(), rotated.values()) else {
            return Err(Some(cache));
        };
        // A mask this kernel does not take leaves the rows written: the general path writes
        // the same rows at the same positions again.
        rotated.attend(k_buf, v_buf, s).ok_or(Some(cache))
    }

    /// [`Attention::forward`] for one thread's share of a pass's rows
    /// ([`super::row_split`]): its keys and values written at their cache rows, then, once
    /// every thread has written its own ([`RowPart::meet`]), its queries attend to all of
    /// them. `pass` describes this share's rows (their rotation, their rows of the mask).
    /// `None` (the pass is then run again whole) where the in-place path does not apply.
    pub(super) fn forward_part(&self, x: &Tensor, pass: &Pass, cache: &KvCache, part: &RowPart) -> Option<Tensor> {
        let a = pass.adapter;
        let qkv = self.qkv_proj.project(x, a, self.layer, ProjGroup::Qkv);
        let rotated = self.rotate_in_place(&qkv, pass);
        let buffers = rotated.as_ref().and_then(|r| cache.write_rows(self.layer, r.keys(), r.values(), part.at));
        if buffers.is_none() {
            part.fail();
        }
        // Every thread meets here once a layer, whether its rows were written or not.
        if !part.meet() {
            return None;
        }
        let (rotated, (k_buf, v_buf)) = (rotated?, buffers?);
        let Some(y) = rotated.attend(k_buf, v_buf, part.keys) else {
            part.fail();
            return None;
        };
        Some(self.o_proj.project(&y, a, self.layer, ProjGroup::O))
    }

    /// A pass's queries and keys rotated from `qkv` where the in-place path applies (see
    /// [`Attention::attend_in_place`]).
    fn rotate_in_place<'p>(&'p self, qkv: &'p Tensor, pass: &Pass<'p>) -> Option<Rotated<'p>> {
        use super::row_ops::rope_leading;
        let size = qkv.size();
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let width = (h + 2 * kv) * hd;
        let (&[b, t, w], Some(mask)) = (
            size.as_slice(),
            match pass.mask {
                AttnMask::Custom(mask) => Some(Some(mask)),
                AttnMask::Causal if size.get(1) == Some(&1) => Some(None),
                AttnMask::Causal => None,
            },
        ) else {
            return None;
        };
        let plain = self.q_norm.is_none() && self.k_norm.is_none() && !pass.joins_halves() && pass.write_at.is_none();
        if !(plain && w == width && super::few_queries::runs() && IN_PLACE.with(|c| c.get().0)) {
            return None;
        }
        let qk = rope_leading(qkv, h + kv, hd, &pass.rope.cos, &pass.rope.sin_signed)?;
        Some(Rotated { attention: self, qkv, qk, mask, b, t })
    }
}

/// A pass's queries and keys rotated ([`Attention::rotate_in_place`]), read in place with
/// its values.
struct Rotated<'a> {
    attention: &'a Attention,
    /// `[b, t, (h + 2 kv) hd]`, the values read from it.
    qkv: &'a Tensor,
    /// `[b, t, h + kv, hd]` contiguous: the rotated queries, then keys.
    qk: Tensor,
    mask: Option<&'a Tensor>,
    b: i64,
    t: i64,
}

impl Rotated<'_> {
    /// `[b, kv, t, hd]` rows of `ptr` whose tokens are `row` values apart.
    fn rows(&self, ptr: *const f32, row: i64) -> super::row_ops::Rows {
        let (b, t, kv, hd) = (self.b, self.t, self.attention.num_kv_heads, self.attention.head_dim);
        super::row_ops::Rows {
            ptr: ptr as *const u8,
            size: [b, kv, t, hd],
            strides: [t * row, hd, row],
            kind: tch::Kind::Float,
        }
    }

    /// The keys: heads `h..` of `qk`'s `h + kv`.
    fn keys(&self) -> super::row_ops::Rows {
        let (h, kv, hd) = (self.attention.num_heads, self.attention.num_kv_heads, self.attention.head_dim);
        self.rows((self.qk.data_ptr() as *const f32).wrapping_add((h * hd) as usize), (h + kv) * hd)
    }

    /// The values: heads `h + kv..` of `qkv`'s `h + 2 kv`.
    fn values(&self) -> super::row_ops::Rows {
        let (h, kv, hd) = (self.attention.num_heads, self.attention.num_kv_heads, self.attention.head_dim);
        self.rows((self.qkv.data_ptr() as *const f32).wrapping_add(((h + kv) * hd) as usize), (h + 2 * kv) * hd)
    }

    /// The queries' attention over the first `s` rows of the cache buffers `k_buf`, `v_buf`
    /// (`[b, kv, capacity, hd]`, contiguous, this pass's rows written) under the pass's
    /// mask, `[b, t, h hd]`; `None` where the kernel does not take the mask.
    fn attend(&self, k_buf: &Tensor, v_buf: &Tensor, s: i64) -> Option<Tensor> {
        use super::few_queries::{Dims, View, attend_views};
        let Attention { num_heads: h, num_kv_heads: kv, head_dim: hd, scale, .. } = *self.attention;
        let (b, t) = (self.b, self.t);
        let capacity = k_buf.size()[2];
        let buffer = |x: &Tensor| View {
            ptr: x.data_ptr() as *const f32,
            strides: [(kv * capacity * hd) as isize, (capacity * hd) as isize, hd as isize],
        };
        let qk_row = (h + kv) * hd;
        let q = View {
            ptr: self.qk.data_ptr() as *const f32,
            strides: [(t * qk_row) as isize, hd as isize, qk_row as isize],
        };
        let dims =
            Dims { b: b as usize, h: h as usize, kv: kv as usize, t: t as usize, s: s as usize, hd: hd as usize };
        let y = attend_views(dims, [q, buffer(k_buf), buffer(v_buf)], self.mask, false, scale, &[b, t, h * hd])?;
        IN_PLACE.with(|c| c.set((true, c.get().1 + 1)));
        Some(y)
    }
}

thread_local! {
    /// Whether this thread's passes may read attention in place, and how many layers' did.
    static IN_PLACE: std::cell::Cell<(bool, u64)> = const { std::cell::Cell::new((true, 0)) };
}

/// Whether this thread's passes may read their attention in place ([`read_in_place`]).
pub(super) fn reads_in_place() -> bool {
    IN_PLACE.with(|c| c.get().0)
}

/// Let this thread's forward passes read their attention in place where they can (`true`,
/// the default) or take the general path (the tests compare the two); returns how many
/// layers' attention this thread has read in place so far.
pub fn read_in_place(on: bool) -> u64 {
    IN_PLACE.with(|c| {
        let (_, count) = c.get();
        c.set((on, count));
        count
    })
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
