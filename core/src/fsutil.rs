//! File writing that never leaves a half-written file behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temporary sibling `path` is first written to.
pub fn tmp_path(path: &Path) -> PathBuf {
    suffixed(path, ".tmp")
}

/// The sibling of `path` whose name is `path`'s followed by `suffix`.
pub fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Write `bytes` to `path` atomically: write and sync a temporary sibling, then rename it
/// over `path`. A crash leaves either the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = tmp_path(path);
    let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// [`write_atomic`] for a value serialized as pretty JSON.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|source| Error::Json { path: path.to_owned(), source })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_cleans_up() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("sub").join("a.json");
        write_json_atomic(&path, &serde_json::json!({"x": 1}))?;
        write_atomic(&path, b"second")?;
        assert_eq!(std::fs::read(&path).map_err(|e| Error::io(&path, e))?, b"second");
        assert!(!tmp_path(&path).exists());
        Ok(())
    }
}
