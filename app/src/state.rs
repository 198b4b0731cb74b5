//! The UI's state: [`Persisted`] (forms, tab, recent projects; saved by eframe across
//! restarts, every field defaulted so old saves keep loading) and [`Runtime`] (what the
//! worker reported this session). Views read both and write only forms.

use std::path::PathBuf;

use mtp_core::decode::bench::BenchReport;
use mtp_core::decode::{DraftArithmetic, MaskCount, Mode, StepStats};
use mtp_core::mtp::probe::ProbeReport;
use mtp_core::project::Project;
use mtp_core::train::TrainConfig;
use mtp_core::train::{StepMetrics, TrainEvent};
use mtp_core::{DType, DeviceSpec};
use serde::{Deserialize, Serialize};

use crate::worker::{AdapterSummary, DataPreview, Job, LaneDone, LaneToken, ModelSummary, RunSummary, StepView};

/// The tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Tab {
    /// Pick and inspect a model.
    #[default]
    Model,
    /// Pick and preview a dataset.
    Data,
    /// Train an adapter.
    Train,
    /// The A/B race.
    Compare,
    /// Step through quadratic decoding.
    Step,
    /// The benchmark.
    Bench,
    /// The probe.
    Probe,
}

impl Tab {
    /// All tabs in order.
    pub const ALL: [Tab; 7] = [Tab::Model, Tab::Data, Tab::Train, Tab::Compare, Tab::Step, Tab::Bench, Tab::Probe];

    /// Its title.
    pub fn title(self) -> &'static str {
        match self {
            Tab::Model => "Model",
            Tab::Data => "Data",
            Tab::Train => "Train",
            Tab::Compare => "Compare",
            Tab::Step => "Step",
            Tab::Bench => "Bench",
            Tab::Probe => "Probe",
        }
    }
}

/// Model tab form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelForm {
    /// Folder, hub repo id, or `demo`.
    pub source: String,
    /// Device.
    pub device: DeviceSpec,
    /// Precision.
    pub dtype: DType,
    /// Record decoding steps as CUDA graphs (CUDA only; on by default, `--no-cuda-graphs`
    /// off). Saved under a new name: projects saved while graphs were off by default, which
    /// wrote `cuda_graphs: false` whether or not anyone chose it, take the new default.
    #[serde(rename = "replay_cuda_graphs")]
    pub cuda_graphs: bool,
    /// The arithmetic of a speculative step's mask rows (`--draft-arithmetic`; applies when
    /// a model or an adapter is loaded next).
    pub draft_arithmetic: DraftArithmetic,
    /// Adapter file to load.
    pub adapter: String,
    /// Variables the chat template reads besides the conversation, one `KEY=VALUE` a line
    /// (`--chat-template-var`; applies at the next load).
    pub chat_template_vars: String,
}

impl ModelForm {
    /// The template variables of [`ModelForm::chat_template_vars`], blank lines skipped; a
    /// bad line is an error naming it.
    pub fn template_vars(&self) -> anyhow::Result<mtp_core::TemplateVars> {
        self.chat_template_vars
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| mtp_core::tokenizer::parse_template_var(l).map_err(anyhow::Error::from))
            .collect()
    }
}

impl Default for ModelForm {
    fn default() -> Self {
        let device = DeviceSpec::best_available();
        Self {
            source: "demo".into(),
            device,
            dtype: DType::default_for(device),
            cuda_graphs: true,
            draft_arithmetic: DraftArithmetic::Auto,
            adapter: String::new(),
            chat_template_vars: String::new(),
        }
    }
}

/// Data tab form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataForm {
    /// File, folder or `builtin:NAME`.
    pub source: String,
    /// Fail on the first malformed line.
    pub strict: bool,
    /// Self-distillation: prompts to continue.
    pub distill_sequences: usize,
    /// Self-distillation: greedy tokens per prompt.
    pub distill_new_tokens: usize,
    /// Self-distillation of chat: the dataset's questions through the chat template.
    pub distill_chat: bool,
}

impl Default for DataForm {
    fn default() -> Self {
        let d = mtp_core::train::distill::DistillConfig::default();
        Self {
            source: "builtin:arith".into(),
            strict: false,
            distill_sequences: d.sequences,
            distill_new_tokens: d.new_tokens,
            distill_chat: d.chat,
        }
    }
}

/// Train tab form: the recipe `mtp train` runs (the same typed struct, edited in place) and
/// the run's name. The recipe's model, dataset, device and precision are taken from the
/// Model and Data tabs when a run starts ([`crate::requests::train`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainForm {
    /// The recipe.
    pub recipe: TrainConfig,
    /// Run name (folder under `runs/`); empty: a timestamp.
    pub run_name: String,
}

impl Default for TrainForm {
    /// `mtp train`'s defaults, but for two on purpose: the window is where the built-in demo
    /// model is retrained with a click, and at the paper's learning rate (2e-4, the CLI's) a
    /// 5.5M model learns too little in the few hundred steps a session gives it (the demo's
    /// adapters were trained at 1e-3); validation and checkpoints every 25 steps instead of
    /// 50 give the live curves points within the first minutes.
    fn default() -> Self {
        let defaults = TrainConfig::default();
        Self {
            recipe: TrainConfig {
                training: mtp_core::train::LoopConfig {
                    optim: mtp_core::train::OptimConfig { lr: 1e-3, ..defaults.training.optim.clone() },
                    val_every: 25,
                    checkpoint_every: 25,
                    ..defaults.training.clone()
                },
                ..defaults
            },
            run_name: String::new(),
        }
    }
}

/// Compare tab form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CompareForm {
    /// Prompt.
    pub prompt: String,
    /// Lane B's mode.
    pub mode: Mode,
    /// Lane B's masks.
    pub masks: usize,
    /// Lane B chooses its masks each step (up to the adapter's k) from the recent acceptance.
    pub auto_masks: bool,
    /// Greedy (else sampled).
    pub greedy: bool,
    /// Sampling temperature.
    pub temperature: f64,
    /// Sampling seed.
    pub seed: u64,
    /// Token limit.
    pub max_new_tokens: usize,
    /// Wrap with the chat template.
    pub chat: bool,
}

impl CompareForm {
    /// Lane B's mask count.
    pub fn mask_count(&self) -> MaskCount {
        if self.auto_masks { MaskCount::Auto } else { MaskCount::Fixed(self.masks) }
    }
}

impl Default for CompareForm {
    fn default() -> Self {
        Self {
            prompt: "Question: Priya has 37 pebbles and gets 15 more from Jonas. How many pebbles does Priya have now?\nAnswer:".into(),
            mode: Mode::Quadratic,
            masks: 4,
            // Each step's count from the recent acceptance and the step's measured cost: the
            // race a user sees first is the best this machine runs (a fixed 4 loses on a CPU).
            auto_masks: true,
            greedy: true,
            temperature: 0.8,
            seed: 0,
            max_new_tokens: 96,
            chat: false,
        }
    }
}

/// Step tab form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StepForm {
    /// Prompt.
    pub prompt: String,
    /// Masks per step.
    pub masks: usize,
}

impl Default for StepForm {
    fn default() -> Self {
        Self {
            prompt:
                "Question: Maya has 12 apples and gets 7 more from Leo. How many apples does Maya have now?\nAnswer:"
                    .into(),
            masks: 3,
        }
    }
}

/// Bench tab form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchForm {
    /// Prompts file (empty: the demo's).
    pub prompts: String,
    /// Mask counts, comma-separated.
    pub masks: String,
    /// Include linear decoding.
    pub linear: bool,
    /// Include quadratic decoding.
    pub quadratic: bool,
    /// New tokens per prompt.
    pub max_new_tokens: usize,
    /// Runs of each generation, the fastest counted (`mtp bench --repeats`).
    pub repeats: usize,
    /// Text prompts as a user's turn through the model's chat template (`mtp bench --chat`).
    pub chat: bool,
}

impl Default for BenchForm {
    fn default() -> Self {
        Self {
            prompts: String::new(),
            masks: "1,2,4,auto".into(),
            linear: true,
            quadratic: true,
            max_new_tokens: 48,
            // One run of a generation on a shared or busy machine can be off by tens of
            // percent (docs/BENCHMARKS.md): the fastest of three, as the documented commands.
            repeats: 3,
            chat: false,
        }
    }
}

/// Probe tab form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProbeForm {
    /// Prompt.
    pub prompt: String,
    /// True continuation.
    pub continuation: String,
}

impl Default for ProbeForm {
    fn default() -> Self {
        Self {
            prompt: "Question: Ava has 20 stickers and gives 5 to Tom. How many stickers does Ava have left?\nAnswer:"
                .into(),
            continuation: " Ava starts with 20 stickers. Giving away 5 leaves 20 - 5 = 15.".into(),
        }
    }
}

/// Everything saved across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Persisted {
    /// The open tab.
    pub tab: Tab,
    /// The open project.
    pub project_dir: Option<PathBuf>,
    /// Recently opened projects, newest first.
    pub recent: Vec<PathBuf>,
    /// Name typed for a new project.
    pub new_project: String,
    /// Forms.
    pub model: ModelForm,
    /// Forms.
    pub data: DataForm,
    /// Forms.
    pub train: TrainForm,
    /// Forms.
    pub compare: CompareForm,
    /// Forms.
    pub step: StepForm,
    /// Forms.
    pub bench: BenchForm,
    /// Forms.
    pub probe: ProbeForm,
    /// The adapter last in use with each model in each project, newest first.
    pub adapters_in_use: Vec<AdapterInUse>,
}

/// The adapter last in use with a model in a project (or with no project open): a restart,
/// or a return to the project, loads it again rather than the demo's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterInUse {
    /// The project folder, if one was open.
    pub project: Option<PathBuf>,
    /// The model's source, as the Model form writes it.
    pub model: String,
    /// The adapter file.
    pub path: PathBuf,
}

impl Persisted {
    /// Most adapters remembered.
    const ADAPTERS_KEPT: usize = 16;

    /// Remember `path` as the adapter in use with `model` in the open project.
    pub fn remember_adapter(&mut self, model: &mtp_core::ModelSource, path: &std::path::Path) {
        let entry = AdapterInUse { project: self.project_dir.clone(), model: model.to_string(), path: path.to_owned() };
        self.adapters_in_use.retain(|a| a.project != entry.project || a.model != entry.model);
        self.adapters_in_use.insert(0, entry);
        self.adapters_in_use.truncate(Self::ADAPTERS_KEPT);
    }

    /// The adapter last in use with `model` in the open project, if its file is still there.
    pub fn remembered_adapter(&self, model: &mtp_core::ModelSource) -> Option<&std::path::Path> {
        let model = model.to_string();
        self.adapters_in_use
            .iter()
            .find(|a| a.project == self.project_dir && a.model == model)
            .map(|a| a.path.as_path())
            .filter(|p| p.is_file())
    }
}

/// The metrics of one run, as plotted.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Run folder.
    pub dir: PathBuf,
    /// Training records.
    pub train: Vec<StepMetrics>,
    /// Validation records.
    pub val: Vec<StepMetrics>,
    /// Steps in total.
    pub total_steps: usize,
}

impl Series {
    /// Add one record.
    pub fn push(&mut self, m: StepMetrics) {
        match m.split {
            mtp_core::train::Split::Train => self.train.push(m),
            mtp_core::train::Split::Val => self.val.push(m),
        }
    }
}

/// One lane of the race.
#[derive(Debug, Clone, Default)]
pub struct LaneState {
    /// Tokens so far.
    pub tokens: Vec<LaneToken>,
    /// Rejected drafts, after the token index they were rejected at (text, step).
    pub rejected: Vec<(usize, String, usize)>,
    /// Speculative steps.
    pub steps: Vec<StepStats>,
    /// Totals when done.
    pub done: Option<LaneDone>,
    /// When the lane started (for the live tokens/s while it runs).
    pub started: Option<std::time::Instant>,
}

impl LaneState {
    /// Tokens per forward so far.
    pub fn tokens_per_forward(&self) -> f64 {
        match &self.done {
            Some(d) if d.forwards > 0 => d.tokens as f64 / d.forwards as f64,
            _ => {
                let forwards = self.tokens.last().map_or(0, |t| t.step + 1);
                if forwards > 0 { self.tokens.len() as f64 / forwards as f64 } else { 0.0 }
            }
        }
    }

    /// Tokens per second of the lane's own compute (when done), or of wall time so far.
    pub fn tokens_per_second(&self) -> f64 {
        match (&self.done, self.started) {
            (Some(d), _) if d.seconds > 0.0 => d.tokens as f64 / d.seconds,
            (None, Some(t)) => self.tokens.len() as f64 / t.elapsed().as_secs_f64().max(1e-6),
            _ => 0.0,
        }
    }
}

/// The race.
#[derive(Debug, Clone, Default)]
pub struct RaceState {
    /// Lane A (AR) and lane B.
    pub lanes: [LaneState; 2],
    /// Whether the race was greedy.
    pub greedy: bool,
    /// Lane B's description.
    pub lane_b: String,
    /// The prompt raced.
    pub prompt: String,
    /// The adapter lane B raced with.
    pub adapter: Option<PathBuf>,
}

impl RaceState {
    /// Both lanes done and greedy: are the outputs identical?
    pub fn identical(&self) -> Option<bool> {
        match (&self.lanes[0].done, &self.lanes[1].done) {
            // A stopped race compares what both lanes wrote before the stop.
            (Some(a), Some(b)) if self.greedy && self.stopped() => {
                let n = a.token_ids.len().min(b.token_ids.len());
                Some(a.token_ids[..n] == b.token_ids[..n])
            }
            (Some(a), Some(b)) if self.greedy => Some(a.token_ids == b.token_ids),
            _ => None,
        }
    }

    /// Whether a lane was stopped before its end (the race's Stop).
    pub fn stopped(&self) -> bool {
        self.lanes.iter().any(|l| l.done.as_ref().is_some_and(|d| d.stop == mtp_core::decode::StopReason::Cancelled))
    }

    /// Lane B's speedup over lane A in tokens per second (none for a stopped race: the
    /// lanes stopped at different points of their outputs).
    pub fn speedup(&self) -> Option<f64> {
        let (a, b) = (self.lanes[0].tokens_per_second(), self.lanes[1].tokens_per_second());
        (a > 0.0 && b > 0.0 && !self.stopped()).then(|| b / a)
    }
}

/// What the worker reported this session.
#[derive(Debug, Default)]
pub struct Runtime {
    /// The open project's description.
    pub project: Option<Project>,
    /// The loaded model.
    pub model: Option<ModelSummary>,
    /// The loaded adapter.
    pub adapter: Option<AdapterSummary>,
    /// The running job.
    pub job: Option<Job>,
    /// Its progress message and fraction.
    pub progress: Option<(String, Option<f32>)>,
    /// Errors to show until dismissed.
    pub errors: Vec<String>,
    /// Notices (run finished, file exported).
    pub notices: Vec<String>,
    /// Dataset preview.
    pub data: Option<DataPreview>,
    /// The live run.
    pub live: Option<Series>,
    /// Runs of the project.
    pub runs: Vec<RunSummary>,
    /// Runs overlaid in the plots.
    pub overlay: Vec<PathBuf>,
    /// Events of the live run since it started (prepared, checkpoints).
    pub train_log: Vec<TrainEvent>,
    /// The race.
    pub race: RaceState,
    /// Step-through views, oldest first.
    pub steps: Vec<StepView>,
    /// The benchmark.
    pub bench: Option<BenchReport>,
    /// The probe and its token texts.
    pub probe: Option<(ProbeReport, Vec<String>)>,
    /// The adapter the probe ran with.
    pub probe_adapter: Option<PathBuf>,
    /// Drawing time of the last frames, in seconds (for the status bar).
    pub frame_times: std::collections::VecDeque<f32>,
    /// The running job is paused.
    pub paused: bool,
    /// Reproducible screenshots: wall-clock numbers (speeds, times) shown as "…" and paths
    /// shown by their last component (tests; the same picture on every machine).
    pub hide_timings: bool,
}

impl Runtime {
    /// Is a job running that other jobs must wait for? A step-through session is not
    /// one: it idles between steps and any other request ends it.
    pub fn busy(&self) -> bool {
        self.job.is_some_and(|j| j != crate::worker::Job::Step)
    }
}

#[cfg(test)]
mod tests {
    use mtp_core::decode::StopReason;

    use super::*;
    use crate::worker::LaneDone;

    fn lane(ids: &[i64], stop: StopReason) -> LaneState {
        let done = LaneDone {
            tokens: ids.len(),
            forwards: ids.len(),
            seconds: 1.0,
            stop,
            token_ids: ids.to_vec(),
            cuda_graph: false,
        };
        LaneState { done: Some(done), ..LaneState::default() }
    }

    /// A stopped greedy race compares what both lanes wrote and claims no speedup; a
    /// finished one compares whole outputs.
    #[test]
    fn a_stopped_race_compares_its_common_prefix() {
        let race = |a: LaneState, b: LaneState| RaceState { lanes: [a, b], greedy: true, ..RaceState::default() };
        let stopped = race(lane(&[1, 2, 3], StopReason::Cancelled), lane(&[1, 2, 3, 4, 5], StopReason::Eos));
        assert!(stopped.stopped());
        assert_eq!((stopped.identical(), stopped.speedup()), (Some(true), None));
        let wrong = race(lane(&[1, 9], StopReason::Cancelled), lane(&[1, 2, 3], StopReason::Eos));
        assert_eq!(wrong.identical(), Some(false));
        let finished = race(lane(&[1, 2, 3], StopReason::Eos), lane(&[1, 2, 3, 4], StopReason::Eos));
        assert!(!finished.stopped());
        assert_eq!(finished.identical(), Some(false));
        assert!(finished.speedup().is_some());
    }

    /// CUDA graphs are on by default, also in a project saved while they were off by default
    /// (its `cuda_graphs: false` was the old default, not a choice); a choice saved since stays.
    #[test]
    fn cuda_graphs_default_on_in_old_and_new_projects() -> anyhow::Result<()> {
        assert!(ModelForm::default().cuda_graphs);
        let old: ModelForm = serde_json::from_str(r#"{"source": "demo", "cuda_graphs": false}"#)?;
        assert!(old.cuda_graphs);
        let off = ModelForm { cuda_graphs: false, ..ModelForm::default() };
        let saved: ModelForm = serde_json::from_str(&serde_json::to_string(&off)?)?;
        assert!(!saved.cuda_graphs);
        Ok(())
    }
}
