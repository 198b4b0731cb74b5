//! Linear projections, stacked where several read the same input (q/k/v, gate/up), and
//! the hook through which an adapter adds a gated low-rank term to them.

use std::fmt;

use tch::Tensor;

use super::weights::Weights;
use crate::error::Result;

/// `y = x W^T + b`, with the weight laid out as in PyTorch (`[out, in]`).
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, when the layer has one.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Load `weight` (and `bias` when `bias` is true) under `w`.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get("weight", &[out_dim as i64, in_dim as i64])?;
        let bias = if bias { Some(w.get("bias", &[out_dim as i64])?) } else { None };
        Ok(Self { weight, bias })
    }

    /// # Shapes
    /// `x`: `[..., in]` -> `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// The seven projections of a decoder layer an adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    /// Attention query.
    Q,
    /// Attention key.
    K,
    /// Attention value.
    V,
    /// Attention output.
    O,
    /// MLP gate.
    Gate,
    /// MLP up.
    Up,
    /// MLP down.
    Down,
}

impl Proj {
    /// All seven, in layer order.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The Hugging Face module name (`q_proj`, ...).
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The group of projections it is computed with.
    pub fn group(self) -> ProjGroup {
        match self {
            Proj::Q | Proj::K | Proj::V => ProjGroup::Qkv,
            Proj::O => ProjGroup::O,
            Proj::Gate | Proj::Up => ProjGroup::GateUp,
            Proj::Down => ProjGroup::Down,
        }
    }
}

impl fmt::Display for Proj {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.module())
    }
}

/// Projections that read the same input and run as one matrix product: q/k/v, o,
/// gate/up, down. Their outputs are concatenated in [`ProjGroup::parts`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjGroup {
    /// q, k, v (input: the normed hidden state).
    Qkv,
    /// o (input: the attention output).
    O,
    /// gate, up (input: the normed hidden state).
    GateUp,
    /// down (input: the gated MLP activation).
    Down,
}

impl ProjGroup {
    /// All four, in layer order.
    pub const ALL: [ProjGroup; 4] = [ProjGroup::Qkv, ProjGroup::O, ProjGroup::GateUp, ProjGroup::Down];

    /// The projections of the group, in output order.
    pub fn parts(self) -> &'static [Proj] {
        match self {
            ProjGroup::Qkv => &[Proj::Q, Proj::K, Proj::V],
            ProjGroup::O => &[Proj::O],
            ProjGroup::GateUp => &[Proj::Gate, Proj::Up],
            ProjGroup::Down => &[Proj::Down],
        }
    }

    /// Position in [`ProjGroup::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The projections of one [`ProjGroup`]: one stacked `[sum(out), in]` matrix, so that the
/// group costs one matrix product. A deviation from the checkpoint tree (which stores
/// `q_proj`, `k_proj`, `v_proj` apart), made at load time: each part is copied into its
/// rows. Trainable weights (pretraining) stay separate leaf tensors, one product each.
#[derive(Debug)]
pub struct StackedLinear {
    weights: Stacking,
}

#[derive(Debug)]
enum Stacking {
    Stacked(Linear),
    Separate(Vec<Linear>),
}

impl StackedLinear {
    /// Load the parts `(module, out_dim)` under `w` (each `module.weight`, and
    /// `module.bias` when `bias`), all reading `in_dim` features.
    pub fn load(w: &Weights, parts: &[(&str, usize)], in_dim: usize, bias: bool) -> Result<Self> {
        let mut linears = parts
            .iter()
            .map(|(name, out)| Linear::load(&w.pp(name), in_dim, *out, bias))
            .collect::<Result<Vec<_>>>()?;
        let weights = if linears.len() == 1 {
            Stacking::Stacked(linears.remove(0))
        } else if !w.frozen() {
            Stacking::Separate(linears)
        } else {
            let stack = |ts: Vec<&Tensor>| tch::no_grad(|| Tensor::cat(&ts, 0));
            let weight = stack(linears.iter().map(|l| &l.weight).collect());
            let bias = if bias { Some(stack(linears.iter().filter_map(|l| l.bias.as_ref()).collect())) } else { None };
            Stacking::Stacked(Linear { weight, bias })
        };
        Ok(Self { weights })
    }

    /// All parts' outputs, concatenated on the last dimension.
    ///
    /// # Shapes
    /// `x`: `[..., in]` -> `[..., sum(out)]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match &self.weights {
            Stacking::Stacked(l) => linear(x, &l.weight, l.bias.as_ref()),
            Stacking::Separate(parts) => Tensor::cat(&parts.iter().map(|l| l.forward(x)).collect::<Vec<_>>(), -1),
        }
    }

    /// The output of the group with the adapter's term added on the rows its gate selects
    /// (or the adapter's own product of the whole group, when it computes one).
    ///
    /// # Shapes
    /// `x`: `[b, t, in]` -> `[b, t, sum(out)]`.
    pub fn project(&self, x: &Tensor, adapter: Option<&Gated>, layer: usize, group: ProjGroup) -> Tensor {
        let Some(a) = adapter else { return self.forward(x) };
        if let Some(y) = a.delta.product(layer, group, x, &a.gate) {
            return y;
        }
        a.delta.add_to(layer, group, x, self.forward(x), &a.gate)
    }

    /// The stacked weight, where the parts are not separate trainable tensors.
    pub(crate) fn stacked_weight_mut(&mut self) -> Option<&mut Tensor> {
        match &mut self.weights {
            Stacking::Stacked(l) => Some(&mut l.weight),
            Stacking::Separate(_) => None,
        }
    }

    /// The stacked weight (`[sum(out), in]`) and bias of the group, as one product uses
    /// them (copies when the parts are separate trainable tensors).
    pub fn weight_and_bias(&self) -> (Tensor, Option<Tensor>) {
        match &self.weights {
            Stacking::Stacked(l) => (l.weight.shallow_clone(), l.bias.as_ref().map(Tensor::shallow_clone)),
            Stacking::Separate(parts) => tch::no_grad(|| {
                let weight = Tensor::cat(&parts.iter().map(|l| l.weight.detach()).collect::<Vec<_>>(), 0);
                let biases: Vec<Tensor> = parts.iter().filter_map(|l| l.bias.as_ref().map(Tensor::detach)).collect();
                (weight, (!biases.is_empty()).then(|| Tensor::cat(&biases, 0)))
            }),
        }
    }
}

/// `x W^T + b` (`x`: `[..., in]`, `weight`: `[out, in]`), the way that runs fastest for
/// the number of rows on the CPU (f32, no gradient; docs/BENCHMARKS.md, "Few-row
/// products" and "A product kernel for a few rows"):
/// - 1 to 32 rows (decoding), on a CPU with AVX2 and FMA: our own kernel
///   ([`super::few_rows`]), which streams the weight once and whose outputs for a row do
///   not depend on the other rows.
/// - Otherwise, for weights with both sides 256 or more, 1 to 5 rows: MKL's sgemm with the
///   weight as the left operand (`y^T = W x^T`), which streams the weight once; a single
///   row goes in twice, since MKL's matrix-vector product reads the weight at well under
///   half that bandwidth.
/// - 6 to 64 rows and a weight of 2 MiB or more: oneDNN's inner product, which reads the
///   plain weight in place (MKL's kernels for these column counts run at a fraction of the
///   CPU's arithmetic); 6 to 16 rows of a smaller weight: as for 1 to 5.
/// - 33 to 128 rows (a prompt's prefill; to 512 for a weight of 2 MiB or more), weights with
///   both sides 256 or more, where our kernel runs: our kernel 32 rows at a time
///   ([`chunked_max_rows`]).
/// - bf16 operands: our kernel as for f32 (the weight read as bf16), else `x.linear(W)`.
/// - Anything else: `x.linear(W)`.
///
/// `MTP_CPU_PRODUCTS=libraries` leaves our kernel out, `MTP_CPU_PRODUCTS=mkl` oneDNN too
/// (to compare the routes).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let route = cpu_route(x, weight);
    if route == Route::Library {
        return x.linear(weight, bias);
    }
    let size = x.size();
    let x2 = x.reshape([-1, size[size.len() - 1]]);
    let y = match route {
        // Should the kernel or oneDNN refuse after all, the library's product is the same.
        Route::Rows => super::few_rows::product(&x2, weight, bias).unwrap_or_else(|| x2.linear(weight, bias)),
        Route::RowChunks => {
            super::few_rows::product_in_chunks(&x2, weight, bias).unwrap_or_else(|| x2.linear(weight, bias))
        }
        Route::OneDnn => onednn_product(&x2, weight, bias).unwrap_or_else(|_| x2.linear(weight, bias)),
        Route::WeightLeft | Route::Library => {
            let rows = x2.size()[0];
            let x2 = if rows == 1 { x2.repeat([2, 1]) } else { x2 };
            let y = weight.mm(&x2.tr()).tr();
            let y = if rows == 1 { y.narrow(0, 0, 1) } else { y };
            match bias {
                Some(b) => y + b,
                None => y.contiguous(),
            }
        }
    };
    let mut out = size;
    if let Some(last) = out.last_mut() {
        *last = weight.size()[0];
    }
    y.view(out.as_slice())
}

/// `y += x W^T` in place for the rows of a decoding step (`x`: `[rows, in]`, `y`: a
/// contiguous `[rows, out]`, both f32 on the CPU): our kernel where [`linear`] would use
/// it, else `addmm_`.
pub fn add_product(y: &Tensor, x: &Tensor, weight: &Tensor) {
    if few_row_kernel_runs(y.device(), y.kind()) && super::few_rows::accumulate(x, weight, y) {
        return;
    }
    let mut y = y.shallow_clone();
    let _ = y.addmm_(x, &weight.tr());
}

/// Whether decoding's few-row products of a model on `device` in `kind` run through our
/// kernel ([`super::few_rows`]) in f32, and with them what reads f32 host vectors (the
/// draft chain, verification on the host, the adapter's term in the kernel): the CPU,
/// f32, a CPU with the instructions, and not switched off by `MTP_CPU_PRODUCTS`.
pub fn few_row_kernel_runs(device: tch::Device, kind: tch::Kind) -> bool {
    kind == tch::Kind::Float && few_row_products_ours(device, kind)
}

/// Whether [`linear`]'s few-row products of a model on `device` in `kind` run through our
/// kernel: as [`few_row_kernel_runs`], for f32 or bf16. Where they do, each row's output
/// does not depend on the other rows of a product, and a step needs no other form of its
/// products to keep its next-token rows AR's.
pub fn few_row_products_ours(device: tch::Device, kind: tch::Kind) -> bool {
    device == tch::Device::Cpu
        && matches!(kind, tch::Kind::Float | tch::Kind::BFloat16)
        && products() == CpuProducts::Ours
        && super::few_rows::available()
}

/// The smallest weight (elements) whose few-row products go through oneDNN: each call
/// costs oneDNN about 70 us more than MKL here, which only a weight of 2 MiB or more (in
/// f32) earns back (SmolLM2-135M's q/k/v, gate/up and down; none of the demo's).
const ONEDNN_MIN_WEIGHT: i64 = 1 << 19;

/// The most rows whose products go through our kernel [`super::few_rows::MAX_ROWS`] rows
/// at a time (a prompt's prefill), for a weight of `elements`: on the Zen 4 CPU
/// docs/BENCHMARKS.md measured ("Prefill"), MKL's products of 33 to 128 rows took 1.1-1.6x
/// as long for the demo's weights (0.1-0.4 M elements; 1.1x as long at 256 rows) and those
/// of 33 to 512 rows 1.1-2x as long for SmolLM2-135M's (0.3-1.8 M elements).
fn chunked_max_rows(elements: i64) -> i64 {
    if elements >= ONEDNN_MIN_WEIGHT { 512 } else { 128 }
}

/// How [`linear`] computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `x.linear(W)`.
    Library,
    /// Our kernel for a few rows.
    Rows,
    /// Our kernel, [`super::few_rows::MAX_ROWS`] rows at a time.
    RowChunks,
    /// MKL, the weight as the left operand.
    WeightLeft,
    /// oneDNN's inner product.
    OneDnn,
}

fn cpu_route(x: &Tensor, weight: &Tensor) -> Route {
    let size = x.size();
    let rows: i64 = size[..size.len().saturating_sub(1)].iter().product();
    let (out, inp) = (weight.size()[0], weight.size()[1]);
    let bf16 = x.kind() == tch::Kind::BFloat16;
    let eligible = x.device() == tch::Device::Cpu
        && (x.kind() == tch::Kind::Float || bf16)
        && weight.kind() == x.kind()
        && !x.requires_grad()
        && !weight.requires_grad();
    let big = out >= 256 && inp >= 256;
    let ours = few_row_products_ours(x.device(), x.kind());
    match rows {
        _ if !eligible => Route::Library,
        1..=super::few_rows::MAX_ROWS if ours => Route::Rows,
        _ if !big => Route::Library,
        _ if ours && rows <= chunked_max_rows(out * inp) => Route::RowChunks,
        // The libraries' forms below were measured for f32.
        _ if bf16 => Route::Library,
        1..=5 => Route::WeightLeft,
        6..=64 if out * inp >= ONEDNN_MIN_WEIGHT && onednn_available() => Route::OneDnn,
        6..=16 => Route::WeightLeft,
        _ => Route::Library,
    }
}

/// `x W^T + b` through oneDNN (`x`: `[rows, in]`, f32 on the CPU; the weight is read in
/// place).
fn onednn_product(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> std::result::Result<Tensor, tch::TchError> {
    x.contiguous().f_to_mkldnn(None)?.f_mkldnn_linear(weight, bias)?.f_to_dense(None, false)
}

/// Whether this libtorch has oneDNN and the route is not switched off.
fn onednn_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| tch::utils::has_mkldnn() && products() != CpuProducts::Mkl)
}

/// Which products the CPU routes may use (`MTP_CPU_PRODUCTS`, to compare them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CpuProducts {
    /// Our kernel, oneDNN and MKL (the default).
    Ours,
    /// `libraries`: oneDNN and MKL.
    Libraries,
    /// `mkl`: MKL alone.
    Mkl,
}

fn products() -> CpuProducts {
    static CHOICE: std::sync::OnceLock<CpuProducts> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("MTP_CPU_PRODUCTS").map(|v| v.to_ascii_lowercase()).as_deref() {
        Ok("mkl") => CpuProducts::Mkl,
        Ok("libraries") => CpuProducts::Libraries,
        _ => CpuProducts::Ours,
    })
}

/// Which rows of a forward pass an adapter's term applies to.
#[derive(Debug)]
pub enum Gate {
    /// Every row (plain LoRA, the paper's ablation: next-token outputs change too).
    All,
    /// A per-row factor, `[b, t, 1]` in the activations' dtype: 1 on rows the term applies
    /// to (mask rows), 0 elsewhere, where the output then equals the base output exactly.
    Rows(Tensor),
    /// Rows `start..t` of every sequence (decoding lays out mask rows last): the rows
    /// before `start` are not touched at all, so they cost nothing extra and equal the
    /// base output bit for bit (with an adapter's folded weights on libtorch's general
    /// path, they come from a product with more columns: on a GPU the base output to its
    /// kernels' rounding).
    Tail(i64),
    /// Activations packed as two halves, `[2, r, ·]`: entry 0 holds next-token rows, entry
    /// 1 mask rows, and attention joins them into one sequence of `2r` rows (entry 0
    /// first). The term applies to entry 1. An adapter with merged weights runs each
    /// group as one batched product, base weights on entry 0 and base + delta on entry 1:
    /// no extra operation per projection (decoding steps of small models, whose time is
    /// the number of operations).
    Halves,
}

impl Gate {
    /// True for [`Gate::Halves`]: the batch dimension holds two halves of one sequence.
    pub fn joins_halves(&self) -> bool {
        matches!(self, Gate::Halves)
    }
}

/// Something that adds a term to projections' outputs: a (gated) LoRA adapter.
pub trait ProjDelta {
    /// `y`, the base output of `group` in layer `layer` for input `x` (`[b, t, in]` ->
    /// `[b, t, out]`), plus the adapter's term on the rows `gate` selects. May add in
    /// place (outside autograd) and return `y` itself; returns `y` unchanged when the
    /// group is not adapted.
    fn add_to(&self, layer: usize, group: ProjGroup, x: &Tensor, y: Tensor, gate: &Gate) -> Tensor;

    /// The whole output of `group` (base and term) for input `x`, when the adapter
    /// computes it in one product of its own (merged weights for [`Gate::Halves`]); `None`
    /// to let the base product run and [`ProjDelta::add_to`] add the term.
    fn product(&self, _layer: usize, _group: ProjGroup, _x: &Tensor, _gate: &Gate) -> Option<Tensor> {
        None
    }

    /// True when a [`Gate::Tail`] pass's rows may be shared out between threads
    /// ([`super::row_split`]): each row's output is computed the same way whichever other
    /// rows share its call, however many of them the term applies to, and the adapter may be
    /// called from several threads at once (it reads what it holds and writes only its
    /// outputs).
    fn rows_apart(&self) -> bool {
        false
    }

    /// What a [`Gate::Tail`] row's products cost relative to a row without the term's
    /// (their arithmetic's rate: int8 about four times f32's), for weighing the threads'
    /// shares of a pass's rows.
    fn tail_row_cost(&self) -> f64 {
        1.0
    }
}

/// An adapter and the rows its term applies to.
pub struct Gated<'a> {
    /// The adapter.
    pub delta: &'a dyn ProjDelta,
    /// Where it applies.
    pub gate: Gate,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Every route gives the library's product (to f32 rounding), for each row count on
    /// both sides of each threshold, with and without a bias, on a weight under the oneDNN
    /// size and one over it.
    #[test]
    fn every_route_computes_the_same_product() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(0);
        let o = (Kind::Float, Device::Cpu);
        for (out, inp) in [(320, 256), (1024, 512)] {
            let w = Tensor::randn([out, inp], o);
            let b = Tensor::randn([out], o);
            for rows in [1, 2, 5, 6, 9, 16, 17, 25, 32, 33, 64, 65] {
                let x = Tensor::randn([1, rows, inp], o);
                for bias in [None, Some(&b)] {
                    let want = x.linear(&w, bias);
                    let got = linear(&x, &w, bias);
                    assert_eq!(got.size(), want.size(), "{out}x{inp}, {rows} rows");
                    let diff = (&got - &want).abs().max().double_value(&[]);
                    assert!(diff < 1e-3, "{out}x{inp}, {rows} rows, bias {}: max difference {diff}", bias.is_some());
                }
            }
        }
    }

    /// Which route each product takes: our kernel for 1 to 32 rows where the CPU has it, and
    /// in chunks of 32 for up to a few hundred rows of a big weight, else MKL or oneDNN
    /// (only for a big weight and 6 to 64 rows, when this libtorch has it); never anything
    /// but the library for tensors that need a gradient.
    #[test]
    fn products_take_the_route_their_shape_calls_for() {
        let o = (Kind::Float, Device::Cpu);
        let (big, small) = (Tensor::zeros([1024, 512], o), Tensor::zeros([320, 256], o));
        let rows = |n: i64, w: &Tensor| Tensor::zeros([1, n, w.size()[1]], o);
        let dnn =
            if tch::utils::has_mkldnn() && products() != CpuProducts::Mkl { Route::OneDnn } else { Route::WeightLeft };
        assert_eq!(onednn_available(), dnn == Route::OneDnn);
        let ours = few_row_kernel_runs(Device::Cpu, Kind::Float);
        let few = |library: Route| if ours { Route::Rows } else { library };
        assert_eq!(cpu_route(&rows(1, &big), &big), few(Route::WeightLeft));
        assert_eq!(cpu_route(&rows(5, &big), &big), few(Route::WeightLeft));
        assert_eq!(cpu_route(&rows(9, &big), &big), few(dnn));
        assert_eq!(cpu_route(&rows(32, &big), &big), few(dnn));
        // More rows (a prefill): our kernel 32 rows at a time, up to 512 for a weight of 2 MiB
        // or more, 128 for a smaller one.
        let chunks = |library: Route| if ours { Route::RowChunks } else { library };
        assert_eq!(cpu_route(&rows(33, &big), &big), chunks(dnn));
        assert_eq!(cpu_route(&rows(65, &big), &big), chunks(Route::Library));
        assert_eq!(cpu_route(&rows(512, &big), &big), chunks(Route::Library));
        assert_eq!(cpu_route(&rows(513, &big), &big), Route::Library);
        assert_eq!(cpu_route(&rows(9, &small), &small), few(Route::WeightLeft));
        assert_eq!(cpu_route(&rows(25, &small), &small), few(Route::Library));
        assert_eq!(cpu_route(&rows(128, &small), &small), chunks(Route::Library));
        assert_eq!(cpu_route(&rows(129, &small), &small), Route::Library);
        let thin = Tensor::zeros([1024, 64], o);
        assert_eq!(cpu_route(&rows(9, &thin), &thin), few(Route::Library));
        assert_eq!(cpu_route(&rows(40, &thin), &thin), Route::Library);
        let trainable = big.set_requires_grad(true);
        assert_eq!(cpu_route(&rows(9, &trainable), &trainable), Route::Library);
    }
}
