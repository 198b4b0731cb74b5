//! Every kind of bad input ends in a typed error whose message names the file and the
//! tensor or key at fault: never a panic, never a silent skip.

mod common;

use std::path::Path;

use common::*;
use mtp_core::checkpoint::{SafetensorsFile, save};
use mtp_core::decode::{Decoding, GenerateRequest, generate_ar};
use mtp_core::{Error, LoadOptions, LoadedModel};
use tch::Tensor;

fn load(dir: &Path) -> Result<LoadedModel, Error> {
    LoadedModel::from_folder(dir, &LoadOptions::default())
}

/// Load `dir`, expect failure, and check the message mentions every needle.
fn expect_error(dir: &Path, needles: &[&str]) -> anyhow::Result<Error> {
    let err = match load(dir) {
        Ok(_) => anyhow::bail!("loading {} should fail", dir.display()),
        Err(e) => e,
    };
    let msg = err.to_string();
    for needle in needles {
        assert!(msg.contains(needle), "`{msg}` should mention `{needle}`");
    }
    Ok(err)
}

/// Rewrite `model.safetensors` of `dir` through `edit`.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> anyhow::Result<()> {
    let path = dir.join("model.safetensors");
    let file = SafetensorsFile::open(&path)?;
    let mut tensors =
        file.names().into_iter().map(|n| Ok((n.clone(), file.read(&n)?))).collect::<anyhow::Result<Vec<_>>>()?;
    drop(file);
    edit(&mut tensors);
    save(&path, &tensors, None)?;
    Ok(())
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<()> {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

#[test]
fn truncated_safetensors() -> anyhow::Result<()> {
    let tmp = scratch_copy("llama")?;
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    let err = expect_error(tmp.path(), &["model.safetensors", "corrupt"])?;
    assert!(matches!(err, Error::Safetensors { .. }), "{err:?}");
    Ok(())
}

#[test]
fn corrupt_safetensors_header() -> anyhow::Result<()> {
    let tmp = scratch_copy("llama")?;
    let path = tmp.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path)?;
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&path, &bytes)?;
    expect_error(tmp.path(), &["model.safetensors", "corrupt"])?;
    std::fs::write(&path, b"tiny")?;
    expect_error(tmp.path(), &["model.safetensors", "corrupt"])?;
    Ok(())
}

#[test]
fn tensor_with_wrong_shape() -> anyhow::Result<()> {
    let tmp = scratch_copy("llama")?;
    let name = "model.layers.1.self_attn.q_proj.weight";
    rewrite_weights(tmp.path(), |ts| {
        for (n, t) in ts.iter_mut() {
            if n == name {
                *t = t.narrow(0, 0, 60);
            }
        }
    })?;
    let err = expect_error(tmp.path(), &[name, "[60, 64]", "[64, 64]", "model.safetensors"])?;
    assert!(matches!(err, Error::TensorShape { .. }));
    Ok(())
}

#[test]
fn missing_tensor() -> anyhow::Result<()> {
    let tmp = scratch_copy("llama")?;
    rewrite_weights(tmp.path(), |ts| ts.retain(|(n, _)| n != "model.norm.weight"))?;
    let err = expect_error(tmp.path(), &["missing tensor", "model.norm.weight"])?;
    assert!(matches!(err, Error::MissingTensor { .. }));
    Ok(())
}

#[test]
fn unexpected_tensor() -> anyhow::Result<()> {
    let tmp = scratch_copy("llama")?;
    rewrite_weights(tmp.path(), |ts| {
        ts.push(("model.layers.0.mlp.extra.weight".into(), Tensor::zeros([2], tch::kind::FLOAT_CPU)))
    })?;
    let err = expect_error(tmp.path(), &["unexpected", "model.layers.0.mlp.extra.weight", "model.safetensors"])?;
    assert!(matches!(err, Error::UnexpectedTensors { .. }));
    Ok(())
}

#[test]
fn missing_shard() -> anyhow::Result<()> {
    let tmp = scratch_copy("llama-sharded")?;
    std::fs::remove_file(tmp.path().join("model-00003-of-00012.safetensors"))?;
    expect_error(tmp.path(), &["model-00003-of-00012.safetensors"])?;
    Ok(())
}

#[test]
fn unknown_model_type_and_unsupported_features() -> anyhow::Result<()> {
    let cases: [(&str, serde_json::Value, &[&str]); 4] = [
        ("model_type", serde_json::json!("gpt_neox"), &["config.json", "model_type `gpt_neox`"]),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            &["config.json", "rope_scaling.rope_type: yarn"],
        ),
        ("quantization_config", serde_json::json!({"quant_method": "gptq"}), &["config.json", "quantization_config"]),
        ("hidden_act", serde_json::json!("gelu"), &["config.json", "hidden_act `gelu`"]),
    ];
    for (key, value, needles) in cases {
        let tmp = scratch_copy("llama")?;
        edit_json(&tmp.path().join("config.json"), |v| v[key] = value)?;
        let err = expect_error(tmp.path(), needles)?;
        assert!(matches!(err, Error::Unsupported { .. }), "{key}: {err:?}");
    }
    let tmp = scratch_copy("llama")?;
    edit_json(&tmp.path().join("config.json"), |v| v["num_key_value_heads"] = 3.into())?;
    expect_error(tmp.path(), &["config.json", "num_key_value_heads"])?;
    let tmp = scratch_copy("llama")?;
    std::fs::write(tmp.path().join("config.json"), "{\"model_type\": \"llama\",")?;
    expect_error(tmp.path(), &["config.json", "invalid JSON"])?;
    Ok(())
}

#[test]
fn missing_or_broken_tokenizer() -> anyhow::Result<()> {
    let tmp = scratch_copy("qwen2")?;
    std::fs::remove_file(tmp.path().join("tokenizer.json"))?;
    let err = expect_error(tmp.path(), &["tokenizer.json", "not found"])?;
    assert!(matches!(err, Error::Tokenizer { .. }));
    std::fs::write(tmp.path().join("tokenizer.json"), "{\"version\": \"1.0\", \"model\": 17}")?;
    expect_error(tmp.path(), &["tokenizer.json"])?;
    Ok(())
}

#[test]
fn prompt_longer_than_context() -> anyhow::Result<()> {
    let m = load(&model_dir("llama"))?;
    let context = m.model.config.context_length();
    let req = GenerateRequest {
        prompt_ids: vec![5; context - 4],
        max_new_tokens: 10,
        decoding: Decoding::Greedy,
        eos_ids: vec![],
    };
    let err = generate_ar(&m.model, &req, &mut ()).expect_err("too long");
    assert!(matches!(err, Error::ContextLength { needed, .. } if needed == context + 6), "{err:?}");
    assert!(err.to_string().contains(&context.to_string()));
    let bad_id = GenerateRequest { prompt_ids: vec![1, 100_000], ..req };
    let err = generate_ar(&m.model, &bad_id, &mut ()).expect_err("bad id");
    assert!(err.to_string().contains("100000"), "{err}");
    Ok(())
}

/// The probe reads a continuation as the text does: its tokens are those that follow the
/// prompt's in the tokens of the two joined (a continuation without a leading space is the
/// end of the prompt's last word, not a new word); one token is too few to probe.
#[test]
fn probe_continuations_are_tokenized_as_they_follow_the_prompt() -> anyhow::Result<()> {
    let loaded = load(&model_dir("llama"))?;
    let tok = &loaded.tokenizer;
    let (prompt, continuation) = ("def add(a, b):", "\n    return a + b");
    let (p, c) = mtp_core::mtp::probe::encode(tok, prompt, continuation)?;
    let joint = tok.encode(&format!("{prompt}{continuation}"))?;
    assert_eq!([p.as_slice(), c.as_slice()].concat(), joint);
    assert_eq!(p, tok.encode(prompt)?);
    let (_, none) = mtp_core::mtp::probe::encode(tok, prompt, "")?;
    assert!(none.is_empty());
    let adapter = mtp_core::mtp::MtpAdapter::new(&loaded.model, mtp_core::mtp::MtpConfig::default(), "llama")?;
    let err = mtp_core::mtp::probe::probe(&loaded.model, &adapter, &p, &c[..1]).expect_err("one token");
    assert!(err.to_string().contains("at least 2 tokens"), "{err}");
    Ok(())
}
