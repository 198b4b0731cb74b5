//! What each speculative step did, for the CLI's JSON, the benchmark table and the GUI's
//! acceptance map.

use serde::{Deserialize, Serialize};

/// One forward pass of a speculative mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// 1-based step (the prefill is step 0 and has no stats).
    pub step: usize,
    /// The drafts the step verified (empty when it had none).
    pub drafts: Vec<i64>,
    /// How many of them were accepted.
    pub accepted: usize,
    /// The 1-based draft slot of the first rejection, if any.
    pub first_rejected: Option<usize>,
    /// Masks per block in the step (the drafts it made for the next step).
    #[serde(default)]
    pub masks: usize,
    /// Mask blocks in the step: one after every regular row (quadratic; fewer where `auto`
    /// left out those verification would likely not need), one (linear).
    #[serde(default)]
    pub blocks: usize,
    /// Tokens the step emitted (accepted drafts + the next verified token; fewer at EOS or
    /// the token limit).
    pub emitted: usize,
    /// Wall time of the step in seconds.
    pub seconds: f64,
    /// UNO recipe: the random token ids the step's mask rows read, in row order (empty for
    /// the paper's recipe).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub noise_ids: Vec<i64>,
}

impl StepStats {
    /// The drafts that were rejected, in slot order (the first one and those after it).
    pub fn rejected(&self) -> &[i64] {
        &self.drafts[self.accepted.min(self.drafts.len())..]
    }
}

/// How a generation's drafts fared, from its steps: per draft slot, the steps that reached
/// it (verified a draft there with every draft before it accepted) and those that accepted
/// it; and the steps by the tokens they emitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Acceptance {
    /// Per draft slot, slot 1 first: steps that reached it.
    pub reached: Vec<usize>,
    /// Per draft slot: steps that accepted its draft.
    pub accepted: Vec<usize>,
    /// Steps by tokens emitted: `emitted[n]` steps emitted `n` tokens.
    pub emitted: Vec<usize>,
}

impl Acceptance {
    /// Count `steps` (the prefill has no stats and is not among them).
    pub fn of(steps: &[StepStats]) -> Self {
        let mut a = Acceptance::default();
        for s in steps {
            let slots = s.drafts.len();
            if a.reached.len() < slots {
                a.reached.resize(slots, 0);
                a.accepted.resize(slots, 0);
            }
            // Slot j + 1 is reached when the j drafts before it were accepted.
            for j in 0..slots.min(s.accepted + 1) {
                a.reached[j] += 1;
                a.accepted[j] += usize::from(j < s.accepted);
            }
            if a.emitted.len() <= s.emitted {
                a.emitted.resize(s.emitted + 1, 0);
            }
            a.emitted[s.emitted] += 1;
        }
        a
    }

    /// Add `other`'s counts (another generation's) to these.
    pub fn merge(&mut self, other: &Acceptance) {
        fn add(into: &mut Vec<usize>, from: &[usize]) {
            if into.len() < from.len() {
                into.resize(from.len(), 0);
            }
            into.iter_mut().zip(from).for_each(|(a, b)| *a += b);
        }
        add(&mut self.reached, &other.reached);
        add(&mut self.accepted, &other.accepted);
        add(&mut self.emitted, &other.emitted);
    }

    /// The share of the steps reaching draft slot `slot` (1-based) that accepted it.
    pub fn rate(&self, slot: usize) -> Option<f64> {
        let i = slot.checked_sub(1)?;
        let reached = *self.reached.get(i)?;
        (reached > 0).then(|| self.accepted[i] as f64 / reached as f64)
    }

    /// One line: each slot's acceptance, `slot 1 72% (38/53) · slot 2 ...`; empty without
    /// drafts.
    pub fn summary(&self) -> String {
        let slots = (1..=self.reached.len()).filter_map(|j| {
            self.rate(j)
                .map(|r| format!("slot {j} {:.0}% ({}/{})", r * 100.0, self.accepted[j - 1], self.reached[j - 1]))
        });
        slots.collect::<Vec<_>>().join(" · ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(drafts: usize, accepted: usize, emitted: usize) -> StepStats {
        StepStats {
            step: 1,
            drafts: (0..drafts as i64).collect(),
            accepted,
            first_rejected: (accepted < drafts).then_some(accepted + 1),
            masks: 3,
            blocks: 4,
            emitted,
            seconds: 0.0,
            noise_ids: Vec::new(),
        }
    }

    #[test]
    fn acceptance_counts_each_slot_among_the_steps_that_reached_it() {
        // No drafts (after a block was left out), all three accepted, the second rejected, the first
        // rejected, one accepted of two (a step after a partial acceptance drafts fewer).
        let steps = [step(0, 0, 1), step(3, 3, 4), step(3, 1, 2), step(3, 0, 1), step(2, 1, 2)];
        let a = Acceptance::of(&steps);
        assert_eq!(a.reached, vec![4, 3, 1]);
        assert_eq!(a.accepted, vec![3, 1, 1]);
        assert_eq!(a.emitted, vec![0, 2, 2, 0, 1]);
        assert_eq!(a.rate(1), Some(0.75));
        assert_eq!((a.rate(0), a.rate(4)), (None, None));
        assert_eq!(a.summary(), "slot 1 75% (3/4) · slot 2 33% (1/3) · slot 3 100% (1/1)");
        assert_eq!(Acceptance::of(&[]).summary(), "");
    }

    /// Two generations' counts merged are the counts of their steps together.
    #[test]
    fn merged_counts_are_the_counts_of_both_generations_steps() {
        let first = [step(3, 3, 4), step(3, 0, 1)];
        let second = [step(4, 4, 5), step(2, 1, 2), step(0, 0, 1)];
        let mut merged = Acceptance::of(&first);
        merged.merge(&Acceptance::of(&second));
        let all: Vec<StepStats> = first.iter().chain(&second).cloned().collect();
        assert_eq!(merged, Acceptance::of(&all));
        let mut empty = Acceptance::default();
        empty.merge(&Acceptance::of(&second));
        assert_eq!(empty, Acceptance::of(&second));
    }
}
