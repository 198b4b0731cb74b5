//! Speculative decoding with the model's own mask tokens (METHOD.md section 4): the
//! quadratic scheme of the paper and the linear ablation, greedy or sampled, one forward
//! pass per step. Split by role:
//!
//! - [`layout`]: which rows a step has, in which order, and their device constants;
//! - [`drafter`]: the adapter prepared for decoding, and the draft chain;
//! - [`step`]: the decoder (prefill, then verify, keep, draft, each step);
//! - `fixed`: greedy steps of fixed shapes, recorded as CUDA graphs;
//! - [`masks`]: the mask count of each step when chosen on the fly;
//! - [`detail`]: what the step-through view shows.
//!
//! The prefill is METHOD.md's bootstrap, the prompt followed by one mask block, as one
//! causal pass (the block follows the prompt's last token, so every row's attention is
//! causal; a gated adapter touches the block's rows only); its drafts are the first step's.
//! Where this departs from METHOD.md's wording: with `--masks auto` on the CPU a quadratic
//! step may leave out the mask blocks after the regular rows where verification will likely
//! not stop (the drafter's confidences say where: [`MaskController::blocks_to_keep`]); when
//! it stops there after all, the next step has no drafts, as in linear decoding after a
//! partial acceptance. Verification is the paper's, so the outputs are too.

pub mod detail;
pub mod drafter;
mod fixed;
pub mod layout;
pub mod masks;
pub mod step;

pub use detail::{Candidates, StepDetail};
pub use drafter::{
    AHEAD_MIN_MASK_ROWS, BF16_MIN_MASK_ROWS, DraftArithmetic, DraftOptions, Drafter, HostDrafts, LoraForm,
    int8_short_panels,
};
pub use layout::{StepLayout, StepPlan};
pub use masks::MaskController;
pub use step::{SpecDecoder, StepResult};
