//! Cancel and pause for long jobs, shared between the thread that runs them and the one
//! that asks them to stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A shared flag pair: cancel (stop at the next safe point, saving state) and pause (wait
/// at the next safe point until resumed or cancelled). Clones share the flags.
#[derive(Debug, Clone, Default)]
pub struct Control {
    cancel: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
}

impl Control {
    /// Fresh flags, both off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the job to stop.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Has stopping been asked for?
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Pause (`true`) or resume (`false`).
    pub fn set_paused(&self, paused: bool) {
        self.pause.store(paused, Ordering::SeqCst);
    }

    /// Is the job asked to pause?
    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    /// Block while paused; returns `true` when the job should stop.
    pub fn wait_while_paused(&self) -> bool {
        while self.is_paused() && !self.is_cancelled() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.is_cancelled()
    }

    /// Clear both flags (before the next job).
    pub fn reset(&self) {
        self.cancel.store(false, Ordering::SeqCst);
        self.pause.store(false, Ordering::SeqCst);
    }

    /// The raw cancel flag (for signal handlers).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }
}
