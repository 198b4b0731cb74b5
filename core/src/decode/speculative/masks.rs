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
///   against the step's rows (`(m + 1)^2` quadratic, fewer where recent steps left out
///   blocks, `2m + 1` linear): on a GPU extra rows are nearly free and it drafts up to k,
///   on a CPU each row costs and it drafts less.
///
/// Until two different row counts have been timed, it assumes rows cost nothing (and so
/// drafts k); since every step after the prefill's k drafts has the same rows at k masks,
/// a timed step while it has seen one row count only (at the start, or after a long run of
/// one count has faded the others) is followed by one of a single mask, to see what rows
/// cost. The choice only decides how much to draft: outputs are the same whatever it
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
    /// Decayed sums of the share of mask blocks recent quadratic steps with drafts had
    /// ([`MaskController::blocks_to_keep`] leaves some out) and of their weights.
    kept: (f64, f64),
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

    /// `n^2` times the variance of the x seen.
    fn var(&self) -> f64 {
        self.xx * self.n - self.x * self.x
    }

    /// True once two different x have been seen.
    fn spread(&self) -> bool {
        self.var() > 1e-9 * self.n * self.n
    }

    /// Intercept and slope (slope 0 when every x seen was the same, or negative).
    fn line(&self) -> Option<(f64, f64)> {
        if self.n == 0.0 {
            return None;
        }
        let slope = if self.spread() { ((self.xy * self.n - self.x * self.y) / self.var()).max(0.0) } else { 0.0 };
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
        Self {
            count,
            layout,
            k,
            current,
            reached: vec![0.0; k],
            accepted: vec![0.0; k],
            cost: LineFit::default(),
            kept: (1.0, 1.0),
        }
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
    /// masks per block and `rows` rows, and took `seconds` (`None`: a step whose time says
    /// nothing about the next ones, such as one that recorded a CUDA graph); then choose the
    /// next step's count.
    pub fn observe(&mut self, drafts: usize, accepted: usize, masks: usize, rows: usize, seconds: Option<f64>) {
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
            debug_assert!(rows <= self.layout.rows(drafts, masks));
            self.cost.add(rows as f64, seconds);
        }
        // The share of its blocks the step had (a step without drafts has its one block
        // whatever is pruned; a step that kept every block, sampled decoding's for one,
        // brings the share back up).
        if self.layout == Layout::Quadratic && drafts > 0 && masks > 0 {
            let blocks = rows.saturating_sub(drafts + 1) / masks;
            let share = (blocks as f64 / (drafts + 1) as f64).min(1.0);
            self.kept = (self.kept.0 * DECAY + share, self.kept.1 * DECAY + 1.0);
        }
        self.current = (1..=self.k)
            .map(|m| (m, self.tokens_per_step(m) / self.seconds_per_step(m)))
            .fold((self.current, f64::NEG_INFINITY), |best, (m, rate)| if rate > best.1 { (m, rate) } else { best })
            .0;
        // Steps of one size timed so far: every count looks as costly as another. After a timed
        // step, time one of another size (one mask; two after a step of one). Untimed steps
        // (recording a CUDA graph) never call for one, so that no shape is recorded for it.
        if seconds.is_some() && !self.cost.spread() {
            self.current = if masks > 1 { 1 } else { self.k.min(2) };
        }
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

    /// The fitted cost of a steady step with `m` drafts and `m` masks (relative units), its
    /// mask blocks pruned as recent steps were.
    fn seconds_per_step(&self, m: usize) -> f64 {
        let rows = match self.layout {
            Layout::Quadratic => (m + 1) as f64 * (1.0 + m as f64 * self.kept.0 / self.kept.1),
            Layout::Linear => self.layout.rows(m, m) as f64,
        };
        self.seconds_for(rows)
    }

    /// The fitted cost of a step of `rows` rows (relative units; 1 until a line is fitted).
    fn seconds_for(&self, rows: f64) -> f64 {
        match self.cost.line() {
            Some((a, b)) => (a + b * rows).max(1e-9),
            None => 1.0,
        }
    }

    /// Which mask blocks the next quadratic step keeps, given each new draft's confidence
    /// (its probability under the drafter given the drafts before it, in order; the next
    /// step verifies these drafts): `None` for every block. With `auto`, once rows are
    /// seen to cost time (the fitted line rises), the block after `j` accepted drafts is
    /// kept when the chance that verification stops there (the product of the first `j`
    /// confidences times the chance the next one fails) times what its drafts are worth
    /// (the tokens a step adds beyond its verified one, at the current rate) outweighs its
    /// rows' cost; the likeliest block is always kept. A block left out costs nothing when
    /// verification stops elsewhere; when it stops there, the step after has no drafts to
    /// verify. Verification is unchanged, so outputs are too.
    pub fn blocks_to_keep(&self, confidence: &[f32]) -> Option<Vec<usize>> {
        let unusable = confidence.iter().any(|c| !c.is_finite());
        if self.count != MaskCount::Auto || self.layout != Layout::Quadratic || confidence.is_empty() || unusable {
            return None;
        }
        let (_, slope) = self.cost.line()?;
        if slope <= 0.0 {
            return None;
        }
        let m = self.current;
        let tokens = self.tokens_per_step(m);
        // Seconds that the drafts of a block, when verification needs it, save.
        let worth = (tokens - 1.0) * self.seconds_per_step(m) / tokens;
        let price = slope * m as f64;
        let mut reach = 1.0;
        let stops: Vec<f64> = (0..=confidence.len())
            .map(|j| {
                let c = confidence.get(j).map_or(0.0, |&c| f64::from(c).clamp(0.0, 1.0));
                let stop = reach * (1.0 - c);
                reach *= c;
                stop
            })
            .collect();
        let likeliest = (0..stops.len()).fold(0, |best, j| if stops[j] > stops[best] { j } else { best });
        let keep: Vec<usize> = (0..stops.len()).filter(|&j| j == likeliest || stops[j] * worth >= price).collect();
        (keep.len() < stops.len()).then_some(keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_counts_never_move() {
        let mut c = MaskController::new(MaskCount::Fixed(2), Layout::Quadratic, 4);
        c.observe(2, 0, 2, 9, Some(1.0));
        c.observe(2, 2, 2, 9, Some(1.0));
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
            c.observe(m, m.min(3), m, Layout::Quadratic.rows(m, m), Some(0.010));
        }
        assert_eq!(c.masks(), 4);
    }

    /// Steps whose cost grows with rows (a CPU): fewer masks, more so when acceptance drops.
    #[test]
    fn costly_rows_draft_less() {
        let mut c = MaskController::new(MaskCount::Auto, Layout::Quadratic, 4);
        // Time = 1 + 0.25 per row: 25 rows cost 7.25, 4 rows 2, 9 rows 3.25.
        let time = |drafts: usize, masks: usize| 1.0 + 0.25 * Layout::Quadratic.rows(drafts, masks) as f64;
        // The first step verifies the prefill's 4 drafts at 4 masks; one size timed, the next
        // step tries one mask.
        c.observe(4, 1, 4, Layout::Quadratic.rows(4, 4), Some(time(4, 4)));
        assert_eq!(c.masks(), 1);
        c.observe(4, 1, 1, Layout::Quadratic.rows(4, 1), Some(time(4, 1)));
        // An untimed step (one that recorded a CUDA graph) asks for no other size.
        let mut untimed = MaskController::new(MaskCount::Auto, Layout::Quadratic, 4);
        untimed.observe(4, 4, 4, Layout::Quadratic.rows(4, 4), None);
        assert_eq!(untimed.masks(), 4);
        for _ in 0..30 {
            let m = c.masks();
            // Slot 1 always accepted, later slots rarely.
            let a = if m >= 2 { 1 } else { m };
            c.observe(m, a, m, Layout::Quadratic.rows(m, m), Some(time(m, m)));
        }
        assert!(c.masks() <= 2, "{}", c.masks());
    }

    /// Blocks verification will likely not need are left out once rows cost time; every
    /// block is kept while they seem free, and for a fixed count.
    #[test]
    fn unlikely_blocks_are_left_out_when_rows_cost() {
        let mut fixed = MaskController::new(MaskCount::Fixed(2), Layout::Quadratic, 2);
        fixed.observe(2, 2, 2, 9, Some(1.45));
        assert_eq!(fixed.blocks_to_keep(&[0.99, 0.99]), None);
        let mut free = MaskController::new(MaskCount::Auto, Layout::Quadratic, 2);
        assert_eq!(free.blocks_to_keep(&[0.99, 0.99]), None);
        free.observe(0, 0, 2, 3, Some(0.01));
        free.observe(2, 2, 2, 9, Some(0.01));
        assert_eq!(free.blocks_to_keep(&[0.99, 0.99]), None);
        // Time = 1 + 0.05 per row; drafts always accepted, so two masks a block.
        let mut costly = MaskController::new(MaskCount::Auto, Layout::Quadratic, 2);
        costly.observe(0, 0, 2, 3, Some(1.15));
        for _ in 0..5 {
            costly.observe(2, 2, 2, 9, Some(1.45));
        }
        assert_eq!(costly.masks(), 2);
        // Sure drafts: verification stops after both (0.98); the other blocks' stops
        // (0.01, 0.0099) are worth less than their two rows.
        assert_eq!(costly.blocks_to_keep(&[0.99, 0.99]), Some(vec![2]));
        // Unsure ones: every stop likely enough.
        assert_eq!(costly.blocks_to_keep(&[0.5, 0.5]), None);
        // A sure first draft and an unsure second: no block after none accepted.
        assert_eq!(costly.blocks_to_keep(&[0.99, 0.5]), Some(vec![1, 2]));
        // A confidence that is not a number: every block.
        assert_eq!(costly.blocks_to_keep(&[f32::NAN, 0.99]), None);
        // A step that had one block of three prices later steps with fewer rows; steps
        // with every block bring the price back.
        assert!((costly.seconds_per_step(2) - costly.seconds_for(9.0)).abs() < 1e-12);
        costly.observe(2, 2, 2, 5, Some(1.25));
        assert!(costly.seconds_per_step(2) < costly.seconds_for(8.5));
        for _ in 0..60 {
            costly.observe(2, 2, 2, 9, Some(1.45));
        }
        assert!(costly.seconds_per_step(2) > costly.seconds_for(8.99));
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
