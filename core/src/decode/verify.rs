//! Verification of drafts against the model's own distribution: exact match at
//! temperature 0, speculative sampling above it. Pure functions over host vectors, so
//! they are tested on their own.

use tch::{Kind, Tensor};

use super::sampling::Sampler;

/// The outcome of verifying one step's drafts.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Drafts accepted (a prefix of the drafts).
    pub accepted: usize,
    /// The next token, chosen from the model's distribution at the position after the last
    /// accepted token (the correction on a rejection, the bonus token otherwise).
    pub next: i64,
}

/// Greedy verification: `predictions[g]` is the model's argmax after regular row g (the
/// verified token, then each draft); accept the longest prefix of drafts equal to them.
pub fn verify_greedy(drafts: &[i64], predictions: &[i64]) -> Verdict {
    let accepted = drafts.iter().zip(predictions).take_while(|(d, y)| d == y).count();
    Verdict { accepted, next: predictions[accepted] }
}

/// The greedy token of each row of `logits` (`[..., vocab]`): the index of the row's
/// largest value, the first of equal ones, a NaN counting as larger than any number (what
/// libtorch's `argmax` returns). f32 logits on the CPU are read into host memory and
/// compared there: libtorch's `argmax` and the read of its result took 20-35 us a step on
/// the demo's 4,096-token vocabulary, several times the comparisons. Elsewhere `argmax`
/// runs on the device and only the tokens are read back.
pub fn greedy_tokens(logits: &Tensor) -> crate::error::Result<Vec<i64>> {
    let vocab = logits.size().last().copied().unwrap_or(0);
    if logits.device() == tch::Device::Cpu && logits.kind() == Kind::Float && vocab > 0 {
        let values = Vec::<f32>::try_from(logits.reshape([-1]))?;
        return Ok(values.chunks(vocab as usize).map(|row| first_largest(row) as i64).collect());
    }
    Ok(Vec::<i64>::try_from(logits.argmax(-1, false).reshape([-1]))?)
}

/// The index of the largest of `row`: the first of equal ones, the first NaN if any (what
/// libtorch's `argmax` picks); 0 for an empty row.
pub(crate) fn first_largest(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        let top = row[best];
        if v > top || (v.is_nan() && !top.is_nan()) {
            best = i;
        }
    }
    best
}

/// [`verify_greedy`] on the device, without reading anything back: returns the accepted
/// count and the next token, each `[1]` int64.
///
/// # Shapes
/// `drafts`: `[n]`; `predictions`: `[n + 1]` int64.
pub fn verify_greedy_on_device(drafts: &Tensor, predictions: &Tensor) -> (Tensor, Tensor) {
    let n = drafts.size()[0];
    let accepted = if n == 0 {
        Tensor::zeros([1], (Kind::Int64, predictions.device()))
    } else {
        // The matching prefix: the running product of matches is 1 up to the first miss.
        drafts.eq_tensor(&predictions.narrow(0, 0, n)).cumprod(0, Kind::Int64).sum_dim_intlist(
            [0i64].as_slice(),
            true,
            Kind::Int64,
        )
    };
    let next = predictions.index_select(0, &accepted);
    (accepted, next)
}

/// Speculative sampling: draft d_{g+1} was drawn from `q[g]`; `p[g]` is the model's
/// (processed) distribution after regular row g. Accept each draft with probability
/// min(1, p(d)/q(d)); on the first rejection draw the next token from norm(max(0, p - q));
/// if every draft is accepted draw a bonus token from the last p. The emitted sequence is
/// then distributed exactly as sampling from p token by token.
pub fn verify_sampling(drafts: &[i64], q: &[Vec<f32>], p: &[Vec<f32>], sampler: &mut Sampler) -> Verdict {
    for (g, &d) in drafts.iter().enumerate() {
        let (pg, qg) = (&p[g], &q[g]);
        let (pd, qd) = (f64::from(pg[d as usize]), f64::from(qg[d as usize]));
        let ratio = if qd > 0.0 { pd / qd } else { 0.0 };
        if sampler.uniform() < ratio.min(1.0) {
            continue;
        }
        let residual: Vec<f32> = pg.iter().zip(qg).map(|(a, b)| (a - b).max(0.0)).collect();
        let next =
            if residual.iter().any(|&r| r > 0.0) { sampler.draw_slice(&residual) } else { sampler.draw_slice(pg) };
        return Verdict { accepted: g, next };
    }
    Verdict { accepted: drafts.len(), next: sampler.draw_slice(&p[drafts.len()]) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Decoding, SamplingParams};

    #[test]
    fn greedy_accepts_the_matching_prefix() {
        assert_eq!(verify_greedy(&[5, 6, 7], &[5, 6, 9, 1]), Verdict { accepted: 2, next: 9 });
        assert_eq!(verify_greedy(&[5, 6], &[5, 6, 4]), Verdict { accepted: 2, next: 4 });
        assert_eq!(verify_greedy(&[3], &[5, 6]), Verdict { accepted: 0, next: 5 });
        assert_eq!(verify_greedy(&[], &[8]), Verdict { accepted: 0, next: 8 });
    }

    #[test]
    fn greedy_on_device_equals_greedy_on_the_host() {
        let cases: [(&[i64], &[i64]); 5] = [
            (&[5, 6, 7], &[5, 6, 9, 1]),
            (&[5, 6], &[5, 6, 4]),
            (&[3], &[5, 6]),
            (&[], &[8]),
            (&[1, 2, 3], &[9, 2, 3, 4]),
        ];
        for (drafts, predictions) in cases {
            let host = verify_greedy(drafts, predictions);
            let (a, next) = verify_greedy_on_device(&Tensor::from_slice(drafts), &Tensor::from_slice(predictions));
            assert_eq!(
                (a.int64_value(&[0]) as usize, next.int64_value(&[0])),
                (host.accepted, host.next),
                "{drafts:?}"
            );
        }
    }

    /// The host's greedy tokens are libtorch's `argmax` of every row: random rows, rows
    /// whose largest value comes twice (the first wins), rows with a NaN (it wins), with
    /// -inf, and a single row of `[vocab]` logits.
    #[test]
    fn greedy_tokens_equal_argmax() -> crate::Result<()> {
        tch::manual_seed(3);
        let o = (Kind::Float, tch::Device::Cpu);
        let logits = Tensor::randn([6, 50], o);
        let _ = logits.get(1).get(7).fill_(10.0);
        let _ = logits.get(1).get(31).fill_(10.0);
        let _ = logits.get(2).get(40).fill_(f64::NAN);
        let _ = logits.get(2).get(45).fill_(f64::NAN);
        let _ = logits.get(3).fill_(f64::NEG_INFINITY);
        let _ = logits.get(4).get(0).fill_(f64::NAN);
        let want = Vec::<i64>::try_from(logits.argmax(-1, false))?;
        assert_eq!(&want[1..4], &[7, 40, 0], "libtorch's own answers changed");
        assert_eq!(greedy_tokens(&logits)?, want);
        assert_eq!(greedy_tokens(&logits.get(5))?, vec![want[5]]);
        // Other dtypes go through `argmax`.
        assert_eq!(greedy_tokens(&logits.to_kind(Kind::Double))?, want);
        Ok(())
    }

    /// One draft position: the token after verification must be distributed as p whatever
    /// q is (the core of speculative sampling), checked with a chi-square test.
    #[test]
    fn sampling_output_follows_p() -> crate::Result<()> {
        let p = vec![0.5f32, 0.3, 0.2, 0.0];
        let q = vec![0.1f32, 0.1, 0.4, 0.4];
        let mut s =
            Sampler::new(Decoding::Sample(SamplingParams { temperature: 1.0, top_k: None, top_p: None, seed: 11 }))?;
        let n = 20_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let d = s.draw_slice(&q);
            let v = verify_sampling(&[d], std::slice::from_ref(&q), &[p.clone(), p.clone()], &mut s);
            let first = if v.accepted == 1 { d } else { v.next };
            counts[first as usize] += 1;
        }
        let chi2: f64 = (0..3)
            .map(|i| {
                let e = f64::from(p[i]) * n as f64;
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        // 2 degrees of freedom: P(chi2 > 13.8) = 0.001.
        assert!(chi2 < 13.8, "chi2 {chi2}, counts {counts:?}");
        assert_eq!(counts[3], 0);
        Ok(())
    }
}
