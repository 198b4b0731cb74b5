//! Where the time of one speculative step goes, against one AR step (default: the demo).
//! `cargo run --release -p mtp-core --example step_profile [MASKS] [MODEL_DIR ADAPTER]`
use std::time::Instant;

use mtp_core::decode::speculative::{StepLayout, StepPlan};
use mtp_core::decode::{DraftOptions, Drafter, Layout};
use mtp_core::model::AttnMask;
use mtp_core::mtp::MtpAdapter;
use mtp_core::{LoadOptions, LoadedModel, ModelSource};
use tch::{Kind, Tensor};

/// The fastest of 7 rounds (the machine is shared and noisy): microseconds per call.
fn time(label: &str, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..10 {
        f();
    }
    let mut best = f64::INFINITY;
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..reps / 7 {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e6 / (reps / 7) as f64);
    }
    println!("{label:<40} {best:>9.1} us");
    best
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let masks: usize = args.get(1).map_or(Ok(2), |s| s.parse())?;
    let source = args.get(2).map_or(Ok(ModelSource::Demo), |s| s.parse())?;
    let adapter_path = args.get(3).map_or_else(mtp_core::source::demo_adapter, std::path::PathBuf::from);
    let loaded = LoadedModel::load(&source, &LoadOptions::default(), &mut ())?;
    let model = &loaded.model;
    let adapter = MtpAdapter::load(&adapter_path, model)?;
    let drafter = Drafter::new(model, &adapter, DraftOptions::default())?;
    let _g = tch::no_grad_guard();
    let past = 100i64;
    let mut cache = model.new_cache(400);
    let prompt = Tensor::arange(past, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0);
    let _ = model.forward(&prompt, Some(&mut cache));
    let reps = 300;
    let tok = Tensor::from_slice(&[5i64]).unsqueeze(0);
    let ar_step = |cache: &mut mtp_core::model::KvCache| {
        let positions = Tensor::from_slice(&[past]);
        let h = model.forward_embeds(&model.embed(&tok), &positions, AttnMask::Causal, None, Some(cache));
        let _ = model.logits(&h).argmax(-1, false).int64_value(&[0]);
        cache.truncate(past as usize);
    };
    let ar = time("AR step (forward + head + argmax)", reps, || ar_step(&mut cache));
    let pos1 = Tensor::from_slice(&[past]);
    time("AR forward only, causal", reps, || {
        let _ = model.forward_embeds(&model.embed(&tok), &pos1, AttnMask::Causal, None, Some(&mut cache));
        cache.truncate(past as usize);
    });
    time("AR forward + logits", reps, || {
        let h = model.forward_embeds(&model.embed(&tok), &pos1, AttnMask::Causal, None, Some(&mut cache));
        let _ = model.logits(&h);
        cache.truncate(past as usize);
    });
    time("AR forward + logits + argmax", reps, || {
        let h = model.forward_embeds(&model.embed(&tok), &pos1, AttnMask::Causal, None, Some(&mut cache));
        let _ = model.logits(&h).argmax(-1, false);
        cache.truncate(past as usize);
    });
    time("AR forward (fresh positions)", reps, || {
        let _ = model.forward_embeds(
            &model.embed(&tok),
            &Tensor::from_slice(&[past]),
            AttnMask::Causal,
            None,
            Some(&mut cache),
        );
        cache.truncate(past as usize);
    });
    let zero_mask = Tensor::zeros([1, past + 1], (Kind::Float, tch::Device::Cpu));
    time("AR forward only, additive mask", reps, || {
        let _ = model.forward_embeds(&model.embed(&tok), &pos1, AttnMask::Custom(&zero_mask), None, Some(&mut cache));
        cache.truncate(past as usize);
    });
    let h1 = model.forward_embeds(&model.embed(&tok), &pos1, AttnMask::Causal, None, None);
    time("LM head + argmax + read", reps, || {
        let _ = model.logits(&h1).argmax(-1, false).int64_value(&[0]);
    });
    let plan = StepPlan::new(model, &drafter, StepLayout::new(Layout::Quadratic, masks, masks));
    let n = masks as i64 + 1;
    let inputs = Tensor::full([n], 5, (Kind::Int64, tch::Device::Cpu));
    let x = || Tensor::cat(&[model.embed(&inputs.unsqueeze(0)), plan.mask_inputs.shallow_clone()], 1);
    let mask = || plan.own_mask.constant_pad_nd([past, 0]);
    let pos = || &plan.offsets + past;
    let run = |gated: bool, cache: &mut mtp_core::model::KvCache| {
        let g = drafter.gate_from(n);
        let h = model.forward_embeds(&x(), &pos(), AttnMask::Custom(&mask()), gated.then_some(&g), Some(cache));
        cache.truncate(past as usize);
        h
    };
    let fwd_base = time("quadratic forward, no adapter", reps, || {
        let _ = run(false, &mut cache);
    });
    let fwd = time("quadratic forward, adapter", reps, || {
        let _ = run(true, &mut cache);
    });
    let h = run(true, &mut cache).squeeze_dim(0);
    let head = time("verify (head + argmax + accept)", reps, || {
        let pred = model.logits(&h.narrow(0, 0, n)).argmax(-1, false);
        let (a, _next) = mtp_mtp_verify(&inputs.narrow(0, 1, n - 1), &pred);
        let _ = h.index_select(0, &plan.block_rows.index_select(0, &a).view([-1]));
    });
    let z = h.narrow(0, n, masks as i64);
    let prev = Tensor::from_slice(&[5i64]);
    let draft = time("draft chain", reps, || {
        let _ = drafter.greedy(model, &z, &prev, None);
    });
    let ar2 = time("AR step again", reps, || ar_step(&mut cache));
    let ar = ar.min(ar2);
    println!(
        "ratio: forward {:.2} (no adapter {:.2}), + verify {:.2}, + draft {:.2} => {:.2}",
        fwd / ar,
        fwd_base / ar,
        head / ar,
        draft / ar,
        (fwd + head + draft) / ar
    );
    Ok(())
}

fn mtp_mtp_verify(drafts: &Tensor, pred: &Tensor) -> (Tensor, Tensor) {
    mtp_core::decode::verify::verify_greedy_on_device(drafts, pred)
}
