//! The eframe app. Each frame: drain worker events within a time budget, draw (views read
//! state and collect [`Command`]s), then execute the commands. Drawing never blocks, never
//! touches the disk, the worker or a tensor; file dialogs run on their own threads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use mtp_core::DeviceSpec;
use mtp_core::project::Project;

pub use crate::commands::{Command, Pick};
use crate::state::{Persisted, Runtime, Tab};
use crate::ui;
use crate::worker::{Event, Frames, Job, Wake, WorkerHandle};

/// Most time per frame spent draining worker events.
const EVENT_BUDGET: Duration = Duration::from_millis(6);
/// The app's name: the window's title and its data folder's (`~/.local/share/mtpworkbench`).
const APP_NAME: &str = "MTP Workbench";
/// eframe storage key of [`Persisted`] in versions before [`crate::settings`].
const STORAGE_KEY: &str = "mtp-workbench";
/// A change to [`Persisted`] (a form, the adapter in use, the project) is saved this soon
/// after it, not only when the window closes: a killed window keeps it.
const SAVE_AFTER: Duration = Duration::from_secs(1);

/// What the window's own threads (file dialogs, exports) report back.
#[derive(Debug)]
pub enum Background {
    /// A file or folder chosen in a dialog, with what it was chosen for.
    Picked(Pick, PathBuf),
    /// No dialog could open for this pick (it came back at once, empty).
    NoDialog(Pick),
    /// An export was written.
    Saved(PathBuf),
    /// An export failed.
    Failed(String),
    /// A data preview made beside a busy worker.
    DataPreview(Box<crate::worker::DataPreview>),
}

type BackgroundChannel = (Sender<Background>, Receiver<Background>);

/// The workbench.
pub struct WorkbenchApp {
    /// Forms and choices that survive restarts.
    pub persisted: Persisted,
    /// What this session learned from the worker.
    pub runtime: Runtime,
    pub(crate) worker: WorkerHandle,
    pub(crate) background: BackgroundChannel,
    /// Devices libtorch sees (read once at start).
    pub devices: Vec<DeviceSpec>,
    pub(crate) screenshot_pending: bool,
    /// What was last saved, and when.
    saved: Option<(Persisted, Instant)>,
    /// Saves [`Persisted`] (none in the tests, which leave the user's settings alone).
    pub(crate) saver: Option<crate::settings::Saver>,
    /// Whether a software renderer draws the window (on the CPU's cores), which the
    /// worker's wake-ups read ([`Wake::after`]).
    software_renderer: Arc<AtomicBool>,
    /// When frames start, for the worker ([`Frames`]).
    frames: Frames,
}

impl WorkbenchApp {
    /// Say whether a software renderer draws the window: then a race's events wait for the
    /// live refresh until it has finished ([`Wake::Race`]).
    pub fn set_software_renderer(&self, software: bool) {
        self.software_renderer.store(software, Ordering::Relaxed);
    }

    /// An app with `persisted` state, opened on `target` (a project folder or a model
    /// source; `None` keeps the persisted project). Loads the project's model at once.
    pub fn new(ctx: &egui::Context, persisted: Persisted, target: Option<&str>) -> Self {
        ui::theme::apply(ctx);
        // Model text can hold any character (a byte-level token may even be half of one):
        // draw a box for what no font covers rather than fail.
        ctx.set_missing_glyph_policy(egui::MissingGlyphPolicy::Tofu);
        let repaint = ctx.clone();
        // An event wakes the window within 33 ms, a job's progress or a run's metrics within
        // 250 ms, a race's tokens within 250 ms under a software renderer ([`Wake`]): a fast
        // stream (a race's tokens, a benchmark's or a run's progress) must not spend the CPU
        // on frames the worker needs.
        let software_renderer = Arc::new(AtomicBool::new(false));
        let software = software_renderer.clone();
        let frames = Frames::default();
        let worker = WorkerHandle::spawn(
            move |wake: Wake| repaint.request_repaint_after(wake.after(software.load(Ordering::Relaxed))),
            frames.clone(),
        );
        let mut app = Self {
            persisted,
            runtime: Runtime::default(),
            worker,
            background: unbounded(),
            devices: DeviceSpec::all_available(),
            screenshot_pending: false,
            software_renderer,
            frames,
            saved: None,
            saver: None,
        };
        if !app.devices.contains(&app.persisted.model.device) {
            app.persisted.model.device = DeviceSpec::Cpu;
        }
        match target {
            Some(t) if Project::is_project(Path::new(t)) => app.execute(Command::OpenProject(PathBuf::from(t))),
            Some(t) => {
                app.persisted.model.source = t.to_owned();
                app.execute(Command::LoadModel);
            }
            None => match app.persisted.project_dir.clone() {
                Some(dir) if Project::is_project(&dir) => app.execute(Command::OpenProject(dir)),
                _ => app.execute(Command::LoadModel),
            },
        }
        app
    }

    /// Drain worker events into the runtime state (at most `EVENT_BUDGET` per frame).
    pub fn drain_events(&mut self) {
        let start = Instant::now();
        while start.elapsed() < EVENT_BUDGET {
            let Some(event) = self.worker.try_recv() else { break };
            self.apply(event);
        }
        while let Ok(report) = self.background.1.try_recv() {
            match report {
                Background::Picked(pick, path) => self.picked(pick, path),
                Background::NoDialog(pick) => self.no_dialog(pick),
                Background::Saved(path) => {
                    let text = ui::path_text(&self.runtime, &path);
                    self.runtime.notices.retain(|n| n != &format!("saving {text}"));
                    self.runtime.notices.push(format!("saved {text}"));
                }
                Background::Failed(e) => self.runtime.errors.push(e),
                Background::DataPreview(p) => self.runtime.data = Some(*p),
            }
        }
    }

    fn apply(&mut self, event: Event) {
        let rt = &mut self.runtime;
        match event {
            Event::Started(job) => {
                rt.job = Some(job);
                rt.progress = None;
            }
            Event::Finished(_) => {
                rt.job = None;
                rt.progress = None;
                rt.paused = false;
            }
            Event::Failed(job, msg) => rt.errors.push(format!("{}: {msg}", job.name())),
            Event::Progress(_, msg, frac) => rt.progress = Some((msg, frac)),
            Event::ModelLoaded(summary) => {
                rt.model = Some(*summary);
                rt.adapter = None;
            }
            Event::AdapterLoaded(a) => {
                if let Some(m) = &rt.model {
                    self.persisted.remember_adapter(&m.source, &a.path);
                }
                self.persisted.compare.masks = self.persisted.compare.masks.clamp(1, a.config.k);
                self.persisted.step.masks = self.persisted.step.masks.clamp(1, a.config.k);
                rt.adapter = Some(a);
            }
            Event::DataPreview(p) => rt.data = Some(*p),
            Event::Distilled { path, sequences, new_tokens, seconds } => {
                let took = ui::timing(rt, format!("{seconds:.0} s"));
                rt.notices.push(format!(
                    "wrote {sequences} sequences ({new_tokens} tokens of the model's own output) in {took} to {}; \
                     it is now the dataset",
                    ui::path_text(rt, &path)
                ));
                self.persisted.data.source = path.display().to_string();
                self.execute(Command::PreviewData);
            }
            Event::Train(e) => {
                let e = *e;
                match &e {
                    mtp_core::train::TrainEvent::Prepared { total_steps, checkpointing, memory_estimate, .. } => {
                        if let Some(live) = &mut rt.live {
                            live.total_steps = *total_steps;
                        }
                        if *checkpointing {
                            rt.notices.push(format!(
                                "training with activation checkpointing (memory estimate {})",
                                memory_estimate.map_or("-".into(), mtp_core::inspect::human_bytes)
                            ));
                        }
                        rt.train_log.push(e.clone());
                    }
                    mtp_core::train::TrainEvent::Step(m) | mtp_core::train::TrainEvent::Validation(m) => {
                        if let Some(live) = &mut rt.live {
                            live.push(m.clone());
                        }
                    }
                    mtp_core::train::TrainEvent::Checkpoint { .. } => rt.train_log.push(e.clone()),
                }
            }
            Event::TrainDone { run_dir, step, stopped, adapter_loaded } => {
                let what = if stopped { "stopped" } else { "finished" };
                let name = run_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
                let adapter = if adapter_loaded {
                    "its adapter is loaded"
                } else {
                    "the adapter in use stays (Use in the Runs list loads this run's)"
                };
                rt.notices.push(format!("run {name} {what} at step {step}; {adapter}"));
                self.execute(Command::RefreshRuns);
            }
            Event::Runs(runs) => rt.runs = runs,
            Event::RaceToken(lane, token) => {
                let l = &mut rt.race.lanes[lane];
                l.started.get_or_insert_with(Instant::now);
                l.tokens.push(token);
            }
            Event::RaceStep(lane, stats, texts) => {
                let l = &mut rt.race.lanes[lane];
                let at = l.tokens.len().saturating_sub(1);
                for t in texts {
                    l.rejected.push((at, t, stats.step));
                }
                l.steps.push(stats);
            }
            Event::RaceDone(lane, done) => rt.race.lanes[lane].done = Some(done),
            Event::Step(view) => {
                if view.step == 0 {
                    rt.steps.clear();
                }
                rt.steps.push(*view);
            }
            Event::Bench(report) => rt.bench = Some(*report),
            Event::Probe(report, texts, adapter) => {
                rt.probe = Some((*report, texts));
                rt.probe_adapter = Some(adapter);
            }
            Event::Notice(text) => rt.notices.push(text),
            Event::Exported { dir, tensors } => rt.notices.push(format!(
                "wrote a PEFT LoRA ({tensors} tensors) to {}: SGLang and vLLM serve it with UNO decoding (README)",
                ui::path_text(rt, &dir)
            )),
        }
    }

    /// Draw one frame (also used by the headless tests).
    pub fn draw(&mut self, ui: &mut egui::Ui) {
        let started = Instant::now();
        self.frames.mark();
        let mut commands = Vec::new();
        egui::Panel::bottom("status").show(ui, |ui| ui::status::show(ui, self, &mut commands));
        egui::Panel::left("projects")
            .resizable(true)
            .default_size(200.0)
            .show(ui, |ui| ui::sidebar::show(ui, &mut self.persisted, &self.runtime, &mut commands));
        egui::Panel::top("tabs").show(ui, |ui| {
            ui.horizontal(|ui| {
                for tab in Tab::ALL {
                    ui.selectable_value(&mut self.persisted.tab, tab, tab.title());
                }
            });
        });
        let view = egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical().auto_shrink(false).show(ui, |ui| match self.persisted.tab {
                Tab::Model => ui::model::show(ui, &mut self.persisted, &self.runtime, &self.devices, &mut commands),
                Tab::Data => ui::data::show(ui, &mut self.persisted, &self.runtime, &mut commands),
                Tab::Train => ui::train::show(ui, &mut self.persisted, &mut self.runtime, &mut commands),
                Tab::Compare => ui::compare::show(ui, &mut self.persisted, &self.runtime, &mut commands),
                Tab::Step => ui::step::show(ui, &mut self.persisted, &self.runtime, &mut commands),
                Tab::Bench => ui::bench::show(ui, &mut self.persisted, &self.runtime, &mut commands),
                Tab::Probe => ui::probe::show(ui, &mut self.persisted, &self.runtime, &mut commands),
            });
        });
        // The view's area: what an exported picture holds (not the sidebar or the status bar).
        let view = view.response.rect;
        // Errors and notices float above the views (bottom right): a message that appears
        // never moves the control under the pointer. A picture of the view is taken in a
        // frame without them.
        let shooting = self.screenshot_pending;
        if !shooting && (!self.runtime.errors.is_empty() || !self.runtime.notices.is_empty()) {
            egui::Area::new(egui::Id::unique("messages"))
                .anchor(egui::Align2::RIGHT_BOTTOM, egui::vec2(-12.0, -40.0))
                .order(egui::Order::Foreground)
                .show(ui.ctx(), |ui| {
                    egui::Frame::popup(ui.style()).show(ui, |ui| {
                        ui.set_max_width(620.0);
                        ui::messages(ui, &self.runtime, &mut commands);
                    });
                });
        }
        for c in commands {
            self.execute(c);
        }
        // The same error twice in a row (a button pressed again) is shown once.
        self.runtime.errors.dedup();
        if self.runtime.job.is_some() || self.runtime.race.lanes.iter().any(|l| l.started.is_some() && l.done.is_none())
        {
            // Live numbers (tokens/s, ETA) move with time, not only with events.
            ui.ctx().request_repaint_after(crate::worker::protocol::LIVE_REFRESH);
        }
        if shooting {
            self.handle_screenshot(ui.ctx(), view);
        } else if self.screenshot_pending {
            // Asked for in this frame, whose messages were drawn: the next one is taken.
            ui.ctx().request_repaint();
        }
        let rt = &mut self.runtime;
        rt.frame_times.push_back(started.elapsed().as_secs_f32());
        while rt.frame_times.len() > 120 {
            rt.frame_times.pop_front();
        }
    }

    /// Save a picture of the view in `area` (points) as a PNG in the project's folder.
    fn handle_screenshot(&mut self, ctx: &egui::Context, area: egui::Rect) {
        if !std::mem::take(&mut self.screenshot_pending) {
            return;
        }
        let pixels_per_point = ctx.pixels_per_point();
        let dir = self.persisted.project_dir.clone().unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("{}-{}.png", self.persisted.tab.title().to_lowercase(), file_stamp()));
        self.runtime.notices.push(format!("saving {}", ui::path_text(&self.runtime, &path)));
        let report = self.background.0.clone();
        ctx.request_screenshot(move |image| {
            // Encoding takes tens of milliseconds: not on the frame.
            std::thread::spawn(move || {
                let image = image.region(&area, Some(pixels_per_point));
                let [w, h] = image.size;
                let bytes: Vec<u8> = image.pixels.iter().flat_map(|c| c.to_array()).collect();
                let png = image::RgbaImage::from_raw(w as u32, h as u32, bytes)
                    .ok_or_else(|| "the screenshot has the wrong size".to_string())
                    .and_then(|img| {
                        let mut png = std::io::Cursor::new(Vec::new());
                        img.write_to(&mut png, image::ImageFormat::Png).map_err(|e| e.to_string())?;
                        Ok(png.into_inner())
                    });
                let written =
                    png.and_then(|png| mtp_core::fsutil::write_atomic(&path, &png).map_err(|e| format!("{e:#}")));
                let _ = report.send(match written {
                    Ok(()) => Background::Saved(path),
                    Err(e) => Background::Failed(format!("saving the picture {}: {e}", path.display())),
                });
            });
        });
    }

    /// Save [`Persisted`] when it changed, at most every [`SAVE_AFTER`] (an idle window
    /// draws no frames: one is asked for when a change waits).
    fn save_changes(&mut self, ctx: &egui::Context) {
        let Some(saver) = &self.saver else { return };
        let last = self.saved.as_ref().map(|(p, at)| (p == &self.persisted, at.elapsed()));
        match last {
            Some((true, _)) => {}
            Some((false, since)) if since < SAVE_AFTER => ctx.request_repaint_after(SAVE_AFTER - since),
            _ => {
                saver.save(&self.persisted);
                self.saved = Some((self.persisted.clone(), Instant::now()));
            }
        }
    }

    /// The running job, if any.
    pub fn job(&self) -> Option<Job> {
        self.runtime.job
    }

    /// Block until the worker is idle or `timeout` passes, applying events (tests).
    pub fn wait_idle(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            while let Some(e) = self.worker.try_recv() {
                self.apply(e);
            }
            if !self.runtime.busy() {
                // A request may still be queued: give the worker a moment to pick it up (a
                // race starts after a pause in the frames, `worker::RACE_QUIET`).
                match self.worker.recv_timeout(crate::worker::RACE_QUIET + Duration::from_millis(50)) {
                    Some(e) => self.apply(e),
                    None => return true,
                }
            } else if let Some(e) = self.worker.recv_timeout(Duration::from_millis(20)) {
                self.apply(e);
            }
            if Instant::now() > end {
                return false;
            }
        }
    }
}

impl eframe::App for WorkbenchApp {
    fn logic(&mut self, _ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.drain_events();
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.draw(ui);
        self.save_changes(ui.ctx());
    }

    fn on_exit(&mut self) {
        // A training run stops at its next step and writes a checkpoint before the worker
        // is joined (WorkerHandle's drop).
        self.worker.cancel();
        if let Some(saver) = &mut self.saver {
            saver.save(&self.persisted);
            saver.finish();
        }
    }
}

/// Now, local time, for the names of new runs and exports (`2026-12-01-010733`): they sort
/// by time and say when.
pub(crate) fn file_stamp() -> String {
    chrono::Local::now().format("%Y-%m-%d-%H%M%S").to_string()
}

/// Where new projects go: `projects/` of the source tree (or `$MTP_PROJECTS`).
pub fn projects_root() -> PathBuf {
    std::env::var_os("MTP_PROJECTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| mtp_core::source::assets_dir().join("..").join("projects"))
}

/// Open the window on `target` (a project folder or a model source).
pub fn run(target: Option<String>) -> eframe::Result {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_title("MTP Workbench").with_inner_size([1280.0, 820.0]),
        persist_window: true,
        ..Default::default()
    };
    eframe::run_native(
        APP_NAME,
        options,
        Box::new(move |cc| {
            let file = eframe::storage_dir(APP_NAME).map(|dir| crate::settings::path_in(&dir));
            // Ours, else what an older version left in eframe's file.
            let persisted: Persisted = file
                .as_deref()
                .and_then(crate::settings::load)
                .or_else(|| cc.storage.and_then(|s| eframe::get_value(s, STORAGE_KEY)))
                .unwrap_or_default();
            let mut app = WorkbenchApp::new(&cc.egui_ctx, persisted, target.as_deref());
            app.saver = file.map(crate::settings::Saver::spawn);
            let adapter = cc.wgpu_render_state.as_ref().map(|state| state.adapter.get_info());
            if let Some(info) = adapter.filter(|info| info.device_type == eframe::wgpu::DeviceType::Cpu) {
                tracing::info!("{} draws the window on the CPU: a race's tokens are shown 4 times a second", info.name);
                app.set_software_renderer(true);
            }
            Ok(Box::new(app))
        }),
    )
}
