//! The worker thread: owns every tensor (the model, the adapter), runs one job at a time,
//! and talks to the UI over bounded channels. A job that fails or panics becomes an
//! [`Event::Failed`]; the thread carries on. Cancel and pause go through a shared
//! [`Control`], not through the queue, so they reach a running job at once.

pub mod protocol;

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use mtp_core::decode::bench::{BenchReport, read_prompts, run_bench};
use mtp_core::decode::{
    DraftArithmetic, DraftOptions, Drafter, GenerateRequest, Generation, Layout, MaskCount, SpecDecoder, Speculative,
    StepStats, Strategy, TokenEvent, TokenSink,
};
use mtp_core::inspect::ModelInfo;
use mtp_core::mtp::MtpAdapter;
use mtp_core::mtp::probe::probe;
use mtp_core::source::{DownloadProgress, HubOptions};
use mtp_core::tokenizer::ChatMessage;
use mtp_core::train::distill::distill_into;
use mtp_core::train::trainer::{RunDir, read_config, read_metrics};
use mtp_core::train::{Control, Outcome, TrainEvent};
use mtp_core::{LoadOptions, LoadedModel};

pub use protocol::{
    AdapterSummary, DataPreview, Event, Job, LaneDone, LaneSpec, LaneToken, ModelSummary, Request, RunSummary,
    StepView, Wake,
};

/// Requests waiting for the worker; the UI never needs more.
const REQUEST_CAPACITY: usize = 64;
/// Events waiting for the UI; a fast producer blocks rather than growing memory.
const EVENT_CAPACITY: usize = 4096;

/// The pause in the window's frames a race waits for before its first pass
/// ([`Frames::wait_quiet`]): a click on Race starts a few frames (the press, the button's
/// animation), and under a software renderer they take both cores of a small machine
/// (lavapipe at 1280 x 820 on a 2-core Zen 5, the sixty-fourth session: its two threads
/// used 240-350 ms of CPU time over a click on Race and the demo's race), so a lane
/// timed meanwhile was timed against them. After 100 ms without one the last has been
/// drawn.
pub(crate) const RACE_QUIET: Duration = Duration::from_millis(100);

/// The longest a race waits for [`RACE_QUIET`] (a window that never stops drawing, say
/// under a moving mouse, delays it no more).
const RACE_QUIET_AT_MOST: Duration = Duration::from_secs(1);

/// When the window last started a frame ([`crate::app::WorkbenchApp::draw`], the headless
/// tests' frames included), shared with the worker, which waits for a pause in them before
/// it times a race's lanes. Never marked: no frame to wait for.
#[derive(Debug, Clone, Default)]
pub struct Frames(Arc<Mutex<Option<Instant>>>);

impl Frames {
    /// A frame starts now.
    pub fn mark(&self) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some(Instant::now());
        }
    }

    /// The time since the last frame started (`None`: none has).
    fn since_last(&self) -> Option<Duration> {
        self.0.lock().ok().and_then(|last| last.map(|t| t.elapsed()))
    }

    /// Wait until no frame has started for `quiet`, or `at_most` has passed.
    fn wait_quiet(&self, quiet: Duration, at_most: Duration) {
        let until = Instant::now() + at_most;
        while let Some(since) = self.since_last().filter(|since| *since < quiet) {
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep((quiet - since).min(until - now));
        }
    }
}

/// The UI's handle on the worker. Dropping it cancels the running job, waits for it to
/// stop cleanly (a training run checkpoints) and joins the thread.
pub struct WorkerHandle {
    requests: Option<Sender<Request>>,
    events: Receiver<Event>,
    control: Control,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Start the worker. `wake` is called after every event with how soon it must be shown
    /// ([`Event::wake`]; the GUI asks for a frame within [`Wake::after`]); `frames` tells
    /// when the window draws.
    pub fn spawn(wake: impl Fn(Wake) + Send + 'static, frames: Frames) -> Self {
        let (req_tx, req_rx) = bounded(REQUEST_CAPACITY);
        let (ev_tx, ev_rx) = bounded(EVENT_CAPACITY);
        let control = Control::new();
        let worker_control = control.clone();
        let thread = std::thread::Builder::new()
            .name("mtp-worker".into())
            .spawn(move || {
                Worker {
                    events: ev_tx,
                    wake: Box::new(wake),
                    frames,
                    control: worker_control,
                    model: None,
                    adapter: None,
                    arithmetic: DraftArithmetic::Auto,
                }
                .run(req_rx)
            })
            .ok();
        Self { requests: Some(req_tx), events: ev_rx, control, thread }
    }

    /// Queue a request. Fails (with the reason) when the queue is full or the worker is gone.
    pub fn send(&self, request: Request) -> Result<(), String> {
        let Some(tx) = &self.requests else { return Err("the worker has stopped".into()) };
        tx.try_send(request).map_err(|e| match e {
            TrySendError::Full(_) => "the worker is busy; try again".to_string(),
            TrySendError::Disconnected(_) => "the worker has stopped".to_string(),
        })
    }

    /// Ask the running job to stop at its next safe point.
    pub fn cancel(&self) {
        self.control.cancel();
    }

    /// Pause or resume the running job (training).
    pub fn set_paused(&self, paused: bool) {
        self.control.set_paused(paused);
    }

    /// Is the running job paused?
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// An event that has arrived, without waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Wait up to `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.control.cancel();
        self.requests.take();
        if let Some(t) = self.thread.take() {
            // Keep the event queue flowing until the job has wound down (a training run
            // writes its checkpoint), then join.
            while !t.is_finished() {
                while self.events.try_recv().is_ok() {}
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = t.join();
        }
    }
}

struct Worker {
    events: Sender<Event>,
    wake: Box<dyn Fn(Wake) + Send>,
    frames: Frames,
    control: Control,
    model: Option<LoadedModel>,
    adapter: Option<Adapter>,
    /// The arithmetic of the mask rows of the adapters it prepares (the last load's).
    arithmetic: DraftArithmetic,
}

/// The loaded adapter and the same adapter prepared for decoding.
struct Adapter {
    adapter: MtpAdapter,
    drafter: Drafter,
    /// Its file.
    path: PathBuf,
}

pub(crate) fn job_of(r: &Request) -> Job {
    match r {
        Request::LoadModel { .. } => Job::LoadModel,
        Request::LoadAdapter { .. } => Job::LoadAdapter,
        Request::PreviewData { .. } => Job::Data,
        Request::Distill { .. } => Job::Distill,
        Request::Train { .. } | Request::Resume { .. } => Job::Train,
        Request::ReadRuns { .. } => Job::Runs,
        Request::Race { .. } => Job::Race,
        Request::StepStart { .. } | Request::StepNext => Job::Step,
        Request::Bench { .. } => Job::Bench,
        Request::Probe { .. } => Job::Probe,
        Request::ExportPeft { .. } => Job::Export,
    }
}

impl Worker {
    fn run(mut self, requests: Receiver<Request>) {
        let mut next = requests.recv().ok();
        while let Some(request) = next.take() {
            let job = job_of(&request);
            if matches!(job, Job::Distill | Job::Train) {
                // What decoding kept for the next race (caches, recorded steps) gives way.
                if let Some(m) = &self.model {
                    m.model.release_kept();
                }
                if let Some(a) = &self.adapter {
                    a.drafter.release_kept();
                }
            }
            self.control.reset();
            if job == Job::Race {
                // The frames of the click that asked for the race, drawn on the machine's
                // cores by a software renderer, pass before either lane is timed; those that
                // show it come after, under a software renderer with the live numbers
                // (`Wake::Race`), when a short race has finished. The window learns of the
                // race only then: a window that knows a job runs draws its live numbers
                // every 250 ms, one of which would fall in the race.
                self.frames.wait_quiet(RACE_QUIET, RACE_QUIET_AT_MOST);
            }
            self.emit(Event::Started(job));
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.handle(request, &requests)));
            match result {
                Ok(Ok(follow)) => next = follow,
                Ok(Err(e)) => self.emit(Event::Failed(job, crate::error_text(&e))),
                Err(panic) => self.emit(Event::Failed(job, format!("internal error: {}", panic_message(&panic)))),
            }
            self.emit(Event::Finished(job));
            if next.is_none() {
                next = requests.recv().ok();
            }
        }
    }

    fn emit(&self, event: Event) {
        let wake = event.wake();
        let _ = self.events.send(event);
        (self.wake)(wake);
    }

    fn model(&self) -> anyhow::Result<&LoadedModel> {
        self.model.as_ref().context("no model is loaded: load one in the Model tab")
    }

    fn adapter(&self) -> anyhow::Result<&MtpAdapter> {
        Ok(&self.loaded_adapter()?.adapter)
    }

    fn drafter(&self) -> anyhow::Result<&Drafter> {
        Ok(&self.loaded_adapter()?.drafter)
    }

    fn loaded_adapter(&self) -> anyhow::Result<&Adapter> {
        self.adapter.as_ref().context("no MTP adapter is loaded: train one, or load one in the Model tab")
    }

    /// Make `adapter` (read from `path`) the loaded one, prepared for decoding with the loaded
    /// model, and say so: the window learns of it only once it can decode.
    fn set_adapter(&mut self, adapter: MtpAdapter, path: PathBuf) -> anyhow::Result<()> {
        let options = DraftOptions { arithmetic: self.arithmetic, ..DraftOptions::default() };
        let drafter = Drafter::new(&self.model()?.model, &adapter, options)?;
        self.emit(Event::AdapterLoaded(AdapterSummary { path: path.clone(), config: adapter.config.clone() }));
        self.adapter = Some(Adapter { adapter, drafter, path });
        Ok(())
    }

    /// Run one request. Step-through sessions keep reading the queue; the request that
    /// ends one is returned to be handled next.
    fn handle(&mut self, request: Request, queue: &Receiver<Request>) -> anyhow::Result<Option<Request>> {
        match request {
            Request::LoadModel { source, device, dtype, cuda_graphs, template_vars, arithmetic, adapter: keep } => {
                let start = Instant::now();
                self.arithmetic = arithmetic;
                self.model = None;
                self.adapter = None;
                let options = LoadOptions { device, dtype, hub: HubOptions::from_env(), cuda_graphs, template_vars };
                let loaded = {
                    let mut progress =
                        Progress { worker: self, file: String::new(), total: 0, done: 0, last: Instant::now() };
                    LoadedModel::load(&source, &options, &mut progress)?
                };
                let info = ModelInfo::from_folder(&loaded.dir)?;
                let summary = ModelSummary {
                    source: source.clone(),
                    dir: loaded.dir.clone(),
                    info,
                    config: loaded.model.config.clone(),
                    device,
                    dtype,
                    chat_template: loaded.tokenizer.has_chat_template(),
                    tokenizer: std::sync::Arc::new(loaded.tokenizer.clone()),
                    load_seconds: start.elapsed().as_secs_f64(),
                };
                // The adapter in use stays (the same model loaded again); else the demo's own.
                let demo_adapter = mtp_core::source::demo_adapter();
                let adapter = match keep {
                    Some(path) => {
                        let check =
                            mtp_core::mtp::BaseCheck { model_name: loaded.source.to_string(), ..Default::default() };
                        let kept = MtpAdapter::load_checked(&path, &loaded.model, &check);
                        self.model = Some(loaded);
                        self.emit(Event::ModelLoaded(Box::new(summary)));
                        let kept = kept.with_context(|| {
                            format!("the model is loaded, without the adapter in use, {}", path.display())
                        })?;
                        Some((kept, path))
                    }
                    None => {
                        let demo = if source == mtp_core::ModelSource::Demo && demo_adapter.exists() {
                            Some((MtpAdapter::load(&demo_adapter, &loaded.model)?, demo_adapter))
                        } else {
                            None
                        };
                        self.model = Some(loaded);
                        self.emit(Event::ModelLoaded(Box::new(summary)));
                        demo
                    }
                };
                if let Some((a, path)) = adapter {
                    self.set_adapter(a, path)?;
                }
            }
            Request::LoadAdapter { path, arithmetic } => {
                self.arithmetic = arithmetic;
                let loaded = self.model()?;
                let check = mtp_core::mtp::BaseCheck { model_name: loaded.source.to_string(), ..Default::default() };
                let adapter = MtpAdapter::load_checked(&path, &loaded.model, &check)?;
                self.set_adapter(adapter, path)?;
            }
            Request::PreviewData { source, strict, seq_len } => {
                let preview = data_preview(&source, strict, seq_len, self.model.as_ref().map(|m| &m.tokenizer))?;
                self.emit(Event::DataPreview(Box::new(preview)));
            }
            Request::Distill { source, config, out } => {
                let loaded = self.model()?;
                let started = Instant::now();
                let mut progress = |done: usize, total: usize| {
                    let what = format!("{done}/{total} sequences");
                    self.emit(Event::Progress(Job::Distill, what, Some(done as f32 / total.max(1) as f32)));
                };
                let outcome = distill_into(loaded, &source, &config, &out, &self.control, &mut progress)?;
                if !outcome.complete {
                    self.emit(Event::Notice(format!(
                        "self-distillation stopped with {} prompts answered, kept in {}: Self-distill again continues \
                         from there",
                        outcome.examples.len(),
                        outcome.partial.display()
                    )));
                    return Ok(None);
                }
                let examples = outcome.examples;
                self.emit(Event::Distilled {
                    path: out,
                    sequences: examples.len(),
                    new_tokens: examples.iter().map(|d| d.completion_ids.len()).sum(),
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            Request::Train { config, run_dir } => {
                let loaded = self.model()?;
                let mut sink = |e: &TrainEvent| self.emit(Event::Train(Box::new(e.clone())));
                let summary = mtp_core::train::train(loaded, &config, &run_dir, &mut sink, &self.control)?;
                self.after_training(&run_dir, summary.step, summary.outcome)?;
            }
            Request::Resume { run_dir, steps } => {
                let loaded = self.model()?;
                let mut sink = |e: &TrainEvent| self.emit(Event::Train(Box::new(e.clone())));
                let (_, summary) = mtp_core::train::resume(loaded, &run_dir, steps, &mut sink, &self.control)?;
                self.after_training(&run_dir, summary.step, summary.outcome)?;
            }
            Request::ReadRuns { project_dir } => self.emit(Event::Runs(read_runs(&project_dir))),
            Request::ExportPeft { adapter, out } => {
                let done = mtp_core::mtp::export::export_peft(&adapter, &out)?;
                self.emit(Event::Exported { dir: done.dir, tensors: done.tensors });
            }
            Request::Race { prompt, chat, lanes, decoding, max_new_tokens } => {
                self.race(&prompt, chat, lanes, decoding, max_new_tokens)?;
            }
            Request::StepStart { prompt, masks } => return self.step_session(&prompt, masks, queue),
            Request::StepNext => anyhow::bail!("start step-through first (Start)"),
            Request::Bench { prompts, config } => {
                let loaded = self.model()?;
                let drafter = self.drafter()?;
                let prompts = read_prompts(&prompts)?;
                let control = self.control.clone();
                let mut progress = |done: usize, total: usize, what: &str| {
                    self.emit(Event::Progress(Job::Bench, what.to_owned(), Some(done as f32 / total.max(1) as f32)));
                    if control.is_cancelled() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
                };
                // Stopped on request: the table of the prompts measured (it says so), or, before
                // the first was, a notice and no table; no error either way.
                let adapter = self.loaded_adapter()?.path.clone();
                match run_bench(&loaded.model, drafter, &loaded.tokenizer, &prompts, &config, &mut progress) {
                    Ok(report) => {
                        let context =
                            mtp_core::decode::explain::Context::of(drafter, Some(&adapter), &loaded.tokenizer);
                        let report = BenchReport {
                            model: Some(loaded.source.to_string()),
                            findings: mtp_core::decode::explain::explain(&report, &context),
                            adapter: Some(adapter),
                            ..report
                        };
                        self.emit(Event::Bench(Box::new(report)))
                    }
                    Err(mtp_core::Error::Cancelled) => self.emit(Event::Notice(
                        "benchmark stopped before its first prompt was measured in every mode: no table".into(),
                    )),
                    Err(e) => return Err(e.into()),
                }
            }
            Request::Probe { prompt, continuation } => {
                let loaded = self.model()?;
                let tok = &loaded.tokenizer;
                let (prompt_ids, continuation_ids) = mtp_core::mtp::probe::encode(tok, &prompt, &continuation)?;
                let report = probe(&loaded.model, self.adapter()?, &prompt_ids, &continuation_ids)?;
                let texts = report.slots.iter().map(|s| tok.decode(&[s.token], false).unwrap_or_default()).collect();
                let adapter = self.loaded_adapter()?.path.clone();
                self.emit(Event::Probe(Box::new(report), texts, adapter));
            }
        }
        Ok(None)
    }

    /// After a run: report it and load its adapter for Compare, Step, Bench and Probe (a
    /// stopped run's only when no adapter is loaded).
    fn after_training(&mut self, run_dir: &Path, step: usize, outcome: Outcome) -> anyhow::Result<()> {
        let stopped = outcome == Outcome::Stopped;
        let path = RunDir(run_dir.to_owned()).adapter();
        let load = path.exists() && (!stopped || self.adapter.is_none());
        self.emit(Event::TrainDone { run_dir: run_dir.to_owned(), step, stopped, adapter_loaded: load });
        if load {
            let adapter = MtpAdapter::load(&path, &self.model()?.model)?;
            self.set_adapter(adapter, path)?;
        }
        Ok(())
    }

    fn encode_prompt(loaded: &LoadedModel, prompt: &str, chat: bool) -> anyhow::Result<Vec<i64>> {
        let tok = &loaded.tokenizer;
        Ok(if chat {
            tok.encode_with(&tok.apply_chat_template(&[ChatMessage::new("user", prompt)], true)?, false)?
        } else {
            tok.encode(prompt)?
        })
    }

    /// Two lanes on the same weights, advanced in turns (one forward pass each), so both
    /// stream at once; each lane's speed counts only its own compute time.
    fn race(
        &self,
        prompt: &str,
        chat: bool,
        lanes: [LaneSpec; 2],
        decoding: mtp_core::decode::Decoding,
        max_new_tokens: usize,
    ) -> anyhow::Result<()> {
        let loaded = self.model()?;
        let prompt_ids = Self::encode_prompt(loaded, prompt, chat)?;
        let req = GenerateRequest { prompt_ids, max_new_tokens, decoding, eos_ids: loaded.tokenizer.eos_ids.clone() };
        let drafter = self.adapter.as_ref().map(|a| &a.drafter);
        let mut gens = Vec::new();
        for lane in lanes {
            let strategy = Strategy::new(lane.mode, drafter, lane.masks).with_context(|| {
                format!("lane {} ({} decoding): train or load an adapter first", gens.len() + 1, lane.mode)
            })?;
            gens.push(Generation::new(&loaded.model, strategy, req.clone())?);
        }
        let mut streams: Vec<_> = (0..2).map(|_| loaded.tokenizer.stream(false)).collect();
        while gens.iter().any(|g| !g.is_done()) {
            if self.control.is_cancelled() {
                break;
            }
            for (lane, g) in gens.iter_mut().enumerate() {
                if g.is_done() {
                    continue;
                }
                let mut sink =
                    LaneSink { worker: self, lane, stream: &mut streams[lane], tokenizer: &loaded.tokenizer };
                g.advance(&mut sink)?;
                if g.is_done() {
                    let out = g.output();
                    self.emit(Event::RaceDone(
                        lane,
                        LaneDone {
                            tokens: out.token_ids.len(),
                            forwards: out.forwards,
                            seconds: out.total_time.as_secs_f64(),
                            stop: out.stop,
                            token_ids: out.token_ids.clone(),
                            cuda_graph: out.cuda_graph,
                        },
                    ));
                }
            }
        }
        Ok(())
    }

    /// Step-through: prefill, then one forward pass per `StepNext`. Any other request ends
    /// the session and is returned to be handled next.
    fn step_session(&self, prompt: &str, masks: usize, queue: &Receiver<Request>) -> anyhow::Result<Option<Request>> {
        let loaded = self.model()?;
        let drafter = self.drafter()?;
        let tok = &loaded.tokenizer;
        let prompt_ids = Self::encode_prompt(loaded, prompt, false)?;
        let req = GenerateRequest {
            prompt_ids,
            max_new_tokens: 4096.min(loaded.model.config.context_length() / 2),
            decoding: mtp_core::decode::Decoding::Greedy,
            eos_ids: vec![],
        };
        let spec = Speculative { drafter, layout: Layout::Quadratic, masks: MaskCount::Fixed(masks) };
        let (mut decoder, first) = SpecDecoder::start(&loaded.model, spec, &req)?;
        let text =
            |ids: &[i64]| -> Vec<String> { ids.iter().map(|&i| tok.decode(&[i], false).unwrap_or_default()).collect() };
        let mut generated = vec![first];
        let prefill_top = decoder.prefill_candidates()?;
        self.emit(Event::Step(Box::new(StepView {
            step: 0,
            input_text: Vec::new(),
            detail: None,
            drafts_text: Vec::new(),
            accepted: 0,
            next_text: text(&[first]).concat(),
            regular_top_text: Vec::new(),
            draft_top_text: prefill_top.iter().map(|c| text(&c.ids)).collect(),
            prefill_top,
            next_drafts_text: text(decoder.drafts()),
            generated: tok.decode(&generated, false).unwrap_or_default(),
        })));
        loop {
            let request = match queue.recv() {
                Ok(r) => r,
                Err(_) => return Ok(None),
            };
            if !matches!(request, Request::StepNext) {
                return Ok(Some(request));
            }
            if !decoder.has_room() {
                anyhow::bail!("the context is full");
            }
            let r = decoder.step(true)?;
            generated.extend(&r.accepted);
            generated.push(r.next);
            let detail = r.detail.map(|d| *d);
            let (regular_top_text, draft_top_text, input_text) = match &detail {
                Some(d) => (
                    d.regular_top.iter().map(|c| text(&c.ids)).collect(),
                    d.draft_top.iter().map(|c| text(&c.ids)).collect(),
                    d.inputs.iter().map(|&i| if i < 0 { format!("m{}", -i) } else { text(&[i]).concat() }).collect(),
                ),
                None => (Vec::new(), Vec::new(), Vec::new()),
            };
            self.emit(Event::Step(Box::new(StepView {
                step: r.stats.step,
                input_text,
                drafts_text: text(&r.stats.drafts),
                accepted: r.stats.accepted,
                next_text: text(&[r.next]).concat(),
                regular_top_text,
                draft_top_text,
                next_drafts_text: text(decoder.drafts()),
                prefill_top: Vec::new(),
                generated: tok.decode(&generated, false).unwrap_or_default(),
                detail,
            })));
        }
    }
}

/// What the Data view previews of `source`: the dataset's report and its first three
/// examples as `tokenizer` formats them (none without a model). Reads files and tokenizes,
/// no tensor: the window runs it on a thread of its own while the worker is busy.
pub(crate) fn data_preview(
    source: &mtp_core::train::DataSource,
    strict: bool,
    seq_len: usize,
    tokenizer: Option<&mtp_core::TextTokenizer>,
) -> anyhow::Result<DataPreview> {
    let (examples, report) = mtp_core::train::data::read_examples(source, strict)?;
    let examples = match tokenizer {
        Some(tok) => examples
            .iter()
            .take(3)
            .map(|e| mtp_core::train::data::preview(e, tok, seq_len).map_err(|e| e.to_string()))
            .collect(),
        None => Vec::new(),
    };
    Ok(DataPreview { report, examples })
}

/// Streams one race lane's tokens and steps to the UI.
struct LaneSink<'a, 'b> {
    worker: &'a Worker,
    lane: usize,
    stream: &'a mut mtp_core::tokenizer::TokenStream<'b>,
    tokenizer: &'b mtp_core::TextTokenizer,
}

impl TokenSink for LaneSink<'_, '_> {
    fn token(&mut self, e: &TokenEvent) -> ControlFlow<()> {
        // Per-token text (not the stream's) so each token can be coloured on its own; the
        // stream is still fed so multi-byte characters complete.
        let _ = self.stream.push(e.id);
        let text = self.tokenizer.decode(&[e.id], false).unwrap_or_default();
        self.worker.emit(Event::RaceToken(self.lane, LaneToken { id: e.id, text, origin: e.origin, step: e.step }));
        if self.worker.control.is_cancelled() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    }

    fn step(&mut self, stats: &StepStats) -> ControlFlow<()> {
        let texts = stats.rejected().iter().map(|&i| self.tokenizer.decode(&[i], false).unwrap_or_default()).collect();
        self.worker.emit(Event::RaceStep(self.lane, stats.clone(), texts));
        ControlFlow::Continue(())
    }
}

/// Every run folder of a project with its recipe and metrics (unreadable ones skipped).
fn read_runs(project_dir: &Path) -> Vec<RunSummary> {
    let runs_dir = mtp_core::project::Project::runs_dir(project_dir);
    let Ok(entries) = std::fs::read_dir(&runs_dir) else { return Vec::new() };
    let mut runs: Vec<RunSummary> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").exists())
        .map(|dir| RunSummary { config: read_config(&dir).ok(), metrics: read_metrics(&dir).unwrap_or_default(), dir })
        .collect();
    runs.sort_by(|a, b| a.dir.cmp(&b.dir));
    runs
}

/// Download progress as worker events (at most every 100 ms).
struct Progress<'a> {
    worker: &'a Worker,
    file: String,
    total: u64,
    done: u64,
    last: Instant,
}

impl DownloadProgress for Progress<'_> {
    fn start(&mut self, file: &str, bytes: u64) {
        self.file = file.to_owned();
        self.total = bytes;
        self.done = 0;
        self.worker.emit(Event::Progress(Job::LoadModel, format!("downloading {file}"), Some(0.0)));
    }
    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if self.last.elapsed() > Duration::from_millis(100) {
            self.last = Instant::now();
            let frac = if self.total > 0 { self.done as f32 / self.total as f32 } else { 0.0 };
            let msg = format!("downloading {} ({})", self.file, mtp_core::inspect::human_bytes(self.done));
            self.worker.emit(Event::Progress(Job::LoadModel, msg, Some(frac)));
        }
    }
    fn finish(&mut self) {
        self.worker.emit(Event::Progress(Job::LoadModel, format!("{} downloaded", self.file), Some(1.0)));
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A race waits for a pause in the window's frames: none when no frame was ever drawn,
    /// until `quiet` after the last one otherwise, and no longer than `at_most` while frames
    /// keep coming.
    #[test]
    fn races_wait_for_a_pause_in_the_frames() {
        let frames = Frames::default();
        let quiet = Duration::from_millis(60);
        frames.wait_quiet(Duration::from_secs(3600), Duration::from_secs(3600));
        assert_eq!(frames.since_last(), None, "never drawn: nothing to wait for");
        frames.mark();
        frames.wait_quiet(quiet, Duration::from_secs(3600));
        assert!(frames.since_last().is_some_and(|since| since >= quiet), "returned within `quiet` of a frame");
        // A window drawing every 5 ms: the wait gives up after `at_most`.
        let drawing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let window = {
            let (frames, drawing) = (frames.clone(), drawing.clone());
            std::thread::spawn(move || {
                while drawing.load(std::sync::atomic::Ordering::Relaxed) {
                    frames.mark();
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let (at_most, started) = (Duration::from_millis(50), Instant::now());
        frames.wait_quiet(Duration::from_secs(3600), at_most);
        assert!(started.elapsed() >= at_most);
        drawing.store(false, std::sync::atomic::Ordering::Relaxed);
        window.join().expect("the drawing thread");
    }
}
