//! What the timing examples share.
use std::time::Instant;

/// Median milliseconds of each form over interleaved rounds (each form run once first, to
/// warm up): the forms take turns, round after round, so that the machine's slow and fast
/// phases fall on all of them.
pub fn medians(forms: &[&dyn Fn()], rounds: usize) -> Vec<f64> {
    for f in forms {
        f();
    }
    let mut times = vec![Vec::with_capacity(rounds); forms.len()];
    for _ in 0..rounds {
        for (i, f) in forms.iter().enumerate() {
            let t = Instant::now();
            f();
            times[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}
