//! What training reports, through a sink the CLI, the GUI and tests implement alike.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::data::DataReport;
use crate::mtp::loss::LossValues;

/// Which data a metrics record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// The training batches.
    #[default]
    Train,
    /// The held-out validation set.
    Val,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: usize,
    /// Train or validation.
    pub split: Split,
    /// Loss terms and per-slot accuracies.
    #[serde(flatten)]
    pub losses: LossValues,
    /// Learning rate used for the step.
    pub lr: f64,
    /// Gradient norm before clipping (train only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    /// Input tokens (before mask blocks) per second of the step.
    pub tokens_per_second: f64,
    /// GPU memory in use, on CUDA.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gpu_mem_bytes: Option<u64>,
    /// Seconds since the run (or its resumption) started.
    pub elapsed: f64,
    /// Validation: per mask count 1..k, the tokens per forward the drafter's slot
    /// accuracies predict, `1 + sum over j <= m of acc_1 ... acc_j`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expected_tokens_per_forward: Option<Vec<f64>>,
    /// Validation, every few passes: per mask count 1..k, the tokens per forward greedy
    /// quadratic decoding of a few held-out prompts reached.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub measured_tokens_per_forward: Option<Vec<f64>>,
}

/// The tokens per forward that per-slot acceptance rates `acc` predict at each mask count
/// 1..=len: `1 + acc_1 + acc_1 acc_2 + ...` (a draft counts only when every earlier one was
/// accepted).
pub fn expected_tokens_per_forward(acc: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(acc.len());
    let (mut total, mut run) = (1.0, 1.0);
    for a in acc {
        run *= a.clamp(0.0, 1.0);
        total += run;
        out.push(total);
    }
    out
}

/// Events of one training run, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// Data is read and tokenized; training starts.
    Prepared {
        /// What the dataset held.
        data: DataReport,
        /// Training sequences after packing or truncation.
        train_sequences: usize,
        /// Validation sequences.
        val_sequences: usize,
        /// Trainable parameters.
        trainable_parameters: u64,
        /// The step training starts after (0, or the checkpoint's step on resume).
        start_step: usize,
        /// The last step.
        total_steps: usize,
        /// Activation checkpointing is on.
        #[serde(default)]
        checkpointing: bool,
        /// The training memory estimate for this run's settings, in bytes.
        #[serde(default)]
        memory_estimate: Option<u64>,
    },
    /// A training step finished.
    Step(StepMetrics),
    /// A validation pass finished.
    Validation(StepMetrics),
    /// A checkpoint was written.
    Checkpoint {
        /// Its step.
        step: usize,
        /// Its file.
        path: PathBuf,
    },
}

/// Receives training events.
pub trait TrainSink {
    /// An event happened.
    fn event(&mut self, event: &TrainEvent);
}

/// Ignores events.
impl TrainSink for () {
    fn event(&mut self, _: &TrainEvent) {}
}

/// Any closure over events is a sink.
impl<F: FnMut(&TrainEvent)> TrainSink for F {
    fn event(&mut self, event: &TrainEvent) {
        self(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_tokens_per_forward_multiplies_slot_rates() {
        assert_eq!(expected_tokens_per_forward(&[0.5, 0.5, 1.0]), [1.5, 1.75, 2.0]);
        assert_eq!(expected_tokens_per_forward(&[1.0, 1.0]), [2.0, 3.0]);
        assert_eq!(expected_tokens_per_forward(&[0.0, 0.9]), [1.0, 1.0]);
        assert!(expected_tokens_per_forward(&[]).is_empty());
    }
}
