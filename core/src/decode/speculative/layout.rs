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

use tch::{Kind, Tensor};

use super::super::strategy::Layout;
use super::drafter::Drafter;
use crate::model::Llama;
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
}

impl StepLayout {
    /// The rows of a step with `drafts` drafts and `masks` masks per block.
    pub fn new(layout: Layout, drafts: usize, masks: usize) -> Self {
        let n = drafts as i64;
        let m = masks as i64;
        let mut block: Vec<i64> = (0..=n).collect();
        let mut slot = vec![0; drafts + 1];
        let blocks: Vec<i64> = match layout {
            Layout::Quadratic => (0..=n).collect(),
            Layout::Linear => vec![n],
        };
        for g in blocks {
            block.extend(std::iter::repeat_n(g, masks));
            slot.extend(1..=m);
        }
        debug_assert_eq!(block.len(), layout.rows(drafts, masks));
        Self { layout, drafts, masks, block, slot }
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
        match self.layout {
            Layout::Quadratic if g <= self.drafts => Some(self.regular() + g * self.masks),
            Layout::Linear if g == self.drafts => Some(self.regular()),
            _ => None,
        }
    }

    /// Position of each row relative to the cache length: block + slot.
    pub fn offsets(&self) -> Vec<i64> {
        self.block.iter().zip(&self.slot).map(|(b, s)| b + s).collect()
    }
}

/// A step's constants on the model's device, built once per (drafts, masks) and reused by
/// every step with that shape.
#[derive(Debug)]
pub struct StepPlan {
    /// The rows.
    pub layout: StepLayout,
    /// `[T]` int64: position offsets from the cache length.
    pub offsets: Tensor,
    /// `[T, T]` in the model's dtype: the attention among the step's rows, additive (0 to
    /// attend, -inf not). Padded on the left with zeros for the cache at each step.
    pub own_mask: Tensor,
    /// `[1, T - regular, d]`: the mask embeddings of the mask rows, in row order.
    pub mask_inputs: Tensor,
    /// `[regular, masks]` int64: the rows of the mask block after each regular row
    /// (quadratic; linear has one row for its single block). Indexed on the device by the
    /// accepted count, so that choosing the next block needs no host read.
    pub block_rows: Tensor,
}

impl StepPlan {
    /// Build the plan of `layout` for `model` and `drafter`.
    pub fn new(model: &Llama, drafter: &Drafter, layout: StepLayout) -> Self {
        let device = model.device();
        let kind = model.dtype().kind();
        tch::no_grad(|| {
            let block = Tensor::from_slice(&layout.block);
            let slot = Tensor::from_slice(&layout.slot);
            let own_mask = additive_mask(&attention_mask(&block, &slot), kind).to_device(device);
            let mask_slots: Vec<i64> = layout.slot[layout.regular()..].iter().map(|s| s - 1).collect();
            let mask_inputs = drafter
                .mask_embeddings()
                .index_select(0, &Tensor::from_slice(&mask_slots).to_device(device))
                .unsqueeze(0);
            let starts: Vec<i64> = (0..layout.regular())
                .map(|g| layout.mask_block(g).or(layout.mask_block(layout.drafts)).unwrap_or(0) as i64)
                .collect();
            let m = layout.masks as i64;
            let block_rows = (Tensor::from_slice(&starts).unsqueeze(1)
                + Tensor::arange(m, (Kind::Int64, tch::Device::Cpu)))
            .to_device(device);
            Self {
                offsets: Tensor::from_slice(&layout.offsets()).to_device(device),
                own_mask,
                mask_inputs,
                block_rows,
                layout,
            }
        })
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
