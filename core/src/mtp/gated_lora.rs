//! Gated LoRA: `y = W x + g * (alpha / r) * B (A x)` on chosen projections of every layer,
//! where the gate g is 1 on mask rows and 0 on NTP rows (METHOD.md section 1.2). The model
//! says which rows ([`crate::model::Gate`]); this module holds A and B: trainable
//! ([`Lora`]) and restacked for decoding ([`PreparedLora`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use crate::model::few_rows;
use crate::model::int8::{self, Int8Panels};
use crate::model::linear::{add_product, few_row_kernel_runs, few_row_products_ours, linear};
use crate::model::panels::Panels;
use crate::model::{Gate, Llama, ModelConfig, Proj, ProjDelta, ProjGroup};

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
    /// Output width of every projection (adapted or not).
    out_dims: BTreeMap<Proj, i64>,
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
        let out_dims = Proj::ALL.iter().map(|&p| (p, proj_dims(model, p).1 as i64)).collect();
        Self { pairs, out_dims, scale: cfg.alpha / cfg.rank as f64 }
    }
}

impl Lora {
    /// alpha / r.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The adapted parts of `group` in `layer`: `(part index in the group, factors)`.
    fn parts(&self, layer: usize, group: ProjGroup) -> Vec<(usize, &Pair)> {
        group
            .parts()
            .iter()
            .enumerate()
            .filter_map(|(i, p)| self.pairs.get(&(layer, *p)).map(|pair| (i, pair)))
            .collect()
    }

    /// The factors restacked for decoding (see [`PreparedLora`]), in `model`'s dtype;
    /// with `merged`, also each adapted group's base weight plus the delta: alone where the
    /// CPU's few-row kernel runs (the [`Gate::Tail`] rows read it), else stacked after the
    /// base weight for [`Gate::Halves`] steps.
    pub fn prepare(&self, model: &Llama, merged: bool) -> PreparedLora {
        let config = &model.config;
        let kind = model.dtype().kind();
        tch::no_grad(|| {
            let mut groups = Vec::with_capacity(config.num_layers * ProjGroup::ALL.len());
            for layer in 0..config.num_layers {
                for group in ProjGroup::ALL {
                    let parts = self.parts(layer, group);
                    if parts.is_empty() {
                        groups.push(None);
                        continue;
                    }
                    let r = parts[0].1.a.size()[0];
                    let a = Tensor::cat(&parts.iter().map(|(_, p)| &p.a).collect::<Vec<_>>(), 0);
                    let dims: Vec<i64> = group.parts().iter().map(|&p| proj_dims(config, p).1 as i64).collect();
                    let offsets: Vec<i64> = dims.iter().scan(0, |o, d| Some(std::mem::replace(o, *o + d))).collect();
                    let b = Tensor::zeros([parts.len() as i64 * r, dims.iter().sum()], (Kind::Float, a.device()));
                    for (slot, (i, pair)) in parts.iter().enumerate() {
                        b.narrow(0, slot as i64 * r, r)
                            .narrow(1, offsets[*i], dims[*i])
                            .copy_(&(pair.b.tr() * self.scale));
                    }
                    // W + (A^T (s B^T))^T, summed in f32: where the CPU's few-row kernel runs
                    // the step's products, alone (its mask rows read it); elsewhere stacked
                    // after W for one batched product of two halves, [2, out, in].
                    let merged = match (merged, model.group_weight(layer, group)) {
                        (true, Some((w, bias))) => {
                            let adapted = (w.to_kind(Kind::Float) + a.tr().mm(&b).tr()).to_kind(kind);
                            Some(if few_row_products_ours(model.device(), kind) {
                                let adapted = adapted.contiguous();
                                // The mask rows' weight as panels where its rows are short.
                                let panels = Panels::of(&adapted);
                                Merged::Tail { adapted, panels }
                            } else {
                                Merged::Halves { w2: Tensor::stack(&[w.to_kind(kind), adapted], 0), bias }
                            })
                        }
                        _ => None,
                    };
                    let bt = Tensor::zeros([r, dims.iter().sum()], (kind, a.device()));
                    let mut term_parts = Vec::with_capacity(parts.len());
                    for (slot, (i, pair)) in parts.iter().enumerate() {
                        bt.narrow(1, offsets[*i], dims[*i]).copy_(&(pair.b.tr() * self.scale));
                        let start = offsets[*i] as usize;
                        term_parts.push(few_rows::TermPart {
                            cols: start..start + dims[*i] as usize,
                            rank_offset: slot * r as usize,
                        });
                    }
                    let (a, b) = (a.to_kind(kind).contiguous(), b.tr().contiguous().to_kind(kind));
                    let base = model.group_weight(layer, group);
                    groups.push(Some(PreparedGroup { a, b, bt, term_parts, merged, base, int8: None, folded: None }));
                }
            }
            PreparedLora { groups, bf16_min_rows: None, int8_min_rows: None }
        })
    }
}

impl ProjDelta for Lora {
    fn add_to(&self, layer: usize, group: ProjGroup, x: &Tensor, y: Tensor, gate: &Gate) -> Tensor {
        let parts = self.parts(layer, group);
        if parts.is_empty() {
            return y;
        }
        // The factors stay in f32 (trainable master weights) and compute in the
        // activations' dtype. The A factors of a group run as one product.
        let kind = x.kind();
        let a = if parts.len() == 1 {
            parts[0].1.a.to_kind(kind)
        } else {
            Tensor::cat(&parts.iter().map(|(_, p)| &p.a).collect::<Vec<_>>(), 0).to_kind(kind)
        };
        if let Gate::Halves = gate {
            // Entry 1 holds the mask rows: the term goes there, entry 0 is left alone.
            let delta = self.add_to(layer, group, &x.narrow(0, 1, 1), y.narrow(0, 1, 1), &Gate::All);
            return Tensor::cat(&[y.narrow(0, 0, 1), delta], 0);
        }
        let (t, start) = (x.size()[1], if let Gate::Tail(s) = gate { *s } else { 0 });
        if start >= t {
            return y;
        }
        let xs = if start > 0 { x.narrow(1, start, t - start) } else { x.shallow_clone() };
        let h = xs.linear::<Tensor>(&a, None);
        // The gate (with the scale) multiplies the rank-r intermediate: r columns, not `out`.
        let h = match gate {
            Gate::Rows(g) => h * (g * self.scale),
            Gate::All | Gate::Tail(_) | Gate::Halves => h * self.scale,
        };
        let r = parts[0].1.a.size()[0];
        let mut outs = Vec::new();
        let mut next = parts.iter().enumerate().peekable();
        for (i, &proj) in group.parts().iter().enumerate() {
            match next.next_if(|(_, (pi, _))| *pi == i) {
                Some((slot, (_, pair))) => {
                    outs.push(h.narrow(-1, slot as i64 * r, r).linear::<Tensor>(&pair.b.to_kind(kind), None))
                }
                None => {
                    let mut size = h.size();
                    if let Some(last) = size.last_mut() {
                        *last = self.out_dims.get(&proj).copied().unwrap_or(0);
                    }
                    outs.push(Tensor::zeros(size, (kind, x.device())));
                }
            }
        }
        let delta = if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, -1) };
        if start > 0 {
            Tensor::cat(&[y.narrow(1, 0, start), y.narrow(1, start, t - start) + delta], 1)
        } else {
            y + delta
        }
    }
}

/// LoRA factors restacked for decoding, per layer and [`ProjGroup`]: the A factors of the
/// group's adapted parts stacked (`[parts * r, in]`), the B factors as one block-diagonal
/// matrix multiplied by the scale (`[out, parts * r]`, zero where a part is not adapted),
/// both laid out as a projection's weight, in the model's dtype. A group then costs two
/// matrix products on the rows the gate selects, added in place. Optionally also merged
/// weights ([`Merged`]): no term to compute, no extra operation.
#[derive(Debug)]
pub struct PreparedLora {
    /// Index `layer * 4 + group`, `None` when not adapted.
    groups: Vec<Option<PreparedGroup>>,
    /// The fewest rows of a [`Gate::Tail`] whose base products run in bf16 on the CPU's
    /// few-row kernel (`None`: never).
    bf16_min_rows: Option<usize>,
    /// The fewest rows of a [`Gate::Tail`] multiplied in int8 ([`int8::product_tail`],
    /// through each group's [`PreparedGroup::int8`]; `None`: never).
    int8_min_rows: Option<usize>,
}

/// One adapted projection group, prepared.
#[derive(Debug)]
struct PreparedGroup {
    /// The stacked A factors, `[parts * r, in]`.
    a: Tensor,
    /// `scale * B`, block-diagonal, `[out, parts * r]`.
    b: Tensor,
    /// `scale * B^T` without its zero blocks, `[r, out]` (each adapted part's in its own
    /// columns), and which columns read which slice of `x A^T`: the CPU kernel's term.
    bt: Tensor,
    term_parts: Vec<few_rows::TermPart>,
    merged: Option<Merged>,
    /// The group's base weight and bias (shared with the model, not copied), for
    /// [`few_rows::product_with_low_rank`].
    base: Option<(Tensor, Option<Tensor>)>,
    /// The merged weight `W + s B A` quantized to int8, for the [`Gate::Tail`] rows
    /// ([`PreparedLora::with_int8_tail`]).
    int8: Option<Int8Panels>,
    /// `A` stacked after the base weight ([`PreparedLora::with_folded_base`]).
    folded: Option<Folded>,
}

/// A group's base weight with its stacked `A` factors after it, `[out + parts * r, in]`
/// (and the bias with zeros after it): one product on a step's rows gives their base
/// outputs and, in its last columns, `x A^T`, which the mask rows then multiply by `s B^T`
/// in place. One operation per group beyond AR's where the low-rank form issues two (on a
/// GPU, the `x A^T` product of a few rows and thousands of inputs would otherwise be its
/// own small kernel).
#[derive(Debug)]
struct Folded {
    /// `[out + parts * r, in]`.
    weight: Tensor,
    /// `[out + parts * r]`.
    bias: Option<Tensor>,
    /// `out`: the base outputs' columns.
    out: i64,
}

/// A group's weight with the adapter's delta merged in (`W + scale * B A`).
#[derive(Debug)]
enum Merged {
    /// Stacked after the base weight for one batched product of two halves
    /// ([`Gate::Halves`]).
    Halves {
        /// `[2, out, in]`: `W` and `W + scale * B A`.
        w2: Tensor,
        /// The base projection's bias, `[out]`.
        bias: Option<Tensor>,
    },
    /// Alone, for the CPU's few-row kernel: the rows of a [`Gate::Tail`] read it, the
    /// others the base weight, in one call ([`few_rows::product_two_weights`]).
    Tail {
        /// `[out, in]`.
        adapted: Tensor,
        /// `adapted` as panels, where its rows are short enough ([`Panels::of`]): the
        /// mask rows read them when they are multiplied in f32.
        panels: Option<Panels>,
    },
}

impl Merged {
    /// Bytes held: the merged weights, and their panels where they have them.
    fn bytes(&self) -> usize {
        let (t, panels) = match self {
            Merged::Halves { w2, .. } => (w2, None),
            Merged::Tail { adapted, panels } => (adapted, panels.as_ref()),
        };
        t.numel() * t.kind().elt_size_in_bytes() + panels.map_or(0, Panels::bytes)
    }
}

impl Folded {
    /// `[w; a]` (`w`: `[out, in]`, `a`: `[parts * r, in]`) in `w`'s dtype, and `bias` with
    /// `parts * r` zeros after it.
    fn of(w: &Tensor, bias: Option<&Tensor>, a: &Tensor) -> Self {
        let a = a.to_kind(w.kind());
        let rank = a.size()[0];
        let bias = bias.map(|b| Tensor::cat(&[b.shallow_clone(), b.new_zeros([rank], (b.kind(), b.device()))], 0));
        Folded { weight: Tensor::cat(&[w, &a], 0), bias, out: w.size()[0] }
    }

    /// The base outputs of every row of `x` (`[b, t, in]`) and the term `(x A^T) (s B)^T`
    /// added to rows `start..` of each sequence, from one product by the folded weight;
    /// `[b, t, out]`, a view of that product's output (rows `out + parts * r` apart).
    fn product(&self, x: &Tensor, b_scaled: &Tensor, start: i64) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        // Through the routes of a projection's product (on the CPU, those for few rows).
        let full = linear(x, &self.weight, self.bias.as_ref()); // [b, t, out + parts r]
        let y = full.narrow(-1, 0, self.out);
        if start < t {
            let rank = self.weight.size()[0] - self.out;
            let rows = t - start;
            // x A^T of the tail rows: the product's last columns.
            let h = full.narrow(1, start, rows).narrow(-1, self.out, rank);
            if b == 1 {
                add_product(&y.select(0, 0).narrow(0, start, rows), &h.select(0, 0), b_scaled);
            } else {
                let _ = y.narrow(1, start, rows).g_add_(&h.matmul(&b_scaled.tr()));
            }
        }
        y
    }
}

impl PreparedLora {
    fn group(&self, layer: usize, group: ProjGroup) -> Option<&PreparedGroup> {
        self.groups.get(layer * ProjGroup::ALL.len() + group.index()).and_then(Option::as_ref)
    }

    /// Multiply the rows of a [`Gate::Tail`] in bf16 when there are at least `min_rows` of
    /// them (see [`few_rows::product_with_low_rank`]); `None`: never.
    pub fn with_bf16_tail(mut self, min_rows: Option<usize>) -> Self {
        self.bf16_min_rows = min_rows;
        self
    }

    /// The fewest tail rows multiplied in bf16 (`None`: never).
    pub fn bf16_min_rows(&self) -> Option<usize> {
        self.bf16_min_rows
    }

    /// Multiply the rows of a [`Gate::Tail`] in int8 when there are at least `min_rows` of
    /// them ([`int8::product_tail`]; before bf16): each adapted group's merged weight
    /// `W + s B A` (whatever the form: no term to add) is quantized to int8 panels here, a
    /// quarter of its f32 bytes (`short`: in `[-32, 32]`, [`Int8Panels::of`]). `None`, or
    /// where the int8 tiles do not run: never.
    pub fn with_int8_tail(mut self, min_rows: Option<usize>, short: bool) -> Self {
        let min_rows = min_rows.filter(|_| int8::available());
        self.int8_min_rows = min_rows;
        for group in self.groups.iter_mut().flatten() {
            group.int8 = min_rows.and_then(|_| {
                let merged = match &group.merged {
                    Some(Merged::Tail { adapted, .. }) => adapted.shallow_clone(),
                    Some(Merged::Halves { .. }) => return None,
                    None => {
                        let (w, _) = group.base.as_ref()?;
                        tch::no_grad(|| w + group.b.mm(&group.a))
                    }
                };
                Int8Panels::of(&merged, short)
            });
        }
        self
    }

    /// With `on`, each adapted group's base weight is held once more with its `A` factors
    /// stacked after it ([`Folded`]), and a [`Gate::Tail`] product on libtorch's general
    /// path (a GPU) runs as one product of the step's rows by that weight and one in-place
    /// product for the mask rows' term. Where the CPU's few-row kernel runs a group's step,
    /// the kernel computes the term with the base product already and does not read it.
    pub fn with_folded_base(mut self, on: bool) -> Self {
        for group in self.groups.iter_mut().flatten() {
            group.folded = match (&group.base, on) {
                (Some((w, bias)), true) => Some(tch::no_grad(|| Folded::of(w, bias.as_ref(), &group.a))),
                _ => None,
            };
        }
        self
    }

    /// Bytes of the folded weights ([`PreparedLora::with_folded_base`]).
    pub fn folded_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        self.groups
            .iter()
            .flatten()
            .filter_map(|g| g.folded.as_ref())
            .map(|f| bytes(&f.weight) + f.bias.as_ref().map_or(0, bytes))
            .sum()
    }

    /// The fewest tail rows multiplied in int8 (`None`: never).
    pub fn int8_min_rows(&self) -> Option<usize> {
        self.int8_min_rows
    }

    /// Bytes of the int8 panels.
    pub fn int8_bytes(&self) -> usize {
        self.groups.iter().flatten().filter_map(|g| g.int8.as_ref()).map(Int8Panels::bytes).sum()
    }

    /// True when the groups carry merged weights for [`Gate::Halves`] steps.
    pub fn is_merged(&self) -> bool {
        self.groups.iter().flatten().any(|g| g.merged.is_some())
    }

    /// Bytes of the merged weights.
    pub fn merged_bytes(&self) -> usize {
        self.groups.iter().flatten().filter_map(|g| g.merged.as_ref()).map(Merged::bytes).sum()
    }
}

impl ProjDelta for PreparedLora {
    fn product(&self, layer: usize, group: ProjGroup, x: &Tensor, gate: &Gate) -> Option<Tensor> {
        let prepared = self.group(layer, group)?;
        let (w2, bias) = match (gate, &prepared.merged) {
            (Gate::Halves, Some(Merged::Halves { w2, bias })) => (w2, bias),
            // A bf16 model's step on the CPU: the mask rows' base products in bf16 pairs
            // (the next-token rows exactly AR's), then the term added to them.
            (Gate::Tail(start), _)
                if x.size()[0] == 1
                    && x.kind() == Kind::BFloat16
                    && few_row_products_ours(x.device(), x.kind())
                    && self.bf16_min_rows.is_some_and(|min| x.size()[1] - start >= min as i64) =>
            {
                let (w, bias) = prepared.base.as_ref()?;
                let y = few_rows::product_bf16_tail(&x.reshape([x.size()[1], x.size()[2]]), w, bias.as_ref(), *start)?;
                return Some(self.add_to(layer, group, x, y.unsqueeze(0), gate));
            }
            // One sequence of a decoding step, mask rows last: base product and term (or
            // the merged weight) in one call of the CPU's few-row kernel, where it runs.
            (Gate::Tail(start), merged) if x.size()[0] == 1 && few_row_kernel_runs(x.device(), x.kind()) => {
                let (w, bias) = prepared.base.as_ref()?;
                let tail = (x.size()[1] - start).max(0) as usize;
                // The mask rows in int8 where they were asked for and run (the merged
                // weight's panels: the term is in them), `[1, t, in]` read in place.
                if let Some(panels) =
                    prepared.int8.as_ref().filter(|_| self.int8_min_rows.is_some_and(|min| tail >= min))
                    && let Some(y) = int8::product_tail(x, w, bias.as_ref(), panels, *start)
                {
                    return Some(y);
                }
                let bf16 = self.bf16_min_rows.is_some_and(|min| tail >= min);
                if let Some(Merged::Tail { adapted, panels }) = merged {
                    let panels = panels.as_ref();
                    return few_rows::product_two_weights(x, w, adapted, panels, bias.as_ref(), *start, bf16);
                }
                let term = few_rows::TailTerm {
                    a: &prepared.a,
                    bt: &prepared.bt,
                    parts: &prepared.term_parts,
                    start: *start,
                    bf16,
                };
                return few_rows::product_with_low_rank(x, w, bias.as_ref(), &term);
            }
            (Gate::Tail(start), _) if prepared.folded.is_some() => {
                return prepared.folded.as_ref().map(|f| f.product(x, &prepared.b, *start));
            }
            _ => return None,
        };
        // [2, r, in] x [2, in, out]: entry 0 through W, entry 1 through W + delta.
        let y = x.matmul(&w2.transpose(1, 2));
        Some(match bias {
            Some(b) => y + b,
            None => y,
        })
    }

    /// Which form a tail row takes (int8, bf16 or f32) depends on how many tail rows share
    /// its call only through the thresholds: rows may go apart where every mask row takes
    /// int8 (the groups all have their panels), or bf16 is not counted (never, or from one
    /// row). Every form computes a row from that row alone. Not with folded weights: their
    /// outputs are views with rows apart by more than their width, which the in-place
    /// passes a split takes do not read (and they run only on libtorch's general path).
    fn rows_apart(&self) -> bool {
        if self.groups.iter().flatten().any(|g| g.folded.is_some()) {
            return false;
        }
        let every_int8 =
            self.int8_min_rows.is_some_and(|min| min <= 1) && self.groups.iter().flatten().all(|g| g.int8.is_some());
        every_int8 || self.bf16_min_rows.is_none_or(|min| min <= 1) && self.int8_min_rows.is_none_or(|min| min <= 1)
    }

    /// int8's `vpdpbusd` does four times the multiply-adds of an f32 FMA an instruction, a
    /// bf16 pair two (the rates measured on the Zen 4 of docs/BENCHMARKS.md: 219 and 52 a
    /// nanosecond for int8 and f32); AVX2's tiles two or 2.8 ([`Int8Panels::macs_per_f32`]).
    fn tail_row_cost(&self) -> f64 {
        let panels = self.groups.iter().flatten().find_map(|g| g.int8.as_ref());
        if let Some(panels) = panels.filter(|_| self.int8_min_rows.is_some()) {
            1.0 / panels.macs_per_f32()
        } else if self.bf16_min_rows.is_some() {
            0.5
        } else {
            1.0
        }
    }

    fn add_to(&self, layer: usize, group: ProjGroup, x: &Tensor, y: Tensor, gate: &Gate) -> Tensor {
        let Some(PreparedGroup { a, b: b_scaled, merged, .. }) = self.group(layer, group) else { return y };
        let (b, t) = (x.size()[0], x.size()[1]);
        let (batch, start) = match gate {
            Gate::Rows(g) => return y + (x.matmul(&a.tr()) * g).matmul(&b_scaled.tr()),
            Gate::All => (None, 0),
            Gate::Tail(s) => (None, *s),
            // With merged weights the product already holds the term.
            Gate::Halves if matches!(merged, Some(Merged::Halves { .. })) => return y,
            Gate::Halves => (Some(1), 0),
        };
        if start >= t {
            return y;
        }
        let rows = t - start;
        if b == 1 || batch.is_some() {
            // In place on the selected rows of `y` (a view of its storage): y += (x A^T) B^T,
            // both products through the few-row routes of a projection.
            let e = batch.unwrap_or(0);
            let h = linear(&x.select(0, e).narrow(0, start, rows), a, None);
            add_product(&y.select(0, e).narrow(0, start, rows), &h, b_scaled);
        } else {
            let delta = x.narrow(1, start, rows).matmul(&a.tr()).matmul(&b_scaled.tr());
            let _ = y.narrow(1, start, rows).g_add_(&delta);
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// A folded product is the base product with its bias, plus the low-rank term on the
    /// tail rows only, for one sequence and for several.
    #[test]
    fn folded_product_is_base_plus_tail_term() {
        tch::manual_seed(5);
        let f = (Kind::Double, Device::Cpu);
        let (w, bias, a, b_scaled) =
            (Tensor::randn([12, 8], f), Tensor::randn([12], f), Tensor::randn([6, 8], f), Tensor::randn([12, 6], f));
        let folded = Folded::of(&w, Some(&bias), &a);
        assert_eq!((folded.weight.size(), folded.out), (vec![18, 8], 12));
        for (batch, t, start) in [(1, 5, 2), (3, 4, 1), (1, 3, 3)] {
            let x = Tensor::randn([batch, t, 8], f);
            let y = folded.product(&x, &b_scaled, start);
            let expected = x.matmul(&w.tr()) + &bias;
            let term = x.narrow(1, start, t - start).matmul(&a.tr()).matmul(&b_scaled.tr());
            let _ = expected.narrow(1, start, t - start).g_add_(&term);
            let diff = (&y - &expected).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "{batch} x {t} from {start}: {diff}");
        }
    }
}
