//! The worker thread: owns every tensor, runs one job at a time, and talks to the UI over
//! bounded channels. A job that fails or panics becomes an [`Event::Failed`]; the thread
//! carries on.

pub mod protocol;

use std::panic::AssertUnwindSafe;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use mtp_core::inspect::ModelInfo;
use mtp_core::source::{DownloadProgress, HubOptions};
use mtp_core::{LoadOptions, LoadedModel};

pub use protocol::{Event, ModelSummary, Request};

/// Requests waiting for the worker; the UI never needs more.
const REQUEST_CAPACITY: usize = 16;
/// Events waiting for the UI; a fast producer blocks rather than growing memory.
const EVENT_CAPACITY: usize = 1024;

/// The UI's handle on the worker. Dropping it stops the thread and joins it.
pub struct WorkerHandle {
    requests: Option<Sender<Request>>,
    events: Receiver<Event>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Start the worker. `wake` is called after every event (the GUI passes
    /// `request_repaint`).
    pub fn spawn(wake: impl Fn() + Send + 'static) -> Self {
        let (req_tx, req_rx) = bounded(REQUEST_CAPACITY);
        let (ev_tx, ev_rx) = bounded(EVENT_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("mtp-worker".into())
            .spawn(move || Worker { events: ev_tx, wake: Box::new(wake), model: None }.run(req_rx))
            .ok();
        Self { requests: Some(req_tx), events: ev_rx, thread }
    }

    /// Queue a request. Fails (with the reason) when the queue is full or the worker is gone.
    pub fn send(&self, request: Request) -> Result<(), String> {
        let Some(tx) = &self.requests else { return Err("the worker has stopped".into()) };
        tx.try_send(request).map_err(|e| match e {
            TrySendError::Full(_) => "the worker is busy; try again".to_string(),
            TrySendError::Disconnected(_) => "the worker has stopped".to_string(),
        })
    }

    /// Events that have arrived, without waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Wait for the next event (tests and the CLI).
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.requests.take();
        // Unblock a worker waiting to send, then join it.
        while self.events.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    events: Sender<Event>,
    wake: Box<dyn Fn() + Send>,
    model: Option<LoadedModel>,
}

impl Worker {
    fn run(mut self, requests: Receiver<Request>) {
        for request in requests {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.handle(request)));
            let failure = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(panic) => Some(format!("internal error: {}", panic_message(&panic))),
            };
            if let Some(msg) = failure {
                self.emit(Event::Failed(msg));
            }
        }
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
        (self.wake)();
    }

    fn handle(&mut self, request: Request) -> anyhow::Result<()> {
        match request {
            Request::LoadModel { source, device, dtype } => {
                self.emit(Event::Started(format!("loading {source}")));
                let start = Instant::now();
                self.model = None;
                let options = LoadOptions { device, dtype, hub: HubOptions::from_env() };
                let mut progress = Progress { worker: self };
                let loaded = LoadedModel::load(&source, &options, &mut progress)?;
                let info = ModelInfo::from_folder(&loaded.dir)?;
                let summary = ModelSummary {
                    source,
                    dir: loaded.dir.clone(),
                    info,
                    device,
                    dtype,
                    chat_template: loaded.tokenizer.has_chat_template(),
                    load_seconds: start.elapsed().as_secs_f64(),
                };
                self.model = Some(loaded);
                self.emit(Event::ModelLoaded(Box::new(summary)));
            }
        }
        Ok(())
    }
}

/// Download progress as worker events.
struct Progress<'a> {
    worker: &'a Worker,
}

impl DownloadProgress for Progress<'_> {
    fn start(&mut self, file: &str, bytes: u64) {
        self.worker.emit(Event::Progress(format!("downloading {file} ({bytes} bytes)"), Some(0.0)));
    }
    fn advance(&mut self, _bytes: u64) {}
    fn finish(&mut self) {
        self.worker.emit(Event::Progress("download complete".into(), Some(1.0)));
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}
