//! The UNO recipe, against `scripts/reference.py uno-check` (PEFT and a PyTorch UNO draft
//! step written from SGLang's and vLLM's description): for every family, an adapter of the
//! recipe drafts exactly what UNO's draft pass drafts from the same prompt and random ids; its
//! PEFT export holds the keys PEFT loaded with nothing missing or unexpected; an adapter of
//! the paper's recipe is refused; greedy decoding with it equals AR, and its random ids are
//! reproducible.

mod common;

use std::collections::BTreeMap;

use common::*;
use mtp_core::checkpoint::SafetensorsFile;
use mtp_core::decode::{
    Decoding, DraftArithmetic, DraftOptions, Drafter, GenerateRequest, Layout, LoraForm, MaskCount, Mode,
    SamplingParams, SpecDecoder, Speculative, Strategy, generate,
};
use mtp_core::mtp::export::{PEFT_CONFIG, PEFT_WEIGHTS, export_peft, peft_key};
use mtp_core::mtp::{MtpAdapter, MtpConfig, Recipe};
use mtp_core::{LoadOptions, LoadedModel, ModelSource};
use serde::Deserialize;

const UNO_FAMILIES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

#[derive(Debug, Deserialize)]
struct PeftRecord {
    keys: Vec<String>,
    missing: Vec<String>,
    unexpected: Vec<String>,
    config: serde_json::Value,
}

/// What `reference.py uno-check` recorded for one family.
#[derive(Debug, Deserialize)]
struct UnoRecord {
    masks: usize,
    prompt_ids: Vec<i64>,
    first: i64,
    noise_ids: Vec<i64>,
    drafts: Vec<i64>,
    base_drafts: Vec<i64>,
    peft: PeftRecord,
    checks: BTreeMap<String, bool>,
}

fn record(family: &str) -> anyhow::Result<UnoRecord> {
    let path = fixtures().join("reference").join(format!("uno-{family}.json"));
    Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
}

fn adapter_path(family: &str) -> std::path::PathBuf {
    fixtures().join("reference").join(format!("uno-{family}.safetensors"))
}

fn load(family: &str) -> anyhow::Result<(LoadedModel, MtpAdapter)> {
    let m = LoadedModel::load(&ModelSource::Local { path: model_dir(family) }, &LoadOptions::default(), &mut ())?;
    let a = MtpAdapter::load(&adapter_path(family), &m.model)?;
    Ok((m, a))
}

fn greedy(prompt_ids: Vec<i64>, max_new_tokens: usize) -> GenerateRequest {
    GenerateRequest { prompt_ids, max_new_tokens, decoding: Decoding::Greedy, eos_ids: vec![] }
}

#[test]
fn drafts_equal_the_reference_uno_draft_step() -> anyhow::Result<()> {
    for family in UNO_FAMILIES {
        let r = record(family)?;
        assert!(r.checks.values().all(|ok| *ok), "{family}: the reference recorded a failed check: {:?}", r.checks);
        // The LoRA decides the drafts: without it they differ.
        assert_ne!(r.drafts, r.base_drafts, "{family}");
        let (m, a) = load(family)?;
        assert_eq!((a.config.recipe, a.config.sampler, a.config.k), (Recipe::Uno, false, r.masks), "{family}");
        for form in [LoraForm::Merged, LoraForm::LowRank] {
            // Exact mask rows and chain: int8 ones (`auto` where the CPU has VNNI) may draft
            // otherwise in this random model's near-ties.
            let options = DraftOptions { lora: form, arithmetic: DraftArithmetic::Exact, ..DraftOptions::default() };
            let drafter = Drafter::new(&m.model, &a, options)?;
            let strategy = Strategy::new(Mode::Linear, Some(&drafter), MaskCount::Fixed(r.masks))?;
            let out = generate(&m.model, strategy, &greedy(r.prompt_ids.clone(), 12), &mut ())?;
            let what = format!("{family}, {form}");
            // The prefill: the prompt, its last token the seed, then the mask rows reading the
            // random ids; the first step verifies the drafts they made.
            assert_eq!(out.prefill_noise_ids, r.noise_ids, "{what}");
            assert_eq!(out.token_ids[0], r.first, "{what}");
            assert_eq!(out.steps[0].drafts, r.drafts, "{what}");
        }
    }
    Ok(())
}

#[test]
fn peft_export_holds_what_peft_loaded() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    for family in UNO_FAMILIES {
        let r = record(family)?;
        assert!(r.peft.missing.is_empty() && r.peft.unexpected.is_empty(), "{family}: {:?}", r.peft);
        let out = tmp.path().join(family);
        let done = export_peft(&adapter_path(family), &out)?;
        let written = SafetensorsFile::open(&out.join(PEFT_WEIGHTS))?;
        let mut keys = written.names();
        keys.sort();
        assert_eq!(keys, r.peft.keys, "{family}");
        assert_eq!(done.tensors, keys.len());
        // The factors are ours, renamed.
        let ours = SafetensorsFile::open(&adapter_path(family))?;
        let mut renamed = 0;
        for name in ours.names() {
            if let Some(key) = peft_key(&name) {
                assert!(ours.read(&name)?.equal(&written.read(&key)?), "{family}: {name} -> {key}");
                renamed += 1;
            }
        }
        assert_eq!(renamed, keys.len(), "{family}");
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join(PEFT_CONFIG))?)?;
        for field in ["r", "lora_alpha", "target_modules", "peft_type", "task_type"] {
            assert_eq!(config[field], r.peft.config[field], "{family}: {field}");
        }
        assert_eq!(config["base_model_name_or_path"], r.peft.config["base_model_name_or_path"], "{family}");
    }

    // The paper's recipe cannot be served by UNO: refused, saying what to train instead.
    let m = LoadedModel::load(&ModelSource::Local { path: model_dir("llama") }, &LoadOptions::default(), &mut ())?;
    let paper = MtpAdapter::new(&m.model, MtpConfig { k: 2, ..MtpConfig::default() }, "llama")?;
    let file = tmp.path().join("paper.safetensors");
    paper.save(&file)?;
    let out = tmp.path().join("paper-peft");
    let err = export_peft(&file, &out).expect_err("a paper adapter exported").to_string();
    for what in ["paper.safetensors", "mask embeddings", "sampler head", "--recipe uno"] {
        assert!(err.contains(what), "`{what}` missing from: {err}");
    }
    assert!(!out.exists(), "a refused export wrote {}", out.display());
    Ok(())
}

#[test]
fn greedy_equals_ar_and_random_ids_are_reproducible() -> anyhow::Result<()> {
    let (m, a) = load("llama")?;
    let vocab = m.model.config.vocab_size as i64;
    let drafter = Drafter::new(&m.model, &a, DraftOptions::default())?;
    let prompts: Vec<Vec<i64>> =
        (0..12).map(|i| (0..3 + i % 5).map(|j| ((i * 37 + j * 11) % (vocab as usize)) as i64).collect()).collect();
    for mode in [Mode::Linear, Mode::Quadratic] {
        for masks in [1, 2, 3].map(MaskCount::Fixed).into_iter().chain([MaskCount::Auto]) {
            let strategy = Strategy::new(mode, Some(&drafter), masks)?;
            for prompt in &prompts {
                let req = greedy(prompt.clone(), 20);
                let ar = generate(&m.model, Strategy::Ar, &req, &mut ())?;
                let spec = generate(&m.model, strategy, &req, &mut ())?;
                assert_eq!(spec.token_ids, ar.token_ids, "{mode}, {masks} masks, prompt {prompt:?}");
                for s in &spec.steps {
                    // Every block with a fixed count; `auto` may leave some out.
                    let blocks = if mode == Mode::Quadratic { s.drafts.len() + 1 } else { 1 };
                    assert!(s.blocks == blocks || (masks == MaskCount::Auto && s.blocks < blocks), "{s:?}");
                    assert_eq!(s.noise_ids.len(), s.blocks * s.masks, "{mode} {masks}: {s:?}");
                    assert!(s.noise_ids.iter().all(|&id| (0..vocab).contains(&id)), "{s:?}");
                }
                // The same request draws the same ids (with a fixed mask count: the automatic
                // one follows measured step times).
                if masks == MaskCount::Auto {
                    continue;
                }
                let again = generate(&m.model, strategy, &req, &mut ())?;
                let key = |o: &mtp_core::decode::GenerateOutput| {
                    o.steps.iter().map(|s| (s.drafts.clone(), s.accepted, s.noise_ids.clone())).collect::<Vec<_>>()
                };
                assert_eq!(key(&again), key(&spec));
            }
        }
    }

    // Sampling: a seed fixes the random ids and the tokens; another seed draws others.
    let strategy = Strategy::new(Mode::Quadratic, Some(&drafter), MaskCount::Fixed(3))?;
    let sample = |seed| {
        let params = SamplingParams { temperature: 0.8, top_k: None, top_p: None, seed };
        let req = GenerateRequest { decoding: Decoding::Sample(params), ..greedy(prompts[0].clone(), 24) };
        generate(&m.model, strategy, &req, &mut ())
    };
    let (a1, a2, b) = (sample(3)?, sample(3)?, sample(4)?);
    let ids = |o: &mtp_core::decode::GenerateOutput| o.steps.iter().map(|s| s.noise_ids.clone()).collect::<Vec<_>>();
    assert_eq!((&a1.token_ids, ids(&a1)), (&a2.token_ids, ids(&a2)));
    assert_ne!(ids(&a1), ids(&b));
    Ok(())
}

/// The fixed-shape steps that CUDA graphs record (run eagerly here: `StepGraphs::Eager`)
/// read the recipe's random ids as one more input: every step drafts, accepts and draws the
/// ids the ordinary step does, and the output is AR's.
#[test]
fn fixed_shape_steps_draft_as_ordinary_steps() -> anyhow::Result<()> {
    let (m, a) = load("llama")?;
    let mut fixed =
        LoadedModel::load(&ModelSource::Local { path: model_dir("llama") }, &LoadOptions::default(), &mut ())?;
    fixed.model.set_step_graphs(mtp_core::model::StepGraphs::Eager);
    let vocab = m.model.config.vocab_size as i64;
    // Exact arithmetic: the ordinary steps' chain runs on host vectors, with its head in
    // int8 by default where the CPU has VNNI, the fixed-shape steps' as tensor operations
    // in f32, so that their drafts could part in near-ties.
    let exact = DraftOptions { arithmetic: DraftArithmetic::Exact, ..DraftOptions::default() };
    let (plain, graphed) = (Drafter::new(&m.model, &a, exact)?, Drafter::new(&fixed.model, &a, exact)?);
    let key = |o: &mtp_core::decode::GenerateOutput| {
        o.steps.iter().map(|s| (s.drafts.clone(), s.accepted, s.noise_ids.clone())).collect::<Vec<_>>()
    };
    let mut steps = 0;
    for mode in [Mode::Linear, Mode::Quadratic] {
        for masks in [1, 3].map(MaskCount::Fixed) {
            for i in 0..6usize {
                let prompt: Vec<i64> = (0..3 + i % 4).map(|j| ((i * 53 + j * 7) % vocab as usize) as i64).collect();
                let req = greedy(prompt.clone(), 24);
                let ar = generate(&m.model, Strategy::Ar, &req, &mut ())?;
                let want = generate(&m.model, Strategy::new(mode, Some(&plain), masks)?, &req, &mut ())?;
                let got = generate(&fixed.model, Strategy::new(mode, Some(&graphed), masks)?, &req, &mut ())?;
                assert_eq!(got.token_ids, ar.token_ids, "{mode}, {masks} masks, prompt {prompt:?}");
                assert_eq!(key(&got), key(&want), "{mode}, {masks} masks, prompt {prompt:?}");
                steps += got.steps.len();
            }
        }
    }
    assert!(steps > 50, "only {steps} steps");
    // Those steps ran the fixed-shape pass, random ids included: counted on a new drafter's
    // decoders. In the first generation the first step (3 drafts, from the prefill's block)
    // runs the ordinary pass and the shape is recorded at its second step; the drafter keeps
    // the cache and the recordings, so the next generation runs every step recorded.
    let fresh = Drafter::new(&fixed.model, &a, DraftOptions::default())?;
    for want in [7, 8] {
        let spec = Speculative { drafter: &fresh, layout: Layout::Quadratic, masks: MaskCount::Fixed(3) };
        let (mut decoder, _) = SpecDecoder::start(&fixed.model, spec, &greedy(vec![1, 2, 3], 24))?;
        let mut ids = 0;
        for _ in 0..8 {
            ids += decoder.step(false)?.stats.noise_ids.len();
        }
        assert_eq!(decoder.prefill_noise_ids().len(), 3, "the prefill's block");
        assert_eq!(ids, 8 * 4 * 3, "a mask block after each regular row");
        assert_eq!(decoder.fixed_shape_steps(), want);
    }
    Ok(())
}
