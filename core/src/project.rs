//! Project folders: `project.toml` (model source, dataset, defaults) and `runs/`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, read_to_string};
use crate::source::ModelSource;

/// File name of a project's description.
pub const PROJECT_FILE: &str = "project.toml";

/// What `project.toml` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Project {
    /// Display name.
    pub name: String,
    /// The base model.
    pub model: ModelSource,
}

impl Project {
    /// True when `dir` holds a `project.toml`.
    pub fn is_project(dir: &Path) -> bool {
        dir.join(PROJECT_FILE).is_file()
    }

    /// Read `dir/project.toml`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(PROJECT_FILE);
        let text = read_to_string(&path)?;
        let mut project: Project =
            toml::from_str(&text).map_err(|e| Error::config(&path, "project", e.message().to_owned()))?;
        // Local model paths in a project are relative to the project folder.
        if let ModelSource::Local { path: p } = &mut project.model
            && p.is_relative()
        {
            *p = dir.join(&*p);
        }
        Ok(project)
    }

    /// Write `dir/project.toml` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(PROJECT_FILE);
        let text = toml::to_string_pretty(self).map_err(|e| Error::config(&path, "project", e.to_string()))?;
        crate::fsutil::write_atomic(&path, text.as_bytes())
    }

    /// The folder of a project's runs.
    pub fn runs_dir(dir: &Path) -> PathBuf {
        dir.join("runs")
    }

    /// The adapter most recently written by one of the project's runs (a run writes
    /// `adapter.safetensors` at each checkpoint and at its end), if any.
    pub fn newest_adapter(dir: &Path) -> Option<PathBuf> {
        let runs = std::fs::read_dir(Self::runs_dir(dir)).ok()?;
        runs.filter_map(|e| e.ok())
            .map(|e| crate::train::RunDir(e.path()).adapter())
            .filter_map(|a| Some((a.metadata().ok()?.modified().ok()?, a)))
            .max()
            .map(|(_, a)| a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_resolves_relative_paths() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let p = Project { name: "x".into(), model: ModelSource::Demo };
        p.save(dir.path())?;
        assert_eq!(Project::load(dir.path())?, p);
        std::fs::write(dir.path().join(PROJECT_FILE), "name = \"y\"\n[model]\nkind = \"local\"\npath = \"m\"\n")
            .map_err(|e| Error::io("write", e))?;
        assert_eq!(Project::load(dir.path())?.model, ModelSource::Local { path: dir.path().join("m") });
        std::fs::write(dir.path().join(PROJECT_FILE), "name = 3").map_err(|e| Error::io("write", e))?;
        assert!(Project::load(dir.path()).expect_err("bad").to_string().contains("project.toml"));
        Ok(())
    }

    #[test]
    fn the_newest_adapter_is_the_last_one_a_run_wrote() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        assert_eq!(Project::newest_adapter(dir.path()), None, "no runs folder");
        let runs = Project::runs_dir(dir.path());
        let write = |run: &str, seconds: u64| -> Result<PathBuf> {
            let path = runs.join(run).join("adapter.safetensors");
            std::fs::create_dir_all(runs.join(run)).map_err(|e| Error::io(&runs, e))?;
            let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
            file.set_modified(at).map_err(|e| Error::io(&path, e))?;
            Ok(path)
        };
        write("old", 1_000)?;
        let newest = write("new", 2_000)?;
        std::fs::create_dir_all(runs.join("failed")).map_err(|e| Error::io(&runs, e))?;
        assert_eq!(Project::newest_adapter(dir.path()), Some(newest));
        Ok(())
    }
}
