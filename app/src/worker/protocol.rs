//! The messages between the UI and the worker thread: plain data, never a tensor.

use std::path::PathBuf;
use std::time::Duration;

use mtp_core::decode::bench::{BenchConfig, BenchReport};
use mtp_core::decode::speculative::StepDetail;
use mtp_core::decode::{Decoding, DraftArithmetic, MaskCount, Mode, StepStats, StopReason, TokenOrigin};
use mtp_core::inspect::ModelInfo;
use mtp_core::mtp::MtpConfig;
use mtp_core::mtp::probe::ProbeReport;
use mtp_core::train::data::{DataReport, PreviewToken};
use mtp_core::train::distill::DistillConfig;
use mtp_core::train::{DataSource, StepMetrics, TrainConfig, TrainEvent};
use mtp_core::{DType, DeviceSpec, ModelSource};

/// The kinds of job, for the status bar and for routing failures to the right view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Loading (and maybe downloading) a model.
    LoadModel,
    /// Loading an adapter.
    LoadAdapter,
    /// Reading and formatting a dataset.
    Data,
    /// Recording the model's own continuations as a dataset.
    Distill,
    /// Training.
    Train,
    /// Reading the runs of a project.
    Runs,
    /// The A/B race.
    Race,
    /// Step-through decoding.
    Step,
    /// The benchmark.
    Bench,
    /// The probe.
    Probe,
    /// Writing an adapter for other tools.
    Export,
}

impl Job {
    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Job::LoadModel => "loading model",
            Job::LoadAdapter => "loading adapter",
            Job::Data => "reading data",
            Job::Distill => "self-distilling",
            Job::Train => "training",
            Job::Runs => "reading runs",
            Job::Race => "A/B race",
            Job::Step => "step-through",
            Job::Bench => "benchmark",
            Job::Probe => "probe",
            Job::Export => "export",
        }
    }
}

/// One lane of the A/B race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneSpec {
    /// Decoding mode.
    pub mode: Mode,
    /// Masks (speculative modes).
    pub masks: MaskCount,
}

/// What the UI asks the worker to do.
#[derive(Debug, Clone)]
pub enum Request {
    /// Resolve (downloading when needed) and load a model, replacing any loaded one.
    LoadModel {
        /// Where it comes from.
        source: ModelSource,
        /// Where it runs.
        device: DeviceSpec,
        /// In which precision.
        dtype: DType,
        /// Record decoding steps as CUDA graphs (CUDA only).
        cuda_graphs: bool,
        /// Variables the chat template reads besides the conversation.
        template_vars: mtp_core::TemplateVars,
        /// The arithmetic of the mask rows of the adapters loaded from now on.
        arithmetic: DraftArithmetic,
        /// The adapter to load with it (the one in use, when the same model is loaded again,
        /// in another precision for one); `None`: the demo's own adapter for the demo.
        adapter: Option<PathBuf>,
    },
    /// Load an MTP adapter for the loaded model.
    LoadAdapter {
        /// `adapter.safetensors`.
        path: PathBuf,
        /// The arithmetic of its mask rows (and of the adapters loaded after it).
        arithmetic: DraftArithmetic,
    },
    /// Read a dataset and format a few examples exactly as trained.
    PreviewData {
        /// The dataset.
        source: DataSource,
        /// Fail on the first malformed line.
        strict: bool,
        /// Tokens shown per example.
        seq_len: usize,
    },
    /// Record the loaded model's greedy continuations of prompts cut from a dataset, as a
    /// JSONL training set.
    Distill {
        /// Where prompts come from.
        source: DataSource,
        /// How many, how long.
        config: DistillConfig,
        /// The JSONL file to write.
        out: PathBuf,
    },
    /// Start a training run.
    Train {
        /// The recipe.
        config: Box<TrainConfig>,
        /// The run folder.
        run_dir: PathBuf,
    },
    /// Resume a run from its last checkpoint.
    Resume {
        /// The run folder.
        run_dir: PathBuf,
        /// New total steps.
        steps: Option<usize>,
    },
    /// Read the runs of a project (configs and metrics).
    ReadRuns {
        /// The project folder.
        project_dir: PathBuf,
    },
    /// Race two lanes on one prompt.
    Race {
        /// Prompt text.
        prompt: String,
        /// Wrap the prompt with the chat template.
        chat: bool,
        /// Lane A and lane B.
        lanes: [LaneSpec; 2],
        /// Greedy or sampled (same seed in both lanes).
        decoding: Decoding,
        /// Token limit.
        max_new_tokens: usize,
    },
    /// Start step-through decoding (prefill) on a prompt.
    StepStart {
        /// Prompt text.
        prompt: String,
        /// Masks per step.
        masks: usize,
    },
    /// The next step of step-through decoding.
    StepNext,
    /// Run the benchmark.
    Bench {
        /// Prompts file.
        prompts: PathBuf,
        /// Modes, masks, tokens.
        config: BenchConfig,
    },
    /// Run the probe.
    Probe {
        /// Prompt text.
        prompt: String,
        /// True continuation.
        continuation: String,
    },
    /// Write an adapter as a PEFT LoRA folder (for SGLang's and vLLM's UNO decoding).
    ExportPeft {
        /// The adapter file.
        adapter: PathBuf,
        /// The folder to write.
        out: PathBuf,
    },
}

/// A loaded model, as the UI shows it.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    /// Where it came from.
    pub source: ModelSource,
    /// Its local folder.
    pub dir: PathBuf,
    /// Facts from its files.
    pub info: ModelInfo,
    /// Its validated config (for the memory estimate).
    pub config: mtp_core::model::ModelConfig,
    /// Where it runs.
    pub device: DeviceSpec,
    /// Its compute precision.
    pub dtype: DType,
    /// Whether the tokenizer has a chat template.
    pub chat_template: bool,
    /// Its tokenizer, for work beside the worker (a data preview while a job runs).
    pub tokenizer: std::sync::Arc<mtp_core::TextTokenizer>,
    /// Seconds the load took.
    pub load_seconds: f64,
}

/// A loaded adapter.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    /// Its file.
    pub path: PathBuf,
    /// Its method config.
    pub config: MtpConfig,
}

/// Formatted examples of a dataset.
#[derive(Debug, Clone)]
pub struct DataPreview {
    /// What reading found.
    pub report: DataReport,
    /// The first few examples as trained (empty without a loaded model), or why one cannot
    /// be (a conversation for a model without a chat template).
    pub examples: Vec<Result<Vec<PreviewToken>, String>>,
}

/// A run of a project.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Its folder.
    pub dir: PathBuf,
    /// Its recipe.
    pub config: Option<TrainConfig>,
    /// Its metrics.
    pub metrics: Vec<StepMetrics>,
}

/// One token of a race lane.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneToken {
    /// Token id.
    pub id: i64,
    /// Its text.
    pub text: String,
    /// How it was produced.
    pub origin: TokenOrigin,
    /// The forward pass that produced it.
    pub step: usize,
}

/// A race lane's totals.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneDone {
    /// Tokens emitted.
    pub tokens: usize,
    /// Forward passes.
    pub forwards: usize,
    /// Compute seconds of this lane.
    pub seconds: f64,
    /// Why it stopped.
    pub stop: StopReason,
    /// All token ids.
    pub token_ids: Vec<i64>,
    /// Whether its steps replayed CUDA graphs.
    pub cuda_graph: bool,
}

/// One step of step-through decoding, with texts for display.
#[derive(Debug, Clone)]
pub struct StepView {
    /// The step number (0 = prefill).
    pub step: usize,
    /// Text of every row's input token (masks shown as m1..mk).
    pub input_text: Vec<String>,
    /// What the step computed.
    pub detail: Option<StepDetail>,
    /// The drafts it verified, as text.
    pub drafts_text: Vec<String>,
    /// Accepted drafts.
    pub accepted: usize,
    /// The next verified token's text.
    pub next_text: String,
    /// Text of the top candidates: regular rows, then the draft slots.
    pub regular_top_text: Vec<Vec<String>>,
    /// Top candidate texts of each draft slot.
    pub draft_top_text: Vec<Vec<String>>,
    /// The next drafts as text.
    pub next_drafts_text: Vec<String>,
    /// The prefill (step 0): the top-5 of each slot of the mask block after the prompt,
    /// which made the first drafts (texts in `draft_top_text`); empty for a step.
    pub prefill_top: Vec<mtp_core::decode::speculative::Candidates>,
    /// The text generated so far.
    pub generated: String,
}

/// What the worker reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A job started.
    Started(Job),
    /// A job finished (successfully or not).
    Finished(Job),
    /// A job failed; the worker carries on.
    Failed(Job, String),
    /// Progress of the running job: a message and a fraction in [0, 1] when known.
    Progress(Job, String, Option<f32>),
    /// A model is loaded.
    ModelLoaded(Box<ModelSummary>),
    /// An adapter is loaded.
    AdapterLoaded(AdapterSummary),
    /// A dataset preview.
    DataPreview(Box<DataPreview>),
    /// A distilled set was written.
    Distilled {
        /// The JSONL file.
        path: PathBuf,
        /// Sequences in it.
        sequences: usize,
        /// Generated tokens in it.
        new_tokens: usize,
        /// Seconds it took.
        seconds: f64,
    },
    /// A training event.
    Train(Box<TrainEvent>),
    /// A training run ended.
    TrainDone {
        /// The run folder.
        run_dir: PathBuf,
        /// Completed steps.
        step: usize,
        /// True when it was stopped before the end.
        stopped: bool,
        /// Whether its adapter was loaded: a finished run's is; a stopped run's only when no
        /// adapter was loaded (a few steps' adapter does not replace a good one unasked).
        adapter_loaded: bool,
    },
    /// The runs of a project.
    Runs(Vec<RunSummary>),
    /// A race lane emitted a token.
    RaceToken(usize, LaneToken),
    /// A race lane finished a speculative step (for rejected drafts), with the drafts' text.
    RaceStep(usize, StepStats, Vec<String>),
    /// A race lane finished.
    RaceDone(usize, LaneDone),
    /// Step-through: a step.
    Step(Box<StepView>),
    /// A benchmark report.
    Bench(Box<BenchReport>),
    /// A probe report with the true tokens' texts and the adapter it probed.
    Probe(Box<ProbeReport>, Vec<String>, PathBuf),
    /// Something the user should know that is no error (a job stopped on request).
    Notice(String),
    /// An adapter was exported as a PEFT LoRA folder.
    Exported {
        /// The folder.
        dir: PathBuf,
        /// LoRA tensors written.
        tensors: usize,
    },
}

/// How often the window refreshes what moves while a job runs (its progress, a run's
/// metrics, tokens/s and times), and how long such an event may wait to be shown.
pub const LIVE_REFRESH: Duration = Duration::from_millis(250);

/// How long any other event may wait to be shown: a job starting or ending, a result, a
/// race's tokens where frames are cheap (about 30 frames a second at most, however fast
/// they come).
pub const PROMPT_REFRESH: Duration = Duration::from_millis(33);

/// How soon the window must show an event ([`Event::wake`]). A frame costs the machine the
/// job runs on (with a software renderer, a VM's or a remote desktop's, tens of
/// milliseconds of both cores of a small machine), so what moves with a job is shown a few
/// times a second, and nothing a race measures shares its cores with frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// With the other live numbers ([`LIVE_REFRESH`]): a job's progress, a run's metrics.
    Live,
    /// A race's start, tokens, steps and finished lanes: at once ([`PROMPT_REFRESH`]) where
    /// a GPU draws the window, with the live numbers where a software renderer does, so that
    /// no frame falls inside a short race. There a frame took both cores of a 2-core machine
    /// for tens of milliseconds, and the lanes, timed pass by pass in turns, were timed
    /// against whichever frames fell in their passes: the demo's race under lavapipe on a
    /// Zen 5 (the sixty-fourth session) read 0.90x to 9.52x over five races, AR's lane at
    /// 111-1,432 tokens/s; with this and the worker's wait for a pause in the frames
    /// (`worker::RACE_QUIET`), 1.20x to 1.69x over sixteen, AR's lane at 1,540-2,521
    /// tokens/s, as `mtp generate` runs it (2,320-2,590).
    Race,
    /// At once ([`PROMPT_REFRESH`]): a job starting or ending, a result, a notice.
    Prompt,
}

impl Wake {
    /// How long the event may wait to be shown, with a software renderer or not.
    pub fn after(self, software_renderer: bool) -> Duration {
        match self {
            Wake::Live => LIVE_REFRESH,
            Wake::Race if software_renderer => LIVE_REFRESH,
            Wake::Race | Wake::Prompt => PROMPT_REFRESH,
        }
    }
}

impl Event {
    /// How soon the window must show this event ([`Wake`]).
    pub fn wake(&self) -> Wake {
        match self {
            Event::Progress(..) | Event::Train(_) => Wake::Live,
            Event::Started(Job::Race) | Event::RaceToken(..) | Event::RaceStep(..) | Event::RaceDone(..) => Wake::Race,
            _ => Wake::Prompt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What moves with a running job waits for the live refresh; a job's start and end, its
    /// results and a race's tokens are shown at once, but for a race's under a software
    /// renderer, which wait for the live refresh until the race has finished.
    #[test]
    fn progress_and_metrics_wait_for_the_live_refresh() {
        for software in [false, true] {
            let progress = Event::Progress(Job::Bench, "prompt 1 of 30".into(), Some(0.0));
            assert_eq!(progress.wake().after(software), LIVE_REFRESH);
            for prompt in [Event::Started(Job::Bench), Event::Finished(Job::Bench), Event::Notice("stopped".into())] {
                assert_eq!(prompt.wake().after(software), PROMPT_REFRESH, "{prompt:?}");
            }
            let token = LaneToken { id: 7, text: "x".into(), origin: TokenOrigin::Verified, step: 1 };
            let expected = if software { LIVE_REFRESH } else { PROMPT_REFRESH };
            for event in [Event::Started(Job::Race), Event::RaceToken(1, token)] {
                assert_eq!(event.wake().after(software), expected, "{event:?}, software renderer {software}");
            }
            // The race's end shows its numbers at once.
            assert_eq!(Event::Finished(Job::Race).wake().after(software), PROMPT_REFRESH);
        }
        assert!(PROMPT_REFRESH < LIVE_REFRESH);
    }
}
