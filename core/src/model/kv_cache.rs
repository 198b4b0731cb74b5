//! The key/value cache: per layer, preallocated buffers that grow by doubling, a committed
//! length shared by all layers, and compaction on the device for speculative decoding.

use tch::{Kind, Tensor};

/// Keys and values of every layer for the tokens seen so far, in two preallocated buffers
/// (keys, values) shared by all layers, so that compaction is one gather per buffer
/// whatever the depth.
#[derive(Debug)]
pub struct KvCache {
    /// `(k, v)`, each `[layers, b, h_kv, capacity, head_dim]`, allocated on first use.
    buffers: Option<(Tensor, Tensor)>,
    num_layers: i64,
    /// Rows filled (the same for every layer between forward passes).
    len: i64,
    capacity_hint: i64,
}

impl KvCache {
    /// An empty cache for `num_layers` layers that first allocates room for `capacity_hint`
    /// positions (it grows past that when needed).
    pub fn new(num_layers: usize, capacity_hint: usize) -> Self {
        Self { buffers: None, num_layers: num_layers as i64, len: 0, capacity_hint: capacity_hint.max(16) as i64 }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Make room for `need` rows (allocating on first use, doubling when full).
    fn reserve(&mut self, like: &Tensor, need: i64) {
        let capacity = self.buffers.as_ref().map_or(0, |(k, _)| k.size()[3]);
        if capacity >= need {
            return;
        }
        let (b, h, d) = (like.size()[0], like.size()[1], like.size()[3]);
        let new_cap = need.max(self.capacity_hint).max(capacity * 2);
        let opts = (like.kind(), like.device());
        let k = Tensor::zeros([self.num_layers, b, h, new_cap, d], opts);
        let v = Tensor::zeros([self.num_layers, b, h, new_cap, d], opts);
        if let Some((old_k, old_v)) = self.buffers.take() {
            k.narrow(3, 0, self.len).copy_(&old_k.narrow(3, 0, self.len));
            v.narrow(3, 0, self.len).copy_(&old_v.narrow(3, 0, self.len));
        }
        self.buffers = Some((k, v));
    }

    /// Write `k` and `v` (`[b, h_kv, t, head_dim]`) of `layer` after the committed rows and
    /// return views of all rows including them (`[b, h_kv, len + t, head_dim]`). The new
    /// rows count only after [`KvCache::commit`].
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let need = self.len + t;
        self.reserve(k, need);
        let Some((kb, vb)) = &self.buffers else { return (k.shallow_clone(), v.shallow_clone()) };
        let (kl, vl) = (kb.get(layer as i64), vb.get(layer as i64));
        kl.narrow(2, self.len, t).copy_(k);
        vl.narrow(2, self.len, t).copy_(v);
        (kl.narrow(2, 0, need), vl.narrow(2, 0, need))
    }

    /// Count the `t` rows appended by the last forward pass.
    pub fn commit(&mut self, t: usize) {
        self.len += t as i64;
    }

    /// Keep the committed rows before `base` and, after them, only the rows `base + rows[i]`
    /// (`rows`: int64, ascending, relative to `base`), moved down to follow `base`. One
    /// gather per buffer for all layers; only the tail is read and written.
    pub fn keep_tail(&mut self, base: usize, rows: &Tensor) {
        let base = base as i64;
        let n = rows.size()[0];
        if let Some((kb, vb)) = &self.buffers {
            for buf in [kb, vb] {
                let kept = buf.narrow(3, base, self.len - base).index_select(3, rows);
                buf.narrow(3, base, n).copy_(&kept);
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
        self.buffers.as_ref().map_or(0, |(k, v)| (k.numel() + v.numel()) * k.kind().elt_size_in_bytes())
    }
}

/// The boolean mask (`true` = attend) for `t` new tokens after `past` cached ones under
/// plain causal attention: `[t, past + t]`.
pub fn causal_mask(past: i64, t: i64, device: tch::Device) -> Tensor {
    let cols = Tensor::arange(past + t, (Kind::Int64, device)).unsqueeze(0);
    let rows = (Tensor::arange(t, (Kind::Int64, device)) + past).unsqueeze(1);
    cols.le_tensor(&rows)
}
