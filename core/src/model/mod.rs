//! The Llama-family decoder in tch: config, layers, weights and the KV cache. Struct and
//! field names follow the Hugging Face checkpoint keys (`self_attn.q_proj`, ...).

pub mod attention;
pub mod block;
pub mod config;
pub mod cuda_graph;
pub mod few_queries;
pub mod few_rows;
pub mod huge_pages;
pub mod int8;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod mlp;
pub mod norm;
pub mod panels;
mod partner;
pub mod rope;
pub mod row_ops;
pub mod row_split;
pub mod threads;
pub mod trace;
pub mod weights;

pub use attention::AttnMask;
pub use config::{Family, HfConfig, ModelConfig, RopeScaling};
pub use cuda_graph::{CudaGraph, FixedStep, StepGraphs};
pub use kv_cache::KvCache;
pub use linear::{Gate, Gated, Proj, ProjDelta, ProjGroup, StackedLinear};
pub use llama::Llama;
pub use weights::{CheckpointSource, SpecSource, TensorSpec, WeightSource, Weights};
