//! The real app (not mock widgets) driven headless with egui_kittest on a fixture model:
//! open a project, load the model, train and stop, train to the end, race AR against
//! quadratic decoding and see the identical-outputs badge, step through decoding, bench,
//! probe; a snapshot of each tab; bad files become errors in the window; quitting during
//! training leaves a resumable checkpoint; self-distillation writes a dataset and selects it.
//! Every snapshot also checks that each widget has an accessible name.
//!
//! Snapshots are rendered by wgpu on Mesa's lavapipe (software Vulkan). Regenerate them
//! with `UPDATE_SNAPSHOTS=force cargo test -p mtp-app --test gui`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use mtp_app::app::WorkbenchApp;
use mtp_app::state::{Persisted, Tab};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("tests").join("fixtures").join("models").join(name)
}

/// A project folder whose model is the llama fixture.
fn project(dir: &Path) -> anyhow::Result<PathBuf> {
    let p = dir.join("proj");
    std::fs::create_dir_all(p.join("runs"))?;
    let model = fixture("llama").canonicalize()?;
    std::fs::write(
        p.join("project.toml"),
        format!("name = \"fixture\"\n\n[model]\nkind = \"local\"\npath = {:?}\n", model.to_string_lossy()),
    )?;
    Ok(p)
}

/// Small, fast settings for every form.
fn persisted() -> Persisted {
    let mut p = Persisted::default();
    p.model.device = mtp_core::DeviceSpec::Cpu;
    p.data.source = "builtin:arith:200".into();
    p.train.recipe.method.k = 2;
    p.train.recipe.method.lora.rank = 4;
    let t = &mut p.train.recipe.training;
    t.steps = 12;
    t.batch_size = 2;
    t.seq_len = 32;
    t.optim.lr = 3e-3;
    t.optim.warmup = 2;
    t.val_every = 4;
    t.checkpoint_every = 4;
    p.compare.prompt = "Question: Tom has 3 cards".into();
    p.compare.masks = 2;
    // A fixed count: auto chooses each step's count from measured times, so its drafts
    // (and the snapshot's struck-through rejections) vary from run to run.
    p.compare.auto_masks = false;
    p.compare.max_new_tokens = 24;
    // Exact mask rows: `auto` takes int8 or bf16 on CPUs that have them, and the snapshot's
    // struck-through rejected drafts would then depend on the CPU.
    p.model.draft_arithmetic = mtp_core::decode::DraftArithmetic::Exact;
    p.step.masks = 2;
    p.step.prompt = "def add(a, b):".into();
    p.bench.masks = "1,2".into();
    p.bench.max_new_tokens = 12;
    p.probe.prompt = "def add(a, b):".into();
    p.probe.continuation = "\n    return a + b".into();
    p
}

fn harness(project: &Path, persisted: Persisted) -> Harness<'static, WorkbenchApp> {
    let target = project.to_string_lossy().into_owned();
    Harness::builder()
        .with_size(egui::vec2(1280.0, 900.0))
        .with_accessibility_check(true)
        // Model text (the fixture's random tokens) holds characters no font covers; the app
        // itself sets the same policy.
        .allow_missing_glyphs()
        .build_eframe(move |cc| {
            let mut app = WorkbenchApp::new(&cc.egui_ctx, persisted, Some(&target));
            app.runtime.hide_timings = true;
            app
        })
}

/// Wait for the worker to go idle, then let the UI settle.
fn settle(h: &mut Harness<'static, WorkbenchApp>) {
    assert!(h.state_mut().wait_idle(Duration::from_secs(180)), "the worker did not finish in time");
    h.run_steps(4);
}

/// Step frames until `done` holds (or fail after `secs`).
fn until(h: &mut Harness<'static, WorkbenchApp>, secs: u64, what: &str, done: impl Fn(&WorkbenchApp) -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !done(h.state()) {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.run_steps(2);
}

fn tab(h: &mut Harness<'static, WorkbenchApp>, t: Tab) {
    h.get_by_label(t.title()).click();
    h.run_steps(3);
    assert_eq!(h.state().persisted.tab, t);
}

#[test]
fn main_flow_and_snapshots() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let proj = project(tmp.path())?;
    let mut h = harness(&proj, persisted());
    settle(&mut h);
    let mut snapshots = egui_kittest::SnapshotResults::new();

    // The project opened and its model loaded.
    assert!(h.state().runtime.project.as_ref().is_some_and(|p| p.name == "fixture"));
    assert!(h.state().runtime.errors.is_empty(), "{:?}", h.state().runtime.errors);
    h.get_by_label("115008 (0.12 M)");
    // The source field holds the fixture's absolute path, which differs per checkout.
    h.state_mut().persisted.model.source = "tests/fixtures/models/llama".into();
    h.run_steps(2);
    snapshots.add(h.try_snapshot("model"));

    // Data: the formatted preview.
    tab(&mut h, Tab::Data);
    h.get_by_label("Preview").click();
    h.run_steps(2);
    settle(&mut h);
    assert!(h.state().runtime.data.as_ref().is_some_and(|d| d.report.examples == 200 && !d.examples.is_empty()));
    snapshots.add(h.try_snapshot("data"));

    // Train: start, see metrics arrive, stop.
    tab(&mut h, Tab::Train);
    h.state_mut().persisted.train.run_name = "stopped".into();
    h.state_mut().persisted.train.recipe.training.steps = 200;
    h.get_by_label("Start training").click();
    until(&mut h, 120, "training metrics", |a| a.runtime.live.as_ref().is_some_and(|l| l.train.len() >= 3));
    // The run in progress is in the runs list (and the status bar says "training").
    assert_eq!(h.get_all_by_label("training").count(), 2);
    // The Data view previews while the worker trains (a thread of the window's own).
    tab(&mut h, Tab::Data);
    h.state_mut().runtime.data = None;
    h.get_by_label("Preview").click();
    until(&mut h, 60, "a preview while training", |a| a.runtime.data.is_some());
    assert!(h.state().runtime.data.as_ref().is_some_and(|d| d.report.examples == 200 && !d.examples.is_empty()));
    assert_eq!(h.state().runtime.job, Some(mtp_app::worker::Job::Train));
    tab(&mut h, Tab::Train);
    h.get_by_label("Stop").click();
    h.run_steps(2);
    settle(&mut h);
    let stopped = proj.join("runs").join("stopped");
    let step = mtp_core::train::RunDir(stopped.clone()).latest_checkpoint().map(|c| c.0);
    assert!(step.is_some_and(|s| (3..200).contains(&s)), "stopped run checkpoint: {step:?}");
    assert!(h.state().runtime.adapter.is_some(), "the stopped run's adapter is loaded");
    // Where it stopped depends on timing: dismiss the notice and remove the run before the
    // snapshots (the runs list at the bottom of the Train tab would show its step).
    h.get_by_label("OK").click();
    h.run_steps(2);
    std::fs::remove_dir_all(&stopped)?;

    // Train to the end (deterministic: the snapshot shows its curves).
    h.state_mut().persisted.train.run_name = "full".into();
    h.state_mut().persisted.train.recipe.training.steps = 12;
    h.get_by_label("Start training").click();
    h.run_steps(2);
    settle(&mut h);
    assert_eq!(h.state().runtime.live.as_ref().map(|l| l.train.len()), Some(12));
    assert_eq!(h.state().runtime.runs.len(), 1);
    snapshots.add(h.try_snapshot("train"));
    // A small window (1024 x 700) keeps the form and the charts within its width.
    h.set_size(egui::vec2(1024.0, 700.0));
    h.run_steps(3);
    snapshots.add(h.try_snapshot("train-small"));
    h.set_size(egui::vec2(1280.0, 900.0));
    h.run_steps(3);

    // Compare: the A/B race, greedy: identical outputs.
    tab(&mut h, Tab::Compare);
    h.get_by_label("Race").click();
    h.run_steps(2);
    settle(&mut h);
    let race = &h.state().runtime.race;
    assert!(race.lanes.iter().all(|l| l.done.is_some()), "both lanes finished");
    assert_eq!(race.identical(), Some(true));
    h.get_by_label("outputs identical");
    snapshots.add(h.try_snapshot("compare"));

    // Step: prefill, then two steps.
    tab(&mut h, Tab::Step);
    h.get_by_label("Start").click();
    until(&mut h, 60, "the prefill", |a| a.runtime.steps.len() == 1);
    // The prefill drafts from the mask block after the prompt: its two drafts and each
    // slot's top candidates are shown before the first step.
    let prefill = &h.state().runtime.steps[0];
    assert_eq!((prefill.next_drafts_text.len(), prefill.prefill_top.len()), (2, 2));
    h.get_by_label_contains("Top-5 of each mask slot after the prompt");
    for n in 2..=3 {
        h.get_by_label("Next step").click();
        until(&mut h, 60, "a step", |a| a.runtime.steps.len() == n);
    }
    assert!(h.state().runtime.steps.last().is_some_and(|s| s.detail.as_ref().is_some_and(|d| d.inputs.len() == 9)));
    snapshots.add(h.try_snapshot("step"));

    // Bench.
    tab(&mut h, Tab::Bench);
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"def f(x):\", \"domain\": \"code\"}\n{\"prompt\": \"Question: 2 + 2\", \"domain\": \"math\"}\n",
    )?;
    h.state_mut().persisted.bench.prompts = prompts.to_string_lossy().into_owned();
    h.get_by_label("Run benchmark").click();
    h.run_steps(2);
    settle(&mut h);
    let report = h
        .state()
        .runtime
        .bench
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no bench report: {:?}", h.state().runtime.errors))?;
    assert_eq!(report.rows.len(), 3 * 5);
    assert!(report.rows.iter().all(|r| r.identical));
    // The paper's tables, one per mode.
    h.get_by_label("quadratic: tokens per forward (speedup over AR)");
    h.get_by_label("linear: tokens per forward (speedup over AR)");
    // Why the acceptance is what it is, each finding a line.
    assert!(!report.findings.is_empty(), "no findings");
    h.get_by_label("Why this acceptance");
    h.get_by_label(report.findings[0].text.as_str());
    // The temporary path differs per run: show a stable one in the snapshot.
    h.state_mut().persisted.bench.prompts = "prompts.jsonl".into();
    h.run_steps(2);
    snapshots.add(h.try_snapshot("bench"));

    // Probe.
    tab(&mut h, Tab::Probe);
    h.get_by_label("Run probe").click();
    h.run_steps(2);
    settle(&mut h);
    assert!(h.state().runtime.probe.as_ref().is_some_and(|(r, _)| r.slots.len() == 3));
    snapshots.add(h.try_snapshot("probe"));

    assert!(h.state().runtime.errors.is_empty(), "{:?}", h.state().runtime.errors);
    Ok(())
}

#[test]
fn bad_files_become_errors_and_the_worker_survives() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let proj = project(tmp.path())?;
    let mut h = harness(&proj, persisted());
    settle(&mut h);

    // A dataset that does not exist, then one with only malformed lines.
    tab(&mut h, Tab::Data);
    h.state_mut().persisted.data.source = tmp.path().join("missing.jsonl").to_string_lossy().into_owned();
    h.get_by_label("Preview").click();
    h.run_steps(2);
    settle(&mut h);
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "not json\n{\"x\": 1}\n")?;
    h.state_mut().persisted.data.source = bad.to_string_lossy().into_owned();
    h.get_by_label("Preview").click();
    h.run_steps(2);
    settle(&mut h);

    // A broken model folder and a broken adapter file.
    tab(&mut h, Tab::Model);
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken)?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("llama").join(f), broken.join(f))?;
    }
    std::fs::write(broken.join("model.safetensors"), b"truncated")?;
    h.state_mut().persisted.model.source = broken.to_string_lossy().into_owned();
    h.get_by_label("Load model").click();
    h.run_steps(2);
    settle(&mut h);

    // The worker still works: the good model loads.
    h.state_mut().persisted.model.source = fixture("llama").to_string_lossy().into_owned();
    h.get_by_label("Load model").click();
    h.run_steps(2);
    settle(&mut h);
    assert!(h.state().runtime.model.is_some());

    // An adapter file that is not one, and a benchmark prompts file with a bad line.
    let not_adapter = tmp.path().join("not-an-adapter.safetensors");
    std::fs::write(&not_adapter, b"garbage")?;
    h.state_mut().persisted.model.adapter = not_adapter.to_string_lossy().into_owned();
    h.get_by_label("Load adapter").click();
    h.run_steps(2);
    settle(&mut h);
    tab(&mut h, Tab::Bench);
    let prompts = tmp.path().join("bad-prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"x\", \"domain\": \"code\"}\nnot json\n")?;
    h.state_mut().persisted.bench.prompts = prompts.to_string_lossy().into_owned();
    // The bench needs an adapter: the fixture's run from a quick training.
    let run = proj.join("runs").join("quick");
    let loaded = mtp_core::LoadedModel::from_folder(&fixture("llama"), &mtp_core::LoadOptions::default())?;
    let config = mtp_core::train::TrainConfig {
        model: mtp_core::ModelSource::Local { path: fixture("llama") },
        data: "builtin:arith:50".parse()?,
        training: mtp_core::train::LoopConfig {
            steps: 1,
            batch_size: 1,
            seq_len: 32,
            ..mtp_core::train::LoopConfig::default()
        },
        ..mtp_core::train::TrainConfig::default()
    };
    mtp_core::train::train(&loaded, &config, &run, &mut (), &mtp_core::train::Control::new())?;
    h.state_mut().persisted.model.adapter = run.join("adapter.safetensors").to_string_lossy().into_owned();
    h.state_mut().execute(mtp_app::app::Command::LoadAdapter);
    settle(&mut h);
    h.get_by_label("Run benchmark").click();
    h.run_steps(2);
    settle(&mut h);

    let errors = h.state().runtime.errors.clone();
    assert_eq!(errors.len(), 5, "{errors:?}");
    assert!(errors[0].contains("missing.jsonl"), "{errors:?}");
    assert!(errors[1].contains("no usable examples"), "{errors:?}");
    assert!(errors[2].contains("model.safetensors"), "{errors:?}");
    assert!(errors[3].contains("not-an-adapter.safetensors"), "{errors:?}");
    assert!(errors[4].contains("bad-prompts.jsonl") && errors[4].contains("line 2"), "{errors:?}");
    // Shown in the window.
    h.get_by_label_contains("missing.jsonl");
    h.get_by_label_contains("bad-prompts.jsonl");
    assert!(h.state().runtime.adapter.is_some());

    // An export that cannot be written (its folder would be inside a file) is an error in the
    // window, not a line on stderr; where no file dialog opens, a save goes to the project
    // folder and a file to open is typed into its field.
    use mtp_app::app::Pick;
    h.state_mut().picked(Pick::SaveRaceJson, bad.join("race.json"));
    until(&mut h, 10, "the failed export", |a| a.runtime.errors.len() == 6);
    assert!(h.state().runtime.errors[5].contains("bad.jsonl"), "{:?}", h.state().runtime.errors);
    h.state_mut().no_dialog(Pick::SaveRaceJson);
    until(&mut h, 10, "the export", |a| a.runtime.notices.iter().any(|n| n.starts_with("saved race-")));
    let saved = std::fs::read_dir(&proj)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("race-"));
    assert_eq!(saved.count(), 1);
    h.state_mut().no_dialog(Pick::DataFile);
    h.run_steps(2);
    assert!(h.state().runtime.errors[6].contains("Dataset field"), "{:?}", h.state().runtime.errors);
    Ok(())
}

#[test]
fn quitting_during_training_leaves_a_resumable_checkpoint() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let proj = project(tmp.path())?;
    let mut p = persisted();
    p.train.recipe.training.steps = 100_000;
    p.train.recipe.training.checkpoint_every = 100_000;
    p.train.run_name = "interrupted".into();
    p.tab = Tab::Train;
    let mut h = harness(&proj, p);
    settle(&mut h);
    h.get_by_label("Start training").click();
    until(&mut h, 120, "a few steps", |a| a.runtime.live.as_ref().is_some_and(|l| l.train.len() >= 2));
    // While it trains, no frame asks for the next one at once: a busy indicator that did
    // would have the window draw frames as fast as it can for as long as the run lasts (with
    // a software renderer, two thirds of a 2-core machine's training speed; BENCHMARKS.md).
    for _ in 0..3 {
        h.step();
        assert!(!h.ctx.requested_repaint_last_pass(), "{:?}", h.ctx.repaint_causes());
    }
    // Quit: the app is dropped (eframe calls on_exit, then drops it).
    drop(h);
    let run = proj.join("runs").join("interrupted");
    let (step, _) = mtp_core::train::RunDir(run.clone())
        .latest_checkpoint()
        .ok_or_else(|| anyhow::anyhow!("no checkpoint after quitting"))?;
    assert!(step >= 2);
    let loaded = mtp_core::LoadedModel::from_folder(&fixture("llama"), &mtp_core::LoadOptions::default())?;
    let (_, summary) =
        mtp_core::train::resume(&loaded, &run, Some(step + 2), &mut (), &mtp_core::train::Control::new())?;
    assert_eq!(summary.step, step + 2);

    // Opened again with the window's settings lost, the project starts with its newest run's
    // adapter; a restart with them saved loads it again.
    let adapter = Some(run.join("adapter.safetensors"));
    let mut h = harness(&proj, persisted());
    settle(&mut h);
    assert_eq!(h.state().runtime.adapter.as_ref().map(|a| a.path.clone()), adapter);
    let saved = h.state().persisted.clone();
    drop(h);
    let mut h = harness(&proj, saved);
    settle(&mut h);
    assert_eq!(h.state().runtime.adapter.as_ref().map(|a| a.path.clone()), adapter);
    assert!(h.state().runtime.errors.is_empty(), "{:?}", h.state().runtime.errors);
    Ok(())
}

#[test]
fn self_distill_writes_a_dataset_and_selects_it() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let proj = project(tmp.path())?;
    let mut p = persisted();
    p.data.distill_sequences = 9;
    p.data.distill_new_tokens = 5;
    let mut h = harness(&proj, p);
    settle(&mut h);
    tab(&mut h, Tab::Data);
    h.get_by_label("Self-distill").click();
    h.run_steps(2);
    settle(&mut h);
    let runtime = &h.state().runtime;
    assert!(runtime.errors.is_empty(), "{:?}", runtime.errors);
    let file = proj.join("data").join("distilled-1.jsonl");
    assert_eq!(h.state().persisted.data.source, file.display().to_string());
    assert_eq!(std::fs::read_to_string(&file)?.lines().count(), 9);
    // The new dataset was previewed: prompt + completion token ids, formatted by the model.
    let data = runtime.data.as_ref().expect("a preview of the distilled set");
    assert_eq!(data.report.examples, 9);
    assert_eq!(data.report.format, mtp_core::train::data::DataFormat::PromptCompletion);
    assert!(data.examples.iter().flatten().all(|e| e.iter().any(|t| t.target) && e.iter().any(|t| !t.target)));
    assert!(data.examples.iter().all(Result::is_ok));
    h.get_by_label_contains("distilled-1.jsonl");
    // A second one does not overwrite the first.
    h.get_by_label("Self-distill").click();
    h.run_steps(2);
    settle(&mut h);
    assert!(proj.join("data").join("distilled-2.jsonl").is_file());
    Ok(())
}
