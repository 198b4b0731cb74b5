//! Our models against transformers: logits, greedy generation, tokenization, chat
//! templates and parameter counts, for every fixture family (see scripts/reference.py).

mod common;

use common::*;
use mtp_core::decode::{Decoding, GenerateRequest, generate_ar};
use mtp_core::inspect::ModelInfo;
use mtp_core::{DType, LoadOptions, LoadedModel, ModelSource};
use tch::{Device, Kind, Tensor};

/// Logits agree with transformers within this (f32, both sides).
const LOGITS_TOL: f64 = 1e-4;

fn load(family: &str) -> anyhow::Result<LoadedModel> {
    let options = LoadOptions { dtype: DType::F32, ..LoadOptions::default() };
    Ok(LoadedModel::load(&ModelSource::Local { path: model_dir(family) }, &options, &mut ())?)
}

/// A folder's weights are loaded into one buffer on huge pages (model/huge_pages.rs): the
/// same logits, bit for bit, as the weights where loading first put them.
#[test]
fn weights_in_one_buffer_give_the_same_logits() -> anyhow::Result<()> {
    use mtp_core::model::{ModelConfig, ProjGroup};
    let _g = tch::no_grad_guard();
    for family in FAMILIES {
        let dir = model_dir(family);
        let packed = mtp_core::Llama::from_folder(&dir, DType::F32, Device::Cpu)?;
        let checkpoint = mtp_core::checkpoint::Checkpoint::open(&dir)?;
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let plain = mtp_core::Llama::from_checkpoint(config, &checkpoint, DType::F32, Device::Cpu)?;
        let ids = Tensor::from_slice(&[1i64, 5, 9, 2, 7, 3]).unsqueeze(0);
        assert!(packed.forward(&ids, None).equal(&plain.forward(&ids, None)), "{family}");
        // The embedding first, then (untied) the head and every layer's projections, each
        // on a 64-byte boundary: one span of their bytes and that padding.
        let tied = packed.config.tie_word_embeddings;
        assert_eq!(packed.lm_head.data_ptr() == packed.embed_tokens.data_ptr(), tied, "{family}");
        let mut weights = vec![packed.embed_tokens.shallow_clone()];
        if !tied {
            weights.push(packed.lm_head.shallow_clone());
        }
        weights.extend(
            (0..packed.layers().len())
                .flat_map(|l| ProjGroup::ALL.map(move |g| (l, g)))
                .filter_map(|(l, g)| packed.group_weight(l, g).map(|(w, _)| w)),
        );
        let start = packed.embed_tokens.data_ptr() as usize;
        let bytes: usize = weights.iter().map(|w| w.numel() * 4).sum();
        let end = weights.iter().map(|w| w.data_ptr() as usize + w.numel() * 4).max().unwrap_or(start);
        assert!(weights.iter().all(|w| w.data_ptr() as usize >= start), "{family}");
        assert!(end - start <= bytes + 64 * weights.len(), "{family}: {} bytes span {}", bytes, end - start);
    }
    Ok(())
}

#[test]
fn logits_match_transformers() -> anyhow::Result<()> {
    for family in FAMILIES {
        let m = load(family)?;
        let r = reference(family)?;
        let ids = Tensor::from_slice(&r.logits_input_ids).unsqueeze(0);
        let ours = tch::no_grad(|| m.model.forward(&ids, None)).squeeze_dim(0);
        let theirs = reference_logits(family)?;
        assert_eq!(ours.size(), theirs.size(), "{family}");
        let diff = max_abs_diff(&ours, &theirs);
        println!("{family}: max |logit diff| = {diff:.2e}");
        assert!(diff < LOGITS_TOL, "{family}: logits differ by {diff}");
        assert_eq!(m.model.config.family.model_type(), r.model_type);
    }
    Ok(())
}

#[test]
fn greedy_generation_matches_transformers() -> anyhow::Result<()> {
    for family in FAMILIES {
        let m = load(family)?;
        let r = reference(family)?;
        for (prompt_ids, expected) in [
            (r.greedy.prompt_ids.clone(), &r.greedy.token_ids),
            (m.tokenizer.encode(&r.text.prompt)?, &r.text.token_ids),
        ] {
            let req = GenerateRequest {
                prompt_ids,
                max_new_tokens: expected.len(),
                decoding: Decoding::Greedy,
                eos_ids: m.tokenizer.eos_ids.clone(),
            };
            let out = generate_ar(&m.model, &req, &mut ())?;
            assert_eq!(&out.token_ids, expected, "{family}: prompt {:?}", req.prompt_ids);
            assert_eq!(out.forwards, out.token_ids.len());
        }
    }
    Ok(())
}

#[test]
fn tokenizer_and_chat_template_match_transformers() -> anyhow::Result<()> {
    for family in FAMILIES {
        let m = load(family)?;
        let r = reference(family)?;
        assert_eq!(m.tokenizer.encode(&r.text.prompt)?, r.text.prompt_ids, "{family}: encoding");
        assert_eq!(m.tokenizer.decode(&r.text.token_ids, false)?, r.text.decoded, "{family}: decoding");
        let rendered = m.tokenizer.apply_chat_template(&r.chat.messages, true)?;
        assert_eq!(rendered, r.chat.rendered, "{family}: chat template");
        // Streaming decode gives the same text as decoding at once.
        let mut stream = m.tokenizer.stream(false);
        let mut streamed: String = r.text.token_ids.iter().map(|&id| stream.push(id)).collect();
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, r.text.decoded, "{family}: streamed text");
    }
    Ok(())
}

#[test]
fn inspect_counts_parameters_exactly() -> anyhow::Result<()> {
    for family in FAMILIES {
        let info = ModelInfo::from_folder(&model_dir(family))?;
        let r = reference(family)?;
        assert_eq!(info.num_parameters, r.num_parameters, "{family}");
        assert_eq!(info.vocab_size, r.vocab_size, "{family}");
    }
    let stored = |f| ModelInfo::from_folder(&model_dir(f)).map(|i| i.stored_dtype);
    assert_eq!(stored("llama")?, DType::F32);
    assert_eq!(stored("llama3-tied")?, DType::Bf16);
    assert_eq!(stored("mistral")?, DType::F16);
    Ok(())
}

/// Prefill then token by token, and prefill then chunks, against one full forward.
#[test]
fn kv_cache_matches_full_forward() -> anyhow::Result<()> {
    for family in FAMILIES {
        let m = load(family)?;
        let ids = Tensor::from_slice(&reference(family)?.logits_input_ids).unsqueeze(0);
        let t = ids.size()[1];
        let full = tch::no_grad(|| m.model.forward(&ids, None));
        for chunk in [1, 3, 5] {
            let mut cache = m.model.new_cache(4); // small: exercises growth
            let mut parts = vec![tch::no_grad(|| m.model.forward(&ids.narrow(1, 0, 8), Some(&mut cache)))];
            let mut start = 8;
            while start < t {
                let n = chunk.min(t - start);
                parts.push(tch::no_grad(|| m.model.forward(&ids.narrow(1, start, n), Some(&mut cache))));
                start += n;
            }
            let incremental = Tensor::cat(&parts, 1);
            let diff = max_abs_diff(&incremental, &full);
            assert!(diff < 1e-5, "{family}, chunks of {chunk}: {diff}");
            assert_eq!(cache.len() as i64, t);
        }
    }
    Ok(())
}

/// Running in bf16 or f16 stays close to f32 (a smoke test of the reduced-precision path;
/// exactness is only claimed in f32).
#[test]
fn half_precision_runs_close_to_f32() -> anyhow::Result<()> {
    let dir = model_dir("llama");
    let ids = Tensor::from_slice(&reference("llama")?.logits_input_ids).unsqueeze(0);
    let f32 = mtp_core::Llama::from_folder(&dir, DType::F32, Device::Cpu)?;
    let reference = tch::no_grad(|| f32.forward(&ids, None));
    for dtype in [DType::Bf16, DType::F16] {
        let m = mtp_core::Llama::from_folder(&dir, dtype, Device::Cpu)?;
        let logits = tch::no_grad(|| m.forward(&ids, None));
        assert_eq!(logits.kind(), dtype.kind());
        let diff = max_abs_diff(&logits.to_kind(Kind::Float), &reference);
        let scale = reference.abs().max().double_value(&[]);
        assert!(diff < 0.05 * scale, "{dtype}: {diff} vs scale {scale}");
    }
    Ok(())
}
