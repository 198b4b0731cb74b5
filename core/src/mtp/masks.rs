//! The training layout of METHOD.md section 2 (paper Fig. 4): after each NTP token whose
//! next token carries loss, a block of k mask tokens; per-row position ids, labels, gate and
//! the token the sampler conditions on; and the boolean attention mask, built with tensor
//! ops from per-row (block, slot) vectors.

use tch::{Device, Kind, Tensor};

/// Label value that carries no loss.
pub const IGNORE: i64 = -100;

/// Block id given to padding rows: larger than any real block, so no real row attends them.
const PAD_BLOCK: i64 = i64::MAX / 4;

/// One sequence in the MTP layout. Every tensor is `[L]` (`[B, L]` after [`collate`]), where
/// L = n + k * (number of NTP tokens followed by a block).
#[derive(Debug)]
pub struct MtpLayout {
    /// Token id on NTP rows; on mask rows 0 (their input is a mask embedding), or the random
    /// id they read under the UNO recipe ([`with_noise`]).
    pub tokens: Tensor,
    /// 0 on NTP rows, j (1..=k) on the row of mask m_j.
    pub slot: Tensor,
    /// The index i of the NTP token x_i the row belongs to (its own, or the one before the
    /// block); [`PAD_BLOCK`] on padding.
    pub block: Tensor,
    /// RoPE position: i on NTP x_i, i + j on mask m_j after x_i.
    pub positions: Tensor,
    /// x_{i+1} on NTP x_i, x_{i+1+j} on m_j after x_i, or [`IGNORE`].
    pub labels: Tensor,
    /// The ground-truth token just before the label (teacher forcing): x_i on NTP x_i,
    /// x_{i+j} on m_j after x_i.
    pub prev: Tensor,
    /// On mask rows with a label: the row of NTP x_{i+j} (which predicts the same token);
    /// -1 elsewhere. The latent-consistency loss pulls the mask's state toward that row's.
    pub lcm_target: Tensor,
}

impl MtpLayout {
    /// True on mask rows, `[L]` bool.
    pub fn is_mask(&self) -> Tensor {
        self.slot.gt(0)
    }

    /// The gate of gated LoRA: 1 on mask rows, 0 on NTP rows, as `[..., L, 1]` in `kind`.
    pub fn gate(&self, kind: Kind) -> Tensor {
        self.is_mask().to_kind(kind).unsqueeze(-1)
    }

    /// Rows.
    pub fn len(&self) -> i64 {
        *self.slot.size().last().unwrap_or(&0)
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The attention mask, `[L, L]` (`[B, 1, L, L]` for collated layouts), `true` = attend.
    pub fn attention_mask(&self) -> Tensor {
        let mask = attention_mask(&self.block, &self.slot);
        if self.block.dim() == 2 { mask.unsqueeze(1) } else { mask }
    }
}

/// Lay out `ids` (`[n]` int64) with `k` masks after each position whose next token carries
/// loss. `loss` (`[n]` bool) marks positions i whose label x_{i+1} carries loss (for chat
/// data: the last prompt token and every response token but the last; for text: all).
pub fn build_layout(ids: &Tensor, loss: &Tensor, k: i64) -> MtpLayout {
    let device = ids.device();
    let n = ids.size()[0];
    let i64s = (Kind::Int64, device);
    // Position n-1 has no next token: it never carries loss.
    let loss = loss.logical_and(&Tensor::arange(n, i64s).lt(n - 1));
    let has_block = loss.shallow_clone();

    // A [n, k+1] grid of (block, slot), keeping slot 0 always and slots 1..k where a block is.
    let slot_grid = Tensor::arange(k + 1, i64s).unsqueeze(0).expand([n, k + 1], false);
    let block_grid = Tensor::arange(n, i64s).unsqueeze(1).expand([n, k + 1], false);
    let keep = slot_grid.eq(0).logical_or(&has_block.unsqueeze(1));
    let slot = slot_grid.masked_select(&keep);
    let block = block_grid.masked_select(&keep);

    let target = &block + &slot; // the position whose next token is this row's label
    let clamped = target.clamp_max(n - 1);
    let valid = target.lt(n - 1).logical_and(&loss.index_select(0, &clamped));
    let label_ids = ids.index_select(0, &(&clamped + 1).clamp_max(n - 1));
    let labels = label_ids.where_self(&valid, &Tensor::full([1], IGNORE, i64s));
    let prev = ids.index_select(0, &clamped);
    let tokens = ids.index_select(0, &block).where_self(&slot.eq(0), &Tensor::zeros([1], i64s));

    // Row of each NTP token: exclusive prefix sum of the segment lengths (1 or 1 + k).
    let seg = has_block.to_kind(Kind::Int64) * k + 1;
    let ntp_row = seg.cumsum(0, Kind::Int64) - &seg;
    let lcm_target =
        ntp_row.index_select(0, &clamped).where_self(&valid.logical_and(&slot.gt(0)), &Tensor::full([1], -1, i64s));

    MtpLayout { tokens, positions: target, slot, block, labels, prev, lcm_target }
}

/// Draw `n` uniformly random token ids of a `vocab`-token vocabulary: what a mask row reads
/// under the UNO recipe.
pub fn noise_ids(rng: &mut impl rand::Rng, n: usize, vocab: usize) -> Vec<i64> {
    (0..n).map(|_| rng.random_range(0..vocab as i64)).collect()
}

/// The layout with every mask row's token replaced by a random id (UNO: each block reads
/// fresh noise), drawn from `rng`; next-token rows are unchanged.
pub fn with_noise(mut layout: MtpLayout, rng: &mut impl rand::Rng, vocab: usize) -> MtpLayout {
    let shape = layout.tokens.size();
    let noise = noise_ids(rng, layout.tokens.numel(), vocab);
    let noise = Tensor::from_slice(&noise).view(shape.as_slice()).to_device(layout.tokens.device());
    layout.tokens = layout.tokens.where_self(&layout.slot.eq(0), &noise);
    layout
}

/// The attention pattern of METHOD.md section 2 from per-row vectors (`[L]` or `[B, L]`):
/// an NTP row attends to NTP rows of blocks up to its own; a mask row attends to those and
/// to the masks of its own block up to its own slot. `[.., L, L]` bool.
pub fn attention_mask(block: &Tensor, slot: &Tensor) -> Tensor {
    let (rb, rs) = (block.unsqueeze(-1), slot.unsqueeze(-1)); // rows
    let (cb, cs) = (block.unsqueeze(-2), slot.unsqueeze(-2)); // columns
    let ntp_col = cs.eq(0);
    let to_ntp = ntp_col.logical_and(&cb.le_tensor(&rb));
    let to_own_block =
        ntp_col.logical_not().logical_and(&cb.eq_tensor(&rb)).logical_and(&cs.le_tensor(&rs)).logical_and(&rs.gt(0));
    to_ntp.logical_or(&to_own_block)
}

/// A boolean attention mask (`true` = attend) as an additive one in `kind` (0 to attend,
/// -inf not): what the attention kernels take without converting it on every call, so a
/// forward pass converts it once and every layer shares the one tensor (also in memory,
/// where the backward pass keeps it).
pub fn additive_mask(allowed: &Tensor, kind: Kind) -> Tensor {
    Tensor::zeros(allowed.size(), (kind, allowed.device())).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
}

/// Stack layouts into a batch, padding each to the longest with rows that carry no label
/// and that no real row attends. Row indices in `lcm_target` stay per sequence.
pub fn collate(layouts: &[MtpLayout], device: Device) -> MtpLayout {
    let max = layouts.iter().map(MtpLayout::len).max().unwrap_or(0);
    let pad = |t: &Tensor, value: i64| -> Tensor {
        let missing = max - t.size()[0];
        let t = t.to_device(device);
        if missing == 0 { t } else { Tensor::cat(&[t, Tensor::full([missing], value, (Kind::Int64, device))], 0) }
    };
    let stack = |f: &dyn Fn(&MtpLayout) -> Tensor| Tensor::stack(&layouts.iter().map(f).collect::<Vec<_>>(), 0);
    MtpLayout {
        tokens: stack(&|l| pad(&l.tokens, 0)),
        slot: stack(&|l| pad(&l.slot, 0)),
        block: stack(&|l| pad(&l.block, PAD_BLOCK)),
        positions: stack(&|l| pad(&l.positions, 0)),
        labels: stack(&|l| pad(&l.labels, IGNORE)),
        prev: stack(&|l| pad(&l.prev, 0)),
        lcm_target: stack(&|l| pad(&l.lcm_target, -1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t.flatten(0, -1)).unwrap_or_default()
    }

    /// METHOD.md's example: k = 2, tokens x0 x1 x2 (then x3.. x5 so every label exists).
    #[test]
    fn matches_the_method_example() {
        let ids = Tensor::from_slice(&[10i64, 11, 12, 13, 14, 15]);
        let loss = Tensor::ones([6], (Kind::Bool, Device::Cpu));
        let l = build_layout(&ids, &loss, 2);
        // Blocks after x0..x4 (x5 has no next token): 6 + 5 * 2 rows.
        assert_eq!(l.len(), 16);
        assert_eq!(v(&l.slot)[..9], [0, 1, 2, 0, 1, 2, 0, 1, 2]);
        assert_eq!(v(&l.positions)[..9], [0, 1, 2, 1, 2, 3, 2, 3, 4]);
        assert_eq!(v(&l.labels)[..9], [11, 12, 13, 12, 13, 14, 13, 14, 15]);
        assert_eq!(v(&l.tokens)[..9], [10, 0, 0, 11, 0, 0, 12, 0, 0]);
        assert_eq!(v(&l.prev)[..9], [10, 11, 12, 11, 12, 13, 12, 13, 14]);
        // m1 after x0 predicts x2, as does NTP x1 (row 3); m2 after x0 predicts x3 = NTP x2 (row 6).
        assert_eq!(v(&l.lcm_target)[..9], [-1, 3, 6, -1, 6, 9, -1, 9, 12]);
        // The gate: 1 on mask rows only.
        let gate: Vec<f32> = Vec::try_from(l.gate(Kind::Float).flatten(0, -1)).unwrap_or_default();
        assert_eq!(gate[..9], [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
        // The attention table of METHOD.md for the first nine rows.
        let m = l.attention_mask();
        let row = |r: i64| -> Vec<bool> { Vec::try_from(m.get(r).narrow(0, 0, 9)).unwrap_or_default() };
        let (t, f) = (true, false);
        assert_eq!(row(0), [t, f, f, f, f, f, f, f, f]); // x0
        assert_eq!(row(2), [t, t, t, f, f, f, f, f, f]); // m2 after x0
        assert_eq!(row(4), [t, f, f, t, t, f, f, f, f]); // m1 after x1: x0, x1, its own m1
        assert_eq!(row(6), [t, f, f, t, f, f, t, f, f]); // x2: NTP rows only
        assert_eq!(row(8), [t, f, f, t, f, f, t, t, t]); // m2 after x2
        // The tail: block after x4 has m1 -> x6 (past the end): ignored; x5 has no block.
        assert_eq!(v(&l.labels)[12..], [15, IGNORE, IGNORE, IGNORE]);
        assert_eq!(v(&l.slot)[12..], [0, 1, 2, 0]);
    }

    #[test]
    fn blocks_only_where_the_next_token_carries_loss() {
        // A chat example: prompt x0 x1, response x2 x3 x4. Loss on positions 1, 2, 3.
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5]);
        let loss = Tensor::from_slice(&[false, true, true, true, false]);
        let l = build_layout(&ids, &loss, 2);
        assert_eq!(v(&l.slot), [0, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(v(&l.labels), [IGNORE, 3, 4, 5, 4, 5, IGNORE, 5, IGNORE, IGNORE, IGNORE]);
    }

    #[test]
    fn attention_follows_the_rules() {
        let ids = Tensor::from_slice(&[10i64, 11, 12]);
        let l = build_layout(&ids, &Tensor::ones([3], (Kind::Bool, Device::Cpu)), 2);
        // Rows: x0 m1 m2 x1 m1 m2 x2.
        let m: Vec<Vec<bool>> =
            (0..7).map(|r| Vec::<bool>::try_from(l.attention_mask().get(r)).unwrap_or_default()).collect();
        let t = true;
        let f = false;
        assert_eq!(m[0], [t, f, f, f, f, f, f]); // x0: itself
        assert_eq!(m[1], [t, t, f, f, f, f, f]); // m1 after x0: x0, m1
        assert_eq!(m[2], [t, t, t, f, f, f, f]); // m2 after x0: x0, m1, m2
        assert_eq!(m[3], [t, f, f, t, f, f, f]); // x1: x0, x1, no masks
        assert_eq!(m[5], [t, f, f, t, t, t, f]); // m2 after x1
        assert_eq!(m[6], [t, f, f, t, f, f, t]); // x2
    }

    #[test]
    fn collate_pads_without_changing_real_rows() {
        let ones = |n| Tensor::ones([n], (Kind::Bool, Device::Cpu));
        let a = build_layout(&Tensor::from_slice(&[1i64, 2, 3]), &ones(3), 1);
        let b = build_layout(&Tensor::from_slice(&[4i64, 5]), &ones(2), 1);
        let (la, lb) = (a.len(), b.len());
        let mask_b = b.attention_mask();
        let batch = collate(&[a, b], Device::Cpu);
        assert_eq!(batch.len(), la);
        let m = batch.attention_mask();
        assert_eq!(m.size(), [2, 1, la, la]);
        // The real block of the shorter sequence is unchanged and attends no padding.
        assert!(m.get(1).get(0).narrow(0, 0, lb).narrow(1, 0, lb).equal(&mask_b));
        assert!(!bool::try_from(m.get(1).get(0).narrow(0, 0, lb).narrow(1, lb, la - lb).any()).unwrap_or(true));
        assert_eq!(v(&batch.labels.get(1))[lb as usize..], vec![IGNORE; (la - lb) as usize]);
    }
}
