//! What the step-through view shows of one step.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// The top candidates of one row, for display.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidates {
    /// Token ids, most likely first.
    pub ids: Vec<i64>,
    /// Their probabilities.
    pub probs: Vec<f32>,
}

/// The five most likely tokens of each row of `probs` (`[rows, V]`).
pub fn top5(probs: &Tensor) -> Result<Vec<Candidates>> {
    let k = 5.min(probs.size().last().copied().unwrap_or(1));
    let (p, i) = probs.to_kind(Kind::Float).to_device(Device::Cpu).topk(k, -1, true, true);
    (0..p.size()[0])
        .map(|r| Ok(Candidates { ids: Vec::<i64>::try_from(i.get(r))?, probs: Vec::<f32>::try_from(p.get(r))? }))
        .collect()
}

/// Everything about one step that the step-through view shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDetail {
    /// Input token of each row (mask rows: -(j) for mask m_j), in the step's row order:
    /// the verified token and the drafts, then the mask blocks.
    pub inputs: Vec<i64>,
    /// Block of each row.
    pub block: Vec<i64>,
    /// Slot of each row.
    pub slot: Vec<i64>,
    /// RoPE position of each row.
    pub positions: Vec<i64>,
    /// Cached rows before the step.
    pub past: usize,
    /// `[T][T]` attention among the step's rows (every row also sees the whole cache).
    pub attention: Vec<Vec<bool>>,
    /// Base-model top-5 after each regular row (what verification compares drafts with).
    pub regular_top: Vec<Candidates>,
    /// For the mask block that made the next drafts: the top-5 of each slot.
    pub draft_top: Vec<Candidates>,
    /// The next drafts.
    pub next_drafts: Vec<i64>,
}
