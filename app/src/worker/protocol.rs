//! The messages between the UI and the worker thread: plain data, never a tensor.

use mtp_core::inspect::ModelInfo;
use mtp_core::{DType, DeviceSpec, ModelSource};

/// What the UI asks the worker to do.
#[derive(Debug, Clone)]
pub enum Request {
    /// Resolve and load a model, replacing any loaded one.
    LoadModel {
        /// Where it comes from.
        source: ModelSource,
        /// Where it runs.
        device: DeviceSpec,
        /// In which precision.
        dtype: DType,
    },
}

/// A loaded model, as the UI shows it.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    /// Where it came from.
    pub source: ModelSource,
    /// Its local folder.
    pub dir: std::path::PathBuf,
    /// Facts from its files.
    pub info: ModelInfo,
    /// Where it runs.
    pub device: DeviceSpec,
    /// Its compute precision.
    pub dtype: DType,
    /// Whether the tokenizer has a chat template.
    pub chat_template: bool,
    /// Seconds the load took.
    pub load_seconds: f64,
}

/// What the worker reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A job started (for the status bar).
    Started(String),
    /// Download or load progress: a message and a fraction in [0, 1] when known.
    Progress(String, Option<f32>),
    /// A model is loaded.
    ModelLoaded(Box<ModelSummary>),
    /// A job failed; the worker carries on.
    Failed(String),
}
