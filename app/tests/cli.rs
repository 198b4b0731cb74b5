//! The `mtp` binary end to end on the fixture models: JSON output against the transformers
//! references, and bad input ending in a message and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const FAMILIES: [&str; 6] = ["llama", "llama3-tied", "llama-sharded", "mistral", "qwen2", "qwen3"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("tests").join("fixtures")
}

fn mtp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mtp")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run mtp")
}

fn json_of(out: &Output) -> anyhow::Result<Value> {
    anyhow::ensure!(out.status.success(), "mtp failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn reference(family: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference").join(format!("{family}.json")))?)?)
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_i64).collect()).unwrap_or_default()
}

/// A failed run: non-zero exit, an `error:` line naming each needle, no panic.
fn assert_clean_failure(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error:") && !stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{stderr}` should mention `{n}`");
    }
}

#[test]
fn generate_json_reproduces_reference_greedy_tokens() -> anyhow::Result<()> {
    for family in FAMILIES {
        let r = reference(family)?;
        let dir = fixtures().join("models").join(family);
        let dir = dir.to_str().unwrap_or_default();
        let expected = ids(&r["greedy"]["token_ids"]);
        let prompt_ids: Vec<String> = ids(&r["greedy"]["prompt_ids"]).iter().map(i64::to_string).collect();
        let n = expected.len().to_string();
        let out = json_of(&mtp(&[
            "generate",
            "--model",
            dir,
            "--prompt-ids",
            &prompt_ids.join(","),
            "--max-new-tokens",
            &n,
            "--json",
        ]))?;
        assert_eq!(ids(&out["token_ids"]), expected, "{family} --prompt-ids");
        assert_eq!(ids(&out["prompt_ids"]), ids(&r["greedy"]["prompt_ids"]));
        assert_eq!(out["forwards"].as_u64(), Some(expected.len() as u64));
        assert!(out["tokens_per_second"].as_f64().is_some_and(|t| t > 0.0));
        assert!(out["text"].is_string());

        let prompt = r["text"]["prompt"].as_str().unwrap_or_default();
        let expected = ids(&r["text"]["token_ids"]);
        let n = expected.len().to_string();
        let out = json_of(&mtp(&["generate", "--model", dir, "--prompt", prompt, "--max-new-tokens", &n, "--json"]))?;
        assert_eq!(ids(&out["prompt_ids"]), ids(&r["text"]["prompt_ids"]), "{family} --prompt encoding");
        assert_eq!(ids(&out["token_ids"]), expected, "{family} --prompt");
        assert_eq!(out["text"].as_str(), r["text"]["decoded"].as_str(), "{family} text");
    }
    Ok(())
}

#[test]
fn inspect_json_reports_exact_counts() -> anyhow::Result<()> {
    for family in FAMILIES {
        let r = reference(family)?;
        let dir = fixtures().join("models").join(family);
        let out = json_of(&mtp(&["inspect", dir.to_str().unwrap_or_default(), "--json"]))?;
        assert_eq!(out["num_parameters"], r["num_parameters"], "{family}");
        assert_eq!(out["model_type"], r["model_type"], "{family}");
        assert_eq!(out["vocab_size"], r["vocab_size"], "{family}");
        for key in ["hidden_size", "num_layers", "stored_dtype", "weight_bytes"] {
            assert!(!out[key].is_null(), "{family}: {key} missing");
        }
    }
    Ok(())
}

fn scratch(family: &str) -> anyhow::Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    for e in std::fs::read_dir(fixtures().join("models").join(family))? {
        let e = e?;
        std::fs::copy(e.path(), tmp.path().join(e.file_name()))?;
    }
    Ok(tmp)
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[test]
fn bad_input_exits_with_a_message() -> anyhow::Result<()> {
    // Not a folder, not a repo id.
    assert_clean_failure(&mtp(&["inspect", "no/such/model"]), &["no/such/model"]);
    // Not in the cache, offline.
    let cache = tempfile::tempdir()?;
    let out = Command::new(env!("CARGO_BIN_EXE_mtp"))
        .args(["download", "acme/absent"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache.path())
        .output()?;
    assert_clean_failure(&out, &["acme/absent", "HF_HUB_OFFLINE"]);

    // Truncated weights.
    let tmp = scratch("llama")?;
    let w = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&w)?;
    std::fs::write(&w, &bytes[..1000])?;
    assert_clean_failure(&mtp(&["generate", "--model", path_str(tmp.path()), "--prompt", "x"]), &["model.safetensors"]);
    assert_clean_failure(&mtp(&["inspect", path_str(tmp.path())]), &["model.safetensors"]);

    // Unknown architecture.
    let tmp = scratch("qwen3")?;
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, std::fs::read_to_string(&cfg)?.replace("\"qwen3\"", "\"phi3\""))?;
    assert_clean_failure(&mtp(&["inspect", path_str(tmp.path())]), &["config.json", "phi3"]);

    // Missing tokenizer.
    let tmp = scratch("qwen2")?;
    std::fs::remove_file(tmp.path().join("tokenizer.json"))?;
    assert_clean_failure(&mtp(&["generate", "--model", path_str(tmp.path()), "--prompt", "x"]), &["tokenizer.json"]);

    // Prompt longer than the context (256 positions).
    let dir = fixtures().join("models").join("llama");
    let long = vec!["5"; 250].join(",");
    assert_clean_failure(
        &mtp(&["generate", "--model", path_str(&dir), "--prompt-ids", &long, "--max-new-tokens", "10"]),
        &["260", "256"],
    );
    // Bad flags.
    let out = mtp(&["generate", "--model", path_str(&dir), "--prompt", "x", "--device", "tpu"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("tpu"));
    Ok(())
}

#[test]
fn download_resolves_from_the_cache_offline() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let snap = cache.path().join("models--acme--tiny").join("snapshots").join("c0ffee");
    std::fs::create_dir_all(&snap)?;
    std::fs::create_dir_all(cache.path().join("models--acme--tiny").join("refs"))?;
    std::fs::write(cache.path().join("models--acme--tiny").join("refs").join("main"), "c0ffee")?;
    for e in std::fs::read_dir(fixtures().join("models").join("qwen2"))? {
        let e = e?;
        std::fs::copy(e.path(), snap.join(e.file_name()))?;
    }
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mtp"))
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HUB_CACHE", cache.path())
            .output()
    };
    let out = run(&["download", "acme/tiny"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), snap.to_str().unwrap_or_default());
    let out = json_of(&run(&[
        "generate",
        "--model",
        "acme/tiny",
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        "3",
        "--json",
    ])?)?;
    assert_eq!(ids(&out["token_ids"]).len(), 3);
    Ok(())
}
