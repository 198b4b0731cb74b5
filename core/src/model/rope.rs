//! Rotary position embeddings, with the frequency schedule transformers uses (including
//! Llama 3.1's scaling) so that logits match the reference.

use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

use super::config::{ModelConfig, RopeScaling};

/// The inverse frequencies of one model, and the cos/sin tables they give per position.
#[derive(Debug)]
pub struct Rope {
    /// `[head_dim / 2]`, f32.
    inv_freq: Tensor,
    /// On the CPU: cos and signed sin of positions `0..N` (`[N, head_dim]` f32 each),
    /// computed once, so that a pass copies its positions' rows rather than running a dozen
    /// operations (45-50 us a pass on the demo, 4% of its AR step). `N` is the model's
    /// context, at most [`TABLE_MAX_POSITIONS`]; a pass with a later position computes its
    /// tables as on other devices.
    table: Option<(Tensor, Tensor)>,
}

/// The most positions [`Rope`]'s table holds (2 MiB of f32 for a head of 64).
const TABLE_MAX_POSITIONS: usize = 8192;

/// cos and sin for one forward pass, already in the activations' dtype, shaped to rotate
/// tensors laid out `[b, t, heads, head_dim]` (tokens before heads, as projections give them).
#[derive(Debug)]
pub struct RopeTables {
    /// `[b, t, 1, head_dim]`.
    pub cos: Tensor,
    /// `[b, t, 1, head_dim]`: sin with its first half negated, so that the rotation needs
    /// no negation of its own (see [`RopeTables::apply`]).
    pub sin_signed: Tensor,
}

impl Rope {
    /// The schedule of `config` on `device`.
    pub fn new(config: &ModelConfig, device: Device) -> Self {
        let dim = config.head_dim as i64;
        // 1 / theta^(2i/d), in f32 as transformers computes it.
        let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / dim as f64;
        let base = Tensor::from(config.rope_theta).to_kind(Kind::Float).to_device(device);
        let inv_freq = base.pow(&exponent).reciprocal();
        let inv_freq = match config.rope_scaling {
            RopeScaling::Default => inv_freq,
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = original_max_position_embeddings as f64;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                let wavelen = inv_freq.reciprocal() * (2.0 * PI);
                // Long wavelengths are slowed by `factor`, short ones kept, and the band in
                // between interpolated.
                let scaled = inv_freq.where_self(&wavelen.le(low_freq_wavelen), &(&inv_freq / factor));
                let smooth = ((wavelen.reciprocal() * old) - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let one_minus: Tensor = -&smooth + 1.0;
                let smoothed: Tensor = one_minus * &scaled / factor + &smooth * &scaled;
                let medium = wavelen.ge(high_freq_wavelen).logical_and(&wavelen.le(low_freq_wavelen));
                smoothed.where_self(&medium, &scaled)
            }
        };
        // Each position's row computed once: every pass that reads it (an AR step's row, a
        // speculative step's, a prefill's) rotates by the same values.
        let positions = config.max_position_embeddings.min(TABLE_MAX_POSITIONS);
        let table = (device == Device::Cpu && positions > 0).then(|| {
            let all = Tensor::arange(positions as i64, (Kind::Int64, device));
            let t = compute(&inv_freq, &all, Kind::Float);
            let rows = |x: &Tensor| x.view([positions as i64, dim]);
            (rows(&t.cos), rows(&t.sin_signed))
        });
        Self { inv_freq, table }
    }

    /// cos/sin for `positions` (`[t]` or `[b, t]`, int64), in `kind`: on the CPU the
    /// table's rows where every position is in it, else computed.
    pub fn tables(&self, positions: &Tensor, kind: Kind) -> RopeTables {
        let pos = if positions.dim() == 1 { positions.unsqueeze(0) } else { positions.shallow_clone() };
        if let Some(t) = self.table_rows(&pos) {
            return RopeTables { cos: t.cos.to_kind(kind), sin_signed: t.sin_signed.to_kind(kind) };
        }
        compute(&self.inv_freq, &pos, kind)
    }

    /// The table's rows of `pos` (`[b, t]`), `[b, t, 1, head_dim]`, when there is a table
    /// and it holds every position.
    fn table_rows(&self, pos: &Tensor) -> Option<RopeTables> {
        let (cos, sin) = self.table.as_ref()?;
        if pos.device() != Device::Cpu || pos.kind() != Kind::Int64 {
            return None;
        }
        let shape = |x: Tensor| x.view([pos.size()[0], pos.size()[1], 1, -1]);
        // A decoding pass's few positions: copied in a loop of our own.
        let pos = pos.contiguous();
        if let (Some(c), Some(s)) =
            (super::row_ops::gather_rows(cos, &pos, None), super::row_ops::gather_rows(sin, &pos, None))
        {
            return Some(RopeTables { cos: shape(c), sin_signed: shape(s) });
        }
        let flat = pos.reshape([-1]);
        let host = Vec::<i64>::try_from(&flat).ok()?;
        let n = cos.size()[0];
        if host.iter().any(|p| !(0..n).contains(p)) {
            return None;
        }
        Some(RopeTables { cos: shape(cos.index_select(0, &flat)), sin_signed: shape(sin.index_select(0, &flat)) })
    }
}

/// cos/sin of `pos` (`[b, t]` int64) with the inverse frequencies `inv_freq`, `[b, t, 1,
/// head_dim]` in `kind`.
fn compute(inv_freq: &Tensor, pos: &Tensor, kind: Kind) -> RopeTables {
    let pos = if pos.dim() == 1 { pos.unsqueeze(0) } else { pos.shallow_clone() };
    // [b, t, 1, d/2]
    let freqs = (pos.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.view([1, 1, -1])).unsqueeze(2);
    let (cos, sin) = (freqs.cos(), freqs.sin());
    RopeTables {
        cos: Tensor::cat(&[&cos, &cos], -1).to_kind(kind),
        sin_signed: Tensor::cat(&[&sin.neg(), &sin], -1).to_kind(kind),
    }
}

impl RopeTables {
    /// Rotate `x` (`[b, t, heads, head_dim]`) by the tables' angles: `x * cos +
    /// rotate_half(x) * sin` with `rotate_half(x) = [-x2, x1]`, written as the halves
    /// swapped (`[x2, x1]`, one flip) times the signed sin. `(-x2) * s` and `x2 * (-s)` are
    /// the same float, so the result equals transformers' bit for bit.
    /// A decoding pass's few f32 rows on the CPU take our own loop (`row_ops`), same bits.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        super::row_ops::rope(x, &self.cos, &self.sin_signed).unwrap_or_else(|| self.apply_tensor_ops(x))
    }

    /// [`RopeTables::apply`] in libtorch's operations, whatever the pass.
    pub fn apply_tensor_ops(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (d, half) = (size[3], size[3] / 2);
        let swapped = x.view([size[0], size[1], size[2], 2, half]).flip([3]).view([size[0], size[1], size[2], d]);
        x * &self.cos + swapped * &self.sin_signed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Family;

    fn config(max_positions: usize, scaling: RopeScaling) -> ModelConfig {
        ModelConfig {
            family: Family::Llama,
            vocab_size: 10,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 32,
            max_position_embeddings: max_positions,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: scaling,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            sliding_window: None,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1]))
            .unwrap_or_default()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// A pass reads a position's row of the table whatever the pass (one row, a step's
    /// rows in a batch, a prefill of more rows than the gathering loop takes): the same
    /// bits for the same position, within rounding of the tables computed per pass; a
    /// pass with a position past the table computes its tables, and so does a model
    /// without a table.
    #[test]
    fn table_rows_are_the_same_in_every_pass() {
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        for scaling in [RopeScaling::Default, llama3] {
            let rope = Rope::new(&config(1000, scaling), Device::Cpu);
            let row = |p: i64| bits(&rope.tables(&Tensor::from_slice(&[p]), Kind::Float).cos);
            let one = |p: i64| (row(p), bits(&rope.tables(&Tensor::from_slice(&[p]), Kind::Float).sin_signed));
            let many = Tensor::arange_start(300, 600, (Kind::Int64, Device::Cpu)).view([1, 300]);
            let batched = Tensor::from_slice(&[7i64, 450, 999, 12]).view([2, 2]);
            for positions in [many, batched] {
                let t = rope.tables(&positions, Kind::Float);
                let (b, n) = (positions.size()[0], positions.size()[1]);
                assert_eq!(t.cos.size(), [b, n, 1, 32]);
                let per_pass = compute(&rope.inv_freq, &positions, Kind::Float);
                let diff = (&t.cos - &per_pass.cos).abs().max().double_value(&[])
                    + (&t.sin_signed - &per_pass.sin_signed).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{scaling:?}: {diff}");
                for (i, p) in Vec::<i64>::try_from(positions.reshape([-1])).unwrap_or_default().into_iter().enumerate()
                {
                    let (bi, ti) = (i as i64 / n, i as i64 % n);
                    let got = (bits(&t.cos.get(bi).get(ti)), bits(&t.sin_signed.get(bi).get(ti)));
                    assert_eq!(got, one(p), "{scaling:?}, position {p}");
                }
            }
            // Past the table: computed.
            let late = Tensor::from_slice(&[999i64, 1000]);
            let want = compute(&rope.inv_freq, &late, Kind::Float);
            assert_eq!(bits(&rope.tables(&late, Kind::Float).cos), bits(&want.cos));
            // In bf16: the table's values rounded.
            let p = Tensor::from_slice(&[5i64]);
            let bf = rope.tables(&p, Kind::BFloat16);
            assert_eq!(bf.cos.kind(), Kind::BFloat16);
            assert_eq!(bits(&bf.cos), bits(&rope.tables(&p, Kind::Float).cos.to_kind(Kind::BFloat16)));
        }
        assert!(Rope::new(&config(1000, RopeScaling::Default), Device::Cpu).table.is_some());
        assert!(Rope::new(&config(0, RopeScaling::Default), Device::Cpu).table.is_none());
    }
}
