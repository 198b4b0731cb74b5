//! Generation: autoregressive decoding with a KV cache (this module's `ar`), token
//! selection (`sampling`), and the streaming interface the CLI, GUI and tests share.

pub mod ar;
pub mod bench;
pub mod explain;
pub mod generation;
pub mod sampling;
pub mod speculative;
pub mod stats;
pub mod strategy;
pub mod verify;

use std::ops::ControlFlow;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use ar::generate_ar;
pub use generation::{Generation, generate};
pub use sampling::{Sampler, SamplingParams};
pub use speculative::{DraftArithmetic, DraftOptions, Drafter, LoraForm, SpecDecoder};
pub use stats::{Acceptance, StepStats};
pub use strategy::{Layout, MaskCount, Mode, Speculative, Strategy};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decoding {
    /// The most likely token (first on ties).
    #[default]
    Greedy,
    /// A random draw from the processed distribution.
    Sample(SamplingParams),
}

/// One generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The prompt, already tokenized (may start with BOS).
    pub prompt_ids: Vec<i64>,
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// Greedy or sampled.
    pub decoding: Decoding,
    /// Ids that end generation; the EOS token itself is emitted.
    pub eos_ids: Vec<i64>,
}

/// How a token came to be emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenOrigin {
    /// Chosen from the model's own distribution at its position (AR, or the token a
    /// speculative step verifies itself).
    Verified,
    /// A draft from mask slot `slot` (1-based) that verification accepted.
    Draft {
        /// The slot, 1..=k.
        slot: usize,
    },
}

/// One emitted token, as it streams out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    /// The token id.
    pub id: i64,
    /// Index among the new tokens (0-based).
    pub index: usize,
    /// The forward pass that produced it (0 = prefill).
    pub step: usize,
    /// How it was produced.
    pub origin: TokenOrigin,
}

/// Receives tokens as they are produced. Returning `Break` stops generation (cancel).
pub trait TokenSink {
    /// A token was emitted.
    fn token(&mut self, event: &TokenEvent) -> ControlFlow<()>;

    /// A speculative step finished (after its tokens were emitted).
    fn step(&mut self, _stats: &StepStats) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// A sink that ignores tokens and never stops generation.
impl TokenSink for () {
    fn token(&mut self, _: &TokenEvent) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// Any closure over events is a sink.
impl<F: FnMut(&TokenEvent) -> ControlFlow<()>> TokenSink for F {
    fn token(&mut self, event: &TokenEvent) -> ControlFlow<()> {
        self(event)
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An EOS token was emitted.
    Eos,
    /// `max_new_tokens` were emitted.
    MaxTokens,
    /// The sink asked to stop.
    Cancelled,
}

impl std::fmt::Display for StopReason {
    /// What a user reads: "end of sequence", "token limit", "stopped".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Eos => "end of sequence",
            StopReason::MaxTokens => "token limit",
            StopReason::Cancelled => "stopped",
        })
    }
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOutput {
    /// New tokens only (including a final EOS).
    pub token_ids: Vec<i64>,
    /// Model forward passes, prefill included.
    pub forwards: usize,
    /// Why it stopped.
    pub stop: StopReason,
    /// Time of the prefill pass.
    pub prefill_time: Duration,
    /// Wall time from the request to the last token.
    pub total_time: Duration,
    /// Per speculative step (empty for AR).
    #[serde(default)]
    pub steps: Vec<StepStats>,
    /// Whether decoding steps (AR, or greedy speculative steps) were replayed from a CUDA
    /// graph ([`crate::model::Llama::records_graphs`]; false also when recording failed and
    /// the steps ran eagerly).
    #[serde(default)]
    pub cuda_graph: bool,
    /// UNO recipe: the random ids the prefill's mask block read (its drafts are the first
    /// step's); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefill_noise_ids: Vec<i64>,
}

impl GenerateOutput {
    /// Nothing generated yet (the clock started at `start`).
    pub fn empty(start: std::time::Instant) -> Self {
        Self {
            token_ids: Vec::new(),
            forwards: 0,
            stop: StopReason::MaxTokens,
            prefill_time: Duration::ZERO,
            total_time: start.elapsed(),
            steps: Vec::new(),
            cuda_graph: false,
            prefill_noise_ids: Vec::new(),
        }
    }

    /// New tokens per second of wall time, prefill included.
    pub fn tokens_per_second(&self) -> f64 {
        let s = self.total_time.as_secs_f64();
        if s > 0.0 { self.token_ids.len() as f64 / s } else { 0.0 }
    }

    /// New tokens per forward pass.
    pub fn tokens_per_forward(&self) -> f64 {
        if self.forwards > 0 { self.token_ids.len() as f64 / self.forwards as f64 } else { 0.0 }
    }
}
