//! Multi-token prediction (METHOD.md sections 1-3): the training layout with mask blocks,
//! gated LoRA, the sampler head, the three losses, and the adapter that holds the trainable
//! parts.

pub mod adapter;
pub mod export;
pub mod gated_lora;
pub mod loss;
pub mod masks;
pub mod probe;
pub mod sampler;

pub use adapter::{BaseCheck, BaseIdentity, DEFAULT_SAMPLER_FORM, MtpAdapter, MtpConfig, Recipe};
pub use gated_lora::LoraConfig;
pub use masks::{MtpLayout, build_layout, collate};
pub use sampler::SamplerForm;
