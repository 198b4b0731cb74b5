//! The method's invariants and the training loop, on the tiny fixture models:
//! - the gate keeps NTP rows of the base model bit-identical with any adapter loaded;
//! - mask slot j's output does not depend on later slots (one model serves 1..k masks);
//! - a resumed run reproduces an uninterrupted one;
//! - adapters round-trip and refuse a different base model.

mod common;

use common::*;
use mtp_core::model::AttnMask;
use mtp_core::mtp::{MtpAdapter, MtpConfig, build_layout, collate, loss};
use mtp_core::train::{Control, DataSource, LoopConfig, OptimConfig, StepMetrics, TrainConfig, TrainEvent};
use mtp_core::{DType, LoadOptions, LoadedModel, ModelSource};
use tch::{Device, Kind, Tensor};

fn load(family: &str) -> anyhow::Result<LoadedModel> {
    Ok(LoadedModel::load(&ModelSource::Local { path: model_dir(family) }, &LoadOptions::default(), &mut ())?)
}

/// An adapter whose LoRA B factors are random (a fresh one has B = 0, a zero delta).
fn busy_adapter(m: &LoadedModel, config: MtpConfig) -> anyhow::Result<MtpAdapter> {
    // Seeded under the lock that trainings in other test threads take too.
    mtp_core::device::seeded(1, || -> anyhow::Result<MtpAdapter> {
        let a = MtpAdapter::new(&m.model, config, "fixture")?;
        tch::no_grad(|| {
            for (name, mut t) in a.named_tensors() {
                if name.ends_with(".B") {
                    t.copy_(&(Tensor::randn_like(&t) * 0.5));
                }
            }
        });
        Ok(a)
    })
}

/// Final hidden states of a laid-out sequence, with or without the adapter's delta.
fn hidden(m: &LoadedModel, a: &MtpAdapter, ids: &[i64], k: i64, with_delta: bool) -> (Tensor, Tensor) {
    let layout = collate(
        &[build_layout(&Tensor::from_slice(ids), &Tensor::ones([ids.len() as i64], (Kind::Bool, Device::Cpu)), k)],
        Device::Cpu,
    );
    let x = a.embed(&m.model, &layout.tokens, &layout.slot);
    let gated = a.gated(&layout.slot, m.model.dtype().kind());
    let mask = layout.attention_mask();
    let z = tch::no_grad(|| {
        m.model.forward_embeds(&x, &layout.positions, AttnMask::Custom(&mask), with_delta.then_some(&gated), None)
    });
    (z.squeeze_dim(0), layout.slot.squeeze_dim(0))
}

fn rows(t: &Tensor, slot: &Tensor, want_slot: i64) -> Tensor {
    t.index_select(0, &slot.eq(want_slot).nonzero().view([-1]))
}

#[test]
fn gate_keeps_ntp_rows_bit_identical() -> anyhow::Result<()> {
    for family in ["llama", "qwen3"] {
        let m = load(family)?;
        let ids: Vec<i64> = reference(family)?.logits_input_ids;
        let a = busy_adapter(&m, MtpConfig { k: 3, ..MtpConfig::default() })?;
        let (with, slot) = hidden(&m, &a, &ids, 3, true);
        let (without, _) = hidden(&m, &a, &ids, 3, false);
        let (ntp_with, ntp_without) = (rows(&with, &slot, 0), rows(&without, &slot, 0));
        assert!(ntp_with.equal(&ntp_without), "{family}: NTP rows changed by a gated adapter");
        assert!(
            max_abs_diff(&rows(&with, &slot, 1), &rows(&without, &slot, 1)) > 1e-3,
            "{family}: the adapter does nothing"
        );

        // Against a plain forward of the same tokens (no mask blocks): equal up to rounding.
        let plain = tch::no_grad(|| {
            let ids_t = Tensor::from_slice(&ids).unsqueeze(0);
            let pos = Tensor::arange(ids.len() as i64, (Kind::Int64, Device::Cpu));
            m.model.forward_embeds(&m.model.embed(&ids_t), &pos, AttnMask::Causal, None, None).squeeze_dim(0)
        });
        assert!(max_abs_diff(&ntp_with, &plain) < 1e-5, "{family}");

        // Without mask blocks (every row NTP, the gate 0 everywhere) the adapted model is the
        // base model bit for bit.
        let ids_t = Tensor::from_slice(&ids).unsqueeze(0);
        let pos = Tensor::arange(ids.len() as i64, (Kind::Int64, Device::Cpu));
        let slot = Tensor::zeros([1, ids.len() as i64], (Kind::Int64, Device::Cpu));
        let gated = a.gated(&slot, m.model.dtype().kind());
        let (base_plain, adapted_plain) = tch::no_grad(|| {
            let x = m.model.embed(&ids_t);
            let run = |g: Option<&mtp_core::model::Gated>| m.model.forward_embeds(&x, &pos, AttnMask::Causal, g, None);
            (run(None), run(Some(&gated)))
        });
        assert!(adapted_plain.equal(&base_plain), "{family}: a gated adapter changed a sequence without masks");

        // Plain LoRA (the ablation) changes NTP rows.
        let plain_lora = busy_adapter(&m, MtpConfig { k: 3, gated: false, ..MtpConfig::default() })?;
        let (ungated, slot) = hidden(&m, &plain_lora, &ids, 3, true);
        assert!(
            max_abs_diff(&rows(&ungated, &slot, 0), &ntp_without) > 1e-3,
            "{family}: ungated LoRA left NTP rows alone"
        );
    }
    Ok(())
}

#[test]
fn mask_slots_do_not_see_later_slots() -> anyhow::Result<()> {
    let m = load("llama")?;
    let ids: Vec<i64> = reference("llama")?.logits_input_ids;
    let a = busy_adapter(&m, MtpConfig { k: 4, ..MtpConfig::default() })?;
    let (z4, s4) = hidden(&m, &a, &ids, 4, true);
    // The same adapter with only 2 of its 4 masks per block.
    let (z2, s2) = hidden(&m, &a, &ids, 2, true);
    for j in 0..=2 {
        let d = max_abs_diff(&rows(&z4, &s4, j), &rows(&z2, &s2, j));
        assert!(d < 1e-5, "slot {j} differs by {d}");
    }
    Ok(())
}

fn small_config(steps: usize) -> TrainConfig {
    TrainConfig {
        model: ModelSource::Local { path: model_dir("llama") },
        data: "builtin:arith:300".parse::<DataSource>().expect("builtin"),
        method: MtpConfig {
            k: 2,
            lora: mtp_core::mtp::LoraConfig { rank: 4, ..Default::default() },
            ..MtpConfig::default()
        },
        training: LoopConfig {
            optim: OptimConfig { lr: 3e-3, warmup: 5, ..OptimConfig::default() },
            steps,
            batch_size: 2,
            seq_len: 32,
            val_every: 10,
            checkpoint_every: 10,
            ..LoopConfig::default()
        },
        ..TrainConfig::default()
    }
}

fn train_losses(events: &[TrainEvent]) -> Vec<(usize, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(StepMetrics { step, losses, .. }) => Some((*step, losses.loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn resumed_run_equals_uninterrupted_run() -> anyhow::Result<()> {
    let m = load("llama")?;
    let tmp = tempfile::tempdir()?;
    let control = Control::new();

    let mut straight = Vec::new();
    mtp_core::train::train(
        &m,
        &small_config(40),
        &tmp.path().join("a"),
        &mut |e: &TrainEvent| straight.push(e.clone()),
        &control,
    )?;

    let mut first = Vec::new();
    let b = tmp.path().join("b");
    mtp_core::train::train(&m, &small_config(20), &b, &mut |e: &TrainEvent| first.push(e.clone()), &control)?;
    let mut second = Vec::new();
    mtp_core::train::resume(&m, &b, Some(40), &mut |e: &TrainEvent| second.push(e.clone()), &control)?;

    let a = train_losses(&straight);
    let mut r = train_losses(&first);
    r.extend(train_losses(&second));
    assert_eq!(a.len(), 40);
    assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), r.iter().map(|x| x.0).collect::<Vec<_>>());
    for ((step, x), (_, y)) in a.iter().zip(&r) {
        assert!((x - y).abs() <= 1e-5, "step {step}: {x} vs {y}");
    }
    // Training learned something: the last losses are below the first.
    let early: f64 = a[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let late: f64 = a[35..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    assert!(late < early, "loss did not fall: {early} -> {late}");

    // The metrics file of the resumed run holds each step once, in order.
    let logged = mtp_core::train::trainer::read_metrics(&b)?;
    let steps: Vec<usize> =
        logged.iter().filter(|m| m.split == mtp_core::train::Split::Train).map(|m| m.step).collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>());
    assert!(logged.iter().any(|m| m.split == mtp_core::train::Split::Val));
    assert!(b.join("adapter.safetensors").exists());

    // Every validation pass predicts tokens per forward at 1..k masks from the slot
    // accuracies; the last one (every 4 passes, and at the end) also measures it by decoding.
    let vals: Vec<&StepMetrics> =
        straight.iter().filter_map(|e| if let TrainEvent::Validation(m) = e { Some(m) } else { None }).collect();
    assert_eq!(vals.iter().map(|v| v.step).collect::<Vec<_>>(), [10, 20, 30, 40]);
    for v in &vals {
        let e = v.expected_tokens_per_forward.clone().unwrap_or_default();
        assert!(e.len() == 2 && e[0] >= 1.0 && e[1] >= e[0] && e[1] <= 3.0, "step {}: {e:?}", v.step);
    }
    assert!(vals[..3].iter().all(|v| v.measured_tokens_per_forward.is_none()));
    let measured = vals[3].measured_tokens_per_forward.clone().unwrap_or_default();
    assert!(measured.len() == 2 && measured.iter().all(|t| (1.0..=3.0).contains(t)), "{measured:?}");
    // The resumed run measured at its end too, on (nearly) the same weights.
    let resumed = logged.iter().rev().find_map(|m| m.measured_tokens_per_forward.clone()).unwrap_or_default();
    assert!(resumed.len() == 2 && resumed.iter().zip(&measured).all(|(a, b)| (a - b).abs() < 0.2), "{resumed:?}");
    Ok(())
}

/// The UNO recipe draws fresh random ids for the mask rows of every micro-batch, seeded by
/// the run: a resumed run draws the ones the uninterrupted run drew.
#[test]
fn uno_recipe_resumes_exactly() -> anyhow::Result<()> {
    let m = load("llama")?;
    let tmp = tempfile::tempdir()?;
    let control = Control::new();
    let config = |steps| {
        let mut c = small_config(steps);
        c.method.recipe = mtp_core::mtp::Recipe::Uno;
        c.method.sampler = false;
        (c.training.val_every, c.training.checkpoint_every) = (6, 6);
        c
    };
    let mut straight = Vec::new();
    mtp_core::train::train(
        &m,
        &config(12),
        &tmp.path().join("a"),
        &mut |e: &TrainEvent| straight.push(e.clone()),
        &control,
    )?;
    let b = tmp.path().join("b");
    let mut resumed = Vec::new();
    mtp_core::train::train(&m, &config(6), &b, &mut |e: &TrainEvent| resumed.push(e.clone()), &control)?;
    mtp_core::train::resume(&m, &b, Some(12), &mut |e: &TrainEvent| resumed.push(e.clone()), &control)?;
    let (a, r) = (train_losses(&straight), train_losses(&resumed));
    assert_eq!(a.len(), 12);
    assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), r.iter().map(|x| x.0).collect::<Vec<_>>());
    for ((step, x), (_, y)) in a.iter().zip(&r) {
        assert!((x - y).abs() <= 1e-5, "step {step}: {x} vs {y}");
    }
    let (config, _) = MtpAdapter::read_header(&b.join("adapter.safetensors"))?;
    assert_eq!((config.recipe, config.sampler), (mtp_core::mtp::Recipe::Uno, false));
    Ok(())
}

/// Activation checkpointing changes where gradients are computed, not what they are: the
/// same run with it on and off takes the same steps (losses and final weights equal up to
/// rounding), trainable mask embeddings included.
#[test]
fn checkpointing_gives_the_same_training() -> anyhow::Result<()> {
    use mtp_core::train::trainer::Checkpointing;
    let m = load("llama")?;
    let tmp = tempfile::tempdir()?;
    let control = Control::new();
    let config = |checkpointing| TrainConfig {
        checkpointing,
        method: MtpConfig { train_mask_embeddings: true, ..small_config(12).method },
        ..small_config(12)
    };
    let mut runs = Vec::new();
    for (name, c) in [("off", Checkpointing::Off), ("on", Checkpointing::On)] {
        let mut events = Vec::new();
        let summary = mtp_core::train::train(
            &m,
            &config(c),
            &tmp.path().join(name),
            &mut |e: &TrainEvent| events.push(e.clone()),
            &control,
        )?;
        let used = events.iter().find_map(|e| match e {
            TrainEvent::Prepared { checkpointing, .. } => Some(*checkpointing),
            _ => None,
        });
        assert_eq!(used, Some(c == Checkpointing::On));
        runs.push((train_losses(&events), MtpAdapter::load(&summary.adapter, &m.model)?));
    }
    let ((off_losses, off), (on_losses, on)) = (&runs[0], &runs[1]);
    for ((step, x), (_, y)) in off_losses.iter().zip(on_losses) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "step {step}: {x} vs {y}");
    }
    for ((name, a), (_, b)) in off.named_tensors().iter().zip(on.named_tensors()) {
        let diff = (a - &b).abs().max().double_value(&[]);
        assert!(diff <= 1e-4, "{name}: weights differ by {diff}");
    }
    Ok(())
}

#[test]
fn stop_leaves_a_resumable_checkpoint() -> anyhow::Result<()> {
    let m = load("llama")?;
    let tmp = tempfile::tempdir()?;
    let control = Control::new();
    let stopper = control.clone();
    let mut seen = 0;
    let summary = mtp_core::train::train(
        &m,
        &small_config(30),
        tmp.path(),
        &mut |e: &TrainEvent| {
            if matches!(e, TrainEvent::Step(_)) {
                seen += 1;
                if seen == 7 {
                    stopper.cancel();
                }
            }
        },
        &control,
    )?;
    assert_eq!(summary.outcome, mtp_core::train::Outcome::Stopped);
    assert_eq!(summary.step, 7);
    let run = mtp_core::train::RunDir(tmp.path().to_owned());
    assert_eq!(run.latest_checkpoint().map(|c| c.0), Some(7));
    let (_, resumed) = mtp_core::train::resume(&m, tmp.path(), None, &mut (), &Control::new())?;
    assert_eq!((resumed.outcome, resumed.step), (mtp_core::train::Outcome::Finished, 30));
    Ok(())
}

/// A new run that fails before its first step (here: a dataset with no usable example)
/// leaves its folder as it found it: a file already there stays, what the run wrote goes,
/// a folder it made goes, and a retry with good data starts in the same place.
#[test]
fn a_run_that_fails_before_its_first_step_leaves_nothing() -> anyhow::Result<()> {
    let m = load("llama")?;
    let tmp = tempfile::tempdir()?;
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "")?;
    let bad = TrainConfig { data: empty.display().to_string().parse::<DataSource>()?, ..small_config(3) };
    // A folder the run makes, and one that holds a file of the user's.
    let made = tmp.path().join("made");
    let kept = tmp.path().join("kept");
    std::fs::create_dir(&kept)?;
    std::fs::write(kept.join("notes.txt"), "mine")?;
    for dir in [&made, &kept] {
        let failed = mtp_core::train::train(&m, &bad, dir, &mut (), &Control::new());
        assert!(failed.is_err(), "a run on an empty dataset started");
    }
    assert!(!made.exists(), "the run's folder was left behind");
    let left: Vec<_> = std::fs::read_dir(&kept)?.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
    let summary = mtp_core::train::train(&m, &small_config(3), &made, &mut (), &Control::new())?;
    assert_eq!((summary.outcome, summary.step), (mtp_core::train::Outcome::Finished, 3));
    Ok(())
}

#[test]
fn adapters_round_trip_and_refuse_another_base() -> anyhow::Result<()> {
    let m = load("llama")?;
    let a = busy_adapter(&m, MtpConfig { k: 3, train_mask_embeddings: true, ..MtpConfig::default() })?;
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("adapter.safetensors");
    a.save(&path)?;
    let b = MtpAdapter::load(&path, &m.model)?;
    assert_eq!(b.config, a.config);
    for ((n1, t1), (n2, t2)) in a.named_tensors().iter().zip(b.named_tensors()) {
        assert_eq!(n1, &n2);
        assert!(t1.equal(&t2), "{n1}");
    }
    let other = load("llama-sharded")?;
    let err = MtpAdapter::load(&path, &other.model).expect_err("other base").to_string();
    assert!(err.contains("not for the loaded model") && err.contains("adapter.safetensors"), "{err}");
    Ok(())
}

/// Same architecture, other weights (a base model's adapter on its instruct variant): refused
/// with a message naming both, loaded when allowed; the same weights in bf16 are accepted,
/// and an adapter written before weights were sampled still loads.
#[test]
fn adapters_refuse_other_weights_of_their_architecture() -> anyhow::Result<()> {
    let m = load("llama")?;
    let mut a = busy_adapter(&m, MtpConfig { k: 2, ..MtpConfig::default() })?;
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("adapter.safetensors");
    a.save(&path)?;
    let bf16 = LoadedModel::load(
        &ModelSource::Local { path: model_dir("llama") },
        &LoadOptions { dtype: DType::Bf16, ..LoadOptions::default() },
        &mut (),
    )?;
    MtpAdapter::load(&path, &bf16.model)?;
    // Another checkpoint of the same architecture: every weight 5% larger.
    let other_dir = scratch_copy("llama")?;
    let weights = other_dir.path().join("model.safetensors");
    let nudged: Vec<(String, Tensor)> =
        Tensor::read_safetensors(&weights)?.into_iter().map(|(n, t)| (n, &t * 1.05)).collect();
    Tensor::write_safetensors(&nudged, &weights)?;
    let other =
        LoadedModel::load(&ModelSource::Local { path: other_dir.path().to_owned() }, &LoadOptions::default(), &mut ())?;
    let check = mtp_core::mtp::BaseCheck { model_name: "nudged".into(), allow_other_weights: false };
    match MtpAdapter::load_checked(&path, &other.model, &check) {
        Err(mtp_core::Error::OtherBase(msg)) => {
            assert!(
                msg.contains("`fixture`") && msg.contains("`nudged`") && msg.contains("adapter.safetensors"),
                "{msg}"
            )
        }
        other => anyhow::bail!("expected OtherBase, got {other:?}"),
    }
    let allowed = mtp_core::mtp::BaseCheck { allow_other_weights: true, ..check };
    MtpAdapter::load_checked(&path, &other.model, &allowed)?;
    // Written before the weight sample existed: loads (with a warning).
    a.base.weights = None;
    a.save(&path)?;
    MtpAdapter::load(&path, &other.model)?;
    Ok(())
}

#[test]
fn losses_are_finite_and_slot_accuracy_is_per_slot() -> anyhow::Result<()> {
    let m = load("qwen2")?;
    let a = mtp_core::device::seeded(0, || {
        MtpAdapter::new(&m.model, MtpConfig { k: 3, ..MtpConfig::default() }, "fixture")
    })?;
    let ids: Vec<i64> = reference("qwen2")?.logits_input_ids;
    let layout = collate(
        &[build_layout(&Tensor::from_slice(&ids), &Tensor::ones([ids.len() as i64], (Kind::Bool, Device::Cpu)), 3)],
        Device::Cpu,
    );
    let l = loss::compute(&m.model, &a, &layout, loss::Lcm { weight: 1.0, reduction: loss::LcmReduction::Mean });
    let v = l.values()?;
    assert!(v.loss.is_finite() && v.loss_base > 0.0 && v.loss_sampler > 0.0 && v.loss_lcm > 0.0, "{v:?}");
    assert_eq!(v.slot_acc.len(), 3);
    assert!((v.loss - (v.loss_base + v.loss_sampler + v.loss_lcm)).abs() < 1e-4);
    // Gradients reach LoRA B and the sampler but not the frozen mask embeddings. The default
    // sampler is the residual form, whose output matrix starts at zero: at the first step
    // only that matrix gets a gradient, and the layers before it none yet.
    assert_eq!(a.config.sampler_form, mtp_core::mtp::SamplerForm::Residual);
    l.total.backward();
    for (name, t) in a.named_tensors() {
        let has_grad = t.grad().defined() && t.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0;
        match name.as_str() {
            "mask_embeddings" => assert!(!t.requires_grad(), "mask embeddings are frozen by default"),
            n if n.ends_with(".B") || n.starts_with("sampler.out") => assert!(has_grad, "{n} got no gradient"),
            n if n.starts_with("sampler") => assert!(!has_grad, "{n} got a gradient through a zero matrix"),
            _ => {}
        }
    }
    let _ = DType::F32;
    Ok(())
}

/// The heads' cross-entropy made a chunk of rows at a time (training never holds the
/// `[rows, vocab]` logits) equals libtorch's over all the logits at once: the mean loss,
/// each row's top-1 against its label, and the gradient that reaches the hidden states,
/// with chunks of 5 rows, one row, and all of them.
#[test]
fn chunked_head_loss_equals_the_whole_logits_cross_entropy() -> anyhow::Result<()> {
    let m = load("llama")?;
    let (vocab, d) = (m.model.config.vocab_size as i64, m.model.config.hidden_size as i64);
    tch::manual_seed(11);
    let h0 = Tensor::randn([37, d], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(vocab, [37], (Kind::Int64, Device::Cpu));
    let whole = {
        let h = h0.copy().set_requires_grad(true);
        let logits = m.model.logits(&h);
        let loss = logits.cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Mean, -100, 0.0);
        let top = logits.argmax(-1, false).eq_tensor(&labels);
        (&loss * 3.0).backward();
        (loss.double_value(&[]), top, h.grad())
    };
    for rows in [5, 1, 37] {
        let h = h0.copy().set_requires_grad(true);
        let (loss, top) = loss::head_cross_entropy(&m.model, &h, &labels, rows * vocab);
        (&loss * 3.0).backward();
        let value = loss.double_value(&[]);
        assert!((value - whole.0).abs() <= 1e-6 * whole.0.abs(), "{rows} rows: {value} against {}", whole.0);
        assert!(top.equal(&whole.1), "{rows} rows: top-1s differ");
        let diff = (h.grad() - &whole.2).abs().max().double_value(&[]);
        let scale = whole.2.abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * scale, "{rows} rows: gradient differs by {diff} at scale {scale}");
    }
    // Without a gradient (validation): the same value, nothing attached.
    let (loss, _) = tch::no_grad(|| loss::head_cross_entropy(&m.model, &h0, &labels, 5 * vocab));
    assert!(!loss.requires_grad());
    assert!((loss.double_value(&[]) - whole.0).abs() <= 1e-6 * whole.0.abs());
    Ok(())
}
