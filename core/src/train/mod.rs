//! Training: datasets, the built-in synthetic sets, AdamW, events, cancel/pause, and the
//! MTP training loop with checkpoints and resume.

pub mod builtin;
pub mod control;
pub mod data;
pub mod distill;
pub mod events;
pub mod formats;
pub mod hub_data;
pub mod memory;
pub mod optim;
pub mod pretrain;
pub mod trainer;

pub use control::Control;
pub use data::{DataSource, Example, Tokenized};
pub use events::{Split, StepMetrics, TrainEvent, TrainSink, expected_tokens_per_forward};
pub use optim::{AdamW, OptimConfig, Schedule};
pub use trainer::{LoopConfig, Outcome, Packing, RunDir, TrainConfig, TrainSummary, resume, train};
