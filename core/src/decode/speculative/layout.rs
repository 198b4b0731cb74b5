//! The rows of one speculative step and the device-side constants built from them.
//!
//! Row order: the regular rows first (`r_0` the verified token, `r_1..r_n` the drafts),
//! then the mask blocks, each `m_1..m_m` (quadratic: one after every regular row; linear:
//! one after the last). Regular row g sits at position `P + g` and attends the cache and
//! `r_0..r_g`; mask j of the block after `r_g` sits at `P + g + j` and attends the cache,
//! `r_0..r_g` and the masks of its block up to j: the training pattern with block = g and
//! slot = j, so the same builder makes it. The order of rows does not change what any row
//! computes (positions and the mask say everything); it is chosen so that the rows the
//! cache keeps after verification (`r_0..r_a`) are a prefix, dropped by a truncation, and
//! the rows the adapter applies to are a suffix ([`crate::model::Gate::Tail`]).

use tch::{Device, Kind, Tensor};

use super::super::strategy::Layout;
use super::drafter::Drafter;
use crate::error::Result;
#[cfg(doc)]
use crate::model::Gate;
use crate::model::{AttnMask, Gated, KvCache, Llama};
use crate::mtp::masks::{additive_mask, attention_mask};

/// Which rows one step has, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLayout {
    /// Linear or quadratic.
    pub layout: Layout,
    /// Drafts verified by the step (regular rows: `drafts + 1`).
    pub drafts: usize,
    /// Masks per block.
    pub masks: usize,
    /// Block (regular index g) of each row.
    pub block: Vec<i64>,
    /// Slot of each row: 0 regular, j for mask m_j.
    pub slot: Vec<i64>,
    /// The regular rows followed by a mask block, ascending: every one (quadratic), the
    /// last (linear), or those a pruned quadratic step keeps ([`StepLayout::with_blocks`]).
    pub blocks: Vec<usize>,
}

impl StepLayout {
    /// The rows of a step with `drafts` drafts and `masks` masks per block.
    pub fn new(layout: Layout, drafts: usize, masks: usize) -> Self {
        let blocks = match layout {
            Layout::Quadratic => (0..=drafts).collect(),
            Layout::Linear => vec![drafts],
        };
        let rows = Self::with_blocks(layout, drafts, masks, blocks);
        debug_assert_eq!(rows.len(), layout.rows(drafts, masks));
        rows
    }

    /// The rows of a step with a mask block after the regular rows `blocks` only
    /// (ascending, each at most `drafts`): a quadratic step without the blocks it is
    /// unlikely to need. When verification accepts a count whose block is missing, the next
    /// step has no drafts, as after a partial acceptance in linear decoding.
    pub fn with_blocks(layout: Layout, drafts: usize, masks: usize, blocks: Vec<usize>) -> Self {
        debug_assert!(blocks.windows(2).all(|w| w[0] < w[1]) && blocks.iter().all(|&g| g <= drafts));
        let mut block: Vec<i64> = (0..=drafts as i64).collect();
        let mut slot = vec![0; drafts + 1];
        for &g in &blocks {
            block.extend(std::iter::repeat_n(g as i64, masks));
            slot.extend(1..=masks as i64);
        }
        Self { layout, drafts, masks, block, slot, blocks }
    }

    /// Rows in the step.
    pub fn len(&self) -> usize {
        self.block.len()
    }

    /// True when the step has no rows (never for a built layout).
    pub fn is_empty(&self) -> bool {
        self.block.is_empty()
    }

    /// Regular rows (the verified token and the drafts): rows `0..regular()`.
    pub fn regular(&self) -> usize {
        self.drafts + 1
    }

    /// The first row of the mask block after regular row `g`, when the step has one.
    pub fn mask_block(&self, g: usize) -> Option<usize> {
        self.blocks.iter().position(|&b| b == g).map(|i| self.regular() + i * self.masks)
    }

    /// Position of each row relative to the cache length: block + slot.
    pub fn offsets(&self) -> Vec<i64> {
        self.block.iter().zip(&self.slot).map(|(b, s)| b + s).collect()
    }
}

/// A step's constants on the model's device, built once per layout (drafts, masks, blocks)
/// and reused by every step with that shape.
///
/// Rows are packed for the forward pass in one of two ways. As one sequence (`[1, T, d]`,
/// the rows of [`StepLayout`] in order; the adapter's term is added on the mask rows, or
/// they read merged weights in the CPU's few-row kernel), or, for an adapter with merged
/// weights elsewhere, as two halves (`[2, R, d]`, [`Gate::Halves`]): the
/// regular rows padded to `R` rows, then the mask rows padded to `R`, so that every
/// projection is one batched product. Padding rows (a zero input) attend to the cache and
/// to themselves only, and no other row attends to them. Either way the regular rows come
/// first, so the rows a step keeps in the cache are still a prefix.
#[derive(Debug)]
pub struct StepPlan {
    /// The rows.
    pub layout: StepLayout,
    /// Rows of each half when packed as two halves.
    half: Option<i64>,
    /// Position offsets from the cache length, int64: `[T]`, or `[2, R]` for two halves.
    offsets: Tensor,
    /// The same offsets in host memory, packed order.
    offsets_host: Vec<i64>,
    /// `[P, P]` in the model's dtype (`P` packed rows): the attention among the step's rows,
    /// additive (0 to attend, -inf not). Padded on the left with zeros for the cache.
    own_mask: Tensor,
    /// The mask rows' inputs, in packed order: `[1, T - regular, d]` or `[1, R, d]`.
    mask_inputs: Tensor,
    /// `[regular, masks]` int64: the packed rows of the mask block after each regular row
    /// (quadratic; linear has one row for its single block). Indexed on the device by the
    /// accepted count, so that choosing the next block needs no host read. A pruned layout
    /// ([`StepLayout::with_blocks`], host path only) has no rows for the blocks it left
    /// out: theirs point elsewhere and must not be used.
    pub block_rows: Tensor,
}

impl StepPlan {
    /// Build the plan of `layout` for `model` and `drafter`, packed as two halves when the
    /// drafter's merged weights run as a batched product.
    pub fn new(model: &Llama, drafter: &Drafter, layout: StepLayout) -> Result<Self> {
        let device = model.device();
        let kind = model.dtype().kind();
        let (regular, t) = (layout.regular() as i64, layout.len() as i64);
        let half = drafter.packs_halves().then(|| regular.max(t - regular));
        // Packed index of each of the layout's rows.
        let packed: Vec<i64> = (0..t).map(|u| pack(half, regular, u)).collect();
        let p = half.map_or(t, |r| 2 * r);
        tch::no_grad(|| {
            let allowed = attention_mask(&Tensor::from_slice(&layout.block), &Tensor::from_slice(&layout.slot));
            let allowed = Vec::<bool>::try_from(allowed.view([-1]))?;
            // Padding rows attend to themselves only.
            let mut packed_allowed: Vec<bool> = (0..p * p).map(|i| i / p == i % p).collect();
            let mut offsets = vec![0i64; p as usize];
            for (u, &pu) in packed.iter().enumerate() {
                offsets[pu as usize] = layout.offsets()[u];
                for (v, &pv) in packed.iter().enumerate() {
                    packed_allowed[(pu * p + pv) as usize] = allowed.get(u * t as usize + v).copied().unwrap_or(false);
                }
            }
            let own_mask = additive_mask(&Tensor::from_slice(&packed_allowed).view([p, p]), kind).to_device(device);
            let offsets_host = offsets;
            let offsets = Tensor::from_slice(&offsets_host).to_device(device);
            let mask_slots: Vec<i64> = layout.slot[layout.regular()..].iter().map(|s| s - 1).collect();
            let mask_inputs = drafter
                .mask_embeddings()
                .index_select(0, &Tensor::from_slice(&mask_slots).to_device(device))
                .unsqueeze(0);
            let (offsets, mask_inputs) = match half {
                Some(r) => (offsets.view([2, r]), mask_inputs.constant_pad_nd([0, 0, 0, r - (t - regular)])),
                None => (offsets, mask_inputs),
            };
            let starts: Vec<i64> = (0..layout.regular())
                .map(|g| layout.mask_block(g).or(layout.mask_block(layout.drafts)).unwrap_or(0) as i64)
                .collect();
            let m = layout.masks as i64;
            let block_rows: Vec<i64> =
                starts.iter().flat_map(|s| (0..m).map(move |j| pack(half, regular, s + j))).collect();
            let block_rows = Tensor::from_slice(&block_rows).view([regular, m]).to_device(device);
            Ok(Self { offsets, offsets_host, own_mask, mask_inputs, block_rows, half, layout })
        })
    }

    /// Rows of the forward pass (padding rows included).
    pub fn rows(&self) -> usize {
        self.half.map_or(self.layout.len(), |r| 2 * r as usize)
    }

    /// True when the rows are packed as two halves ([`Gate::Halves`]).
    pub fn halves(&self) -> bool {
        self.half.is_some()
    }

    /// The packed row (an index into [`StepPlan::forward`]'s output) of row `u` of the
    /// layout.
    pub fn row(&self, u: usize) -> usize {
        pack(self.half, self.layout.regular() as i64, u as i64) as usize
    }

    /// The layout's attention among its own rows (`[T, T]` boolean, true = attend), on the
    /// CPU: what the step view draws.
    pub fn allowed(&self) -> Tensor {
        attention_mask(&Tensor::from_slice(&self.layout.block), &Tensor::from_slice(&self.layout.slot))
    }

    /// Rows of the step's mask blocks (padding excluded).
    pub fn mask_rows(&self) -> usize {
        self.layout.len() - self.layout.regular()
    }

    /// One step's forward pass: `inputs` are the regular rows' tokens (`[regular]` int64,
    /// the verified token then the drafts), the cache holds `past` rows before them, the
    /// adapter applies as `gated` says ([`Drafter::step_gate`]). The mask rows read the
    /// mask embeddings, or with `noise` (`[mask rows]` int64, the UNO recipe) the
    /// embeddings of those token ids. Returns the final hidden state of every packed row,
    /// `[rows, d]`; the regular rows are rows `0..regular`.
    pub fn forward(
        &self,
        model: &Llama,
        gated: &Gated,
        inputs: &Tensor,
        noise: Option<&Tensor>,
        past: usize,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        let x = self.packed_inputs(model, inputs, noise);
        let positions = match (self.half, self.offsets.device()) {
            // On the CPU, made from the host's copy: one allocation rather than an operation.
            (None, Device::Cpu) => {
                Tensor::from_slice(&self.offsets_host.iter().map(|o| o + past as i64).collect::<Vec<_>>())
            }
            _ => &self.offsets + past as i64,
        };
        let mask = crate::model::row_ops::pad_left(&self.own_mask, past)
            .unwrap_or_else(|| self.own_mask.constant_pad_nd([past as i64, 0]));
        let h = model.forward_embeds(&x, &positions, AttnMask::Custom(&mask), Some(gated), cache);
        h.reshape([-1, h.size()[2]])
    }

    /// [`StepPlan::forward`] with shapes that never change, as a CUDA graph records it (`noise`
    /// on the device too): the
    /// cache length is `past` (`[1]` int64 on the device), the step's rows are written at
    /// the cache rows after it and attend through the whole cache
    /// ([`Llama::forward_embeds_in_place`]), whose capacity must hold them. Nothing is
    /// committed and nothing read back to the host.
    pub fn forward_in_place(
        &self,
        model: &Llama,
        gated: &Gated,
        inputs: &Tensor,
        noise: Option<&Tensor>,
        past: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        let x = self.packed_inputs(model, inputs, noise);
        let device = model.device();
        let p = self.rows() as i64;
        let positions = &self.offsets + past;
        let rows = Tensor::arange(p, (Kind::Int64, device)) + past;
        // Column c of the cache: cached (c < past) every row attends; one of the step's rows
        // (c - past < p) as the step's own pattern says; later ones none (column p below).
        let relative = Tensor::arange(cache.capacity() as i64, (Kind::Int64, device)) - past;
        let blocked = Tensor::full([p, 1], f64::NEG_INFINITY, (self.own_mask.kind(), device));
        let own = Tensor::cat(&[&self.own_mask, &blocked], 1);
        let mask = own.index_select(1, &relative.clamp(0, p)).masked_fill(&relative.lt(0), 0.0);
        let h = model.forward_embeds_in_place(&x, &positions, &rows, &mask, Some(gated), cache);
        h.reshape([-1, h.size()[2]])
    }

    /// The packed rows' inputs: the regular rows' token embeddings and the mask rows'
    /// (the mask embeddings, or those of the `noise` ids), `[1, T, d]` or `[2, R, d]`.
    fn packed_inputs(&self, model: &Llama, inputs: &Tensor, noise: Option<&Tensor>) -> Tensor {
        if let (None, None) = (noise, self.half) {
            return model.embed_then(inputs, &self.mask_inputs);
        }
        let x = model.embed(&inputs.unsqueeze(0)); // [1, regular, d]
        let masks = match (noise, self.half) {
            (None, _) => self.mask_inputs.shallow_clone(),
            (Some(ids), None) => model.embed(&ids.unsqueeze(0)),
            (Some(ids), Some(r)) => model.embed(&ids.unsqueeze(0)).constant_pad_nd([0, 0, 0, r - ids.size()[0]]),
        };
        match self.half {
            None => Tensor::cat(&[x, masks], 1),
            Some(r) => {
                let pad = r - self.layout.regular() as i64;
                let x = if pad > 0 { x.constant_pad_nd([0, 0, 0, pad]) } else { x };
                Tensor::cat(&[x, masks], 0) // [2, r, d]
            }
        }
    }
}

/// The packed index of layout row `u` with `regular` regular rows: itself as one sequence,
/// or shifted past the first half's padding for a mask row.
fn pack(half: Option<i64>, regular: i64, u: i64) -> i64 {
    match half {
        Some(r) if u >= regular => r + (u - regular),
        _ => u,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_rows_first_then_mask_blocks() {
        let q = StepLayout::new(Layout::Quadratic, 2, 2);
        assert_eq!(q.len(), 9);
        assert_eq!(q.block, [0, 1, 2, 0, 0, 1, 1, 2, 2]);
        assert_eq!(q.slot, [0, 0, 0, 1, 2, 1, 2, 1, 2]);
        assert_eq!(q.offsets(), [0, 1, 2, 1, 2, 2, 3, 3, 4]);
        assert_eq!((0..3).map(|g| q.mask_block(g)).collect::<Vec<_>>(), [Some(3), Some(5), Some(7)]);
        let l = StepLayout::new(Layout::Linear, 2, 2);
        assert_eq!(l.len(), 5);
        assert_eq!(l.block, [0, 1, 2, 2, 2]);
        assert_eq!(l.slot, [0, 0, 0, 1, 2]);
        assert_eq!((l.mask_block(0), l.mask_block(2)), (None, Some(3)));
        let first = StepLayout::new(Layout::Quadratic, 0, 3);
        assert_eq!((first.block, first.slot), (vec![0, 0, 0, 0], vec![0, 1, 2, 3]));
    }

    #[test]
    fn a_pruned_step_has_the_blocks_it_keeps() {
        let p = StepLayout::with_blocks(Layout::Quadratic, 2, 2, vec![0, 2]);
        assert_eq!(p.len(), 7);
        assert_eq!(p.block, [0, 1, 2, 0, 0, 2, 2]);
        assert_eq!(p.slot, [0, 0, 0, 1, 2, 1, 2]);
        assert_eq!(p.offsets(), [0, 1, 2, 1, 2, 3, 4]);
        assert_eq!((0..3).map(|g| p.mask_block(g)).collect::<Vec<_>>(), [Some(3), None, Some(5)]);
        // Every block kept: the quadratic layout.
        let all = StepLayout::with_blocks(Layout::Quadratic, 2, 2, vec![0, 1, 2]);
        assert_eq!(all, StepLayout::new(Layout::Quadratic, 2, 2));
    }

    /// The pattern among a step's rows is the training pattern: a regular row sees the
    /// regular rows up to its own, a mask sees those and its own block up to itself.
    #[test]
    fn attention_follows_blocks_not_row_order() {
        let q = StepLayout::new(Layout::Quadratic, 1, 2);
        // Rows: r0 r1 | (0,1) (0,2) | (1,1) (1,2)
        let allowed = attention_mask(&Tensor::from_slice(&q.block), &Tensor::from_slice(&q.slot));
        let row = |r: i64| -> Vec<bool> { Vec::try_from(allowed.get(r)).unwrap_or_default() };
        let (t, f) = (true, false);
        assert_eq!(row(0), [t, f, f, f, f, f]);
        assert_eq!(row(1), [t, t, f, f, f, f]);
        assert_eq!(row(3), [t, f, t, t, f, f]);
        assert_eq!(row(5), [t, t, f, f, t, t]);
    }
}
