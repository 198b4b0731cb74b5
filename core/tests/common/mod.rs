//! Shared helpers of the core integration tests: fixture locations and reference records.
#![allow(dead_code, missing_docs)]

use std::path::PathBuf;

use serde::Deserialize;
use tch::{Device, Tensor};

/// `tests/fixtures` at the repository root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("tests").join("fixtures")
}

/// Names of every fixture model family.
pub const FAMILIES: [&str; 6] = ["llama", "llama3-tied", "llama-sharded", "mistral", "qwen2", "qwen3"];

pub fn model_dir(family: &str) -> PathBuf {
    fixtures().join("models").join(family)
}

#[derive(Debug, Deserialize)]
pub struct Greedy {
    pub prompt_ids: Vec<i64>,
    pub token_ids: Vec<i64>,
}

#[derive(Debug, Deserialize)]
pub struct TextCase {
    pub prompt: String,
    pub prompt_ids: Vec<i64>,
    pub token_ids: Vec<i64>,
    pub decoded: String,
}

#[derive(Debug, Deserialize)]
pub struct Chat {
    pub messages: Vec<mtp_core::tokenizer::ChatMessage>,
    pub rendered: String,
}

/// What `scripts/reference.py fixtures` recorded for one model with transformers.
#[derive(Debug, Deserialize)]
pub struct Reference {
    pub model_type: String,
    pub vocab_size: usize,
    pub num_parameters: u64,
    pub logits_input_ids: Vec<i64>,
    pub greedy: Greedy,
    pub text: TextCase,
    pub chat: Chat,
}

pub fn reference(family: &str) -> anyhow::Result<Reference> {
    let path = fixtures().join("reference").join(format!("{family}.json"));
    Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
}

/// The reference logits, `[t, vocab]` f32.
pub fn reference_logits(family: &str) -> anyhow::Result<Tensor> {
    let path = fixtures().join("reference").join(format!("{family}.safetensors"));
    let file = mtp_core::checkpoint::SafetensorsFile::open(&path)?;
    Ok(file.read("logits")?.to_device(Device::Cpu))
}

/// Largest absolute difference of two tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Copy a fixture model folder into a fresh temporary folder the test may damage.
pub fn scratch_copy(family: &str) -> anyhow::Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    for entry in std::fs::read_dir(model_dir(family))? {
        let entry = entry?;
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name()))?;
    }
    Ok(tmp)
}
