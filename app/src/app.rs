//! The eframe app: each frame drains worker events, draws, then sends the commands the
//! drawing collected. Nothing here blocks or touches a tensor.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mtp_core::project::Project;
use mtp_core::{DType, DeviceSpec, ModelSource};

use crate::ui;
use crate::worker::{Event, ModelSummary, Request, WorkerHandle};

/// Most time per frame spent draining worker events.
const EVENT_BUDGET: Duration = Duration::from_millis(4);

/// What the window shows about the model.
#[derive(Debug, Clone, Default)]
pub enum ModelState {
    /// Nothing requested yet.
    #[default]
    None,
    /// A load is running.
    Loading(String),
    /// Loaded.
    Ready(Box<ModelSummary>),
}

/// State the UI draws from. Plain data: drawing reads it and records [`Command`]s.
#[derive(Debug, Default)]
pub struct UiState {
    /// Open project folder, if any.
    pub project_dir: Option<PathBuf>,
    /// The project's description.
    pub project: Option<Project>,
    /// Model source text in the picker.
    pub source_text: String,
    /// Chosen device.
    pub device: DeviceSpec,
    /// Chosen dtype.
    pub dtype: DType,
    /// The model.
    pub model: ModelState,
    /// The latest progress message.
    pub progress: Option<(String, Option<f32>)>,
    /// Errors to show until dismissed.
    pub errors: Vec<String>,
}

/// Something the UI asked for during drawing, executed after it.
#[derive(Debug, Clone)]
pub enum Command {
    /// Load the model named in the picker.
    LoadModel,
    /// Dismiss error `i`.
    DismissError(usize),
}

/// The workbench.
pub struct WorkbenchApp {
    /// What is drawn.
    pub state: UiState,
    worker: WorkerHandle,
}

impl WorkbenchApp {
    /// An app opened on `target`: a project folder or a model source. Starts loading the
    /// model at once.
    pub fn new(ctx: &egui::Context, target: &str) -> Self {
        let repaint = ctx.clone();
        let worker = WorkerHandle::spawn(move || repaint.request_repaint());
        let mut state = UiState { source_text: target.to_owned(), ..UiState::default() };
        let dir = PathBuf::from(target);
        if Project::is_project(&dir) {
            match Project::load(&dir) {
                Ok(p) => {
                    state.source_text = p.model.to_string();
                    state.project = Some(p);
                    state.project_dir = Some(dir);
                }
                Err(e) => state.errors.push(e.to_string()),
            }
        }
        let mut app = Self { state, worker };
        app.execute(Command::LoadModel);
        app
    }

    fn drain_events(&mut self) {
        let start = Instant::now();
        while start.elapsed() < EVENT_BUDGET {
            let Some(event) = self.worker.try_recv() else { break };
            match event {
                Event::Started(what) => self.state.model = ModelState::Loading(what),
                Event::Progress(msg, frac) => self.state.progress = Some((msg, frac)),
                Event::ModelLoaded(summary) => {
                    self.state.progress = None;
                    self.state.model = ModelState::Ready(summary);
                }
                Event::Failed(msg) => {
                    self.state.progress = None;
                    if matches!(self.state.model, ModelState::Loading(_)) {
                        self.state.model = ModelState::None;
                    }
                    self.state.errors.push(msg);
                }
            }
        }
    }

    fn execute(&mut self, command: Command) {
        match command {
            Command::LoadModel => match self.state.source_text.parse::<ModelSource>() {
                Ok(source) => {
                    let request = Request::LoadModel { source, device: self.state.device, dtype: self.state.dtype };
                    if let Err(e) = self.worker.send(request) {
                        self.state.errors.push(e);
                    }
                }
                Err(e) => self.state.errors.push(e.to_string()),
            },
            Command::DismissError(i) => {
                if i < self.state.errors.len() {
                    self.state.errors.remove(i);
                }
            }
        }
    }
}

impl eframe::App for WorkbenchApp {
    fn logic(&mut self, _ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.drain_events();
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let mut commands = Vec::new();
        ui::model::show(ui, &mut self.state, &mut commands);
        for c in commands {
            self.execute(c);
        }
    }
}

/// Open the window on `target` (a project folder or a model source).
pub fn run(target: &str) -> eframe::Result {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_title("MTP Workbench").with_inner_size([1100.0, 720.0]),
        ..Default::default()
    };
    let target = target.to_owned();
    eframe::run_native(
        "MTP Workbench",
        options,
        Box::new(move |cc| Ok(Box::new(WorkbenchApp::new(&cc.egui_ctx, &target)))),
    )
}
