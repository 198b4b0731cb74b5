//! What the window does when a view asks for something: the [`Command`]s views push while
//! drawing, executed after the frame is drawn (requests to the worker, dialogs, projects,
//! exports). Requests are built from the forms by [`crate::requests`].

use std::path::{Path, PathBuf};

use mtp_core::ModelSource;
use mtp_core::project::Project;

use crate::app::{Background, WorkbenchApp, file_stamp, projects_root};
use crate::requests;
use crate::state::Series;
use crate::ui;
use crate::worker::Request;

/// A dialog that comes back empty sooner than this never opened.
const NO_DIALOG: std::time::Duration = std::time::Duration::from_millis(300);

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
    /// Continue a run: an unfinished one to its own step count, a finished one extended to
    /// `extend_to` steps.
    Resume {
        /// The run.
        dir: PathBuf,
        /// The new step count of a finished run.
        extend_to: Option<usize>,
    },
    /// Load a run's adapter for Compare, Step, Bench and Probe.
    UseRun(PathBuf),
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
    /// Start stepping through decoding with the Step form.
    StartStep,
    /// One more decoding step.
    NextStep,
    /// Run the benchmark of the Bench form.
    StartBench,
    /// Run the probe of the Probe form.
    StartProbe,
    /// Export a run's adapter as a PEFT LoRA folder next to it.
    ExportPeft(PathBuf),
    /// Export the race as a PNG of the window.
    ScreenshotRace,
    /// Dismiss error `i`.
    DismissError(usize),
    /// Dismiss all notices.
    DismissNotices,
}

impl WorkbenchApp {
    /// Execute one command.
    pub fn execute(&mut self, command: Command) {
        let (p, model) = (&self.persisted, self.runtime.model.as_ref());
        match command {
            Command::LoadModel => {
                let in_use = model.zip(self.runtime.adapter.as_ref()).map(|(m, a)| (&m.source, a.path.as_path()));
                self.send_built(requests::load_model(p, in_use))
            }
            Command::LoadAdapter => self.send(requests::load_adapter(p)),
            Command::PreviewData => {
                let request = requests::preview_data(p);
                // The last preview goes: what shows next is this dataset's, or its error.
                self.runtime.data = None;
                match request {
                    // A preview touches no tensor: while the worker trains or distills, a thread
                    // of its own reads and formats the dataset.
                    Ok(Request::PreviewData { source, strict, seq_len }) if self.runtime.busy() => {
                        let tokenizer = self.runtime.model.as_ref().map(|m| std::sync::Arc::clone(&m.tokenizer));
                        let report = self.background.0.clone();
                        std::thread::spawn(move || {
                            let preview = crate::worker::data_preview(&source, strict, seq_len, tokenizer.as_deref());
                            let _ = report.send(match preview {
                                Ok(p) => Background::DataPreview(Box::new(p)),
                                Err(e) => Background::Failed(format!("Data preview: {}", crate::error_text(&e))),
                            });
                        });
                    }
                    request => self.send_built(request),
                }
            }
            Command::Distill => {
                let out = self.new_distill_path();
                let request = requests::distill(&self.persisted, model, out);
                self.send_built(request);
            }
            Command::StartTraining => {
                let run_dir = self.new_run_dir();
                match requests::train(p, model, run_dir.clone()) {
                    Ok(request) => {
                        let total_steps = p.train.recipe.training.steps;
                        self.runtime.live = Some(Series { dir: run_dir, total_steps, ..Series::default() });
                        self.runtime.train_log.clear();
                        // Earlier runs' banners ("... stopped at step 8") would read as this run's.
                        self.runtime.notices.clear();
                        self.send(request);
                    }
                    Err(e) => self.runtime.errors.push(format!("Train: {}", crate::error_text(&e))),
                }
            }
            Command::UseRun(run_dir) => {
                self.persisted.model.adapter = mtp_core::train::RunDir(run_dir).adapter().display().to_string();
                self.execute(Command::LoadAdapter);
            }
            Command::Resume { dir: run_dir, extend_to } => {
                let prior = self.runtime.runs.iter().find(|r| r.dir == run_dir);
                let mut series = Series { dir: run_dir.clone(), ..Series::default() };
                if let Some(r) = prior {
                    for m in &r.metrics {
                        series.push(m.clone());
                    }
                }
                self.runtime.live = Some(series);
                self.runtime.notices.clear();
                self.send(requests::resume(run_dir, extend_to));
            }
            Command::Cancel => {
                self.worker.set_paused(false);
                self.runtime.paused = false;
                self.worker.cancel();
            }
            Command::Pause(paused) => {
                self.worker.set_paused(paused);
                self.runtime.paused = paused;
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
                self.runtime.race = crate::state::RaceState {
                    greedy: c.greedy,
                    lane_b: match c.mask_count() {
                        mtp_core::decode::MaskCount::Fixed(1) => format!("{} with 1 mask", c.mode),
                        m => format!("{} with {m} masks", c.mode),
                    },
                    prompt: c.prompt.clone(),
                    adapter: self.runtime.adapter.as_ref().map(|a| a.path.clone()),
                    ..Default::default()
                };
                self.send(requests::race(&self.persisted));
            }
            Command::StartStep => self.send(requests::step_start(p)),
            Command::NextStep => self.send(Request::StepNext),
            Command::StartBench => {
                let request = requests::bench(p);
                // The table shown is this run's, never an earlier one's.
                self.runtime.bench = None;
                self.send_built(request)
            }
            Command::StartProbe => self.send(requests::probe(p)),
            Command::ExportPeft(run_dir) => self.send(requests::export_peft(&run_dir)),
            Command::ScreenshotRace => self.screenshot_pending = true,
            Command::DismissError(i) => {
                if i < self.runtime.errors.len() {
                    self.runtime.errors.remove(i);
                }
            }
            Command::DismissNotices => self.runtime.notices.clear(),
        }
    }

    /// Send a request built from the forms, or show why it could not be built.
    fn send_built(&mut self, request: anyhow::Result<Request>) {
        match request {
            Ok(r) => self.send(r),
            Err(e) => self.runtime.errors.push(crate::error_text(&e)),
        }
    }

    pub(crate) fn send(&mut self, request: Request) {
        // A step-through session waits between clicks; any other job ends it: say so.
        let continues_steps = matches!(request, Request::StepNext | Request::StepStart { .. });
        if self.runtime.job == Some(crate::worker::Job::Step) && !continues_steps {
            let job = crate::worker::job_of(&request);
            self.runtime.notices.push(format!("the step-through session ended: {} started", job.name()));
        }
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
        let name = if name.is_empty() { format!("run-{}", file_stamp()) } else { name.to_owned() };
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
                self.persisted.recent.retain(|r| r != &dir);
                self.persisted.recent.insert(0, dir.clone());
                self.persisted.recent.truncate(8);
                // The adapter loaded now belongs to the project left: the one opened loads its own.
                if self.persisted.project_dir.as_ref() != Some(&dir) {
                    self.runtime.adapter = None;
                }
                self.persisted.project_dir = Some(dir.clone());
                // A project whose adapters the window has not used (its runs trained by
                // `mtp train`, or the window's settings lost) starts with its newest run's.
                if self.persisted.remembered_adapter(&p.model).is_none()
                    && let Some(adapter) = Project::newest_adapter(&dir)
                {
                    self.persisted.remember_adapter(&p.model, &adapter);
                }
                self.runtime.project = Some(p);
                if std::path::Path::new(self.persisted.new_project.trim()) == dir {
                    self.persisted.new_project.clear();
                }
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
            self.runtime.errors.push(format!(
                "`{name}` is not a usable project name: a folder name, without / or \\, not starting with a dot"
            ));
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
        let tx = self.background.0.clone();
        let default = self.persisted.project_dir.clone().unwrap_or_else(projects_root);
        std::thread::spawn(move || {
            let opened = std::time::Instant::now();
            let d = rfd::FileDialog::new().set_directory(&default);
            let path = match pick {
                Pick::ModelFolder | Pick::DataFolder | Pick::Project => d.pick_folder(),
                Pick::AdapterFile => d.add_filter("adapter", &["safetensors"]).pick_file(),
                Pick::DataFile => d.add_filter("data", &["jsonl", "json", "parquet", "txt", "md", "py"]).pick_file(),
                Pick::PromptsFile => d.add_filter("prompts", &["jsonl"]).pick_file(),
                Pick::SaveRaceJson => d.set_file_name("race.json").save_file(),
                Pick::SaveBench => d.set_file_name("bench.csv").save_file(),
            };
            let report = match path {
                Some(p) => Some(Background::Picked(pick, p)),
                // Nobody cancels a dialog this fast: none opened (rfd needs an XDG desktop
                // portal or zenity, and says why only on stderr).
                None if opened.elapsed() < NO_DIALOG => Some(Background::NoDialog(pick)),
                None => None,
            };
            if let Some(r) = report {
                let _ = tx.send(r);
            }
        });
    }

    /// No dialog opened: a save goes to the project folder under its default name; a file or
    /// folder to open is typed into its field.
    pub fn no_dialog(&mut self, pick: Pick) {
        let why = "no file dialog could open (it needs an XDG desktop portal or zenity)";
        let dir = self.persisted.project_dir.clone().unwrap_or_else(std::env::temp_dir);
        let instead = match pick {
            Pick::SaveRaceJson | Pick::SaveBench => {
                // The bench's table in each of its formats: there is no file name to choose one by.
                let (name, formats): (&str, &[&str]) =
                    if pick == Pick::SaveRaceJson { ("race", &["json"]) } else { ("bench", &["csv", "json", "md"]) };
                self.runtime.notices.push(format!("{why}: saving in the project folder instead"));
                let stamp = file_stamp();
                for ext in formats {
                    self.picked(pick, dir.join(format!("{name}-{stamp}.{ext}")));
                }
                return;
            }
            Pick::ModelFolder => "type the path into the Model tab's Source field",
            Pick::AdapterFile => "type the path into the Model tab's Adapter file field",
            Pick::DataFile | Pick::DataFolder => "type the path into the Data tab's Dataset field",
            Pick::PromptsFile => "type the path into the Bench tab's Prompts field",
            Pick::Project => "type the project's folder into the box under Open project… and press Open",
        };
        self.runtime.errors.push(format!("{why}: {instead}"));
    }

    /// What a dialog's choice does (tests call it as a dialog would).
    pub fn picked(&mut self, pick: Pick, path: PathBuf) {
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

    /// Write an export on a background thread (never on the frame); its outcome becomes a
    /// notice or an error in the window.
    fn export(&mut self, body: String, path: &Path) {
        let path = path.to_owned();
        self.runtime.notices.push(format!("saving {}", ui::path_text(&self.runtime, &path)));
        let report = self.background.0.clone();
        std::thread::spawn(move || {
            let _ = report.send(match mtp_core::fsutil::write_atomic(&path, body.as_bytes()) {
                Ok(()) => Background::Saved(path),
                Err(e) => Background::Failed(format!("saving {}: {e:#}", path.display())),
            });
        });
    }
}
