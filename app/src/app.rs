//! The eframe app. Each frame: drain worker events within a time budget, draw (views read
//! state and collect [`Command`]s), then execute the commands. Drawing never blocks, never
//! touches the disk, the worker or a tensor; file dialogs run on their own threads.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use mtp_core::project::Project;
use mtp_core::{DeviceSpec, ModelSource};

use crate::state::{Persisted, Runtime, Series, Tab};
use crate::ui;
use crate::worker::{Event, Job, Request, WorkerHandle};

/// Most time per frame spent draining worker events.
const EVENT_BUDGET: Duration = Duration::from_millis(6);
/// eframe storage key of [`Persisted`].
const STORAGE_KEY: &str = "mtp-workbench";

/// Which file or folder a dialog is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// A model folder.
    ModelFolder,
    /// An adapter file.
    AdapterFile,
    /// A dataset file.
    DataFile,
    /// A dataset folder.
    DataFolder,
    /// A benchmark prompts file.
    PromptsFile,
    /// A project folder to open.
    Project,
    /// Where to save the race as JSON.
    SaveRaceJson,
    /// Where to save the bench table.
    SaveBench,
}

/// Something a view asked for, executed after drawing.
#[derive(Debug, Clone)]
pub enum Command {
    /// Send a request to the worker.
    Send(Request),
    /// Load the model named in the Model form.
    LoadModel,
    /// Load the adapter named in the Model form.
    LoadAdapter,
    /// Preview the dataset named in the Data form.
    PreviewData,
    /// Self-distill the loaded model on the dataset named in the Data form.
    Distill,
    /// Start training with the Train form.
    StartTraining,
    /// Resume a run.
    Resume(PathBuf),
    /// Stop the running job.
    Cancel,
    /// Pause or resume the running job.
    Pause(bool),
    /// Open a file dialog.
    Pick(Pick),
    /// Open a project folder.
    OpenProject(PathBuf),
    /// Create a project named in the sidebar under `projects/`.
    NewProject,
    /// Re-read the project's runs.
    RefreshRuns,
    /// Start the race with the Compare form.
    StartRace,
    /// Export the race as a PNG of the window.
    ScreenshotRace,
    /// Dismiss error `i`.
    DismissError(usize),
    /// Dismiss all notices.
    DismissNotices,
}

/// Files chosen in native dialogs (on their own threads), with what they were chosen for.
type PickChannel = (Sender<(Pick, PathBuf)>, Receiver<(Pick, PathBuf)>);

/// The workbench.
pub struct WorkbenchApp {
    /// Forms and choices that survive restarts.
    pub persisted: Persisted,
    /// What this session learned from the worker.
    pub runtime: Runtime,
    worker: WorkerHandle,
    picks: PickChannel,
    /// Devices libtorch sees (read once at start).
    pub devices: Vec<DeviceSpec>,
    screenshot_pending: bool,
}

impl WorkbenchApp {
    /// An app with `persisted` state, opened on `target` (a project folder or a model
    /// source; `None` keeps the persisted project). Loads the project's model at once.
    pub fn new(ctx: &egui::Context, persisted: Persisted, target: Option<&str>) -> Self {
        ui::theme::apply(ctx);
        // Model text can hold any character (a byte-level token may even be half of one):
        // draw a box for what no font covers rather than fail.
        ctx.set_missing_glyph_policy(egui::MissingGlyphPolicy::Tofu);
        let repaint = ctx.clone();
        // Events wake the window at most ~30 times a second: a fast stream (tokens, bench
        // progress) must not spend the CPU on frames the worker needs.
        let worker = WorkerHandle::spawn(move || repaint.request_repaint_after(Duration::from_millis(33)));
        let mut app = Self {
            persisted,
            runtime: Runtime::default(),
            worker,
            picks: unbounded(),
            devices: DeviceSpec::all_available(),
            screenshot_pending: false,
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
        while let Ok((pick, path)) = self.picks.1.try_recv() {
            self.picked(pick, path);
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
            Event::TrainDone { run_dir, step, stopped } => {
                let what = if stopped { "stopped" } else { "finished" };
                let name = run_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
                rt.notices.push(format!("run {name} {what} at step {step}; its adapter is loaded"));
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
            Event::Probe(report, texts) => rt.probe = Some((*report, texts)),
        }
    }

    /// Execute one command.
    pub fn execute(&mut self, command: Command) {
        match command {
            Command::Send(r) => self.send(r),
            Command::LoadModel => match self.persisted.model.source.parse::<ModelSource>() {
                Ok(source) => {
                    let m = &self.persisted.model;
                    self.send(Request::LoadModel { source, device: m.device, dtype: m.dtype });
                }
                Err(e) => self.runtime.errors.push(e.to_string()),
            },
            Command::LoadAdapter => {
                let path = PathBuf::from(self.persisted.model.adapter.trim());
                self.send(Request::LoadAdapter { path });
            }
            Command::PreviewData => match self.persisted.data.source.parse() {
                Ok(source) => {
                    let seq_len = self.persisted.train.seq_len;
                    self.send(Request::PreviewData { source, strict: self.persisted.data.strict, seq_len });
                }
                Err(e) => self.runtime.errors.push(format!("Data: {e}")),
            },
            Command::Distill => match self.persisted.data.source.parse() {
                Ok(source) => {
                    let d = &self.persisted.data;
                    let defaults = mtp_core::train::distill::DistillConfig::default();
                    // Prompts leave room for the continuation in one training sequence.
                    let prompt_tokens = defaults.prompt_tokens.min(self.persisted.train.seq_len / 4).max(1);
                    let config = mtp_core::train::distill::DistillConfig {
                        sequences: d.distill_sequences,
                        new_tokens: d.distill_new_tokens,
                        prompt_tokens,
                        chat: d.distill_chat && self.runtime.model.as_ref().is_some_and(|m| m.chat_template),
                        ..defaults
                    };
                    let out = self.new_distill_path();
                    self.send(Request::Distill { source, config, out });
                }
                Err(e) => self.runtime.errors.push(format!("Data: {e}")),
            },
            Command::StartTraining => {
                match ui::train::config_from_forms(&self.persisted, self.runtime.model.as_ref()) {
                    Ok(config) => {
                        let run_dir = self.new_run_dir();
                        self.runtime.live =
                            Some(Series { dir: run_dir.clone(), total_steps: config.steps, ..Series::default() });
                        self.runtime.train_log.clear();
                        self.send(Request::Train { config: Box::new(config), run_dir });
                    }
                    Err(e) => self.runtime.errors.push(format!("Train: {e}")),
                }
            }
            Command::Resume(run_dir) => {
                let prior = self.runtime.runs.iter().find(|r| r.dir == run_dir);
                let mut series = Series { dir: run_dir.clone(), ..Series::default() };
                if let Some(r) = prior {
                    for m in &r.metrics {
                        series.push(m.clone());
                    }
                }
                self.runtime.live = Some(series);
                let steps = Some(self.persisted.train.steps);
                self.send(Request::Resume { run_dir, steps });
            }
            Command::Cancel => {
                self.worker.set_paused(false);
                self.runtime.paused = false;
                self.worker.cancel();
            }
            Command::Pause(p) => {
                self.worker.set_paused(p);
                self.runtime.paused = p;
            }
            Command::Pick(pick) => self.pick(pick),
            Command::OpenProject(dir) => self.open_project(dir),
            Command::NewProject => self.new_project(),
            Command::RefreshRuns => {
                if let Some(dir) = self.persisted.project_dir.clone() {
                    self.send(Request::ReadRuns { project_dir: dir });
                }
            }
            Command::StartRace => {
                let c = &self.persisted.compare;
                let decoding = if c.greedy {
                    mtp_core::decode::Decoding::Greedy
                } else {
                    mtp_core::decode::Decoding::Sample(mtp_core::decode::SamplingParams {
                        temperature: c.temperature,
                        top_k: None,
                        top_p: None,
                        seed: c.seed,
                    })
                };
                let lanes = [
                    crate::worker::LaneSpec {
                        mode: mtp_core::decode::Mode::Ar,
                        masks: mtp_core::decode::MaskCount::Fixed(0),
                    },
                    crate::worker::LaneSpec { mode: c.mode, masks: c.mask_count() },
                ];
                self.runtime.race = crate::state::RaceState {
                    greedy: c.greedy,
                    lane_b: format!("{} with {} masks", c.mode, c.mask_count()),
                    prompt: c.prompt.clone(),
                    ..Default::default()
                };
                let request = Request::Race {
                    prompt: c.prompt.clone(),
                    chat: c.chat,
                    lanes,
                    decoding,
                    max_new_tokens: c.max_new_tokens,
                };
                self.send(request);
            }
            Command::ScreenshotRace => self.screenshot_pending = true,
            Command::DismissError(i) => {
                if i < self.runtime.errors.len() {
                    self.runtime.errors.remove(i);
                }
            }
            Command::DismissNotices => self.runtime.notices.clear(),
        }
    }

    fn send(&mut self, request: Request) {
        if let Err(e) = self.worker.send(request) {
            self.runtime.errors.push(e);
        }
    }

    fn new_run_dir(&self) -> PathBuf {
        let base = match &self.persisted.project_dir {
            Some(p) => Project::runs_dir(p),
            None => std::env::temp_dir().join("mtp-workbench-runs"),
        };
        let name = self.persisted.train.run_name.trim();
        let name = if name.is_empty() { format!("run-{}", unix_seconds()) } else { name.to_owned() };
        let mut dir = base.join(&name);
        let mut i = 2;
        while dir.exists() {
            dir = base.join(format!("{name}-{i}"));
            i += 1;
        }
        dir
    }

    /// `data/distilled-N.jsonl` in the project (or the temporary folder), N the first free.
    fn new_distill_path(&self) -> PathBuf {
        let base = match &self.persisted.project_dir {
            Some(p) => p.join("data"),
            None => std::env::temp_dir().join("mtp-workbench-data"),
        };
        (1..).map(|i| base.join(format!("distilled-{i}.jsonl"))).find(|p| !p.exists()).unwrap_or(base)
    }

    fn open_project(&mut self, dir: PathBuf) {
        match Project::load(&dir) {
            Ok(p) => {
                self.persisted.model.source = p.model.to_string();
                self.runtime.project = Some(p);
                self.persisted.recent.retain(|r| r != &dir);
                self.persisted.recent.insert(0, dir.clone());
                self.persisted.recent.truncate(8);
                self.persisted.project_dir = Some(dir.clone());
                self.runtime.runs.clear();
                self.runtime.overlay.clear();
                self.execute(Command::LoadModel);
                self.send(Request::ReadRuns { project_dir: dir });
            }
            Err(e) => self.runtime.errors.push(format!("opening project: {e}")),
        }
    }

    fn new_project(&mut self) {
        let name = self.persisted.new_project.trim().to_owned();
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            self.runtime.errors.push(format!("`{name}` is not a usable project name"));
            return;
        }
        let dir = projects_root().join(&name);
        if dir.exists() {
            self.runtime.errors.push(format!("{} already exists", dir.display()));
            return;
        }
        let model = self.persisted.model.source.parse().unwrap_or(ModelSource::Demo);
        let project = Project { name: name.clone(), model };
        let created = std::fs::create_dir_all(Project::runs_dir(&dir))
            .map_err(|e| e.to_string())
            .and_then(|()| project.save(&dir).map_err(|e| e.to_string()));
        match created {
            Ok(()) => {
                self.persisted.new_project.clear();
                self.open_project(dir);
            }
            Err(e) => self.runtime.errors.push(format!("creating project: {e}")),
        }
    }

    /// Open a native dialog on its own thread; the choice comes back through a channel.
    fn pick(&self, pick: Pick) {
        let tx = self.picks.0.clone();
        let default = self.persisted.project_dir.clone().unwrap_or_else(projects_root);
        std::thread::spawn(move || {
            let d = rfd::FileDialog::new().set_directory(&default);
            let path = match pick {
                Pick::ModelFolder | Pick::DataFolder | Pick::Project => d.pick_folder(),
                Pick::AdapterFile => d.add_filter("adapter", &["safetensors"]).pick_file(),
                Pick::DataFile => d.add_filter("data", &["jsonl", "txt", "md", "py"]).pick_file(),
                Pick::PromptsFile => d.add_filter("prompts", &["jsonl"]).pick_file(),
                Pick::SaveRaceJson => d.set_file_name("race.json").save_file(),
                Pick::SaveBench => d.set_file_name("bench.csv").save_file(),
            };
            if let Some(p) = path {
                let _ = tx.send((pick, p));
            }
        });
    }

    fn picked(&mut self, pick: Pick, path: PathBuf) {
        let text = path.display().to_string();
        match pick {
            Pick::ModelFolder => {
                self.persisted.model.source = text;
                self.execute(Command::LoadModel);
            }
            Pick::AdapterFile => {
                self.persisted.model.adapter = text;
                self.execute(Command::LoadAdapter);
            }
            Pick::DataFile | Pick::DataFolder => {
                self.persisted.data.source = text;
                self.execute(Command::PreviewData);
            }
            Pick::PromptsFile => self.persisted.bench.prompts = text,
            Pick::Project => self.execute(Command::OpenProject(path)),
            Pick::SaveRaceJson => self.export(ui::compare::export_json(&self.runtime.race), &path),
            Pick::SaveBench => match &self.runtime.bench {
                Some(report) => {
                    let body = if path.extension().is_some_and(|e| e == "json") {
                        serde_json::to_string_pretty(report).unwrap_or_default()
                    } else if path.extension().is_some_and(|e| e == "md") {
                        report.to_markdown()
                    } else {
                        report.to_csv()
                    };
                    self.export(body, &path);
                }
                None => self.runtime.errors.push("no benchmark to export yet".into()),
            },
        }
    }

    /// Write an export on a background thread (never on the frame).
    fn export(&mut self, body: String, path: &Path) {
        let path = path.to_owned();
        self.runtime.notices.push(format!("saving {}", path.display()));
        std::thread::spawn(move || {
            if let Err(e) = mtp_core::fsutil::write_atomic(&path, body.as_bytes()) {
                tracing::error!("export failed: {e}");
            }
        });
    }

    /// Draw one frame (also used by the headless tests).
    pub fn draw(&mut self, ui: &mut egui::Ui) {
        let started = Instant::now();
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
        egui::CentralPanel::default().show(ui, |ui| {
            ui::messages(ui, &self.runtime, &mut commands);
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
        for c in commands {
            self.execute(c);
        }
        if self.runtime.job.is_some() || self.runtime.race.lanes.iter().any(|l| l.started.is_some() && l.done.is_none())
        {
            // Live numbers (tokens/s, ETA) move with time, not only with events.
            ui.ctx().request_repaint_after(Duration::from_millis(250));
        }
        self.handle_screenshot(ui.ctx());
        let rt = &mut self.runtime;
        rt.frame_times.push_back(started.elapsed().as_secs_f32());
        while rt.frame_times.len() > 120 {
            rt.frame_times.pop_front();
        }
    }

    fn handle_screenshot(&mut self, ctx: &egui::Context) {
        if !std::mem::take(&mut self.screenshot_pending) {
            return;
        }
        let dir = self.persisted.project_dir.clone().unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("{}-{}.png", self.persisted.tab.title().to_lowercase(), unix_seconds()));
        self.runtime.notices.push(format!("saving {}", path.display()));
        ctx.request_screenshot(move |image| {
            // Encoding takes tens of milliseconds: not on the frame.
            std::thread::spawn(move || {
                let [w, h] = image.size;
                let bytes: Vec<u8> = image.pixels.iter().flat_map(|c| c.to_array()).collect();
                match image::RgbaImage::from_raw(w as u32, h as u32, bytes) {
                    Some(img) => {
                        if let Err(e) = img.save(&path) {
                            tracing::error!("saving {}: {e}", path.display());
                        }
                    }
                    None => tracing::error!("screenshot has the wrong size"),
                }
            });
        });
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
                // A request may still be queued: give the worker a moment to pick it up.
                match self.worker.recv_timeout(Duration::from_millis(50)) {
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
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, STORAGE_KEY, &self.persisted);
    }

    fn on_exit(&mut self) {
        // A training run stops at its next step and writes a checkpoint before the worker
        // is joined (WorkerHandle's drop).
        self.worker.cancel();
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
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
        "MTP Workbench",
        options,
        Box::new(move |cc| {
            let persisted: Persisted = cc.storage.and_then(|s| eframe::get_value(s, STORAGE_KEY)).unwrap_or_default();
            Ok(Box::new(WorkbenchApp::new(&cc.egui_ctx, persisted, target.as_deref())))
        }),
    )
}
