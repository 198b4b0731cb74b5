//! How long the UI thread takes per frame while the worker trains: the real app in a
//! headless egui_kittest harness (layout, tessellation, no GPU), on the Train tab with its
//! live plots, stepping frames as fast as it can for a few seconds of training.
//!
//! `cargo run --release -p mtp-app --example frame_budget [MODEL_DIR]`
//!
//! Prints frame-time percentiles and the frame rate they allow; docs/BENCHMARKS.md records
//! the numbers. The requirement: the window stays above 30 frames per second (33 ms).

use std::time::{Duration, Instant};

use egui_kittest::Harness;
use mtp_app::app::{Command, WorkbenchApp};
use mtp_app::state::{Persisted, Tab};

fn main() {
    let model = std::env::args().nth(1).unwrap_or_else(|| "demo".into());
    let mut p = Persisted::default();
    p.model.device = mtp_core::DeviceSpec::Cpu;
    p.tab = Tab::Train;
    p.data.source = "builtin:arith:2000".into();
    p.train.recipe.training.steps = 1_000_000;
    p.train.recipe.training.batch_size = 4;
    p.train.recipe.training.seq_len = 64;
    p.train.run_name = format!("frame-budget-{}", std::process::id());
    let mut h = Harness::builder()
        .with_size(egui::vec2(1280.0, 900.0))
        .with_accessibility_check(false)
        .allow_missing_glyphs()
        .build_eframe(move |cc| WorkbenchApp::new(&cc.egui_ctx, p, Some(&model)));
    if !h.state_mut().wait_idle(Duration::from_secs(120)) || h.state().runtime.model.is_none() {
        eprintln!("could not load the model: {:?}", h.state().runtime.errors);
        std::process::exit(1);
    }
    h.state_mut().execute(Command::StartTraining);
    // Let training get going (data prepared, first steps plotted).
    let warm = Instant::now();
    while h.state().runtime.live.as_ref().is_none_or(|l| l.train.len() < 3) && warm.elapsed() < Duration::from_secs(120)
    {
        h.step();
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut frames = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let t = Instant::now();
        h.step();
        frames.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let steps = h.state().runtime.live.as_ref().map_or(0, |l| l.train.len());
    h.state_mut().execute(Command::Cancel);
    let run_dir = h.state().runtime.live.as_ref().map(|l| l.dir.clone());
    drop(h);
    if let Some(dir) = run_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    frames.sort_by(f64::total_cmp);
    let pct = |q: f64| frames[((frames.len() - 1) as f64 * q) as usize];
    println!(
        "{} frames in 10 s while training ({steps} steps plotted): median {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms; p99 allows {:.0} frames/s",
        frames.len(),
        pct(0.5),
        pct(0.95),
        pct(0.99),
        pct(1.0),
        1000.0 / pct(0.99)
    );
}
