//! Where a model comes from: a local folder, a Hugging Face hub repository (downloaded into
//! the standard cache, or found there with no network), or the built-in demo.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::error::{Error, Result};

/// A model source as a user names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSource {
    /// A folder with `config.json`, safetensors and tokenizer files.
    Local {
        /// The folder.
        path: PathBuf,
    },
    /// A repository on the Hugging Face hub.
    Hub {
        /// `owner/name`.
        repo_id: String,
        /// Branch, tag or commit.
        revision: String,
    },
    /// The demo model shipped in `assets/`.
    Demo,
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Local { path } => write!(f, "{}", path.display()),
            ModelSource::Hub { repo_id, revision } if revision == "main" => write!(f, "{repo_id}"),
            ModelSource::Hub { repo_id, revision } => write!(f, "{repo_id}@{revision}"),
            ModelSource::Demo => write!(f, "demo"),
        }
    }
}

/// True for `owner/name` made of the characters the hub allows.
pub(crate) fn is_repo_id(s: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '-'])
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split('/').collect::<Vec<_>>().as_slice(), [owner, name] if ok(owner) && ok(name))
}

impl FromStr for ModelSource {
    type Err = Error;

    /// `demo`; an existing folder; `owner/name` or `owner/name@revision` for the hub.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "demo" {
            return Ok(ModelSource::Demo);
        }
        let path = Path::new(s);
        if path.is_dir() {
            return Ok(ModelSource::Local { path: path.to_owned() });
        }
        let (repo, revision) = s.split_once('@').unwrap_or((s, "main"));
        if is_repo_id(repo) && !revision.is_empty() {
            return Ok(ModelSource::Hub { repo_id: repo.into(), revision: revision.into() });
        }
        Err(Error::Source {
            source_name: s.into(),
            reason: "not an existing folder, not a hub repo id (owner/name[@revision]), and not `demo`".into(),
        })
    }
}

/// The folder holding the built-in assets: `$MTP_ASSETS`, else `assets/` of the source tree
/// this binary was built from.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("MTP_ASSETS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("assets");
            dir.canonicalize().unwrap_or(dir)
        }
    }
}

/// The built-in demo model's folder.
pub fn demo_model_dir() -> PathBuf {
    assets_dir().join("demo").join("model")
}

/// The built-in demo adapter (MTP weights for the demo model).
pub fn demo_adapter() -> PathBuf {
    assets_dir().join("demo").join("adapter.safetensors")
}

/// The built-in benchmark prompts (domains code, math, text).
pub fn demo_prompts() -> PathBuf {
    assets_dir().join("demo").join("prompts.jsonl")
}

/// Reports download progress (the CLI draws a bar, the GUI a progress widget).
pub trait DownloadProgress {
    /// A file of `bytes` bytes starts downloading.
    fn start(&mut self, file: &str, bytes: u64);
    /// `bytes` more bytes arrived.
    fn advance(&mut self, bytes: u64);
    /// The file is complete.
    fn finish(&mut self);
}

/// Progress that goes nowhere.
impl DownloadProgress for () {
    fn start(&mut self, _: &str, _: u64) {}
    fn advance(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

/// How to reach the hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The cache folder (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Never touch the network (`HF_HUB_OFFLINE=1`): only what is in the cache resolves.
    pub offline: bool,
}

impl HubOptions {
    /// Options from the environment, as the Hugging Face libraries read them.
    pub fn from_env() -> Self {
        let cache_dir = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_hub::Cache::from_env().path().clone());
        let offline =
            std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
        Self { cache_dir, offline }
    }
}

/// Files a model folder may have besides weights; the first is required.
const MODEL_FILES: [&str; 5] =
    ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"];

impl ModelSource {
    /// The local folder of this model, downloading it first when it is a hub repo that is
    /// not in the cache (and the options allow the network).
    pub fn resolve(&self, hub: &HubOptions, progress: &mut dyn DownloadProgress) -> Result<PathBuf> {
        let dir = match self {
            ModelSource::Local { path } => path.clone(),
            ModelSource::Demo => demo_model_dir(),
            ModelSource::Hub { repo_id, revision } => resolve_hub(repo_id, revision, hub, progress)?,
        };
        if !dir.join("config.json").is_file() {
            return Err(Error::Source {
                source_name: self.to_string(),
                reason: format!("{} has no config.json", dir.display()),
            });
        }
        Ok(dir)
    }
}

fn hub_error(repo_id: &str, reason: impl fmt::Display) -> Error {
    Error::Source { source_name: repo_id.into(), reason: reason.to_string() }
}

fn resolve_hub(
    repo_id: &str,
    revision: &str,
    hub: &HubOptions,
    progress: &mut dyn DownloadProgress,
) -> Result<PathBuf> {
    let repo = hf_hub::Repo::with_revision(repo_id.into(), hf_hub::RepoType::Model, revision.into());
    let cached = hf_hub::Cache::new(hub.cache_dir.clone()).repo(repo.clone());
    if let Some(config) = cached.get("config.json") {
        // Complete in the cache (a previous download): use it without the network.
        let has_weights = cached.get(SINGLE_FILE).is_some() || shards_cached(&cached)?;
        if has_weights && cached.get("tokenizer.json").is_some() {
            return snapshot_dir(&config, repo_id);
        }
    }
    if hub.offline {
        return Err(hub_error(
            repo_id,
            format!("not (completely) in the cache {} and HF_HUB_OFFLINE is set", hub.cache_dir.display()),
        ));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(hub.cache_dir.clone()))
        .with_progress(false)
        .build()
        .map_err(|e| hub_error(repo_id, e))?;
    let remote = api.repo(repo);
    let info = remote.info().map_err(|e| hub_error(repo_id, e))?;
    let listed: std::collections::BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let mut wanted: Vec<String> = MODEL_FILES.iter().filter(|f| listed.contains(**f)).map(|f| f.to_string()).collect();
    if !listed.contains("config.json") {
        return Err(hub_error(repo_id, "the repository has no config.json"));
    }
    if listed.contains(INDEX_FILE) {
        wanted.push(INDEX_FILE.into());
    } else if listed.contains(SINGLE_FILE) {
        wanted.push(SINGLE_FILE.into());
    } else {
        return Err(hub_error(repo_id, "the repository has no safetensors weights"));
    }
    let mut config_path = None;
    let mut i = 0;
    while i < wanted.len() {
        let file = wanted[i].clone();
        let path = fetch(&remote, &file, progress).map_err(|e| hub_error(repo_id, format!("{file}: {e}")))?;
        if file == INDEX_FILE {
            wanted.extend(shard_names(&path)?);
        }
        if file == "config.json" {
            config_path = Some(path);
        }
        i += 1;
    }
    let config = config_path.ok_or_else(|| hub_error(repo_id, "config.json was not downloaded"))?;
    snapshot_dir(&config, repo_id)
}

/// Adapts our progress sink to hf-hub's (model and dataset downloads).
pub(crate) struct HubProgress<'a>(pub(crate) &'a mut dyn DownloadProgress);

impl hf_hub::api::Progress for HubProgress<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.start(filename, size as u64);
    }
    fn update(&mut self, size: usize) {
        self.0.advance(size as u64);
    }
    fn finish(&mut self) {
        self.0.finish();
    }
}

fn fetch(
    remote: &hf_hub::api::sync::ApiRepo,
    file: &str,
    progress: &mut dyn DownloadProgress,
) -> std::result::Result<PathBuf, hf_hub::api::sync::ApiError> {
    remote.download_with_progress(file, HubProgress(progress))
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index: Index = crate::error::read_json(index)?;
    let shards: std::collections::BTreeSet<String> = index.weight_map.into_values().collect();
    Ok(shards.into_iter().collect())
}

fn shards_cached(cached: &hf_hub::CacheRepo) -> Result<bool> {
    match cached.get(INDEX_FILE) {
        Some(index) => Ok(shard_names(&index)?.iter().all(|s| cached.get(s).is_some())),
        None => Ok(false),
    }
}

fn snapshot_dir(config: &Path, repo_id: &str) -> Result<PathBuf> {
    config.parent().map(Path::to_owned).ok_or_else(|| hub_error(repo_id, "cache path has no parent"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind() -> Result<()> {
        assert_eq!("demo".parse::<ModelSource>()?, ModelSource::Demo);
        assert_eq!(
            "HuggingFaceTB/SmolLM2-135M".parse::<ModelSource>()?,
            ModelSource::Hub { repo_id: "HuggingFaceTB/SmolLM2-135M".into(), revision: "main".into() }
        );
        assert_eq!(
            "meta-llama/Llama-3.1-8B@v1.0".parse::<ModelSource>()?,
            ModelSource::Hub { repo_id: "meta-llama/Llama-3.1-8B".into(), revision: "v1.0".into() }
        );
        let dir = std::env::temp_dir();
        assert_eq!(dir.to_str().unwrap_or_default().parse::<ModelSource>()?, ModelSource::Local { path: dir.clone() });
        for bad in ["no_such_folder", "a/b/c", "/missing/abs/path", "a/", "x@"] {
            let err = bad.parse::<ModelSource>().expect_err(bad).to_string();
            assert!(err.contains(bad.trim_end_matches('@')), "{err}");
        }
        Ok(())
    }
}
