//! The sampler head (METHOD.md section 1.3): `logits = W_lm MLP([E(prev); z])`, MLP = two
//! blocks of Linear -> SiLU -> LayerNorm (2d -> d, d -> d). It lets a draft depend on the
//! draft before it, not only on the mask's hidden state. The residual form (METHOD.md
//! section 1.3, decided) adds the MLP's output through a zero-initialised `W_o` to `z`:
//! `logits = W_lm (z + W_o MLP([E(prev); z]))`, so that it starts drafting exactly as the
//! LM head does and can only learn to do better.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn, nn::Module};

use crate::error::Result;
use crate::model::few_rows;
use crate::model::int8::{self, Int8Panels};
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
    /// The first layer's `E(prev)` half of the tokens drafts are chosen from, computed once
    /// ([`PreparedSampler::with_prev_table`]).
    prev_table: Option<PrevTable>,
    /// The chain's other products in int8 ([`PreparedSampler::with_int8`]).
    int8: Option<Int8Weights>,
}

/// `w1_z`, `w2` and `W_o` quantized to int8 panels, for a chain whose head is int8 too.
#[derive(Debug)]
struct Int8Weights {
    w1_z: Int8Panels,
    w2: Int8Panels,
    wo: Option<Int8Panels>,
}

/// `E(t) W1_prev^T` for a set of tokens `t`, in host memory: the chain's first product for a
/// previous token is then a row read. Each row was computed by the few-row kernel, whose
/// outputs for a row do not depend on the other rows of a call, so it is the value the
/// chain would compute for that token alone, bit for bit.
#[derive(Debug)]
struct PrevTable {
    /// Per token id of the vocabulary: its row, or `u32::MAX` when it has none.
    row_of: Vec<u32>,
    /// `rows x d` values.
    values: Vec<f32>,
}

/// The most bytes a table of every token of the vocabulary may take (without a draft
/// vocabulary); larger vocabularies keep the product for each draft.
const PREV_TABLE_MAX_BYTES: usize = 16 << 20;

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
                prev_table: None,
                int8: None,
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
        self.host.fit(self.d as usize)
            && product(z, &self.w1_z, self.int8.as_ref().map(|q| &q.w1_z), Some(&self.host.b1), part)
    }

    /// With the chain's products after the first layer's `E(prev)` half (`w1_z`, `w2` and
    /// the residual form's `W_o`) multiplied in int8 on host vectors, where `on` and the
    /// int8 tiles run: what a drafter whose head is int8 does (a quarter of the bytes a
    /// draft reads; its drafts may part from the f32 chain's at near-ties, never the
    /// output). The `E(prev)` half stays f32 (a table's row: nothing to multiply). `short`:
    /// panels in `[-32, 32]` ([`Int8Panels::of`]).
    pub fn with_int8(mut self, on: bool, short: bool) -> Self {
        let panels = || -> Option<Int8Weights> {
            Some(Int8Weights {
                w1_z: Int8Panels::of(&self.w1_z, short)?,
                w2: Int8Panels::of(&self.w2, short)?,
                wo: match &self.wo {
                    Some(wo) => Some(Int8Panels::of(wo, short)?),
                    None => None,
                },
            })
        };
        self.int8 = if on && int8::available() { tch::no_grad(panels) } else { None };
        self
    }

    /// Whether the chain's products run in int8 ([`PreparedSampler::with_int8`]).
    pub fn int8(&self) -> bool {
        self.int8.is_some()
    }

    /// Bytes the int8 panels of [`PreparedSampler::with_int8`] hold.
    pub fn int8_bytes(&self) -> usize {
        self.int8.as_ref().map_or(0, |q| q.w1_z.bytes() + q.w2.bytes() + q.wo.as_ref().map_or(0, Int8Panels::bytes))
    }

    /// With the first layer's `E(prev)` half of `ids` (token ids; every token of the
    /// vocabulary when `None` and the table is at most [`PREV_TABLE_MAX_BYTES`]) computed
    /// now from `embeddings` (`[vocab, d]`, f32 on the CPU), where the few-row kernel runs:
    /// a draft's state then reads its previous token's row ([`PreparedSampler::host_prev`])
    /// rather than multiplying its embedding. Unchanged where the table does not apply.
    pub fn with_prev_table(mut self, embeddings: &Tensor, ids: Option<&[i64]>) -> Self {
        self.prev_table = tch::no_grad(|| self.prev_table_of(embeddings, ids));
        self
    }

    fn prev_table_of(&self, embeddings: &Tensor, ids: Option<&[i64]>) -> Option<PrevTable> {
        let d = self.d as usize;
        let [vocab, width] = embeddings.size()[..] else { return None };
        let fits = few_rows::available()
            && width as usize == d
            && embeddings.kind() == Kind::Float
            && embeddings.device() == tch::Device::Cpu;
        let all: Vec<i64>;
        let ids = match ids {
            Some(ids) => ids,
            None if (vocab as usize) * d * 4 <= PREV_TABLE_MAX_BYTES => {
                all = (0..vocab).collect();
                &all
            }
            None => return None,
        };
        if !fits || ids.is_empty() || ids.iter().any(|&t| !(0..vocab).contains(&t)) {
            return None;
        }
        let rows = embeddings.index_select(0, &Tensor::from_slice(ids)).contiguous();
        let mut e = vec![0f32; ids.len() * d];
        rows.f_copy_data(&mut e, ids.len() * d).ok()?;
        let mut values = vec![0f32; ids.len() * d];
        let chunk = few_rows::MAX_ROWS as usize * d;
        for (x, y) in e.chunks(chunk).zip(values.chunks_mut(chunk)) {
            if !few_rows::product_into(x, &self.w1_prev, None, y) {
                return None;
            }
        }
        let mut row_of = vec![u32::MAX; vocab as usize];
        for (row, &t) in ids.iter().enumerate() {
            row_of[t as usize] = row as u32;
        }
        Some(PrevTable { row_of, values })
    }

    /// Bytes the table of [`PreparedSampler::with_prev_table`] holds.
    pub fn prev_table_bytes(&self) -> usize {
        self.prev_table.as_ref().map_or(0, |t| 4 * (t.row_of.len() + t.values.len()))
    }

    /// The first layer's `E(token)` half for the chain on the CPU, into `out` (`d`
    /// values): the table's row where it has one, else `token`'s row of `embeddings`
    /// (`[vocab, d]`) multiplied by the few-row kernel, the same value either way. False
    /// when the kernel does not take it (the chain then runs on tensors).
    pub fn host_prev(&self, token: i64, embeddings: &Tensor, out: &mut [f32]) -> Result<bool> {
        let d = self.d as usize;
        if out.len() != d {
            return Ok(false);
        }
        let row = self.prev_table.as_ref().and_then(|t| {
            let r = *t.row_of.get(usize::try_from(token).ok()?)?;
            (r != u32::MAX).then(|| &t.values[r as usize * d..][..d])
        });
        if let Some(row) = row {
            out.copy_from_slice(row);
            return Ok(true);
        }
        let mut e = vec![0f32; d];
        embeddings.f_get(token)?.f_copy_data(&mut e, d)?;
        Ok(few_rows::product_into(&e, &self.w1_prev, None, out))
    }

    /// [`PreparedSampler::step`] in host memory on the CPU, every product through the
    /// few-row kernel: a draft costs three products and no libtorch operation. `part` and
    /// `z` are the draft's rows of [`PreparedSampler::host_block`] and of the block's hidden
    /// states, `prev` the previous token's half of the first layer
    /// ([`PreparedSampler::host_prev`]); the state goes to `out` (all `d` values). False
    /// when the kernel does not run here or the lengths do not fit.
    pub fn host_state(&self, part: &[f32], z: &[f32], prev: &[f32], out: &mut [f32]) -> bool {
        let d = self.d as usize;
        let sizes = self.host.fit(d) && part.len() == d && z.len() == d && prev.len() == d && out.len() == d;
        if !sizes {
            return false;
        }
        let mut h = prev.to_vec();
        for (h, p) in h.iter_mut().zip(part) {
            *h += p;
        }
        silu_all(&mut h);
        layer_norm(&mut h, &self.host.ln1);
        let mut m = vec![0f32; d];
        let q = self.int8.as_ref();
        if !product(&h, &self.w2, q.map(|q| &q.w2), Some(&self.host.b2), &mut m) {
            return false;
        }
        silu_all(&mut m);
        layer_norm(&mut m, &self.host.ln2);
        match &self.wo {
            Some(wo) => {
                if !product(&m, wo, q.and_then(|q| q.wo.as_ref()), None, out) {
                    return false;
                }
                out.iter_mut().zip(z).for_each(|(o, z)| *o += z);
            }
            None => out.copy_from_slice(&m),
        }
        true
    }
}

/// `x W^T + b` for host rows: by `panels` in int8 where given, else by the f32 weight's
/// few-row kernel. False (nothing written) when the sizes do not fit.
fn product(x: &[f32], weight: &Tensor, panels: Option<&Int8Panels>, bias: Option<&[f32]>, y: &mut [f32]) -> bool {
    let Some(panels) = panels else { return few_rows::product_into(x, weight, bias, y) };
    if !int8::product_into(x, panels, y) {
        return false;
    }
    if let Some(b) = bias {
        for row in y.chunks_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
    true
}

/// `x * sigmoid(x)` of every value: the CPU's vectorised loop where it runs.
fn silu_all(x: &mut [f32]) {
    if !crate::model::row_ops::silu_in_place(x) {
        x.iter_mut().for_each(|v| *v = *v / (1.0 + (-*v).exp()));
    }
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

    /// A head of `form` and width `d` in `vs`; the residual form's `W_o` random rather than
    /// zero, so that it counts in what a test compares.
    fn head_with_random_out(vs: &VarStore, d: usize, form: SamplerForm) -> SamplerHead {
        let head = SamplerHead::new(&vs.root(), d, form);
        if let Some(out) = &head.out {
            let mut ws = out.ws.shallow_clone();
            ws.copy_(&(Tensor::randn([d as i64, d as i64], (Kind::Float, Device::Cpu)) * 0.1));
        }
        head
    }

    /// The chain's state computed on host vectors equals the tensor operations' to f32
    /// rounding, for both forms (the residual one with a non-zero `W_o`), a block's first
    /// and last draft.
    #[test]
    fn host_state_equals_the_tensor_state() -> anyhow::Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(6);
        let d = 96;
        for form in SamplerForm::ALL {
            let vs = VarStore::new(Device::Cpu);
            let head = head_with_random_out(&vs, d, form);
            let prepared = head.prepare();
            let (m, o) = (3, (Kind::Float, Device::Cpu));
            // A vocabulary of 40 tokens; the previous token is token 7.
            let (z, embeddings) = (Tensor::randn([m, d as i64], o), Tensor::randn([40, d as i64], o));
            let e = embeddings.narrow(0, 7, 1);
            let host = |t: &Tensor| Vec::<f32>::try_from(t.contiguous().view([-1])).unwrap_or_default();
            let z_host = host(&z);
            let mut part = vec![0f32; m as usize * d];
            if !prepared.host_block(&z_host, &mut part) {
                assert!(!few_rows::available());
                return Ok(());
            }
            let mut prev = vec![0f32; d];
            assert!(prepared.host_prev(7, &embeddings, &mut prev)?);
            let block = prepared.block(&z);
            for j in [0, m - 1] {
                let want = host(&prepared.step(&block, j, &e));
                let rows = j as usize * d..(j as usize + 1) * d;
                let mut got = vec![0f32; d];
                assert!(prepared.host_state(&part[rows.clone()], &z_host[rows], &prev, &mut got));
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-5, "{form}, draft {j}: max difference {diff}");
                assert!(want.iter().any(|&v| v != 0.0), "{form}: a zero state compares nothing");
            }
            let mut out = vec![0f32; d];
            assert!(!prepared.host_state(&part[..d - 1], &z_host[..d], &prev, &mut out), "a short row was taken");
        }
        Ok(())
    }

    /// The chain's products in int8 (what a drafter with an int8 head runs) give the f32
    /// chain's block inputs and states within the quantization's error, in both forms, with
    /// panels of 127 levels and short ones (32 levels where AVX2's pair tiles run); the
    /// int8 panels exist only where the tiles run.
    #[test]
    fn int8_chain_near_the_f32_chain() -> anyhow::Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(8);
        let d = 72;
        let o = (Kind::Float, Device::Cpu);
        for (form, short) in SamplerForm::ALL.into_iter().flat_map(|f| [(f, false), (f, true)]) {
            let vs = VarStore::new(Device::Cpu);
            let head = head_with_random_out(&vs, d, form);
            let (exact, quantized) = (head.prepare(), head.prepare().with_int8(true, short));
            // Half a step of a row's largest magnitude over 127 or 32, through two products.
            let bound = if short && !int8::vnni() { 0.1 } else { 0.03 };
            assert_eq!(quantized.int8(), int8::available());
            if !quantized.int8() {
                assert_eq!(quantized.int8_bytes(), 0);
                continue;
            }
            assert!(!exact.int8() && exact.int8_bytes() == 0 && quantized.int8_bytes() > 2 * d * d);
            let m = 3;
            let z = Vec::<f32>::try_from(Tensor::randn([m * d as i64], o))?;
            let embeddings = Tensor::randn([10, d as i64], o);
            let mut prev = vec![0f32; d];
            assert!(exact.host_prev(4, &embeddings, &mut prev)?);
            let (mut part, mut part_q) = (vec![0f32; m as usize * d], vec![0f32; m as usize * d]);
            assert!(exact.host_block(&z, &mut part) && quantized.host_block(&z, &mut part_q));
            let near = |got: &[f32], want: &[f32], what: &str| {
                let top = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let diff = got.iter().zip(want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
                assert!(top > 0.0 && diff <= bound * top, "{form}, {short}, {what}: {diff} against {top}");
                assert!(got != want, "{form}, {short}, {what}: int8 gave the f32 values exactly");
            };
            near(&part_q, &part, "block");
            for j in 0..m as usize {
                let rows = j * d..(j + 1) * d;
                let (mut want, mut got) = (vec![0f32; d], vec![0f32; d]);
                assert!(exact.host_state(&part[rows.clone()], &z[rows.clone()], &prev, &mut want));
                assert!(quantized.host_state(&part[rows.clone()], &z[rows], &prev, &mut got));
                near(&got, &want, "state");
            }
        }
        Ok(())
    }

    /// The table of the first layer's `E(prev)` half gives, for a token it holds, the
    /// product the chain computes for that token alone, bit for bit, and for a token it
    /// does not hold that product itself; a table of every token is made only for a small
    /// vocabulary.
    #[test]
    fn prev_table_rows_equal_the_product() -> anyhow::Result<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(7);
        let d = 80;
        let vs = VarStore::new(Device::Cpu);
        let head = SamplerHead::new(&vs.root(), d, SamplerForm::Residual);
        let o = (Kind::Float, Device::Cpu);
        // 70 tokens: more than one chunk of the few-row kernel's rows.
        let embeddings = Tensor::randn([70, d as i64], o);
        let ids: Vec<i64> = (0..70).filter(|t| t % 3 != 1).collect();
        let plain = head.prepare();
        let table = head.prepare().with_prev_table(&embeddings, Some(&ids));
        let every = head.prepare().with_prev_table(&embeddings, None);
        if !few_rows::available() {
            assert_eq!(table.prev_table_bytes(), 0);
            return Ok(());
        }
        assert_eq!(table.prev_table_bytes(), 4 * (70 + ids.len() * d));
        assert_eq!(every.prev_table_bytes(), 4 * (70 + 70 * d));
        for token in 0..70 {
            let (mut want, mut got, mut all) = (vec![0f32; d], vec![0f32; d], vec![0f32; d]);
            assert!(plain.host_prev(token, &embeddings, &mut want)?);
            assert!(table.host_prev(token, &embeddings, &mut got)?);
            assert!(every.host_prev(token, &embeddings, &mut all)?);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "token {token}");
            assert_eq!(bits(&all), bits(&want), "token {token}");
            assert!(want.iter().any(|&v| v != 0.0));
        }
        // Token ids outside the vocabulary: no table, and no row either way.
        assert_eq!(head.prepare().with_prev_table(&embeddings, Some(&[3, 70])).prev_table_bytes(), 0);
        assert!(plain.host_prev(70, &embeddings, &mut vec![0f32; d]).is_err());
        // A vocabulary past the size limit gets no table of every token.
        let big = Tensor::zeros([(PREV_TABLE_MAX_BYTES / (4 * d)) as i64 + 1, d as i64], o);
        assert_eq!(head.prepare().with_prev_table(&big, None).prev_table_bytes(), 0);
        Ok(())
    }
}
