//! The key/value cache: per layer, preallocated buffers that grow by doubling, a committed
//! length shared by all layers, and compaction on the device for speculative decoding.

use tch::{Kind, Tensor};

/// Keys and values of every layer for the tokens seen so far.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer `(k, v)`, each `[b, h_kv, capacity, head_dim]`, allocated on first use.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Rows filled (the same for every layer between forward passes).
    len: i64,
    capacity_hint: i64,
}

impl KvCache {
    /// An empty cache for `num_layers` layers that first allocates room for `capacity_hint`
    /// positions (it grows past that when needed).
    pub fn new(num_layers: usize, capacity_hint: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| None).collect(), len: 0, capacity_hint: capacity_hint.max(16) as i64 }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write `k` and `v` (`[b, h_kv, t, head_dim]`) of `layer` after the committed rows and
    /// return views of all rows including them (`[b, h_kv, len + t, head_dim]`). The new
    /// rows count only after [`KvCache::commit`].
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let need = self.len + t;
        let hint = self.capacity_hint;
        let len = self.len;
        let slot = &mut self.layers[layer];
        let grow = match slot {
            Some((kb, _)) => kb.size()[2] < need,
            None => true,
        };
        if grow {
            let (b, h, d) = (k.size()[0], k.size()[1], k.size()[3]);
            let capacity = need.max(hint).max(slot.as_ref().map_or(0, |(kb, _)| kb.size()[2] * 2));
            let opts = (k.kind(), k.device());
            let kb = Tensor::zeros([b, h, capacity, d], opts);
            let vb = Tensor::zeros([b, h, capacity, d], opts);
            if let Some((old_k, old_v)) = slot.take() {
                kb.narrow(2, 0, len).copy_(&old_k.narrow(2, 0, len));
                vb.narrow(2, 0, len).copy_(&old_v.narrow(2, 0, len));
            }
            *slot = Some((kb, vb));
        }
        let Some((kb, vb)) = slot.as_ref() else { unreachable!("allocated above") };
        kb.narrow(2, len, t).copy_(k);
        vb.narrow(2, len, t).copy_(v);
        (kb.narrow(2, 0, need), vb.narrow(2, 0, need))
    }

    /// Count the `t` rows appended by the last forward pass.
    pub fn commit(&mut self, t: usize) {
        self.len += t as i64;
    }

    /// Keep only the rows `rows` (int64 indices into the committed rows, ascending), moved
    /// to the front in that order; everything else is dropped. Runs on the cache's device.
    pub fn keep(&mut self, rows: &Tensor) {
        let n = rows.size()[0];
        for (kb, vb) in self.layers.iter().flatten() {
            for buf in [kb, vb] {
                let kept = buf.narrow(2, 0, self.len).index_select(2, rows);
                buf.narrow(2, 0, n).copy_(&kept);
            }
        }
        self.len = n;
    }

    /// Keep the committed rows before `base` and, after them, only the rows `base + rows[i]`
    /// (`rows`: int64, ascending, relative to `base`), moved down to follow `base`. Only the
    /// tail is read and written, so this costs the kept rows, not the cache length.
    pub fn keep_tail(&mut self, base: usize, rows: &Tensor) {
        let base = base as i64;
        let n = rows.size()[0];
        for (kb, vb) in self.layers.iter().flatten() {
            for buf in [kb, vb] {
                let kept = buf.narrow(2, base, self.len - base).index_select(2, rows);
                buf.narrow(2, base, n).copy_(&kept);
            }
        }
        self.len = base + n;
    }

    /// Drop every row from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len as i64);
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(|(k, v)| (k.numel() + v.numel()) * k.kind().elt_size_in_bytes()).sum()
    }
}

/// The boolean mask (`true` = attend) for `t` new tokens after `past` cached ones under
/// plain causal attention: `[t, past + t]`.
pub fn causal_mask(past: i64, t: i64, device: tch::Device) -> Tensor {
    let cols = Tensor::arange(past + t, (Kind::Int64, device)).unsqueeze(0);
    let rows = (Tensor::arange(t, (Kind::Int64, device)) + past).unsqueeze(1);
    cols.le_tensor(&rows)
}
