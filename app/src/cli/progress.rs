//! Progress bars on a terminal (and nothing when stderr is not one).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use mtp_core::source::DownloadProgress;

/// A byte progress bar for downloads.
pub struct DownloadBar {
    bar: Option<ProgressBar>,
}

impl DownloadBar {
    /// A bar on stderr when it is a terminal.
    pub fn new() -> Self {
        Self { bar: None }
    }
}

impl DownloadProgress for DownloadBar {
    fn start(&mut self, file: &str, bytes: u64) {
        if !std::io::stderr().is_terminal() {
            eprintln!("downloading {file} ({})", mtp_core::inspect::human_bytes(bytes));
            return;
        }
        let bar = ProgressBar::new(bytes);
        let style = ProgressStyle::with_template("{msg:30!} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(file.to_owned());
        self.bar = Some(bar);
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
