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
