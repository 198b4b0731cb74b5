//! The key/value cache: per layer, preallocated buffers that grow by doubling, and a
//! committed length shared by all layers. Speculative decoding lays out the rows it keeps
//! first, so dropping the others is a truncation.

use tch::{Device, Kind, Tensor};

use super::row_ops::{Rows, write_rows_from};

/// Keys and values of every layer for the tokens seen so far, in two preallocated buffers
/// (keys, values) shared by all layers.
#[derive(Debug)]
pub struct KvCache {
    /// `(k, v)`, each `[layers, b, h_kv, capacity, head_dim]`, allocated on first use.
    buffers: Option<(Tensor, Tensor)>,
    /// Per layer, views of its slice of the two buffers (`[b, h_kv, capacity, head_dim]`),
    /// made once per allocation rather than once per layer and pass.
    layers: Vec<(Tensor, Tensor)>,
    num_layers: i64,
    /// Rows filled (the same for every layer between forward passes).
    len: i64,
    capacity_hint: i64,
    /// Counts the buffers' allocations ([`KvCache::buffers_id`]).
    allocations: u64,
}

impl KvCache {
    /// An empty cache for `num_layers` layers that first allocates room for `capacity_hint`
    /// positions (it grows past that when needed).
    pub fn new(num_layers: usize, capacity_hint: usize) -> Self {
        Self {
            buffers: None,
            layers: Vec::new(),
            num_layers: num_layers as i64,
            len: 0,
            capacity_hint: capacity_hint.max(16) as i64,
            allocations: 0,
        }
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
        let size = like.size();
        self.reserve_for([size[0], size[1], size[3]], (like.kind(), like.device()), need);
    }

    /// [`KvCache::reserve`] for rows of `[b, h_kv, head_dim]` and `opts`.
    fn reserve_for(&mut self, [b, h, d]: [i64; 3], opts: (Kind, Device), need: i64) {
        let capacity = self.buffers.as_ref().map_or(0, |(k, _)| k.size()[3]);
        if capacity >= need {
            return;
        }
        let new_cap = need.max(self.capacity_hint).max(capacity * 2);
        let k = Tensor::zeros([self.num_layers, b, h, new_cap, d], opts);
        let v = Tensor::zeros([self.num_layers, b, h, new_cap, d], opts);
        if let Some((old_k, old_v)) = self.buffers.take() {
            k.narrow(3, 0, self.len).copy_(&old_k.narrow(3, 0, self.len));
            v.narrow(3, 0, self.len).copy_(&old_v.narrow(3, 0, self.len));
        }
        self.layers = (0..self.num_layers).map(|l| (k.get(l), v.get(l))).collect();
        self.buffers = Some((k, v));
        self.allocations += 1;
    }

    /// Which buffers the cache holds: it changes whenever they are allocated anew (growing,
    /// or keeping some batch rows). A recorded CUDA graph writes to the buffers of its
    /// recording, so it is only replayed while this is unchanged.
    pub fn buffers_id(&self) -> u64 {
        self.allocations
    }

    /// Write `k` and `v` (`[b, h_kv, t, head_dim]`) of `layer` after the committed rows and
    /// return views of all rows including them (`[b, h_kv, len + t, head_dim]`). The new
    /// rows count only after [`KvCache::commit`].
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let need = self.len + t;
        self.reserve(k, need);
        let Some((kl, vl)) = self.layers.get(layer) else { return (k.shallow_clone(), v.shallow_clone()) };
        // On the CPU a loop of row copies, else libtorch's.
        if !(super::row_ops::write_rows(kl, k, self.len) && super::row_ops::write_rows(vl, v, self.len)) {
            kl.narrow(2, self.len, t).copy_(k);
            vl.narrow(2, self.len, t).copy_(v);
        }
        (kl.narrow(2, 0, need), vl.narrow(2, 0, need))
    }

    /// [`KvCache::append`] of keys and values read in place (a CPU pass's, from its q/k/v
    /// projection, without a view of each): returns the layer's buffers (`[b, h_kv,
    /// capacity, head_dim]` each) and how many of their rows now count for attention. `None`,
    /// and nothing written, where [`write_rows_from`] does not take them.
    pub(crate) fn append_rows(&mut self, layer: usize, k: Rows, v: Rows) -> Option<(&Tensor, &Tensor, i64)> {
        let [b, h, t, d] = k.size;
        if v.size != k.size || v.kind != k.kind {
            return None;
        }
        let need = self.len + t;
        self.reserve_for([b, h, d], (k.kind, Device::Cpu), need);
        let (kl, vl) = self.layers.get(layer)?;
        // The two buffers have one shape and dtype, so the second write is taken if the
        // first is.
        (write_rows_from(kl, k, self.len) && write_rows_from(vl, v, self.len)).then_some((kl, vl, need))
    }

    /// Make room for `t` rows after the committed ones, of `[b, h_kv, head_dim]` in `kind`
    /// on the CPU: for passes that write their rows with [`KvCache::write_rows`].
    pub(crate) fn reserve_rows(&mut self, shape: [i64; 3], kind: Kind, t: i64) {
        self.reserve_for(shape, (kind, Device::Cpu), self.len + t);
    }

    /// Write keys and values read in place at the buffers' rows from `at` (which must not
    /// be committed rows: `at >= len`), with room already made ([`KvCache::reserve_rows`]),
    /// and return the layer's buffers; nothing is committed. Through a shared reference,
    /// so that the threads sharing a pass's rows ([`super::row_split`]) each write their
    /// own rows of a layer at once. `None`, and nothing written, where [`write_rows_from`]
    /// does not take them or `at` is a committed row.
    pub(crate) fn write_rows(&self, layer: usize, k: Rows, v: Rows, at: i64) -> Option<(&Tensor, &Tensor)> {
        if v.size != k.size || v.kind != k.kind || at < self.len {
            return None;
        }
        let (kl, vl) = self.layers.get(layer)?;
        (write_rows_from(kl, k, at) && write_rows_from(vl, v, at)).then_some((kl, vl))
    }

    /// Rows the buffers hold before they must grow (0 before the first append).
    pub fn capacity(&self) -> usize {
        self.buffers.as_ref().map_or(0, |(k, _)| k.size()[3] as usize)
    }

    /// Write `k` and `v` (`[b, heads, t, d]`) of `layer` at the cache positions `at` (`[t]`,
    /// on the device) and return the layer's whole buffers: shapes that never change, for a
    /// pass recorded as a CUDA graph. The buffers must already hold those positions (see
    /// [`KvCache::capacity`]); nothing is committed.
    pub fn write_at(&mut self, layer: usize, k: &Tensor, v: &Tensor, at: &Tensor) -> (Tensor, Tensor) {
        let Some((kl, vl)) = self.layers.get(layer) else { return (k.shallow_clone(), v.shallow_clone()) };
        let (mut kl, mut vl) = (kl.shallow_clone(), vl.shallow_clone());
        let _ = kl.index_copy_(2, at, k);
        let _ = vl.index_copy_(2, at, v);
        (kl, vl)
    }

    /// Count the `t` rows appended by the last forward pass.
    pub fn commit(&mut self, t: usize) {
        self.len += t as i64;
    }

    /// Empty the cache, keeping its buffers (and so what was recorded against them).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drop every row from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len as i64);
    }

    /// Keep only the batch rows `rows` (indices into the batch, on the cache's device), in
    /// that order: a batch whose finished rows leave it stops paying for them.
    pub fn keep_rows(&mut self, rows: &Tensor) {
        if let Some((k, v)) = self.buffers.take() {
            let (k, v) = (k.index_select(1, rows), v.index_select(1, rows));
            self.layers = (0..self.num_layers).map(|l| (k.get(l), v.get(l))).collect();
            self.buffers = Some((k, v));
            self.allocations += 1;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The buffers' identity changes exactly when they are allocated anew.
    #[test]
    fn buffers_id_changes_only_with_new_buffers() {
        let mut cache = KvCache::new(2, 16);
        let rows = |t: i64| Tensor::ones([1, 2, t, 4], (Kind::Float, Device::Cpu));
        let first = cache.buffers_id();
        let _ = cache.append(0, &rows(10), &rows(10));
        cache.commit(10);
        let allocated = cache.buffers_id();
        assert_ne!(allocated, first);
        let _ = cache.append(0, &rows(6), &rows(6));
        cache.commit(6);
        assert_eq!((cache.buffers_id(), cache.capacity()), (allocated, 16), "filled, not grown");
        let _ = cache.append(0, &rows(1), &rows(1));
        assert_ne!(cache.buffers_id(), allocated, "grown");
        let grown = cache.buffers_id();
        cache.keep_rows(&Tensor::from_slice(&[0i64]));
        assert_ne!(cache.buffers_id(), grown, "batch rows kept");
    }
}
