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
}

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
        Self { inv_freq }
    }

    /// cos/sin for `positions` (`[t]` or `[b, t]`, int64), in `kind`.
    pub fn tables(&self, positions: &Tensor, kind: Kind) -> RopeTables {
        let pos = if positions.dim() == 1 { positions.unsqueeze(0) } else { positions.shallow_clone() };
        // [b, t, 1, d/2]
        let freqs = (pos.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1])).unsqueeze(2);
        let (cos, sin) = (freqs.cos(), freqs.sin());
        RopeTables {
            cos: Tensor::cat(&[&cos, &cos], -1).to_kind(kind),
            sin_signed: Tensor::cat(&[&sin.neg(), &sin], -1).to_kind(kind),
        }
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
