//! Datasets from the Hugging Face hub, by repo id: the files of the train split, found in
//! the standard cache (no network needed) or downloaded into it, then read like local files.

use std::path::{Path, PathBuf};

use super::data::DataSource;
use crate::error::{Error, Result};
use crate::source::{DownloadProgress, HubOptions, HubProgress};

/// Extensions of the files a dataset's rows are read from.
const DATA_EXTENSIONS: [&str; 3] = ["parquet", "jsonl", "json"];

/// JSON files of a dataset repository that describe it rather than hold rows.
const METADATA_FILES: [&str; 3] = ["dataset_info.json", "dataset_infos.json", "dataset_dict.json"];

impl DataSource {
    /// The same dataset with every hub repository replaced by its local files (the train
    /// split), downloading what the cache lacks unless `hub` is offline.
    pub fn resolve(&self, hub: &HubOptions, progress: &mut dyn DownloadProgress) -> Result<DataSource> {
        match self {
            DataSource::Hub { repo_id, revision } => {
                let files = resolve_dataset(repo_id, revision, hub, progress)?;
                let mut parts: Vec<DataSource> = files.into_iter().map(DataSource::file).collect();
                Ok(if parts.len() == 1 { parts.remove(0) } else { DataSource::Mix { sources: parts } })
            }
            DataSource::Mix { sources } => Ok(DataSource::Mix {
                sources: sources.iter().map(|s| s.resolve(hub, progress)).collect::<Result<Vec<_>>>()?,
            }),
            other => Ok(other.clone()),
        }
    }
}

fn hub_error(repo_id: &str, reason: impl std::fmt::Display) -> Error {
    Error::Source { source_name: format!("dataset {repo_id}"), reason: reason.to_string() }
}

/// The local paths of the train split's files of dataset `repo_id` at `revision`.
pub fn resolve_dataset(
    repo_id: &str,
    revision: &str,
    hub: &HubOptions,
    progress: &mut dyn DownloadProgress,
) -> Result<Vec<PathBuf>> {
    let repo = hf_hub::Repo::with_revision(repo_id.into(), hf_hub::RepoType::Dataset, revision.into());
    if let Some(snapshot) = cached_snapshot(&hub.cache_dir, &repo) {
        let mut listed = Vec::new();
        list_files(&snapshot, &snapshot, &mut listed)?;
        if let Ok(chosen) = train_split(&listed) {
            return Ok(chosen.iter().map(|f| snapshot.join(f)).collect());
        }
    }
    if hub.offline {
        return Err(hub_error(
            repo_id,
            format!("no train split in the cache {} and HF_HUB_OFFLINE is set", hub.cache_dir.display()),
        ));
    }
    let cache = hf_hub::Cache::new(hub.cache_dir.clone());
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(false)
        .build()
        .map_err(|e| hub_error(repo_id, e))?;
    let remote = api.repo(repo.clone());
    let info = remote.info().map_err(|e| hub_error(repo_id, e))?;
    let listed: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let chosen = train_split(&listed).map_err(|e| hub_error(repo_id, e))?;
    let cached = cache.repo(repo);
    chosen
        .iter()
        .map(|file| match cached.get(file) {
            Some(path) => Ok(path),
            None => remote
                .download_with_progress(file, HubProgress(progress))
                .map_err(|e| hub_error(repo_id, format!("{file}: {e}"))),
        })
        .collect()
}

/// The snapshot folder of `repo` in the cache at `cache_dir`, when its revision is there
/// (a branch or tag through `refs/`, or a commit hash directly).
fn cached_snapshot(cache_dir: &Path, repo: &hf_hub::Repo) -> Option<PathBuf> {
    let root = cache_dir.join(repo.folder_name());
    let commit = std::fs::read_to_string(root.join("refs").join(repo.revision()))
        .map(|c| c.trim().to_owned())
        .unwrap_or_else(|_| repo.revision().to_owned());
    let dir = root.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// Every file under `dir`, relative to `root`, with `/` separators, sorted.
fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            list_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
        }
    }
    Ok(())
}

/// The files of a dataset repository (paths relative to its root) that hold its train split:
/// the data files (Parquet, JSONL, JSON; Parquet alone when a repository has both) whose path
/// names the split `train` (a folder, or a name starting with it or with `-train`/`_train` in
/// it); when no file names any split, every data file. An error lists what there is.
pub fn train_split(files: &[String]) -> std::result::Result<Vec<String>, String> {
    let data: Vec<&String> = files
        .iter()
        .filter(|f| {
            let name = f.rsplit('/').next().unwrap_or(f);
            let ext = name.rsplit('.').next().unwrap_or("");
            DATA_EXTENSIONS.contains(&ext)
                && !METADATA_FILES.contains(&name)
                && !f.split('/').any(|p| p.starts_with('.'))
        })
        .collect();
    let has_parquet = data.iter().any(|f| f.ends_with(".parquet"));
    let data: Vec<&String> = data.into_iter().filter(|f| !has_parquet || f.ends_with(".parquet")).collect();
    let names = |split: &str, f: &str| {
        f.to_ascii_lowercase().split('/').any(|part| {
            part == split
                || part.starts_with(&format!("{split}-"))
                || part.starts_with(&format!("{split}_"))
                || part.starts_with(&format!("{split}."))
                || part.contains(&format!("-{split}"))
                || part.contains(&format!("_{split}"))
        })
    };
    let train: Vec<String> = data.iter().filter(|f| names("train", f)).map(|f| f.to_string()).collect();
    if !train.is_empty() {
        return Ok(train);
    }
    let any_split =
        data.iter().any(|f| ["test", "validation", "valid", "val", "dev", "eval"].iter().any(|s| names(s, f)));
    if !data.is_empty() && !any_split {
        return Ok(data.iter().map(|f| f.to_string()).collect());
    }
    let shown: Vec<&str> = files.iter().take(20).map(String::as_str).collect();
    Err(if data.is_empty() {
        format!("no Parquet, JSONL or JSON data files among {shown:?}")
    } else {
        format!("no train split among the data files {data:?}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_train_split_is_chosen_by_name() {
        let parquet = strings(&[
            "README.md",
            ".gitattributes",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
        ]);
        assert_eq!(
            train_split(&parquet),
            Ok(strings(&["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]))
        );
        let folders = strings(&["default/train/0000.parquet", "default/validation/0000.parquet"]);
        assert_eq!(train_split(&folders), Ok(strings(&["default/train/0000.parquet"])));
        // One JSON file with no split in its name (an Alpaca set), and its metadata.
        let single = strings(&["alpaca_data_cleaned.json", "dataset_infos.json", "README.md"]);
        assert_eq!(train_split(&single), Ok(strings(&["alpaca_data_cleaned.json"])));
        let named = strings(&["sharegpt_train.jsonl", "sharegpt_test.jsonl"]);
        assert_eq!(train_split(&named), Ok(strings(&["sharegpt_train.jsonl"])));
        // Parquet wins over the same rows in JSON.
        let both = strings(&["train.jsonl", "data/train-0.parquet"]);
        assert_eq!(train_split(&both), Ok(strings(&["data/train-0.parquet"])));
        assert!(train_split(&strings(&["test.jsonl", "validation.jsonl"])).is_err());
        assert!(train_split(&strings(&["README.md"])).expect_err("none").contains("no Parquet"));
    }
}
