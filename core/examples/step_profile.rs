//! Where the time of one speculative step goes, against one AR step (default: the demo),
//! for each form of the adapter's term and arithmetic of its mask rows (the draft chain
//! with its head in int8 too; with and without AMX tiles where they run). The parts are
//! timed in turns, round after round, and the median of each counts (the machine is shared
//! and noisy); last, the whole int8 step
//! (forward, verification, chain) as the decoding loop runs it, its parts sharing the
//! caches, against the sum of its parts each run alone, and with its chain's head in f32.
//! `cargo run --release -p mtp-core --example step_profile [MASKS] [MODEL_DIR ADAPTER]`
//! With `STEP_PROFILE_ONLY=ar`, `=base` (the step without its adapter), `=bf16` (the step
//! with its mask rows in bf16), `=int8` (the low-rank step with its mask rows in int8),
//! `=merged-int8` (the merged step with its mask rows in int8, what `auto` runs on a small model;
//! `=merged-int8-one` the same with its rows on one thread, `model::row_split` off),
//! `=merged` (its adapter's weights merged) or `=step`: only
//! that part, 2,000 times in a loop (`STEP_PROFILE_CALLS=N`: N times, for a model whose step
//! takes tens of milliseconds), for `perf record`. `STEP_PROFILE_STAT=min`: the
//! fastest round of each part instead of the median. `STEP_PROFILE_PAST=N`: the cached
//! positions every step attends to (default 100). `STEP_PROFILE_ONLY=alt`: an AR step and
//! the merged int8 step in turns, 4,000 of each, and each one's mean (a step as it runs
//! after another kind of pass, not after itself).
use std::time::Instant;

use mtp_core::decode::speculative::{StepLayout, StepPlan};
use mtp_core::decode::{DraftArithmetic, DraftOptions, Drafter, Layout, LoraForm};
use mtp_core::model::{AttnMask, KvCache, Llama};
use mtp_core::mtp::MtpAdapter;
use mtp_core::{LoadOptions, LoadedModel, ModelSource};
use tch::{Kind, Tensor};

/// Named parts, each timed once per round; medians in microseconds.
struct Rounds<'a> {
    parts: Vec<(String, Box<dyn FnMut() + 'a>)>,
}

impl<'a> Rounds<'a> {
    fn add(&mut self, label: &str, f: impl FnMut() + 'a) {
        // `STEP_PROFILE_ONLY=<text>`: time only the parts whose label holds it (for a profiler).
        if std::env::var("STEP_PROFILE_ONLY").is_ok_and(|only| !label.contains(&only)) {
            self.parts.push((label.to_owned(), Box::new(|| {})));
            return;
        }
        self.parts.push((label.to_owned(), Box::new(f)));
    }

    fn run(mut self, rounds: usize, calls: usize) -> Vec<(String, f64)> {
        for (_, f) in &mut self.parts {
            for _ in 0..3 {
                f();
            }
        }
        let mut times = vec![Vec::with_capacity(rounds); self.parts.len()];
        for _ in 0..rounds {
            for (i, (_, f)) in self.parts.iter_mut().enumerate() {
                let t = Instant::now();
                for _ in 0..calls {
                    f();
                }
                times[i].push(t.elapsed().as_secs_f64() * 1e6 / calls as f64);
            }
        }
        self.parts
            .into_iter()
            .zip(times)
            .map(|((label, _), mut t)| {
                t.sort_by(f64::total_cmp);
                // `STEP_PROFILE_STAT=min`: the fastest round (when other work on the machine
                // comes and goes, the median moves with it).
                let min = std::env::var("STEP_PROFILE_STAT").is_ok_and(|s| s == "min");
                (label, if min { t[0] } else { t[t.len() / 2] })
            })
            .collect()
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let masks: usize = args.get(1).map_or(Ok(2), |s| s.parse())?;
    let source = args.get(2).map_or(Ok(ModelSource::Demo), |s| s.parse())?;
    let adapter_path = args.get(3).map_or_else(mtp_core::source::demo_adapter, std::path::PathBuf::from);
    let loaded = LoadedModel::load(&source, &LoadOptions::default(), &mut ())?;
    let model = &loaded.model;
    let adapter = MtpAdapter::load(&adapter_path, model)?;
    let drafter =
        |lora, arithmetic| Drafter::new(model, &adapter, DraftOptions { lora, arithmetic, ..DraftOptions::default() });
    let (low_rank, merged) =
        (drafter(LoraForm::LowRank, DraftArithmetic::Exact)?, drafter(LoraForm::Merged, DraftArithmetic::Exact)?);
    let low_rank_bf16 = drafter(LoraForm::LowRank, DraftArithmetic::Bf16)?;
    let merged_bf16 = drafter(LoraForm::Merged, DraftArithmetic::Bf16)?;
    let (low_rank_int8, merged_int8) =
        (drafter(LoraForm::LowRank, DraftArithmetic::Int8)?, drafter(LoraForm::Merged, DraftArithmetic::Int8)?);
    let auto = LoraForm::Auto.resolve(model, adapter.config.gated);
    let _g = tch::no_grad_guard();
    // `STEP_PROFILE_PAST=N`: the cached positions each step attends to (default 100).
    let past: usize = std::env::var("STEP_PROFILE_PAST").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let prompt = Tensor::arange(past as i64, (Kind::Int64, tch::Device::Cpu))
        .remainder(model.config.vocab_size as i64)
        .unsqueeze(0);
    let new_cache = || -> KvCache {
        let mut cache = model.new_cache(past + 300);
        let _ = model.forward(&prompt, Some(&mut cache));
        cache
    };
    let plan = |d: &Drafter| StepPlan::new(model, d, StepLayout::new(Layout::Quadratic, masks, masks));
    let (plan_lr, plan_mg, plan_bf) = (plan(&low_rank)?, plan(&merged)?, plan(&low_rank_bf16)?);
    let plan_mb = plan(&merged_bf16)?;
    let (plan_li, plan_mi) = (plan(&low_rank_int8)?, plan(&merged_int8)?);
    let n = masks as i64 + 1;
    let inputs = Tensor::full([n], 5, (Kind::Int64, tch::Device::Cpu));
    let tok = Tensor::from_slice(&[5i64]).unsqueeze(0);

    let mut caches: Vec<KvCache> = (0..18).map(|_| new_cache()).collect();
    let mut it = caches.iter_mut();
    let mut next = || it.next().ok_or_else(|| anyhow::anyhow!("caches"));
    let (c1, c2, c3, c4, c5, c6) = (next()?, next()?, next()?, next()?, next()?, next()?);
    let (c7, c8, c9, c10) = (next()?, next()?, next()?, next()?);
    let (c11, c12, c13, c14, c15) = (next()?, next()?, next()?, next()?, next()?);
    let (c16, c17, c18) = (next()?, next()?, next()?);
    let ar = |model: &Llama, cache: &mut KvCache| {
        let h = model.forward_embeds(
            &model.embed(&tok),
            &Tensor::from_slice(&[past as i64]),
            AttnMask::Causal,
            None,
            Some(cache),
        );
        let _ = model.logits(&h).argmax(-1, false).int64_value(&[0]);
        cache.truncate(past);
    };
    let step = |d: &Drafter, plan: &StepPlan, cache: &mut KvCache, adapter: bool| {
        let gated = d.step_gate(plan);
        let base = mtp_core::model::Gated { delta: &NoDelta, gate: mtp_core::model::Gate::All };
        let h = plan.forward(model, if adapter { &gated } else { &base }, &inputs, None, past, Some(cache));
        cache.truncate(past);
        h
    };
    let h = step(&low_rank, &plan_lr, c1, true);
    let z = h.narrow(0, n, masks as i64);
    let prev = Tensor::from_slice(&[5i64]);
    let block_rows = plan_lr.block_rows.shallow_clone();

    // An AR step and the merged int8 step in turns: each after the other kind of pass.
    if std::env::var("STEP_PROFILE_ONLY").is_ok_and(|o| o == "alt") {
        let (mut ta, mut ts) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        for _ in 0..4000 {
            let t = std::time::Instant::now();
            ar(model, c1);
            ta += t.elapsed();
            let t = std::time::Instant::now();
            drop(step(&merged_int8, &plan_mi, c3, true));
            ts += t.elapsed();
        }
        println!("alt: ar {:?}, merged-int8 {:?}", ta / 4000, ts / 4000);
        return Ok(());
    }
    // For a sampling profiler (`perf record`): only the AR step, the step without its
    // adapter or the low-rank step, 2,000 times, then the mean time of one.
    if let Ok(only) = std::env::var("STEP_PROFILE_ONLY") {
        let t = std::time::Instant::now();
        let calls: u32 = std::env::var("STEP_PROFILE_CALLS").ok().and_then(|c| c.parse().ok()).unwrap_or(2000);
        for _ in 0..calls {
            match only.as_str() {
                "ar" => ar(model, c1),
                "base" => drop(step(&low_rank, &plan_lr, c3, false)),
                "bf16" => drop(step(&low_rank_bf16, &plan_bf, c3, true)),
                "int8" => drop(step(&low_rank_int8, &plan_li, c3, true)),
                "merged" => drop(step(&merged, &plan_mg, c3, true)),
                "merged-int8" => drop(step(&merged_int8, &plan_mi, c3, true)),
                "merged-int8-one" => {
                    mtp_core::model::row_split::split_rows(false);
                    drop(step(&merged_int8, &plan_mi, c3, true))
                }
                _ => drop(step(&low_rank, &plan_lr, c3, true)),
            }
        }
        println!("{only}: {:?} a call", t.elapsed() / calls);
        return Ok(());
    }
    let drafts: Vec<i64> = vec![5; n as usize - 1];
    let mut r = Rounds { parts: Vec::new() };
    r.add("AR step (forward + head + argmax)", || ar(model, c1));
    r.add("step forward, no adapter (one sequence)", || {
        let _ = step(&low_rank, &plan_lr, c2, false);
    });
    r.add("step forward, low-rank adapter", || {
        let _ = step(&low_rank, &plan_lr, c3, true);
    });
    r.add("step forward, merged weights", || {
        let _ = step(&merged, &plan_mg, c4, true);
    });
    // Verification and drafting as a greedy step runs them: on host vectors where the
    // CPU's few-row kernel runs, else on the device.
    let on_host = mtp_core::model::linear::few_row_kernel_runs(model.device(), model.dtype().kind());
    r.add("verify (head + argmax + accept)", || {
        let pred = model.logits(&h.narrow(0, 0, n)).argmax(-1, false);
        if on_host {
            let pred = Vec::<i64>::try_from(pred).unwrap_or_default();
            let v = mtp_core::decode::verify::verify_greedy(&drafts, &pred);
            let _ = h.narrow(0, n + (v.accepted as i64) * masks as i64, masks as i64);
        } else {
            let (a, _next) = mtp_core::decode::verify::verify_greedy_on_device(&inputs.narrow(0, 1, n - 1), &pred);
            let _ = h.index_select(0, &block_rows.index_select(0, &a).view([-1]));
        }
    });
    r.add("draft chain", || {
        if !on_host || low_rank.greedy_on_host(model, &z, 5, false).ok().flatten().is_none() {
            let _ = low_rank.greedy(model, &z, &prev, None);
        }
    });
    r.add("AR step again", || ar(model, c5));
    r.add("draft chain, tensor operations (for comparison)", || {
        let _ = low_rank.greedy(model, &z, &prev, None);
    });
    r.add("step forward, low-rank, mask rows in bf16", || {
        let _ = step(&low_rank_bf16, &plan_bf, c6, true);
    });
    // The same two with libtorch's attention kernel in place of ours (few_queries).
    let libtorch = |f: &mut dyn FnMut()| {
        mtp_core::model::few_queries::set_enabled(false);
        f();
        mtp_core::model::few_queries::set_enabled(true);
    };
    r.add("AR step, libtorch's attention", || libtorch(&mut || ar(model, c7)));
    r.add("step forward, merged, libtorch's attention", || {
        libtorch(&mut || drop(step(&merged, &plan_mg, c8, true)));
    });
    r.add("step forward, merged, mask rows in bf16", || {
        let _ = step(&merged_bf16, &plan_mb, c9, true);
    });
    // Merged weights with the mask rows in the dot form, where panels would take them
    // (`model::panels`).
    r.add("step forward, merged, mask rows without panels", || {
        mtp_core::model::panels::set_enabled(false);
        drop(step(&merged, &plan_mg, c10, true));
        mtp_core::model::panels::set_enabled(true);
    });
    r.add("step forward, low-rank, mask rows in int8", || {
        let _ = step(&low_rank_int8, &plan_li, c11, true);
    });
    r.add("step forward, merged, mask rows in int8", || {
        let _ = step(&merged_int8, &plan_mi, c12, true);
    });
    r.add("draft chain, int8 head", || {
        if !on_host || low_rank_int8.greedy_on_host(model, &z, 5, false).ok().flatten().is_none() {
            let _ = low_rank_int8.greedy(model, &z, &prev, None);
        }
    });
    // The whole greedy int8 step as the decoding loop runs it (forward, verification, the
    // chain of `chain`), so that its parts share the caches as they do there.
    let whole = |chain: &Drafter, cache: &mut KvCache| {
        let h = step(&low_rank_int8, &plan_li, cache, true);
        let pred = model.logits(&h.narrow(0, 0, n)).argmax(-1, false);
        if on_host {
            let pred = Vec::<i64>::try_from(pred).unwrap_or_default();
            let v = mtp_core::decode::verify::verify_greedy(&drafts, &pred);
            let z = h.narrow(0, n + (v.accepted as i64) * masks as i64, masks as i64);
            let _ = chain.greedy_on_host(model, &z, 5, false);
        }
    };
    r.add("whole step, int8 (forward + verify + chain)", || whole(&low_rank_int8, c13));
    // The same with the exact drafter's chain (its head in f32), to weigh the int8 head
    // where the parts share the caches.
    r.add("whole step, int8 rows, f32 chain", || whole(&low_rank, c14));
    // The whole int8 step with its mask rows through `vpdpbusd` where AMX tiles would run.
    r.add("whole step, int8, no AMX tiles", || {
        mtp_core::model::int8::use_amx(false);
        whole(&low_rank_int8, c15);
        mtp_core::model::int8::use_amx(true);
    });
    // The same two with the step's rows on one thread (`model::row_split` off).
    let one_thread = |f: &mut dyn FnMut()| {
        mtp_core::model::row_split::split_rows(false);
        f();
        mtp_core::model::row_split::split_rows(true);
    };
    r.add("step forward, merged int8, rows on one thread", || {
        one_thread(&mut || drop(step(&merged_int8, &plan_mi, c16, true)));
    });
    r.add("whole step, int8, rows on one thread", || one_thread(&mut || whole(&low_rank_int8, c17)));
    // The threads that share the rows meeting both ways once a layer, where the one-way
    // meeting would apply.
    r.add("whole step, int8, threads meeting both ways", || {
        mtp_core::model::row_split::one_way_meetings(false);
        whole(&low_rank_int8, c18);
        mtp_core::model::row_split::one_way_meetings(true);
    });
    let results = r.run(15, 20);
    for (label, us) in &results {
        println!("{label:<45} {us:>10.1} us");
    }
    let get = |i: usize| results[i].1;
    let ar_us = (get(0) + get(6)) / 2.0;
    let rest = get(4) + get(5);
    let bf16 = match low_rank_bf16.bf16_min_rows() {
        Some(_) => format!(", mask rows in bf16 {:.2}", (get(8) + rest) / ar_us),
        None => String::new(),
    };
    println!(
        "libtorch's attention: AR step {:.1} us, merged step / AR step {:.2} (ours: {:.2}); merged, mask rows in bf16 {:.2}",
        get(9),
        (get(10) + rest) / get(9),
        (get(3) + rest) / ar_us,
        (get(11) + rest) / ar_us,
    );
    println!("merged without panels: step / AR step {:.2}", (get(12) + rest) / ar_us);
    if low_rank_int8.int8_min_rows().is_some() {
        // Verification, then the chain as the int8 drafter runs it.
        let rest_int8 = get(4) + if low_rank_int8.int8_head() { get(15) } else { get(5) };
        println!(
            "mask rows in int8: step / AR step low-rank {:.2}, merged {:.2}; with the chain's head in int8 {:.2}, {:.2}; \
             the low-rank step whole {:.2}",
            (get(13) + rest) / ar_us,
            (get(14) + rest) / ar_us,
            (get(13) + rest_int8) / ar_us,
            (get(14) + rest_int8) / ar_us,
            get(16) / ar_us,
        );
        println!("the whole step with the chain's head in f32 {:.2}", get(17) / ar_us);
        println!(
            "rows shared out between threads: the merged int8 step's forward {:.1} us (one thread {:.1}), \
             the low-rank int8 step whole {:.2} AR steps (one thread {:.2})",
            get(14),
            get(19),
            get(16) / ar_us,
            get(20) / ar_us,
        );
        if mtp_core::model::int8::amx_available() {
            println!("the whole step without AMX tiles {:.2} (with: {:.2})", get(18) / ar_us, get(16) / ar_us);
        }
    }
    println!(
        "{} masks, {} rows (merged: {}); step / AR step: low-rank {:.2}{bf16}, merged {:.2} (no adapter {:.2}; verify + draft {:.2}); auto = {auto}",
        masks,
        plan_lr.rows(),
        plan_mg.rows(),
        (get(2) + rest) / ar_us,
        (get(3) + rest) / ar_us,
        (get(1) + rest) / ar_us,
        rest / ar_us,
    );
    Ok(())
}

/// No term at all: the base model on the same rows.
struct NoDelta;

impl mtp_core::model::ProjDelta for NoDelta {
    fn add_to(
        &self,
        _: usize,
        _: mtp_core::model::ProjGroup,
        _: &Tensor,
        y: Tensor,
        _: &mtp_core::model::Gate,
    ) -> Tensor {
        y
    }
}
