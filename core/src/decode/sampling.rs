//! Turning logits into a token: greedy argmax, or a seeded draw after temperature, top-k
//! and top-p (applied in that order, as transformers' `generate` does).

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::Decoding;
use crate::error::{Error, Result};

/// Parameters of sampled decoding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Logits are divided by this (> 0).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose mass reaches `p` (0 < p <= 1).
    pub top_p: Option<f64>,
    /// Seed of the draw.
    pub seed: u64,
}

impl SamplingParams {
    /// Check the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!("temperature must be finite and > 0, got {}", self.temperature)));
        }
        if self.top_k == Some(0) {
            return Err(Error::Invalid("top-k must be at least 1".into()));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(Error::Invalid(format!("top-p must be in (0, 1], got {p}")));
        }
        Ok(())
    }

    /// The probability distribution the draw is made from.
    ///
    /// # Shapes
    /// `logits`: `[..., vocab]` (any float dtype) -> `[..., vocab]` f32, rows summing to 1.
    pub fn distribution(&self, logits: &Tensor) -> Tensor {
        let mut l = logits.to_kind(Kind::Float) / self.temperature;
        let vocab = l.size().last().copied().unwrap_or(1);
        if let Some(k) = self.top_k.filter(|&k| (k as i64) < vocab) {
            let (kth, _) = l.topk(k as i64, -1, true, true);
            let threshold = kth.narrow(-1, k as i64 - 1, 1);
            l = l.masked_fill(&l.lt_tensor(&threshold), f64::NEG_INFINITY);
        }
        if let Some(p) = self.top_p.filter(|&p| p < 1.0) {
            // Sorted ascending, drop the tokens whose cumulative mass stays within 1 - p,
            // always keeping the most likely one.
            let (sorted, order) = l.sort(-1, false);
            let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
            let remove_sorted = cum.le(1.0 - p);
            let last = remove_sorted.size().last().copied().unwrap_or(1) - 1;
            let _ = remove_sorted.narrow(-1, last, 1).fill_(0);
            let remove = remove_sorted.scatter(-1, &order, &remove_sorted);
            l = l.masked_fill(&remove, f64::NEG_INFINITY);
        }
        l.softmax(-1, Kind::Float)
    }
}

/// Chooses tokens for one generation; owns the random state of sampled decoding.
pub struct Sampler {
    decoding: Decoding,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `decoding` (validated).
    pub fn new(decoding: Decoding) -> Result<Self> {
        let seed = match decoding {
            Decoding::Greedy => 0,
            Decoding::Sample(p) => {
                p.validate()?;
                p.seed
            }
        };
        Ok(Self { decoding, rng: StdRng::seed_from_u64(seed) })
    }

    /// The decoding mode.
    pub fn decoding(&self) -> Decoding {
        self.decoding
    }

    /// The next token from one row of logits (`[vocab]`).
    pub fn pick(&mut self, logits: &Tensor) -> Result<i64> {
        match self.decoding {
            Decoding::Greedy => super::verify::greedy_tokens(logits)?
                .first()
                .copied()
                .ok_or_else(|| Error::Invalid("no logits to choose a token from".into())),
            Decoding::Sample(p) => {
                let probs = p.distribution(logits);
                self.draw(&probs)
            }
        }
    }

    /// A draw from a probability vector (`[vocab]`, f32, any device).
    pub fn draw(&mut self, probs: &Tensor) -> Result<i64> {
        let probs = Vec::<f32>::try_from(probs.to_device(tch::Device::Cpu))?;
        Ok(self.draw_slice(&probs))
    }

    /// A draw from non-negative weights (normalised here).
    pub fn draw_slice(&mut self, probs: &[f32]) -> i64 {
        let total: f64 = probs.iter().map(|&p| f64::from(p)).sum();
        let mut u = self.rng.random::<f64>() * total;
        let mut last_positive = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                last_positive = i;
                u -= f64::from(p);
                if u < 0.0 {
                    return i as i64;
                }
            }
        }
        // Rounding left a sliver of mass: the last token with any probability.
        last_positive as i64
    }

    /// A uniform number in [0, 1) from the same random stream (speculative acceptance).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(top_k: Option<usize>, top_p: Option<f64>) -> SamplingParams {
        SamplingParams { temperature: 1.0, top_k, top_p, seed: 7 }
    }

    #[test]
    fn top_k_and_top_p_keep_the_right_tokens() {
        let logits = Tensor::from_slice(&[0.4f32, 0.3, 0.2, 0.1]).log();
        let kept = |p: SamplingParams| -> Vec<bool> {
            let d: Vec<f32> = p.distribution(&logits).try_into().unwrap_or_default();
            d.iter().map(|&x| x > 0.0).collect()
        };
        assert_eq!(kept(params(Some(2), None)), [true, true, false, false]);
        assert_eq!(kept(params(None, Some(0.65))), [true, true, false, false]);
        assert_eq!(kept(params(None, Some(0.75))), [true, true, true, false]);
        assert_eq!(kept(params(None, Some(0.01))), [true, false, false, false]);
        assert_eq!(kept(params(None, None)), [true, true, true, true]);
    }

    #[test]
    fn temperature_sharpens() {
        let logits = Tensor::from_slice(&[1.0f32, 0.0]);
        let p = |t: f64| -> f32 {
            let d: Vec<f32> = SamplingParams { temperature: t, ..params(None, None) }
                .distribution(&logits)
                .try_into()
                .unwrap_or_default();
            d[0]
        };
        assert!(p(0.5) > p(1.0) && p(1.0) > p(2.0));
    }

    #[test]
    fn seeded_draws_repeat_and_follow_the_distribution() -> Result<()> {
        let probs = Tensor::from_slice(&[0.5f32, 0.25, 0.25, 0.0]);
        let draws = |seed| -> Result<Vec<i64>> {
            let mut s = Sampler::new(Decoding::Sample(SamplingParams { seed, ..params(None, None) }))?;
            (0..4000).map(|_| s.draw(&probs)).collect()
        };
        let a = draws(1)?;
        assert_eq!(a, draws(1)?);
        assert_ne!(a, draws(2)?);
        let count = |t| a.iter().filter(|&&x| x == t).count() as f64 / 4000.0;
        assert!((count(0) - 0.5).abs() < 0.03 && (count(1) - 0.25).abs() < 0.03, "{} {}", count(0), count(1));
        assert_eq!(count(3), 0.0);
        Ok(())
    }

    #[test]
    fn bad_parameters_are_rejected() {
        for p in [
            SamplingParams { temperature: 0.0, ..params(None, None) },
            params(Some(0), None),
            params(None, Some(0.0)),
            params(None, Some(1.5)),
        ] {
            assert!(Sampler::new(Decoding::Sample(p)).is_err(), "{p:?}");
        }
    }
}
