//! Self-distillation: the batched greedy continuations equal AR's, token for token, for
//! every prompt (a partial last batch and prompts of different lengths in one batch
//! included), a continuation ends at its first EOS, and rows that end leave their batch.

mod common;

use mtp_core::decode::{Decoding, GenerateRequest, generate_ar};
use mtp_core::train::Control;
use mtp_core::train::distill::{DistillConfig, continue_greedy, distill_into};
use mtp_core::{LoadOptions, LoadedModel};
use rand::{Rng, SeedableRng, rngs::StdRng};

#[test]
fn batched_continuations_equal_ar_greedy() -> anyhow::Result<()> {
    let loaded = LoadedModel::from_folder(&common::model_dir("llama"), &LoadOptions::default())?;
    let model = &loaded.model;
    let vocab = model.config.vocab_size as i64;
    let mut rng = StdRng::seed_from_u64(7);
    let prompts: Vec<Vec<i64>> = (0..7).map(|_| (0..6).map(|_| rng.random_range(0..vocab)).collect()).collect();
    let ar_for = |prompt: &Vec<i64>, max_new_tokens: usize| -> anyhow::Result<Vec<i64>> {
        let req =
            GenerateRequest { prompt_ids: prompt.clone(), max_new_tokens, decoding: Decoding::Greedy, eos_ids: vec![] };
        Ok(generate_ar(model, &req, &mut ())?.token_ids)
    };
    let ar = |prompt: &Vec<i64>| ar_for(prompt, 12);
    let mut calls = Vec::new();
    let got = continue_greedy(model, &prompts, 12, 3, &[], &Control::new(), &mut |d, n| calls.push((d, n)))?;
    assert_eq!(calls, [(3, 7), (6, 7), (7, 7)]);
    for (prompt, d) in prompts.iter().zip(&got) {
        assert_eq!(&d.prompt_ids, prompt);
        assert_eq!(d.completion_ids, ar(prompt)?, "prompt {prompt:?}");
    }
    // With the token AR wrote fifth as the end of text, the first continuation stops there.
    let first = ar(&prompts[0])?;
    let eos = first[4];
    let cut = continue_greedy(model, &prompts[..1], 12, 3, &[eos], &Control::new(), &mut |_, _| {})?;
    let end = first.iter().position(|&t| t == eos).expect("eos is in the output") + 1;
    assert_eq!(cut[0].completion_ids, first[..end]);
    // Cancelled before the first batch: nothing.
    let control = Control::new();
    control.cancel();
    assert!(continue_greedy(model, &prompts, 12, 3, &[], &control, &mut |_, _| {})?.is_empty());
    // Prompts of different lengths share a batch, padded on the left: each continuation is
    // still AR's.
    let mixed: Vec<Vec<i64>> = (1..=8).map(|n| (0..n).map(|_| rng.random_range(0..vocab)).collect()).collect();
    let got = continue_greedy(model, &mixed, 12, 3, &[], &Control::new(), &mut |_, _| {})?;
    for (prompt, d) in mixed.iter().zip(&got) {
        assert_eq!(d.completion_ids, ar(prompt)?, "padded batch, prompt of {} tokens", prompt.len());
    }
    // Rows that end leave the batch (every 8 tokens) while the others go on: with two
    // tokens AR writes early in some rows as the end of text, 24 tokens in batches of 4,
    // padded and not, each continuation is still AR's, cut after its first end.
    let long = |prompt: &Vec<i64>| ar_for(prompt, 24);
    let ends = [long(&prompts[0])?[2], long(&mixed[1])?[9]];
    let mut compacted = 0;
    for set in [&prompts, &mixed] {
        let got = continue_greedy(model, set, 24, 4, &ends, &Control::new(), &mut |_, _| {})?;
        for (prompt, d) in set.iter().zip(&got) {
            let mut want = long(prompt)?;
            if let Some(end) = want.iter().position(|t| ends.contains(t)) {
                want.truncate(end + 1);
                compacted += usize::from(end < 16);
            }
            assert_eq!(d.completion_ids, want, "prompt {prompt:?}");
        }
    }
    assert!(compacted >= 2, "rows ended before the last look: {compacted}");
    // An empty prompt is refused.
    assert!(continue_greedy(model, &[vec![], vec![1, 2]], 4, 2, &[], &Control::new(), &mut |_, _| {}).is_err());
    Ok(())
}

/// A distillation that stops (or is killed mid-line) keeps its finished batches in
/// OUT.partial; the same command then decodes only the rest and writes what one
/// uninterrupted run writes. Answers of another token cap are refused, naming the file.
#[test]
fn an_interrupted_distillation_continues_where_it_stopped() -> anyhow::Result<()> {
    let loaded = LoadedModel::from_folder(&common::model_dir("llama"), &LoadOptions::default())?;
    let source = "builtin:arith:60".parse()?;
    let config =
        DistillConfig { sequences: 7, prompt_tokens: 6, new_tokens: 8, batch_size: 2, ..DistillConfig::default() };
    let tmp = tempfile::tempdir()?;
    let whole =
        distill_into(&loaded, &source, &config, &tmp.path().join("whole.jsonl"), &Control::new(), &mut |_, _| {})?;
    assert!(whole.complete && whole.reused == 0 && whole.examples.len() == 7);

    let out = tmp.path().join("d.jsonl");
    let control = Control::new();
    let stopper = control.clone();
    let first = distill_into(&loaded, &source, &config, &out, &control, &mut |done, _| {
        if done >= 2 {
            stopper.cancel();
        }
    })?;
    assert!(!first.complete && first.examples.len() == 2 && !out.exists());
    let partial = first.partial.clone();
    assert_eq!(partial, tmp.path().join("d.jsonl.partial"));
    // Killed while writing the next line.
    std::fs::OpenOptions::new().append(true).open(&partial).and_then(|mut f| {
        use std::io::Write;
        f.write_all(b"{\"prompt_ids\":[1,2")
    })?;
    let mut seen = Vec::new();
    let rest = distill_into(&loaded, &source, &config, &out, &Control::new(), &mut |d, n| seen.push((d, n)))?;
    assert!(rest.complete && rest.reused == 2 && !partial.exists());
    assert_eq!(seen.first(), Some(&(2, 7)), "starts from what was kept");
    assert_eq!(rest.examples, whole.examples);
    assert_eq!(std::fs::read_to_string(&out)?, std::fs::read_to_string(tmp.path().join("whole.jsonl"))?);

    // Another run's answers are not mixed in.
    let control = Control::new();
    let stopper = control.clone();
    let other = tmp.path().join("o.jsonl");
    distill_into(&loaded, &source, &config, &other, &control, &mut |done, _| {
        if done >= 2 {
            stopper.cancel();
        }
    })?;
    let longer = DistillConfig { new_tokens: 9, ..config };
    let err = distill_into(&loaded, &source, &longer, &other, &Control::new(), &mut |_, _| {})
        .expect_err("a partial file of another token cap")
        .to_string();
    assert!(err.contains("o.jsonl.partial") && err.contains("8 new tokens"), "{err}");
    Ok(())
}
