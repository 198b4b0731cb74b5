//! The mask count of each step when it is chosen on the fly ([`MaskCount::Auto`]).

use super::super::strategy::{Layout, MaskCount};

/// How fast old observations fade: each step multiplies the running sums by this.
const DECAY: f64 = 0.9;

/// Chooses how many masks each step uses. Fixed counts never change. `Auto` keeps two
/// running estimates and picks the count with the most tokens per second:
///
/// - the recent acceptance of each draft slot j (the share of steps that reached slot j and
///   accepted it), which gives the tokens a step with m drafts is expected to emit,
///   `1 + sum over j <= m of p_1 ... p_j`;
/// - what a step costs on this machine, as a line through the step times measured so far
///   against the step's rows (`(m + 1)^2` quadratic, `2m + 1` linear): on a GPU extra rows
///   are nearly free and it drafts up to k, on a CPU each row costs and it drafts less.
///
/// Until two different row counts have been timed, it assumes rows cost nothing (and so
/// drafts k). The choice only decides how much to draft: outputs are the same whatever it
/// chooses, but the choice depends on measured times, so tokens per forward may vary a
/// little from run to run.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskController {
    count: MaskCount,
    layout: Layout,
    k: usize,
    current: usize,
    /// Per slot j (index j - 1): decayed counts of steps that reached slot j, and that
    /// accepted its draft.
    reached: Vec<f64>,
    accepted: Vec<f64>,
    /// Decayed sums for the least-squares line seconds = a + b * rows.
    cost: LineFit,
}

/// Running least squares of y on x with exponential forgetting.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct LineFit {
    n: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl LineFit {
    fn add(&mut self, x: f64, y: f64) {
        *self = LineFit {
            n: self.n * DECAY + 1.0,
            x: self.x * DECAY + x,
            y: self.y * DECAY + y,
            xx: self.xx * DECAY + x * x,
            xy: self.xy * DECAY + x * y,
        };
    }

    /// Intercept and slope (slope 0 when every x seen was the same, or negative).
    fn line(&self) -> Option<(f64, f64)> {
        if self.n == 0.0 {
            return None;
        }
        let var = self.xx * self.n - self.x * self.x;
        let slope =
            if var > 1e-9 * self.n * self.n { ((self.xy * self.n - self.x * self.y) / var).max(0.0) } else { 0.0 };
        Some(((self.y - slope * self.x) / self.n, slope))
    }
}

impl MaskController {
    /// A controller for `count` with an adapter trained with `k` masks.
    pub fn new(count: MaskCount, layout: Layout, k: usize) -> Self {
        let k = k.max(1);
        let current = match count {
            MaskCount::Fixed(m) => m.clamp(1, k),
            MaskCount::Auto => k,
        };
        Self { count, layout, k, current, reached: vec![0.0; k], accepted: vec![0.0; k], cost: LineFit::default() }
    }

    /// True for [`MaskCount::Auto`].
    pub fn is_auto(&self) -> bool {
        self.count == MaskCount::Auto
    }

    /// How the mask counts are chosen.
    pub fn count(&self) -> MaskCount {
        self.count
    }

    /// Masks per block for the next step.
    pub fn masks(&self) -> usize {
        self.current
    }

    /// Record a step that verified `drafts` drafts, accepted `accepted` of them, had `masks`
    /// masks per block and took `seconds` (`None`: a step whose time says nothing about the
    /// next ones, such as one that recorded a CUDA graph); then choose the next step's count.
    pub fn observe(&mut self, drafts: usize, accepted: usize, masks: usize, seconds: Option<f64>) {
        if self.count != MaskCount::Auto {
            return;
        }
        for v in self.reached.iter_mut().chain(self.accepted.iter_mut()) {
            *v *= DECAY;
        }
        for j in 0..drafts.min(self.k) {
            if j <= accepted {
                self.reached[j] += 1.0;
            }
            if j < accepted {
                self.accepted[j] += 1.0;
            }
        }
        if let Some(seconds) = seconds {
            self.cost.add(self.layout.rows(drafts, masks) as f64, seconds);
        }
        self.current = (1..=self.k)
            .map(|m| (m, self.tokens_per_step(m) / self.seconds_per_step(m)))
            .fold((self.current, f64::NEG_INFINITY), |best, (m, rate)| if rate > best.1 { (m, rate) } else { best })
            .0;
    }

    /// Expected tokens of a step with `m` drafts: 1 + sum over j of p_1 ... p_j, each slot's
    /// acceptance with one pseudo-observation of 1/2.
    fn tokens_per_step(&self, m: usize) -> f64 {
        let mut reach = 1.0;
        let mut total = 1.0;
        for j in 0..m {
            reach *= (self.accepted[j] + 0.5) / (self.reached[j] + 1.0);
            total += reach;
        }
        total
    }

    /// The fitted cost of a steady step with `m` drafts and `m` masks (relative units).
    fn seconds_per_step(&self, m: usize) -> f64 {
        let rows = self.layout.rows(m, m) as f64;
        match self.cost.line() {
            Some((a, b)) => (a + b * rows).max(1e-9),
            None => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_counts_never_move() {
        let mut c = MaskController::new(MaskCount::Fixed(2), Layout::Quadratic, 4);
        c.observe(2, 0, 2, Some(1.0));
        c.observe(2, 2, 2, Some(1.0));
        assert_eq!(c.masks(), 2);
    }

    /// Steps whose cost does not grow with rows (a GPU): draft as much as the acceptance
    /// pays for, up to k.
    #[test]
    fn free_rows_and_good_acceptance_draft_k() {
        let mut c = MaskController::new(MaskCount::Auto, Layout::Quadratic, 4);
        assert_eq!(c.masks(), 4);
        for _ in 0..20 {
            let m = c.masks();
            c.observe(m, m.min(3), m, Some(0.010));
        }
        assert_eq!(c.masks(), 4);
    }

    /// Steps whose cost grows with rows (a CPU): fewer masks, more so when acceptance drops.
    #[test]
    fn costly_rows_draft_less() {
        let mut c = MaskController::new(MaskCount::Auto, Layout::Quadratic, 4);
        // Time = 1 + 0.25 per row: 25 rows cost 7.25, 4 rows 2, 9 rows 3.25.
        let time = |drafts: usize, masks: usize| 1.0 + 0.25 * Layout::Quadratic.rows(drafts, masks) as f64;
        c.observe(0, 0, 4, Some(time(0, 4)));
        for _ in 0..30 {
            let m = c.masks();
            // Slot 1 always accepted, later slots rarely.
            let a = if m >= 2 { 1 } else { m };
            c.observe(m, a, m, Some(time(m, m)));
        }
        assert!(c.masks() <= 2, "{}", c.masks());
    }

    #[test]
    fn a_line_through_two_points() {
        let mut f = LineFit::default();
        f.add(4.0, 2.0);
        assert_eq!(f.line().map(|l| l.1), Some(0.0));
        f.add(9.0, 3.25);
        let (a, b) = f.line().unwrap_or_default();
        assert!((a - 1.0).abs() < 1e-9 && (b - 0.25).abs() < 1e-9, "{a} {b}");
    }
}
