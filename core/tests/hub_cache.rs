//! Hub sources resolve from a cache folder laid out as the Hugging Face hub lays it out
//! (`models--owner--name/{refs,blobs,snapshots}`), with no network.

mod common;

use std::path::Path;

use common::*;
use mtp_core::source::{HubOptions, ModelSource};
use mtp_core::{LoadOptions, LoadedModel};

/// Put `family`'s fixture files into `cache` as repo `owner/name` at `revision`, with blobs
/// and snapshot symlinks like huggingface_hub makes.
fn populate(cache: &Path, family: &str, repo: &str, revision: &str, commit: &str) -> anyhow::Result<()> {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let (blobs, snapshot) = (root.join("blobs"), root.join("snapshots").join(commit));
    std::fs::create_dir_all(&blobs)?;
    std::fs::create_dir_all(&snapshot)?;
    std::fs::create_dir_all(root.join("refs"))?;
    std::fs::write(root.join("refs").join(revision), commit)?;
    for (i, entry) in std::fs::read_dir(model_dir(family))?.enumerate() {
        let entry = entry?;
        let blob = blobs.join(format!("{commit}{i:04}"));
        std::fs::copy(entry.path(), &blob)?;
        std::os::unix::fs::symlink(
            Path::new("../..").join("blobs").join(blob.file_name().unwrap_or_default()),
            snapshot.join(entry.file_name()),
        )?;
    }
    Ok(())
}

#[test]
fn cached_repo_resolves_offline() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    populate(cache.path(), "llama-sharded", "acme/tiny", "main", "0123abcd")?;
    populate(cache.path(), "qwen2", "acme/tiny", "v2", "4567cdef")?;
    let hub = HubOptions { cache_dir: cache.path().to_owned(), offline: true };

    let main: ModelSource = "acme/tiny".parse()?;
    let dir = main.resolve(&hub, &mut ())?;
    assert!(dir.ends_with("snapshots/0123abcd"), "{}", dir.display());
    let options = LoadOptions { hub: hub.clone(), ..LoadOptions::default() };
    let loaded = LoadedModel::load(&main, &options, &mut ())?;
    assert_eq!(loaded.model.config.family.model_type(), "llama");

    let v2: ModelSource = "acme/tiny@v2".parse()?;
    let loaded = LoadedModel::load(&v2, &options, &mut ())?;
    assert_eq!(loaded.model.config.family.model_type(), "qwen2");
    Ok(())
}

#[test]
fn missing_repo_offline_is_a_clear_error() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let hub = HubOptions { cache_dir: cache.path().to_owned(), offline: true };
    let err = "acme/absent".parse::<ModelSource>()?.resolve(&hub, &mut ()).expect_err("offline").to_string();
    assert!(err.contains("acme/absent") && err.contains("HF_HUB_OFFLINE"), "{err}");

    // A snapshot without weights is incomplete, not loadable.
    populate(cache.path(), "llama", "acme/partial", "main", "89ab")?;
    let snapshot = cache.path().join("models--acme--partial/snapshots/89ab");
    std::fs::remove_file(snapshot.join("model.safetensors"))?;
    let err = "acme/partial".parse::<ModelSource>()?.resolve(&hub, &mut ()).expect_err("partial").to_string();
    assert!(err.contains("acme/partial"), "{err}");
    Ok(())
}
