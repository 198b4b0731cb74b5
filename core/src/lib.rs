//! `mtp-core`: everything that touches a tensor in MTP Workbench. Llama-family models that
//! match the reference implementation, tokenizers and chat templates, model sources (local,
//! hub, built-in), autoregressive generation, and (in later modules) multi-token prediction
//! training and speculative decoding. Never depends on a GUI crate.

#[macro_use]
mod choices;

pub mod bundle;
pub mod checkpoint;
pub mod decode;
pub mod device;
pub mod error;
pub mod fsutil;
pub mod inspect;
pub mod model;
pub mod mtp;
pub mod project;
pub mod source;
pub mod tokenizer;
pub mod train;

pub use bundle::{LoadOptions, LoadedModel};
pub use device::{DType, DeviceSpec};
pub use error::{Error, Result};
pub use model::Llama;
pub use source::ModelSource;
pub use tokenizer::{TemplateVars, TextTokenizer};
