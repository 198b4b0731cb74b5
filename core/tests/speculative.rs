//! Speculative decoding against AR on a small model trained here (pretrained on structured
//! text, then an MTP adapter): greedy outputs identical token for token over many prompts,
//! mask counts and both modes, EOS inside a step included; sampled outputs distributed as
//! AR sampling (chi-square); step statistics within their bounds.

use std::sync::OnceLock;

use mtp_core::decode::{
    Decoding, DraftArithmetic, DraftOptions, Drafter, GenerateRequest, LoraForm, MaskCount, Mode, SamplingParams,
    StopReason, Strategy, generate,
};
use mtp_core::mtp::{LoraConfig, MtpAdapter, MtpConfig};
use mtp_core::train::pretrain::{ArchConfig, PretrainConfig, TokenizerPlan, pretrain};
use mtp_core::train::{Control, LoopConfig, OptimConfig, Schedule, TrainConfig};
use mtp_core::{DeviceSpec, LoadOptions, LoadedModel, ModelSource};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tch::{Kind, Tensor};

/// A pretrained tiny model and an adapter with k = 8, prepared for decoding four times:
/// with the whole vocabulary in the merged form, the same in the low-rank form (mask rows
/// exact, and mask rows in bf16 in every step where the CPU has it), and with a draft
/// vocabulary of the 64 tokens the model writes most often.
struct Trained {
    loaded: LoadedModel,
    adapter: MtpAdapter,
    drafter: Drafter,
    low_rank: Drafter,
    bf16: Drafter,
    small_vocab: Drafter,
}

impl Trained {
    fn strategy(&self, mode: Mode, masks: MaskCount) -> anyhow::Result<Strategy<'_>> {
        Ok(Strategy::new(mode, Some(&self.drafter), masks)?)
    }
}

/// Train once per test binary (tensors cannot be shared between test threads, so the
/// files are, and each test loads them).
fn files() -> &'static (std::path::PathBuf, std::path::PathBuf) {
    static FILES: OnceLock<(std::path::PathBuf, std::path::PathBuf)> = OnceLock::new();
    FILES.get_or_init(|| make().expect("training the test model"))
}

fn trained() -> Trained {
    let (model_dir, adapter) = files();
    let loaded = LoadedModel::from_folder(model_dir, &LoadOptions::default()).expect("load the test model");
    let mut adapter = MtpAdapter::load(adapter, &loaded.model).expect("load the test adapter");
    let merged = DraftOptions { lora: LoraForm::Merged, ..DraftOptions::default() };
    let drafter = Drafter::new(&loaded.model, &adapter, merged).expect("drafter");
    // `auto`: merged for a model this small (layers far below 1 MiB).
    let auto = Drafter::new(&loaded.model, &adapter, DraftOptions::default()).expect("drafter").form();
    assert_eq!(auto, LoraForm::Merged);
    let kernel = mtp_core::model::linear::few_row_kernel_runs(loaded.model.device(), loaded.model.dtype().kind());
    let low_rank = |arithmetic| {
        let options = DraftOptions { lora: LoraForm::LowRank, arithmetic, ..DraftOptions::default() };
        Drafter::new(&loaded.model, &adapter, options).expect("drafter")
    };
    let (low_rank, bf16) = (low_rank(DraftArithmetic::Exact), low_rank(DraftArithmetic::Bf16));
    let bf16_runs = mtp_core::model::few_rows::bf16_available() && kernel;
    assert_eq!(bf16.bf16_min_rows(), bf16_runs.then_some(1));
    assert_eq!(low_rank.bf16_min_rows(), None);
    adapter.draft_vocab = Some(frequent_tokens(&loaded, 64));
    let small_vocab = Drafter::new(&loaded.model, &adapter, DraftOptions::default()).expect("drafter");
    adapter.draft_vocab = None;
    Trained { loaded, adapter, drafter, low_rank, bf16, small_vocab }
}

/// The `n` tokens the model emits most often after a few code prompts.
fn frequent_tokens(loaded: &LoadedModel, n: usize) -> Vec<i64> {
    let mut counts = std::collections::HashMap::new();
    for start in ["def ", "class ", "for x in ", "    return "] {
        let req = request(loaded.tokenizer.encode(start).expect("encode"), 40, Decoding::Greedy, vec![]);
        for id in generate(&loaded.model, Strategy::Ar, &req, &mut ()).expect("AR").token_ids {
            *counts.entry(id).or_insert(0usize) += 1;
        }
    }
    let mut ids: Vec<(i64, usize)> = counts.into_iter().collect();
    ids.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut vocab: Vec<i64> = ids.into_iter().map(|(id, _)| id).take(n).collect();
    // Pad with low ids so the set has n members.
    let missing: Vec<i64> = (0..n as i64).filter(|i| !vocab.contains(i)).take(n - vocab.len()).collect();
    vocab.extend(missing);
    vocab
}

fn make() -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    // Kept for the life of the test process.
    let dir = Box::leak(Box::new(tempfile::tempdir()?));
    let model_dir = dir.path().join("model");
    let config = PretrainConfig {
        data: vec!["builtin:code:1500".parse()?],
        arch: ArchConfig::preset("tiny")?,
        tokenizer: TokenizerPlan::Train { vocab_size: 320 },
        training: LoopConfig {
            optim: OptimConfig { lr: 5e-3, warmup: 10, schedule: Schedule::Cosine, ..OptimConfig::default() },
            steps: 150,
            batch_size: 8,
            grad_accum: 1,
            seq_len: 64,
            val_fraction: 0.02,
            val_every: 0,
            checkpoint_every: 1000,
            seed: 5,
            device: DeviceSpec::Cpu,

            ..LoopConfig::default()
        },
    };
    pretrain(&config, &model_dir, false, &mut (), &Control::new())?;
    let loaded = LoadedModel::from_folder(&model_dir, &LoadOptions::default())?;
    let train = TrainConfig {
        model: ModelSource::Local { path: model_dir.clone() },
        data: "builtin:code:1500".parse()?,
        method: MtpConfig { k: 8, lora: LoraConfig { rank: 8, ..LoraConfig::default() }, ..MtpConfig::default() },
        training: LoopConfig {
            optim: OptimConfig { lr: 3e-3, warmup: 10, ..OptimConfig::default() },
            steps: 120,
            batch_size: 4,
            seq_len: 64,
            val_every: 0,
            checkpoint_every: 1000,
            ..LoopConfig::default()
        },
        ..TrainConfig::default()
    };
    let summary = mtp_core::train::train(&loaded, &train, &dir.path().join("run"), &mut (), &Control::new())?;
    Ok((model_dir, summary.adapter))
}

fn request(prompt_ids: Vec<i64>, max_new_tokens: usize, decoding: Decoding, eos_ids: Vec<i64>) -> GenerateRequest {
    GenerateRequest { prompt_ids, max_new_tokens, decoding, eos_ids }
}

fn random_prompts(t: &Trained, n: usize, seed: u64) -> anyhow::Result<Vec<Vec<i64>>> {
    let tok = &t.loaded.tokenizer;
    let mut rng = StdRng::seed_from_u64(seed);
    let starts = ["def ", "class ", "    return ", "for x in ", "    total", "words = ", "result", "def sum_"];
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                Ok(tok.encode(starts[rng.random_range(0..starts.len())])?)
            } else {
                let len = rng.random_range(2..12);
                Ok((0..len).map(|_| rng.random_range(0..tok.vocab_size() as i64)).collect())
            }
        })
        .collect()
}

#[test]
fn greedy_speculative_equals_greedy_ar() -> anyhow::Result<()> {
    let t = trained();
    let model = &t.loaded.model;
    let prompts = random_prompts(&t, 60, 1)?;
    let ar_outputs = prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            generate(model, Strategy::Ar, &request(prompt.clone(), 24 + i % 7, Decoding::Greedy, vec![]), &mut ())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut per_mode_tpf = Vec::new();
    let fixed = [1, 2, 4, 8].map(MaskCount::Fixed);
    assert_eq!((t.drafter.form(), t.low_rank.form()), (LoraForm::Merged, LoraForm::LowRank));
    // (mode, masks, drafter: 0 merged, 1 low-rank, 2 draft vocabulary, 3 mask rows in bf16)
    let settings = [Mode::Linear, Mode::Quadratic]
        .into_iter()
        .flat_map(|mode| fixed.iter().chain([&MaskCount::Auto]).flat_map(move |&m| [(mode, m, 0), (mode, m, 1)]))
        .chain([(Mode::Quadratic, MaskCount::Fixed(4), 2), (Mode::Linear, MaskCount::Auto, 2)])
        .chain([MaskCount::Fixed(2), MaskCount::Fixed(8), MaskCount::Auto].map(|m| (Mode::Quadratic, m, 3)))
        .chain([(Mode::Linear, MaskCount::Fixed(4), 3)]);
    for (mode, masks, which) in settings {
        let drafter = [&t.drafter, &t.low_rank, &t.small_vocab, &t.bf16][which];
        let small_vocab = which == 2;
        let strategy = Strategy::new(mode, Some(drafter), masks)?;
        let max = masks.max(8);
        {
            let (mut tokens, mut forwards) = (0, 0);
            for (i, (prompt, ar)) in prompts.iter().zip(&ar_outputs).enumerate() {
                let req = request(prompt.clone(), 24 + i % 7, Decoding::Greedy, vec![]);
                let spec = generate(model, strategy, &req, &mut ())?;
                let what = format!(
                    "{mode} with {masks} masks ({}, draft vocabulary: {small_vocab}, mask rows {}), prompt {prompt:?}",
                    drafter.form(),
                    drafter.arithmetic()
                );
                assert_eq!(spec.token_ids, ar.token_ids, "{what}");
                assert_eq!(spec.stop, StopReason::MaxTokens);
                for s in &spec.steps {
                    assert!(s.masks >= 1 && s.masks <= max, "{s:?}");
                    assert!(s.accepted <= max && s.emitted >= 1 && s.emitted <= max + 1, "{s:?}");
                    assert!(s.accepted <= s.drafts.len());
                    assert_eq!(s.first_rejected.is_some(), s.accepted < s.drafts.len());
                }
                assert_eq!(spec.forwards, spec.steps.len() + 1);
                tokens += spec.token_ids.len();
                forwards += spec.forwards;
            }
            per_mode_tpf.push((mode, masks, which, tokens as f64 / forwards as f64));
        }
    }
    println!("tokens per forward: {per_mode_tpf:?}");
    // Trained on structured code, drafts are accepted well above chance.
    let quad4 = per_mode_tpf
        .iter()
        .find(|x| x.0 == Mode::Quadratic && x.1 == MaskCount::Fixed(4) && x.2 == 0)
        .map_or(0.0, |x| x.3);
    assert!(quad4 > 1.2, "quadratic, 4 masks: {quad4} tokens per forward");
    Ok(())
}

/// Decoding drafts what training drafts: on the model's own greedy continuation, every
/// step's drafts (up to the first wrong one, after which the chain and the training pass
/// read different previous tokens) are those one training pass over the prompt and the
/// continuation makes at that block, the first step's included (the prefill's block after
/// the prompt, which training lays out too). The mask rows exact (in int8 or bf16 their
/// rounding flips more); near-ties between the two passes' arithmetic may flip a few.
#[test]
fn decoding_drafts_what_a_training_pass_drafts() -> anyhow::Result<()> {
    let t = trained();
    let model = &t.loaded.model;
    let (mut compared, mut differ) = (0usize, 0usize);
    for prompt in random_prompts(&t, 16, 3)? {
        let req = request(prompt.clone(), 24, Decoding::Greedy, vec![]);
        let ar = generate(model, Strategy::Ar, &req, &mut ())?;
        let ids: Vec<i64> = prompt.iter().chain(&ar.token_ids).copied().collect();
        let last = prompt.len() - 1;
        let trained_drafts = mtp_core::mtp::loss::training_drafts(model, &t.adapter, &ids, last)?;
        for masks in [1, 2, 4] {
            let strategy = Strategy::new(Mode::Quadratic, Some(&t.low_rank), MaskCount::Fixed(masks))?;
            let out = generate(model, strategy, &req, &mut ())?;
            assert_eq!(out.token_ids, ar.token_ids);
            assert_eq!(out.steps[0].drafts.len(), masks, "the first step verifies the prefill's drafts");
            // The block the step's drafts came from follows the last token before them.
            let mut block = last;
            for s in &out.steps {
                let want = &trained_drafts[block];
                for (j, &d) in s.drafts.iter().enumerate() {
                    if want[j] < 0 {
                        break;
                    }
                    compared += 1;
                    differ += usize::from(d != want[j]);
                    if d != ids[block + j + 2] {
                        break;
                    }
                }
                block += s.emitted;
            }
        }
    }
    println!("{differ} of {compared} drafts differ from the training pass's");
    assert!(compared > 300, "only {compared} drafts compared");
    assert!(differ * 50 <= compared, "{differ} of {compared} drafts differ from the training pass's");
    Ok(())
}

/// EOS inside a step: choose as EOS a token the model emits often, so that it is often an
/// accepted draft; both decoders must stop right after it.
#[test]
fn eos_inside_a_step_stops_like_ar() -> anyhow::Result<()> {
    let t = trained();
    let model = &t.loaded.model;
    let prompts = random_prompts(&t, 30, 2)?;
    let mut counts = std::collections::HashMap::new();
    for p in &prompts {
        let out = generate(model, Strategy::Ar, &request(p.clone(), 30, Decoding::Greedy, vec![]), &mut ())?;
        for id in out.token_ids {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    let (&eos, _) = counts.iter().max_by_key(|(_, c)| **c).ok_or_else(|| anyhow::anyhow!("no tokens"))?;
    let mut eos_in_draft = 0;
    for p in &prompts {
        let req = request(p.clone(), 30, Decoding::Greedy, vec![eos]);
        let ar = generate(model, Strategy::Ar, &req, &mut ())?;
        for mode in [Mode::Linear, Mode::Quadratic] {
            let mut last_origin = None;
            let mut sink = |e: &mtp_core::decode::TokenEvent| {
                last_origin = Some(e.origin);
                std::ops::ControlFlow::Continue(())
            };
            let spec = generate(model, t.strategy(mode, MaskCount::Fixed(4))?, &req, &mut sink)?;
            assert_eq!(spec.token_ids, ar.token_ids, "{mode}, prompt {p:?}");
            assert_eq!(spec.stop, ar.stop);
            if spec.stop == StopReason::Eos && matches!(last_origin, Some(mtp_core::decode::TokenOrigin::Draft { .. }))
            {
                eos_in_draft += 1;
            }
        }
    }
    assert!(eos_in_draft > 0, "no run ended on an accepted draft EOS");
    Ok(())
}

/// Exact distribution of the first `n` tokens under AR sampling, by enumeration over the
/// processed (top-k) distributions.
fn exact_marginals(
    model: &mtp_core::Llama,
    prompt: &[i64],
    params: SamplingParams,
    n: usize,
) -> Vec<std::collections::HashMap<i64, f64>> {
    let mut prefixes: Vec<(Vec<i64>, f64)> = vec![(vec![], 1.0)];
    let mut marginals = Vec::new();
    for _ in 0..n {
        let mut next = Vec::new();
        let mut m = std::collections::HashMap::new();
        for (prefix, prob) in &prefixes {
            let ids: Vec<i64> = prompt.iter().chain(prefix).copied().collect();
            let logits = tch::no_grad(|| model.forward(&Tensor::from_slice(&ids).unsqueeze(0), None));
            let last = logits.get(0).get(ids.len() as i64 - 1);
            let p: Vec<f32> = Vec::try_from(params.distribution(&last).to_kind(Kind::Float)).unwrap_or_default();
            for (tok, &pt) in p.iter().enumerate() {
                if pt > 0.0 {
                    let q = prob * f64::from(pt);
                    *m.entry(tok as i64).or_insert(0.0) += q;
                    let mut pre = prefix.clone();
                    pre.push(tok as i64);
                    next.push((pre, q));
                }
            }
        }
        marginals.push(m);
        prefixes = next;
    }
    marginals
}

/// Chi-square statistic of observed counts against expected probabilities, merging the
/// categories expected fewer than 5 times into one; returns (statistic, degrees of freedom).
fn chi_square(
    observed: &std::collections::HashMap<i64, usize>,
    expected: &std::collections::HashMap<i64, f64>,
    n: usize,
) -> (f64, usize) {
    let (mut chi2, mut df, mut rest_o, mut rest_e) = (0.0, 0usize, 0.0, 0.0);
    for (tok, &p) in expected {
        let e = p * n as f64;
        let o = *observed.get(tok).unwrap_or(&0) as f64;
        if e < 5.0 {
            rest_o += o;
            rest_e += e;
        } else {
            chi2 += (o - e).powi(2) / e;
            df += 1;
        }
    }
    if rest_e > 0.0 {
        chi2 += (rest_o - rest_e).powi(2) / rest_e.max(1e-9);
        df += 1;
    }
    let unexpected: usize = observed.iter().filter(|(t, _)| !expected.contains_key(t)).map(|(_, c)| *c).sum();
    assert_eq!(unexpected, 0, "tokens outside the support were sampled");
    (chi2, df.saturating_sub(1))
}

/// Upper 0.1% point of the chi-square distribution (Wilson-Hilferty approximation).
fn chi2_critical(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.090; // one-sided 0.001
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

#[test]
fn speculative_sampling_matches_ar_sampling() -> anyhow::Result<()> {
    let t = trained();
    let model = &t.loaded.model;
    let prompt = t.loaded.tokenizer.encode("def ")?;
    let base = SamplingParams { temperature: 1.0, top_k: Some(6), top_p: None, seed: 0 };
    let exact = exact_marginals(model, &prompt, base, 3);
    let n = 3000;
    let settings =
        [(Mode::Quadratic, 4, &t.drafter), (Mode::Linear, 2, &t.drafter), (Mode::Quadratic, 4, &t.small_vocab)];
    for (mode, masks, drafter) in settings {
        let strategy = Strategy::new(mode, Some(drafter), MaskCount::Fixed(masks))?;
        let mut observed = vec![std::collections::HashMap::new(); 3];
        for seed in 0..n {
            let req =
                request(prompt.clone(), 3, Decoding::Sample(SamplingParams { seed: seed as u64, ..base }), vec![]);
            let out = generate(model, strategy, &req, &mut ())?;
            for (i, &tok) in out.token_ids.iter().enumerate() {
                *observed[i].entry(tok).or_insert(0usize) += 1;
            }
        }
        for pos in 0..3 {
            let (chi2, df) = chi_square(&observed[pos], &exact[pos], n);
            let crit = chi2_critical(df.max(1));
            println!("{mode} token {}: chi2 {chi2:.1} on {df} df (0.1% critical {crit:.1})", pos + 1);
            assert!(chi2 < crit, "{mode}: token {} is not distributed as AR sampling: chi2 {chi2} > {crit}", pos + 1);
        }
    }
    Ok(())
}

#[test]
fn bad_requests_are_clear_errors() -> anyhow::Result<()> {
    let t = trained();
    let model = &t.loaded.model;
    let err = t.strategy(Mode::Quadratic, MaskCount::Fixed(9)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("9 masks") && err.contains("k = 8"), "{err}");
    let err = Strategy::new(Mode::Linear, None, MaskCount::Fixed(2)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("linear decoding needs an MTP adapter"), "{err}");
    let long = request(vec![5; model.config.context_length() - 3], 2, Decoding::Greedy, vec![]);
    let err = generate(model, t.strategy(Mode::Quadratic, MaskCount::Fixed(4))?, &long, &mut ())
        .expect_err("context")
        .to_string();
    assert!(err.contains("context"), "{err}");
    Ok(())
}

/// 200 CPU steps at k = 4 on structured data raise every slot's accuracy, from the LM head
/// and from the sampler, well above where it starts.
#[test]
fn two_hundred_steps_raise_every_slot() -> anyhow::Result<()> {
    let (model_dir, _) = files();
    let loaded = LoadedModel::from_folder(model_dir, &LoadOptions::default())?;
    let train = TrainConfig {
        model: ModelSource::Local { path: model_dir.clone() },
        data: "builtin:code:2000".parse()?,
        method: MtpConfig { k: 4, lora: LoraConfig { rank: 8, ..LoraConfig::default() }, ..MtpConfig::default() },
        lcm_weight: 0.1,
        training: LoopConfig {
            optim: OptimConfig { lr: 3e-3, warmup: 10, ..OptimConfig::default() },
            steps: 200,
            batch_size: 4,
            seq_len: 64,
            val_every: 200,
            checkpoint_every: 1000,
            ..LoopConfig::default()
        },
        ..TrainConfig::default()
    };
    let tmp = tempfile::tempdir()?;
    let mut first = None;
    let mut last_val = None;
    let mut sink = |e: &mtp_core::train::TrainEvent| match e {
        mtp_core::train::TrainEvent::Step(m) if m.step == 1 => first = Some(m.losses.clone()),
        mtp_core::train::TrainEvent::Validation(m) => last_val = Some(m.losses.clone()),
        _ => {}
    };
    mtp_core::train::train(&loaded, &train, tmp.path(), &mut sink, &Control::new())?;
    let (first, last) =
        (first.ok_or_else(|| anyhow::anyhow!("no step"))?, last_val.ok_or_else(|| anyhow::anyhow!("no validation"))?);
    println!("slot accuracy, LM head: {:?} -> {:?}", first.slot_acc, last.slot_acc);
    println!("slot accuracy, sampler: {:?} -> {:?}", first.slot_acc_sampler, last.slot_acc_sampler);
    for j in 0..4 {
        assert!(
            last.slot_acc[j] > first.slot_acc[j] + 0.1,
            "slot {} (head): {} -> {}",
            j + 1,
            first.slot_acc[j],
            last.slot_acc[j]
        );
        assert!(
            last.slot_acc_sampler[j] > first.slot_acc_sampler[j] + 0.1,
            "slot {} (sampler): {} -> {}",
            j + 1,
            first.slot_acc_sampler[j],
            last.slot_acc_sampler[j]
        );
    }
    Ok(())
}

/// A step's rows through the prepared adapter, in both forms (low-rank: the term added on
/// the mask rows; merged: where the CPU's few-row kernel runs, the mask rows through the
/// merged weights in the same call as the regular rows through the base weights, else two
/// halves through stacked weights, padding included): the regular rows are the same
/// whatever the adapter (bit for bit: the base model's, but for the two halves the same as
/// with an all-zero adapter), and every row equals the training path's (the adapter's own
/// factors, gated per row) up to rounding; with the mask rows in bf16, up to bf16 rounding.
#[test]
fn step_rows_keep_next_token_rows_bit_identical() -> anyhow::Result<()> {
    use mtp_core::decode::Layout;
    use mtp_core::decode::speculative::{StepLayout, StepPlan};
    use mtp_core::model::{AttnMask, Gate, Gated};
    let t = trained();
    let model = &t.loaded.model;
    let fresh = MtpAdapter::new(model, t.adapter.config.clone(), "fresh")?;
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    // Quadratic with 2 drafts and 3 masks (3 regular rows, 9 mask rows: the merged form
    // pads the first half), linear with 2 drafts and 2 masks (pads the second).
    for (layout, drafts, masks) in [(Layout::Quadratic, 2, 3), (Layout::Linear, 2, 2)] {
        let regular = drafts + 1;
        let inputs = Tensor::from_slice(&t.loaded.tokenizer.encode("def add")?[..1].repeat(regular));
        // The training path, on the rows in the layout's order (one sequence).
        let step = StepLayout::new(layout, drafts, masks);
        let rows = step.len() as i64;
        let slot = Tensor::from_slice(&step.slot).unsqueeze(0);
        let ids = Tensor::cat(
            &[inputs.shallow_clone(), Tensor::zeros([rows - regular as i64], (Kind::Int64, tch::Device::Cpu))],
            0,
        );
        let slots = Tensor::from_slice(&step.slot);
        let x = t.adapter.embed(model, &ids.unsqueeze(0), &slots.unsqueeze(0));
        let allowed = mtp_core::mtp::masks::attention_mask(&Tensor::from_slice(&step.block), &slots);
        let offsets = Tensor::from_slice(&step.offsets());
        let run = |gated: Option<&Gated>| {
            tch::no_grad(|| model.forward_embeds(&x, &offsets, AttnMask::Custom(&allowed), gated, None)).squeeze_dim(0)
        };
        let base = run(None);
        let training = run(Some(&t.adapter.gated(&slot, model.dtype().kind())));
        for form in [LoraForm::LowRank, LoraForm::Merged] {
            let options = DraftOptions { lora: form, arithmetic: DraftArithmetic::Exact, ..DraftOptions::default() };
            let (trained, zero) = (Drafter::new(model, &t.adapter, options)?, Drafter::new(model, &fresh, options)?);
            let plan = StepPlan::new(model, &trained, StepLayout::new(layout, drafts, masks))?;
            let kernel = mtp_core::model::linear::few_row_kernel_runs(model.device(), model.dtype().kind());
            assert_eq!(plan.halves(), form == LoraForm::Merged && !kernel);
            let forward =
                |d: &Drafter| tch::no_grad(|| plan.forward(model, &d.step_gate(&plan), &inputs, None, 0, None));
            let (h, h_zero) = (forward(&trained), forward(&zero));
            let what = format!("{layout:?}, {drafts} drafts, {masks} masks, {form}");
            let reg = regular as i64;
            assert!(h.narrow(0, 0, reg).equal(&h_zero.narrow(0, 0, reg)), "{what}: regular rows changed");
            if !plan.halves() {
                assert!(h.narrow(0, 0, reg).equal(&base.narrow(0, 0, reg)), "{what}: not the base model's rows");
            }
            // Packed rows back in the layout's order.
            let order: Vec<i64> = (0..rows as usize).map(|u| plan.row(u) as i64).collect();
            let logical = h.index_select(0, &Tensor::from_slice(&order));
            let masks_part = |x: &Tensor| x.narrow(0, reg, rows - reg);
            assert!(diff(&masks_part(&logical), &masks_part(&base)) > 1e-3, "{what}: the adapter did nothing");
            assert!(diff(&logical, &training) < 1e-5, "{what}: differs from training: {}", diff(&logical, &training));
            if plan.halves() {
                // The training adapter's own term on the second half gives the same rows.
                let halves = Gated { delta: &t.adapter, gate: Gate::Halves };
                let own = tch::no_grad(|| plan.forward(model, &halves, &inputs, None, 0, None));
                assert!(diff(&own, &h) < 1e-5, "{what}: merged weights vs the adapter's factors: {}", diff(&own, &h));
            }
        }
        let reg = regular as i64;
        // Mask rows in a reduced arithmetic: the regular rows still the base model's bit for
        // bit, the mask rows the training path's to its rounding (and not bit for bit, where
        // it runs).
        let reduced = |drafter: &Drafter, what: String, tolerance: f64, runs: bool| -> anyhow::Result<()> {
            let plan = StepPlan::new(model, drafter, StepLayout::new(layout, drafts, masks))?;
            let h = tch::no_grad(|| plan.forward(model, &drafter.step_gate(&plan), &inputs, None, 0, None));
            assert!(h.narrow(0, 0, reg).equal(&base.narrow(0, 0, reg)), "{what}: not the base model's rows");
            let order: Vec<i64> = (0..rows as usize).map(|u| plan.row(u) as i64).collect();
            let logical = h.index_select(0, &Tensor::from_slice(&order));
            let relative = diff(&logical, &training) / training.abs().max().double_value(&[]);
            println!("{what}: largest difference from training {relative:.2e} of the largest value");
            assert!(relative < tolerance, "{what}: differs from training: {relative}");
            if runs {
                assert!(relative > 1e-6, "{what}: the training path's to f32 rounding: it did not run");
            }
            Ok(())
        };
        // In bf16, to bf16 rounding.
        let what = format!("{layout:?}, {drafts} drafts, {masks} masks, mask rows in bf16");
        reduced(&t.bf16, what, 2e-2, t.bf16.bf16_min_rows().is_some())?;
        // In int8 (each form), to int8 rounding: weights of 127 levels, or 32 where AVX2's
        // pair tiles take this small model's short panels (a rounding four times coarser;
        // 5.5e-2 measured on a Zen 3).
        let short = mtp_core::decode::speculative::int8_short_panels(model) && !mtp_core::model::int8::vnni();
        for form in [LoraForm::LowRank, LoraForm::Merged] {
            let options = DraftOptions { lora: form, arithmetic: DraftArithmetic::Int8, ..DraftOptions::default() };
            let int8 = Drafter::new(model, &t.adapter, options)?;
            let what = format!("{layout:?}, {drafts} drafts, {masks} masks, {form}, mask rows in int8");
            reduced(&int8, what, if short { 0.1 } else { 5e-2 }, int8.int8_min_rows().is_some())?;
        }
    }
    Ok(())
}

/// The folded form (each group's `[W; A]` in one product, then the mask rows' term) on
/// libtorch's general path, as a GPU runs it (an f16 model on the CPU): a step's rows are
/// the low-rank form's (the next-token rows the base model's, the mask rows the term's) to
/// f16 rounding, a group's product takes the folded arm where (and only where) the weights
/// are folded, and greedy decoding with it is the low-rank form's; on our f32 kernel the
/// folded form is the low-rank form.
#[test]
fn folded_form_steps_as_the_low_rank_form() -> anyhow::Result<()> {
    use mtp_core::decode::Layout;
    use mtp_core::decode::speculative::{StepLayout, StepPlan};
    let t = trained();
    let exact = |lora| DraftOptions { lora, arithmetic: DraftArithmetic::Exact, ..DraftOptions::default() };
    if mtp_core::model::linear::few_row_products_ours(tch::Device::Cpu, Kind::Float) {
        assert_eq!(Drafter::new(&t.loaded.model, &t.adapter, exact(LoraForm::Folded))?.form(), LoraForm::LowRank);
    }
    let (model_dir, adapter_path) = files();
    let options = LoadOptions { dtype: mtp_core::DType::F16, ..LoadOptions::default() };
    let loaded = LoadedModel::from_folder(model_dir, &options)?;
    let model = &loaded.model;
    let adapter = MtpAdapter::load(adapter_path, model)?;
    let fresh = MtpAdapter::new(model, adapter.config.clone(), "fresh")?;
    let (low, folded) = (
        Drafter::new(model, &adapter, exact(LoraForm::LowRank))?,
        Drafter::new(model, &adapter, exact(LoraForm::Folded))?,
    );
    let zero = Drafter::new(model, &fresh, exact(LoraForm::Folded))?;
    assert_eq!((low.form(), folded.form()), (LoraForm::LowRank, LoraForm::Folded));
    // The base weights once more, with the factors.
    let c = &model.config;
    let weights = c.num_layers
        * (c.hidden_size * (c.q_dim() + 2 * c.kv_dim())
            + c.q_dim() * c.hidden_size
            + 3 * c.hidden_size * c.intermediate_size);
    assert!(
        folded.extra_bytes() - low.extra_bytes() > 2 * weights,
        "{} bytes",
        folded.extra_bytes() - low.extra_bytes()
    );
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    let prompt = t.loaded.tokenizer.encode("def add(a, b):\n    return a")?;
    for (layout, drafts, masks) in [(Layout::Quadratic, 4, 4), (Layout::Quadratic, 2, 3), (Layout::Linear, 3, 3)] {
        let step = StepLayout::new(layout, drafts, masks);
        let plan = StepPlan::new(model, &low, step.clone())?;
        let inputs = Tensor::from_slice(&prompt[..drafts + 1]);
        let rows = |d: &Drafter| {
            let mut cache = model.new_cache(8);
            tch::no_grad(|| {
                let _ = model.forward(&Tensor::from_slice(&prompt).unsqueeze(0), Some(&mut cache));
                let past = cache.len();
                plan.forward(model, &d.step_gate(&plan), &inputs, None, past, Some(&mut cache)).to_kind(Kind::Float)
            })
        };
        let (h_low, h_folded, h_zero) = (rows(&low), rows(&folded), rows(&zero));
        let what = format!("{layout:?}, {drafts} drafts, {masks} masks");
        let reg = drafts as i64 + 1;
        let scale = h_low.abs().max().double_value(&[]);
        let regular = diff(&h_folded.narrow(0, 0, reg), &h_low.narrow(0, 0, reg)) / scale;
        let all = diff(&h_folded, &h_low) / scale;
        println!("{what}: next-token rows {regular:.2e}, every row {all:.2e} of the largest value");
        assert!(all < 1e-3, "{what}: folded rows differ from the low-rank form's by {all:.2e}");
        assert!(
            h_folded.narrow(0, 0, reg).equal(&h_zero.narrow(0, 0, reg)),
            "{what}: next-token rows depend on the adapter"
        );
        let tail = |h: &Tensor| h.narrow(0, reg, h.size()[0] - reg);
        assert!(diff(&tail(&h_folded), &tail(&h_zero)) / scale > 1e-2, "{what}: the folded term did nothing");
    }
    // A group's product takes the folded arm (its output a view of the wider product) where
    // the weights are folded, and only there: the base product plus the term on the tail.
    {
        use mtp_core::model::{Gate, ProjDelta, ProjGroup};
        let (plain, with) =
            (adapter.prepared_lora(model, false), adapter.prepared_lora(model, false).with_folded_base(true));
        let x = Tensor::randn([1, 5, c.hidden_size as i64], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::Half);
        for group in [ProjGroup::Qkv, ProjGroup::Down] {
            let x = if group == ProjGroup::Down {
                Tensor::randn([1, 5, c.intermediate_size as i64], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::Half)
            } else {
                x.shallow_clone()
            };
            assert!(plain.product(1, group, &x, &Gate::Tail(2)).is_none(), "{group:?}");
            let y = with
                .product(1, group, &x, &Gate::Tail(2))
                .ok_or_else(|| anyhow::anyhow!("{group:?}: no folded product"))?;
            assert!(!y.is_contiguous(), "{group:?}: not a view of the folded product");
            let (w, _) = model.group_weight(1, group).ok_or_else(|| anyhow::anyhow!("no weight"))?;
            let expected = plain.add_to(1, group, &x, x.matmul(&w.tr()), &Gate::Tail(2)).to_kind(Kind::Float);
            let relative = diff(&y.to_kind(Kind::Float), &expected) / expected.abs().max().double_value(&[]);
            assert!(relative < 1e-3, "{group:?}: {relative:.2e}");
        }
    }
    // Greedy decoding: the low-rank form's tokens, quadratic and linear.
    for prompt in random_prompts(&t, 4, 11)? {
        let req = request(prompt.clone(), 24, Decoding::Greedy, vec![]);
        for (layout, masks) in [(Layout::Quadratic, MaskCount::Fixed(4)), (Layout::Linear, MaskCount::Fixed(3))] {
            let spec = |drafter| Strategy::Speculative(mtp_core::decode::Speculative { drafter, layout, masks });
            let a = generate(model, spec(&low), &req, &mut ())?;
            let b = generate(model, spec(&folded), &req, &mut ())?;
            assert_eq!(a.token_ids, b.token_ids, "{layout:?}, prompt {prompt:?}");
        }
    }
    Ok(())
}

/// A step's rows shared out between two threads through every layer
/// (`mtp_core::model::row_split`) give the same bits as on one thread: every row of the step,
/// the cache rows it wrote (read by the AR step after it), with each form and arithmetic of
/// the mask rows, quadratic and linear, the threads meeting one way and both ways, the
/// second thread taking halves of the first's calls or not; and the split is taken, and the
/// halves, where the process has two threads.
#[test]
fn rows_shared_between_threads_give_the_same_bits() -> anyhow::Result<()> {
    use mtp_core::decode::Layout;
    use mtp_core::decode::speculative::{StepLayout, StepPlan};
    use mtp_core::model::row_split::{PartnerCalls, head_on_first_rows, one_way_meetings, partner_calls, split_rows};
    let t = trained();
    let model = &t.loaded.model;
    let prompt = Tensor::from_slice(&t.loaded.tokenizer.encode("def add(a, b):\n    return a")?).unsqueeze(0);
    let options = |lora, arithmetic| DraftOptions { lora, arithmetic, ..DraftOptions::default() };
    let drafters = [
        ("merged, exact", Drafter::new(model, &t.adapter, options(LoraForm::Merged, DraftArithmetic::Exact))?),
        ("merged, int8", Drafter::new(model, &t.adapter, options(LoraForm::Merged, DraftArithmetic::Int8))?),
        ("low-rank, int8", Drafter::new(model, &t.adapter, options(LoraForm::LowRank, DraftArithmetic::Int8))?),
        ("auto", Drafter::new(model, &t.adapter, DraftOptions::default())?),
    ];
    let drafters = drafters
        .iter()
        .map(|(what, d)| (*what, d))
        .chain([("low-rank, exact", &t.low_rank), ("low-rank, bf16", &t.bf16)]);
    let mut shared = 0;
    let mut halves = 0;
    let mut unshared = Vec::new();
    let early_logits = std::cell::Cell::new(0);
    for (what, drafter) in drafters {
        for (layout, drafts, masks) in [(Layout::Quadratic, 4, 4), (Layout::Quadratic, 2, 2), (Layout::Linear, 3, 3)] {
            let plan = StepPlan::new(model, drafter, StepLayout::new(layout, drafts, masks))?;
            let inputs = prompt.get(0).narrow(0, 0, drafts as i64 + 1);
            let run = |split: bool| {
                let before = split_rows(split);
                let mut cache = model.new_cache(8);
                let out = tch::no_grad(|| {
                    let _ = model.forward(&prompt, Some(&mut cache));
                    let past = cache.len();
                    let (h, early) = head_on_first_rows(&model.lm_head, drafts as i64 + 1, || {
                        plan.forward(model, &drafter.step_gate(&plan), &inputs, None, past, Some(&mut cache))
                    });
                    // The next-token rows' logits from the first thread, where it took them.
                    if let Some(logits) = early {
                        assert!(logits.equal(&model.logits(&h.narrow(0, 0, drafts as i64 + 1))), "early logits");
                        early_logits.set(early_logits.get() + 1);
                    }
                    let next = model.forward(&Tensor::from_slice(&[5i64]).unsqueeze(0), Some(&mut cache));
                    (h, next)
                });
                (out, split_rows(true) - before)
            };
            let ((one_h, one_next), none) = run(false);
            let case = format!("{what}, {layout:?}, {drafts} drafts, {masks} masks");
            assert_eq!(none, 0, "{case}: shared out while switched off");
            // The threads meeting one way (the layouts' first rows, the next-token rows, see
            // no later row) and both ways once a layer; the second thread offered every call
            // of the first's, however small (the default offers only big ones), or none.
            for (one_way, calls) in
                [(true, PartnerCalls::Every), (false, PartnerCalls::Every), (true, PartnerCalls::Off)]
            {
                let before = one_way_meetings(one_way);
                let taken_before = partner_calls(calls);
                let mut took = false;
                // A step gives up sharing where the other thread does not get a core in time
                // (tests running side by side): then it runs on one thread, and is tried again.
                for _ in 0..100 {
                    let ((two_h, two_next), taken) = run(true);
                    assert!(two_h.equal(&one_h), "{case}, one way {one_way}: the step's rows differ");
                    assert!(
                        two_next.equal(&one_next),
                        "{case}, one way {one_way}: the cache rows the step wrote differ"
                    );
                    if taken > 0 {
                        shared += 1;
                        took = true;
                        break;
                    }
                }
                if !took {
                    unshared.push(format!("{case}, one way {one_way}, {calls:?}"));
                }
                let met_one_way = one_way_meetings(true) - before;
                let taken = partner_calls(PartnerCalls::Big) - taken_before;
                if took {
                    assert_eq!(met_one_way > 0, one_way, "{case}: passes that met one way");
                }
                if calls == PartnerCalls::Off {
                    assert_eq!(taken, 0, "{case}: the second thread took calls while offered none");
                }
                halves += taken;
            }
        }
    }
    if tch::get_num_threads() > 1 {
        assert_eq!(shared, 54, "steps shared out; never: {unshared:?}");
        assert!(halves > 0, "the second thread took none of the first's calls");
        assert!(early_logits.get() > 0, "no step's first thread took the logits");
    }
    Ok(())
}

/// The CPU's draft chain on host vectors ([`Drafter::greedy_on_host`]) drafts what the chain
/// of tensor operations ([`Drafter::greedy`]) drafts, with the whole vocabulary and with a
/// draft vocabulary, from the final hidden states of real text (each window of 8 rows taken
/// as a mask block, the token before it as the verified one). With its head in int8 (the
/// default where the CPU has VNNI) it drafts nearly the same tokens.
#[test]
fn host_chain_drafts_as_the_tensor_chain() -> anyhow::Result<()> {
    let mut t = trained();
    let model = &t.loaded.model;
    if !mtp_core::model::linear::few_row_kernel_runs(model.device(), model.dtype().kind()) {
        return Ok(()); // the host chain runs only where the few-row kernel does
    }
    let _g = tch::no_grad_guard();
    let ids = t.loaded.tokenizer.encode("def total(words):\n    result = 0\n    for x in words:\n        result")?;
    let tokens = Tensor::from_slice(&ids);
    let positions = Tensor::arange(ids.len() as i64, (Kind::Int64, model.device()));
    let embeds = model.embed(&tokens.unsqueeze(0));
    let h = model.forward_embeds(&embeds, &positions, mtp_core::model::AttnMask::Causal, None, None).squeeze_dim(0);
    let k = t.drafter.k();
    let exact = DraftOptions { arithmetic: DraftArithmetic::Exact, ..DraftOptions::default() };
    let whole = Drafter::new(model, &t.adapter, exact)?;
    t.adapter.draft_vocab = Some(frequent_tokens(&t.loaded, 64));
    let small = Drafter::new(model, &t.adapter, exact)?;
    let int8 = mtp_core::model::int8::available();
    let (mut compared, mut same, mut drafts) = (0, 0, 0);
    for (drafter, default) in [(&whole, &t.drafter), (&small, &t.small_vocab)] {
        assert!(!drafter.int8_head());
        assert_eq!(default.int8_head(), int8, "the default arithmetic's chain");
        for start in 1..ids.len() - k {
            let z = h.narrow(0, start as i64, k as i64);
            let prev = ids[start - 1];
            let host = |d: &Drafter| -> anyhow::Result<Vec<i64>> {
                Ok(d.greedy_on_host(model, &z, prev, false)?.expect("the host chain runs with the kernel").ids)
            };
            let on_host = host(drafter)?;
            let tensors = Vec::<i64>::try_from(drafter.greedy(model, &z, &Tensor::from_slice(&[prev]), None))?;
            assert_eq!(on_host, tensors, "window at {start}");
            compared += 1;
            // The int8 head's chain: the same drafts up to its first near-tie (each later
            // draft follows from the one before it).
            let reduced = host(default)?;
            same += on_host.iter().zip(&reduced).take_while(|(a, b)| a == b).count();
            drafts += on_host.len();
        }
    }
    assert!(compared >= 20, "only {compared} windows");
    let agree = same as f64 / drafts as f64;
    println!("int8 head: {same} of {drafts} drafts the exact chain's before any difference");
    assert!(agree >= 0.9, "the int8 head's chain agrees on {agree:.3} of the drafts");
    Ok(())
}

/// The fixed-shape steps that CUDA graphs record (`StepGraphs::Eager`: the same passes,
/// the same bookkeeping, run eagerly on the CPU) decode as the ordinary steps do, step for
/// step (accepted drafts, next token, new drafts), and as AR does: both layouts, fixed and
/// chosen mask counts, the forms of the adapter (the low-rank one with its mask rows in
/// bf16 pairs where the CPU has them), in f32 and bf16 (products and attention
/// through our CPU kernels, so AR's output exactly) and f16 (libtorch's kernels, where
/// merged weights run as two halves, padding rows included, and the folded form runs).
#[test]
fn fixed_shape_steps_decode_as_ordinary_steps() -> anyhow::Result<()> {
    use mtp_core::decode::speculative::SpecDecoder;
    use mtp_core::decode::{Layout, Speculative};
    use mtp_core::model::StepGraphs;
    let (model_dir, adapter_path) = files();
    let t = trained();
    let prompts = random_prompts(&t, 8, 7)?;
    let mut halves_seen = false;
    for dtype in [mtp_core::DType::F32, mtp_core::DType::Bf16, mtp_core::DType::F16] {
        // Our kernels keep every row apart where they run: f32 and bf16.
        let exact =
            dtype == mtp_core::DType::F32 || (dtype == mtp_core::DType::Bf16 && mtp_core::model::few_rows::available());
        let options = LoadOptions { dtype, ..LoadOptions::default() };
        let ordinary = LoadedModel::from_folder(model_dir, &options)?;
        let mut fixed = LoadedModel::from_folder(model_dir, &options)?;
        fixed.model.set_step_graphs(StepGraphs::Eager);
        assert_eq!(fixed.model.step_graphs(), StepGraphs::Eager);
        let adapter = MtpAdapter::load(adapter_path, &ordinary.model)?;
        let (mut fixed_steps, mut draft_ties, mut runs) = (0, 0, 0);
        // The low-rank form with the mask rows in bf16 where the CPU has the pairs (an f32
        // model's rounded, a bf16 model's as they are: few_rows::product_bf16_tail), and in
        // int8 where it has VNNI (an f32 model's; others as bf16).
        // The folded form where libtorch's general path runs (f16): on our kernels it is the
        // low-rank form.
        let folded = (dtype == mtp_core::DType::F16).then_some((LoraForm::Folded, DraftArithmetic::Exact));
        let setups = [
            (LoraForm::Merged, DraftArithmetic::Auto),
            (LoraForm::LowRank, DraftArithmetic::Bf16),
            (LoraForm::LowRank, DraftArithmetic::Int8),
        ];
        for (form, arithmetic) in setups.into_iter().chain(folded) {
            let options = DraftOptions { lora: form, arithmetic, ..DraftOptions::default() };
            let (d_ordinary, d_fixed) =
                (Drafter::new(&ordinary.model, &adapter, options)?, Drafter::new(&fixed.model, &adapter, options)?);
            if form == LoraForm::LowRank && exact {
                assert_eq!(d_fixed.bf16_min_rows(), mtp_core::model::few_rows::bf16_available().then_some(1));
                let int8 = arithmetic == DraftArithmetic::Int8
                    && dtype == mtp_core::DType::F32
                    && mtp_core::model::int8::available();
                assert_eq!(d_fixed.int8_min_rows(), int8.then_some(1), "{dtype:?}, {arithmetic}");
            }
            halves_seen |= d_fixed.packs_halves();
            for (layout, masks) in [
                (Layout::Quadratic, MaskCount::Fixed(2)),
                (Layout::Quadratic, MaskCount::Fixed(4)),
                (Layout::Quadratic, MaskCount::Auto),
                (Layout::Linear, MaskCount::Fixed(3)),
            ] {
                for (index, prompt) in prompts.iter().enumerate() {
                    let req = request(prompt.clone(), 28, Decoding::Greedy, vec![]);
                    let what = format!("{dtype:?}, {form}, {arithmetic}, {layout:?}, {masks} masks, prompt {prompt:?}");
                    let ar = generate(&ordinary.model, Strategy::Ar, &req, &mut ())?;
                    let ar_fixed = generate(&fixed.model, Strategy::Ar, &req, &mut ())?;
                    assert_eq!(ar_fixed.token_ids, ar.token_ids, "AR, {what}");
                    let spec = |drafter| Speculative { drafter, layout, masks };
                    let (mut a, first_a) = SpecDecoder::start(&ordinary.model, spec(&d_ordinary), &req)?;
                    let (mut b, first_b) = SpecDecoder::start(&fixed.model, spec(&d_fixed), &req)?;
                    assert_eq!(first_a, first_b, "{what}");
                    let mut tokens = vec![first_a];
                    if masks == MaskCount::Auto {
                        // Each decoder chooses its mask counts from its own step times: the
                        // output is AR's, the steps may differ.
                        let out = generate(&fixed.model, Strategy::Speculative(spec(&d_fixed)), &req, &mut ())?;
                        let plain = generate(&ordinary.model, Strategy::Speculative(spec(&d_ordinary)), &req, &mut ())?;
                        assert_eq!(out.token_ids, plain.token_ids, "{what}");
                        if exact {
                            assert_eq!(out.token_ids, ar.token_ids, "{what}: not AR's output");
                        }
                    }
                    let (mut steps, mut diverged) = (0, false);
                    while masks != MaskCount::Auto && tokens.len() < req.max_new_tokens && b.has_room() {
                        let (ra, rb) = (a.step(false)?, b.step(false)?);
                        steps += 1;
                        let step = ra.stats.step;
                        assert_eq!((&ra.accepted, ra.next), (&rb.accepted, rb.next), "{what}, step {step}");
                        if (!exact || d_ordinary.int8_head()) && a.drafts() != b.drafts() {
                            // libtorch's attention through the whole cache sums in another
                            // order: in f16 a near-tie in the draft chain may go the other
                            // way; and the ordinary steps' chain on host vectors reads the
                            // head in int8 where the fixed-shape steps' tensor chain reads it
                            // in f32. The runs then differ in their drafts, not in what they emit.
                            println!("{what}, step {step}: drafts {:?} and {:?}", a.drafts(), b.drafts());
                            // Bounded below for f16; the int8 head's agreement is pinned by
                            // `host_chain_drafts_as_the_tensor_chain`.
                            draft_ties += usize::from(!exact);
                            diverged = true;
                            break;
                        }
                        assert_eq!(a.drafts(), b.drafts(), "{what}, step {step}: new drafts");
                        assert_eq!(a.cache_len(), b.cache_len(), "{what}, step {step}");
                        tokens.extend(&ra.accepted);
                        tokens.push(ra.next);
                    }
                    runs += 1;
                    // The drafter keeps the last generation's cache and recordings: from the
                    // third generation on, every quadratic step's shape has been seen twice.
                    if index >= 2 && layout == Layout::Quadratic && masks != MaskCount::Auto {
                        assert_eq!(b.fixed_shape_steps(), steps, "{what}: steps of recorded shapes");
                    }
                    tokens.truncate(req.max_new_tokens);
                    if exact && masks != MaskCount::Auto && !diverged {
                        assert_eq!(tokens, ar.token_ids, "{what}: not AR's output");
                    }
                    assert_eq!(a.fixed_shape_steps(), 0, "{what}: the ordinary model ran fixed-shape steps");
                    assert!(!b.replays_graph(), "{what}: nothing is recorded on the CPU");
                    fixed_steps += b.fixed_shape_steps();
                }
            }
        }
        assert!(fixed_steps > 100, "{dtype:?}: only {fixed_steps} fixed-shape steps ran");
        assert!(draft_ties * 8 <= runs, "{dtype:?}: drafts differed in {draft_ties} runs of {runs}");
    }
    assert!(halves_seen, "no drafter packed two halves");
    Ok(())
}

/// `run_bench` with repeats goes round the modes of a prompt in turn (AR, each mode, AR
/// again ..), so that each mode's fastest run comes from the same stretch of time; it counts
/// every generation in its progress, and the table keeps one generation per prompt and mode
/// (tokens and forwards as one run has them), every greedy output AR's.
#[test]
fn bench_repeats_go_round_the_modes() -> anyhow::Result<()> {
    use mtp_core::decode::bench::{BenchConfig, BenchPrompt, run_bench};
    let t = trained();
    let prompts: Vec<BenchPrompt> = ["(a b", "[c d e"]
        .iter()
        .map(|p| BenchPrompt { prompt: (*p).into(), messages: None, domain: "text".into() })
        .collect();
    let config = BenchConfig {
        modes: vec![Mode::Ar, Mode::Quadratic],
        masks: vec![MaskCount::Fixed(1), MaskCount::Fixed(2)],
        max_new_tokens: 12,
        repeats: 3,
        chat: false,
    };
    let mut seen: Vec<(usize, usize, String)> = Vec::new();
    let mut progress = |done: usize, total: usize, what: &str| {
        seen.push((done, total, what.to_owned()));
        std::ops::ControlFlow::Continue(())
    };
    let report = run_bench(&t.loaded.model, &t.drafter, &t.loaded.tokenizer, &prompts, &config, &mut progress)?;
    // 2 prompts x 3 runs (AR, quadratic 1, quadratic 2) x 3 repeats, then "done".
    assert_eq!(seen.len(), 19, "{seen:?}");
    assert!(seen.iter().enumerate().all(|(i, (done, total, _))| *done == i && *total == 18), "{seen:?}");
    let first: Vec<&str> = seen[..6].iter().map(|(_, _, w)| w.as_str()).collect();
    assert_eq!(
        first,
        [
            "prompt 1 of 2 (text): AR, run 1 of 3",
            "prompt 1 of 2 (text): quadratic, 1 mask, run 1 of 3",
            "prompt 1 of 2 (text): quadratic, 2 masks, run 1 of 3",
            "prompt 1 of 2 (text): AR, run 2 of 3",
            "prompt 1 of 2 (text): quadratic, 1 mask, run 2 of 3",
            "prompt 1 of 2 (text): quadratic, 2 masks, run 2 of 3",
        ]
    );
    assert!(seen[9].2.starts_with("prompt 2 of 2 (text): AR"), "{seen:?}");
    assert!(report.divergences.is_empty(), "{:?}", report.divergences);
    let all: Vec<_> = report.rows.iter().filter(|r| r.domain == "all").collect();
    assert_eq!(all.len(), 3);
    for r in &all {
        assert!(r.identical, "{r:?}");
        assert_eq!(r.prompts, 2, "{r:?}");
        assert_eq!(r.tokens, all[0].tokens, "{r:?}");
        assert!(r.step_cost_vs_ar > 0.0 && r.tokens_per_second > 0.0, "{r:?}");
    }
    // One generation per prompt and mode: AR's forwards are its tokens (prefill + one a token).
    assert!(all[0].tokens > 2 && all[0].tokens <= 24 && all[0].forwards == all[0].tokens, "{:?}", all[0]);
    Ok(())
}

/// A benchmark row counts its drafts slot by slot as its generations' steps do, and with a
/// draft vocabulary the report counts AR's answer tokens it lacks, per domain and in all.
#[test]
fn bench_counts_slots_and_the_tokens_a_draft_vocabulary_lacks() -> anyhow::Result<()> {
    use mtp_core::decode::Acceptance;
    use mtp_core::decode::bench::{BenchConfig, BenchPrompt, run_bench};
    let t = trained();
    let prompts: Vec<BenchPrompt> = [("def ", "code"), ("class ", "code"), ("(a b", "text")]
        .iter()
        .map(|(p, d)| BenchPrompt { prompt: (*p).into(), messages: None, domain: (*d).into() })
        .collect();
    let config = BenchConfig {
        modes: vec![Mode::Quadratic],
        masks: vec![MaskCount::Fixed(2)],
        max_new_tokens: 24,
        repeats: 1,
        chat: false,
    };
    let report = run_bench(&t.loaded.model, &t.small_vocab, &t.loaded.tokenizer, &prompts, &config, &mut ())?;
    let vocab = t.small_vocab.draft_vocab_ids().unwrap_or_default();
    assert_eq!((report.draft_vocab, vocab.len()), (Some(64), 64));
    let strategy = Strategy::new(Mode::Quadratic, Some(&t.small_vocab), MaskCount::Fixed(2))?;
    let (mut acceptance, mut tokens, mut outside) = (Acceptance::default(), 0, 0);
    for p in &prompts {
        let req =
            request(t.loaded.tokenizer.encode(&p.prompt)?, 24, Decoding::Greedy, t.loaded.tokenizer.eos_ids.clone());
        let ar = generate(&t.loaded.model, Strategy::Ar, &req, &mut ())?;
        tokens += ar.token_ids.len();
        outside += ar.token_ids.iter().filter(|id| !vocab.contains(id)).count();
        acceptance.merge(&Acceptance::of(&generate(&t.loaded.model, strategy, &req, &mut ())?.steps));
    }
    let all = report.rows.iter().find(|r| r.domain == "all" && r.mode == Mode::Quadratic);
    assert_eq!(all.map(|r| &r.acceptance), Some(&acceptance), "{:?}", report.rows);
    assert!(acceptance.reached.first().is_some_and(|&n| n > 0), "{acceptance:?}");
    let misses =
        |domain: &str| report.draft_vocab_misses.iter().find(|m| m.domain == domain).map(|m| (m.tokens, m.outside));
    assert_eq!(misses("all"), Some((tokens, outside)), "{:?}", report.draft_vocab_misses);
    // Some answer tokens lie outside the 64 frequent ones, most inside.
    assert!(0 < outside && 2 * outside < tokens, "{outside} of {tokens}");
    let code = misses("code").unwrap_or_default();
    let text = misses("text").unwrap_or_default();
    assert_eq!((code.0 + text.0, code.1 + text.1), (tokens, outside));
    // Drafting from the whole vocabulary: nothing to count.
    let whole = run_bench(&t.loaded.model, &t.drafter, &t.loaded.tokenizer, &prompts, &config, &mut ())?;
    assert!(whole.draft_vocab.is_none() && whole.draft_vocab_misses.is_empty());
    Ok(())
}

/// A benchmark stopped on request reports the prompts it measured in every mode (the table
/// covers them alone and says how many of how many); stopped before the first is measured,
/// it reports no table.
#[test]
fn a_stopped_bench_reports_the_prompts_it_measured() -> anyhow::Result<()> {
    use mtp_core::decode::bench::{BenchConfig, BenchPrompt, run_bench};
    use std::ops::ControlFlow;
    let t = trained();
    let prompts: Vec<BenchPrompt> = [("(a b", "code"), ("[c d e", "math"), ("(f", "code")]
        .iter()
        .map(|(p, d)| BenchPrompt { prompt: (*p).into(), messages: None, domain: (*d).into() })
        .collect();
    let config = BenchConfig {
        modes: vec![Mode::Ar, Mode::Quadratic],
        masks: vec![MaskCount::Fixed(2)],
        max_new_tokens: 8,
        repeats: 1,
        chat: false,
    };
    // Two generations a prompt (AR, then 2 masks): stopped as the second prompt's second starts.
    let mut calls = 0;
    let mut progress = |_: usize, _: usize, _: &str| {
        calls += 1;
        if calls > 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    };
    let report = run_bench(&t.loaded.model, &t.drafter, &t.loaded.tokenizer, &prompts, &config, &mut progress)?;
    assert_eq!((report.stopped_after, report.prompts), (Some(1), 3));
    let domains: Vec<&str> = report.rows.iter().map(|r| r.domain.as_str()).collect();
    assert_eq!(domains, ["code", "code", "all", "all"]);
    assert!(report.rows.iter().all(|r| r.prompts == 1 && r.identical), "{:?}", report.rows);
    assert!(report.to_markdown().contains("Stopped after 1 of 3 prompts"));
    let mut at_once = |_: usize, _: usize, _: &str| ControlFlow::Break(());
    let none = run_bench(&t.loaded.model, &t.drafter, &t.loaded.tokenizer, &prompts, &config, &mut at_once);
    assert!(matches!(none, Err(mtp_core::Error::Cancelled)), "{none:?}");
    Ok(())
}

/// Whatever mask blocks a quadratic step keeps (`auto` leaves out those verification will
/// likely not need), the output is AR's: every step here keeps a random subset of its
/// blocks (the likeliest-looking ones or none of them alike); when verification stops where
/// a block was left out, the next step has no drafts. The pruned steps report their blocks.
#[test]
fn pruned_blocks_keep_the_output() -> anyhow::Result<()> {
    use mtp_core::decode::speculative::SpecDecoder;
    use mtp_core::decode::{Layout, Speculative};
    let t = trained();
    // Steps prune where drafts are made on host vectors: where the few-row kernel runs.
    if !mtp_core::model::linear::few_row_kernel_runs(t.loaded.model.device(), t.loaded.model.dtype().kind()) {
        return Ok(());
    }
    let mut rng = StdRng::seed_from_u64(11);
    let (mut pruned_steps, mut empty_after_miss) = (0, 0);
    for (masks, prompt) in [2, 3, 4]
        .into_iter()
        .flat_map(|m| random_prompts(&t, 6, m as u64).unwrap_or_default().into_iter().map(move |p| (m, p)))
    {
        let req = request(prompt.clone(), 40, Decoding::Greedy, vec![]);
        let ar = generate(&t.loaded.model, Strategy::Ar, &req, &mut ())?;
        for drafter in [&t.low_rank, &t.drafter] {
            let spec = Speculative { drafter, layout: Layout::Quadratic, masks: MaskCount::Fixed(masks) };
            let (mut d, first) = SpecDecoder::start(&t.loaded.model, spec, &req)?;
            let mut tokens = vec![first];
            while tokens.len() < req.max_new_tokens && d.has_room() {
                let n = d.drafts().len();
                let blocks: Vec<usize> = (0..=n).filter(|_| rng.random_bool(0.5)).collect();
                d.keep_blocks(blocks.clone());
                let r = d.step(false)?;
                // The step ran the pruned layout.
                assert_eq!((r.stats.blocks, r.stats.masks), (blocks.len(), masks), "blocks {blocks:?}");
                pruned_steps += usize::from(blocks.len() <= n);
                if !blocks.contains(&r.accepted.len()) {
                    assert!(d.drafts().is_empty(), "no block after {} accepted, yet drafts", r.accepted.len());
                    empty_after_miss += 1;
                }
                tokens.extend(&r.accepted);
                tokens.push(r.next);
            }
            tokens.truncate(req.max_new_tokens);
            assert_eq!(tokens, ar.token_ids, "masks {masks}, prompt {prompt:?}: not AR's output");
        }
    }
    assert!(pruned_steps > 100 && empty_after_miss > 20, "{pruned_steps} pruned steps, {empty_after_miss} misses");
    Ok(())
}
