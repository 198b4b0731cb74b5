//! Where the window keeps [`Persisted`] across restarts: `settings.json` in the app's data
//! folder (eframe's, `~/.local/share/mtpworkbench` on Linux), written by a thread of its own
//! through a temporary file and a rename, so that a frame never waits on the disk and a
//! window killed while it writes keeps the settings before. (eframe's own file, still
//! read once to carry over what an older version saved there, is rewritten in place.)

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};

use crate::state::Persisted;

/// The file in `dir`.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join("settings.json")
}

/// The settings saved in `path`: `None` when there are none, or when the file cannot be read
/// (said on stderr; the window then starts from its defaults, and the next save replaces it).
pub fn load(path: &Path) -> Option<Persisted> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!("{}: {e}; starting from the default settings", path.display());
            None
        }
    }
}

/// Writes the settings it is given on its own thread, the newest of those waiting.
pub struct Saver {
    tx: Option<Sender<Persisted>>,
    thread: Option<JoinHandle<()>>,
}

impl Saver {
    /// A saver writing to `path`.
    pub fn spawn(path: PathBuf) -> Self {
        let (tx, rx) = unbounded::<Persisted>();
        let thread = std::thread::Builder::new()
            .name("settings".into())
            .spawn(move || {
                while let Ok(mut settings) = rx.recv() {
                    // Only the newest of those waiting is worth writing.
                    while let Ok(newer) = rx.try_recv() {
                        settings = newer;
                    }
                    if let Err(e) = mtp_core::fsutil::write_json_atomic(&path, &settings) {
                        tracing::error!("saving the window's settings: {e}");
                    }
                }
            })
            .ok();
        Self { tx: Some(tx), thread }
    }

    /// Save `settings` (soon, on the saver's thread).
    pub fn save(&self, settings: &Persisted) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(settings.clone());
        }
    }

    /// Write what is waiting and stop.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The newest settings saved are on disk once the saver finishes, read back equal; a
    /// file that is not settings reads as none.
    #[test]
    fn the_newest_settings_are_written_and_read_back() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = path_in(dir.path());
        assert_eq!(load(&path), None);
        let mut saver = Saver::spawn(path.clone());
        let mut settings = Persisted::default();
        for name in ["a", "b", "c"] {
            settings.new_project = name.into();
            saver.save(&settings);
        }
        saver.finish();
        assert_eq!(load(&path), Some(settings));
        std::fs::write(&path, "{ not json")?;
        assert_eq!(load(&path), None);
        Ok(())
    }
}
