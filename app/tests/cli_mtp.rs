//! The MTP commands end to end: `mtp train` (and --resume), `mtp generate --mode`,
//! `mtp bench`, `mtp probe`, `mtp pretrain`, with their bad inputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("tests").join("fixtures").join("models").join(name)
}

fn mtp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mtp")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run mtp")
}

fn ok(out: Output) -> anyhow::Result<String> {
    anyhow::ensure!(out.status.success(), "mtp failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

fn fails_with(out: Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{err}` should mention `{n}`");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_i64).collect()).unwrap_or_default()
}

/// `mtp train` arguments for a 2-mask adapter on the llama fixture.
fn train_args(run: &Path, steps: &str) -> Vec<String> {
    let model = fixture("llama");
    [
        "train",
        "--model",
        s(&model),
        "--data",
        "builtin:arith:200",
        "--out",
        s(run),
        "--k",
        "2",
        "--rank",
        "4",
        "--steps",
        steps,
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--json",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// Train a 2-mask adapter on the llama fixture for a few steps.
fn train_adapter(dir: &Path, steps: &str) -> anyhow::Result<PathBuf> {
    let run = dir.join("run");
    let mut args = train_args(&run, steps);
    args.extend(["--checkpoint-every", "3", "--val-every", "3"].map(String::from));
    ok(mtp(&args.iter().map(String::as_str).collect::<Vec<_>>()))?;
    Ok(run)
}

/// `--chat-template-var` reaches a run's recipe (which a resumed run renders with, and which
/// `--resume` does not take again); a bad one is refused before anything loads, naming it.
#[test]
fn chat_template_vars_reach_the_run_recipe() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let mut args = train_args(&run, "1");
    args.extend(
        ["--chat-template-var", "enable_thinking=false", "--chat-template-var", "date_string=26 Jul 2024"]
            .map(String::from),
    );
    ok(mtp(&args.iter().map(String::as_str).collect::<Vec<_>>()))?;
    let config: Value = serde_json::from_str(&std::fs::read_to_string(run.join("config.json"))?)?;
    assert_eq!(config["chat_template_vars"]["enable_thinking"], false, "{config}");
    assert_eq!(config["chat_template_vars"]["date_string"], "26 Jul 2024", "{config}");
    let again = mtp(&["train", "--resume", s(&run), "--chat-template-var", "enable_thinking=true"]);
    assert_eq!(again.status.code(), Some(2), "{}", String::from_utf8_lossy(&again.stderr));
    let model = fixture("llama");
    let bad = mtp(&["generate", "--model", s(&model), "--prompt", "x", "--chat-template-var", "enable_thinking"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("--chat-template-var") && err.contains("template variable `enable_thinking`"), "{err}");
    Ok(())
}

#[test]
fn train_writes_a_run_and_resumes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = train_adapter(tmp.path(), "6")?;
    for f in ["config.json", "metrics.jsonl", "adapter.safetensors"] {
        assert!(run.join(f).exists(), "{f}");
    }
    let lines: Vec<Value> = std::fs::read_to_string(run.join("metrics.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let train: Vec<&Value> = lines.iter().filter(|l| l["split"] == "train").collect();
    assert_eq!(train.len(), 6);
    for key in [
        "step",
        "loss",
        "loss_base",
        "loss_sampler",
        "loss_lcm",
        "slot_acc",
        "slot_acc_sampler",
        "lr",
        "tokens_per_second",
    ] {
        assert!(!train[0][key].is_null(), "metrics.jsonl lacks {key}");
    }
    assert_eq!(train[0]["slot_acc"].as_array().map(Vec::len), Some(2));
    assert!(lines.iter().any(|l| l["split"] == "val"));
    let config: Value = serde_json::from_str(&std::fs::read_to_string(run.join("config.json"))?)?;
    assert_eq!(config["method"]["k"], 2);

    ok(mtp(&["train", "--resume", s(&run), "--steps", "9"]))?;
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["split"] == "train")
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(steps, (1..=9).collect::<Vec<_>>());

    // Bad input.
    fails_with(
        mtp(&["train", "--model", s(&fixture("llama")), "--data", "builtin:nope", "--out", s(&tmp.path().join("x"))]),
        &["builtin:"],
    );
    fails_with(
        mtp(&["train", "--model", s(&fixture("llama")), "--data", "builtin:arith:10", "--out", s(&run)]),
        &["already holds a run"],
    );
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "{\"bad\": 1}\n")?;
    fails_with(
        mtp(&["train", "--model", s(&fixture("llama")), "--data", s(&empty), "--out", s(&tmp.path().join("y"))]),
        &["no usable examples"],
    );
    fails_with(
        mtp(&[
            "train",
            "--model",
            s(&fixture("llama")),
            "--data",
            s(&empty),
            "--out",
            s(&tmp.path().join("z")),
            "--strict",
        ]),
        &["empty.jsonl", "line 1"],
    );
    Ok(())
}

#[test]
fn generate_bench_and_probe_with_an_adapter() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = train_adapter(tmp.path(), "3")?;
    let adapter = run.join("adapter.safetensors");
    let model = fixture("llama");
    let base = ["generate", "--model", s(&model), "--prompt-ids", "1,40,41,42,43", "--max-new-tokens", "20", "--json"];
    let ar: Value = serde_json::from_str(&ok(mtp(&base))?)?;
    for mode in ["linear", "quadratic"] {
        for masks in ["1", "2"] {
            let mut args = base.to_vec();
            args.extend(["--adapter", s(&adapter), "--mode", mode, "--masks", masks]);
            let out: Value = serde_json::from_str(&ok(mtp(&args))?)?;
            assert_eq!(ids(&out["token_ids"]), ids(&ar["token_ids"]), "{mode} {masks}");
            assert_eq!(out["mode"], mode);
            assert_eq!(out["masks"].as_u64(), masks.parse().ok());
            let tpf = out["tokens_per_forward"].as_f64().unwrap_or(0.0);
            assert!((1.0..=3.0).contains(&tpf), "{tpf}");
            let steps = out["steps"].as_array().cloned().unwrap_or_default();
            assert_eq!(steps.len() + 1, out["forwards"].as_u64().unwrap_or(0) as usize);
            assert!(steps.iter().all(|s| s.get("accepted").is_some() && s.get("first_rejected").is_some()));
            // Slot 1 is reached by every step with drafts; the steps' tokens and the
            // prefill's one make the output.
            let acceptance = &out["acceptance"];
            let drafting = steps.iter().filter(|s| s["drafts"].as_array().is_some_and(|d| !d.is_empty())).count();
            assert_eq!(acceptance["reached"][0].as_u64(), Some(drafting as u64), "{acceptance}");
            let by_count = acceptance["emitted"].as_array().cloned().unwrap_or_default();
            let emitted: u64 = by_count.iter().enumerate().map(|(n, c)| n as u64 * c.as_u64().unwrap_or(0)).sum();
            assert_eq!(emitted + 1, ids(&out["token_ids"]).len() as u64, "{acceptance}");
        }
    }
    // Mask rows in int8 or bf16 (where the CPU has them) or exact: the output is AR's
    // either way.
    for (arithmetic, min_rows) in [("int8", Some(1)), ("bf16", Some(1)), ("exact", None)] {
        let mut args = base.to_vec();
        args.extend([
            "--adapter",
            s(&adapter),
            "--mode",
            "quadratic",
            "--masks",
            "2",
            "--draft-arithmetic",
            arithmetic,
        ]);
        let out: Value = serde_json::from_str(&ok(mtp(&args))?)?;
        assert_eq!(ids(&out["token_ids"]), ids(&ar["token_ids"]), "mask rows {arithmetic}");
        let key = if arithmetic == "int8" { "int8_min_mask_rows" } else { "bf16_min_mask_rows" };
        let got = out[key].as_u64();
        assert!(got.is_none() || got == min_rows, "mask rows {arithmetic}: {out}");
        // The chain's head in int8 exactly where the mask rows are.
        let int8_rows = out["int8_min_mask_rows"].as_u64().is_some();
        assert_eq!(out["int8_draft_head"].as_bool(), Some(int8_rows), "mask rows {arithmetic}: {out}");
    }
    // Without --masks each step chooses its own count (auto), and the output is still AR's.
    let mut args = base.to_vec();
    args.extend(["--adapter", s(&adapter), "--mode", "quadratic"]);
    let out: Value = serde_json::from_str(&ok(mtp(&args))?)?;
    assert_eq!(out["masks"], "auto", "{out}");
    assert_eq!(ids(&out["token_ids"]), ids(&ar["token_ids"]), "quadratic, auto masks");
    // Bad combinations.
    let mut args = base.to_vec();
    args.extend(["--adapter", s(&adapter), "--mode", "quadratic", "--masks", "3"]);
    fails_with(mtp(&args), &["--masks 3", "k = 2"]);
    let mut args = base.to_vec();
    args.extend(["--mode", "linear"]);
    fails_with(mtp(&args), &["needs an MTP adapter"]);
    let qwen = fixture("qwen2");
    let other =
        ["generate", "--model", s(&qwen), "--prompt-ids", "5,6", "--adapter", s(&adapter), "--mode", "quadratic"];
    fails_with(mtp(&other), &["adapter.safetensors", "trained for base model"]);

    // Bench.
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        concat!(
            "{\"prompt\": \"def f(x):\", \"domain\": \"code\"}\n{\"prompt\": \"Question: 2 + 2\", \"domain\": \"math\"}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"What is 2 + 2?\"}], \"domain\": \"chat\"}\n"
        ),
    )?;
    let out = tmp.path().join("bench");
    let report: Value = serde_json::from_str(&ok(mtp(&[
        "bench",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--prompts",
        s(&prompts),
        "--masks",
        "1,2",
        "--max-new-tokens",
        "12",
        "--json",
        "--out",
        s(&out),
    ]))?)?;
    let rows = report["rows"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 4 * 5); // (chat, code, math, all) x (ar, linear 1, linear 2, quadratic 1, quadratic 2)
    // The conversation went through the fixture's chat template, and the report says whose.
    assert!(report["chat_template"].as_str().is_some_and(|t| t.ends_with("tokenizer_config.json")), "{report}");
    for r in &rows {
        for key in ["domain", "mode", "masks", "tokens_per_forward", "tokens_per_second", "speedup", "identical"] {
            assert!(!r[key].is_null(), "bench row lacks {key}");
        }
        assert_eq!(r["identical"], true);
    }
    for f in ["bench.json", "bench.csv", "bench.md"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // The report names what it measured.
    assert_eq!(report["adapter"].as_str(), Some(s(&adapter)), "{report}");
    assert!(report["model"].as_str().is_some_and(|m| m.contains("llama")), "{report}");
    assert!(std::fs::read_to_string(out.join("bench.md"))?.contains("adapter.safetensors"));
    // Why the acceptance is what it is: the quadratic rows' slots (every domain together),
    // the training run beside the adapter (3 steps, its last validation's estimate at 2
    // masks, the largest count measured), and the answer tokens a draft vocabulary lacks.
    let row = |domain: &str, mode: &str, masks: u64| {
        rows.iter().find(|r| r["domain"] == domain && r["mode"] == mode && r["masks"].as_u64() == Some(masks)).cloned()
    };
    let main = row("all", "quadratic", 2).unwrap_or_default();
    let findings = report["findings"].as_array().cloned().unwrap_or_default();
    let finding = |kind: &str| findings.iter().find(|f| f["kind"] == kind).cloned().unwrap_or_default();
    // The first slot from the 1-mask steps (what the paper's 1-mask figures measure).
    let one = row("all", "quadratic", 1).unwrap_or_default();
    assert_eq!(finding("first_slot")["reached"], one["acceptance"]["reached"][0], "{findings:?}");
    assert_eq!(finding("first_slot")["masks"], 1, "{findings:?}");
    assert!(main["acceptance"]["reached"][0].as_u64().is_some_and(|n| n > 0), "{main}");
    assert_eq!(finding("against_training")["measured"], main["tokens_per_forward"], "{findings:?}");
    assert_eq!(finding("against_training")["masks"], 2, "{findings:?}");
    assert_eq!(finding("training")["steps"], 3, "{findings:?}");
    assert!(findings.iter().all(|f| f["text"].as_str().is_some_and(|t| t.len() > 20)), "{findings:?}");
    // This adapter drafts from the whole vocabulary (the fixture's 416 tokens are under the
    // default draft vocabulary's size); one with a 64-token draft vocabulary counts the AR
    // answer tokens it lacks.
    assert!(report["draft_vocab"].is_null() && report["draft_vocab_misses"].is_null(), "{report}");
    let small = tmp.path().join("small-vocab.safetensors");
    let args = ["draft-vocab", "--model", s(&model), "--adapter", s(&adapter), "--data", "builtin:code:50"];
    ok(mtp(&[&args[..], &["--size", "64", "--out", s(&small)]].concat()))?;
    let bench = ["bench", "--model", s(&model), "--adapter", s(&small), "--prompts", s(&prompts), "--json"];
    let report: Value =
        serde_json::from_str(&ok(mtp(&[&bench[..], &["--masks", "2", "--max-new-tokens", "12"]].concat()))?)?;
    assert_eq!(report["draft_vocab"], 64, "{report}");
    let misses = report["draft_vocab_misses"].as_array().cloned().unwrap_or_default();
    let all = misses.iter().find(|m| m["domain"] == "all").cloned().unwrap_or_default();
    let ar_tokens = report["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["domain"] == "all" && r["mode"] == "ar").cloned());
    assert_eq!(all["tokens"], ar_tokens.unwrap_or_default()["tokens"], "{report}");
    let within = all["outside"].as_u64().is_some_and(|o| all["tokens"].as_u64().is_some_and(|t| o <= t && t > 0));
    assert!(within && misses.len() == 4, "{report}");
    // Text prompts: raw, the finding says the model has a chat template; with --chat they go
    // through it (the report names it) and the finding is gone.
    let text = tmp.path().join("text.jsonl");
    std::fs::write(&text, "{\"prompt\": \"What is 2 + 2?\", \"domain\": \"chat\"}\n")?;
    let quick = [
        "bench",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--prompts",
        s(&text),
        "--masks",
        "1",
        "--max-new-tokens",
        "6",
        "--json",
    ];
    for chat in [false, true] {
        let args = if chat { [&quick[..], &["--chat"]].concat() } else { quick.to_vec() };
        let report: Value = serde_json::from_str(&ok(mtp(&args))?)?;
        let raw = report["findings"].as_array().is_some_and(|f| f.iter().any(|f| f["kind"] == "raw_prompts"));
        assert_eq!((raw, report["chat_template"].is_string()), (!chat, chat), "--chat {chat}: {report}");
        assert!(report["rows"].as_array().is_some_and(|r| r.iter().all(|r| r["identical"] == true)), "{report}");
    }
    std::fs::write(&prompts, "{\"prompt\": \"x\", \"domain\": \"code\"}\nnot json\n")?;
    fails_with(
        mtp(&["bench", "--model", s(&model), "--adapter", s(&adapter), "--prompts", s(&prompts)]),
        &["prompts.jsonl", "line 2"],
    );
    std::fs::write(
        &prompts,
        "{\"prompt\": \"x\", \"messages\": [{\"role\": \"user\", \"content\": \"y\"}], \"domain\": \"chat\"}\n",
    )?;
    fails_with(
        mtp(&["bench", "--model", s(&model), "--adapter", s(&adapter), "--prompts", s(&prompts)]),
        &["prompts.jsonl", "line 1", "not both"],
    );

    // Probe.
    let probe: Value = serde_json::from_str(&ok(mtp(&[
        "probe",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--prompt",
        "def add(a, b):",
        "--continuation",
        "\n    return a + b",
        "--json",
    ]))?)?;
    let slots = probe["slots"].as_array().cloned().unwrap_or_default();
    assert_eq!(slots.len(), 3); // next token + 2 masks
    assert!(
        slots.iter().all(|s| s["rank_base"].as_u64().is_some_and(|r| r >= 1) && (s["slot"] == 0) == s["rank_sampler"].is_null())
    );
    Ok(())
}

#[test]
fn pretrain_makes_a_loadable_model() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("m");
    ok(mtp(&[
        "pretrain",
        "--data",
        "builtin:code:300,builtin:arith:300",
        "--out",
        s(&out),
        "--preset",
        "tiny",
        "--vocab-size",
        "320",
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--warmup",
        "2",
    ]))?;
    let info: Value = serde_json::from_str(&ok(mtp(&["inspect", s(&out), "--json"]))?)?;
    assert_eq!(info["vocab_size"], 320);
    assert_eq!(info["model_type"], "llama");
    let generated: Value = serde_json::from_str(&ok(mtp(&[
        "generate",
        "--model",
        s(&out),
        "--prompt",
        "def ",
        "--max-new-tokens",
        "5",
        "--json",
    ]))?)?;
    assert!(!ids(&generated["token_ids"]).is_empty());
    fails_with(mtp(&["pretrain", "--data", "builtin:code:10", "--out", s(&out), "--preset", "huge"]), &["huge"]);
    Ok(())
}

/// Ctrl-C during `mtp train` writes a checkpoint and exits cleanly; the run resumes.
#[test]
fn ctrl_c_checkpoints_and_exits_130() -> anyhow::Result<()> {
    use std::io::BufRead;
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let mut args = train_args(&run, "100000");
    args.extend(["--checkpoint-every", "100000"].map(String::from));
    let mut child = Command::new(env!("CARGO_BIN_EXE_mtp"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut steps = 0;
    while steps < 3 {
        match lines.next() {
            Some(line) => {
                if line?.contains("\"event\":\"step\"") {
                    steps += 1;
                }
            }
            None => anyhow::bail!("training did not start"),
        }
    }
    // Keep reading so the child never writes into a closed pipe.
    let drain = std::thread::spawn(move || lines.count());
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status()?;
    assert!(status.success());
    let out = child.wait_with_output()?;
    let _ = drain.join();
    let err = String::from_utf8_lossy(&out.stderr);
    // Stopped, not finished: the status an interrupted program ends with.
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("stopped at step") && err.contains("--resume"), "{err}");
    let (step, _) = mtp_core_latest(&run).ok_or_else(|| anyhow::anyhow!("no checkpoint"))?;
    assert!(step >= 3);
    ok(mtp(&["train", "--resume", s(&run), "--steps", &(step + 1).to_string()]))?;
    Ok(())
}

/// Ctrl-C during `mtp bench` prints the table of the prompts measured so far, says how many
/// of how many, and ends with status 130.
#[test]
fn ctrl_c_during_a_bench_prints_what_it_measured() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = train_adapter(tmp.path(), "2")?;
    let prompts = tmp.path().join("many.jsonl");
    // Far more prompts than the few seconds before the signal measure.
    let line = "{\"prompt\": \"def f(x):\", \"domain\": \"code\"}\n";
    std::fs::write(&prompts, line.repeat(3000))?;
    let model = fixture("llama");
    let adapter = run.join("adapter.safetensors");
    let args = [
        "bench",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--prompts",
        s(&prompts),
        "--masks",
        "2",
        "--max-new-tokens",
        "8",
    ];
    let child = Command::new(env!("CARGO_BIN_EXE_mtp"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_secs(6));
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status()?;
    assert!(status.success());
    let out = child.wait_with_output()?;
    let (stdout, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(stdout.contains("of 3000 prompts: the tables cover those") && stdout.contains("| code |"), "{stdout}");
    assert!(err.contains("of 3000 prompts: the table covers those"), "{err}");
    Ok(())
}

/// The newest checkpoint of a run folder (`checkpoints/step-NNNNNNN.safetensors`).
fn mtp_core_latest(run: &Path) -> Option<(usize, PathBuf)> {
    std::fs::read_dir(run.join("checkpoints"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p.file_name()?.to_str()?.strip_prefix("step-")?.strip_suffix(".safetensors")?.parse().ok()?;
            Some((step, p))
        })
        .max_by_key(|(s, _)| *s)
}

#[test]
fn distill_writes_the_models_own_continuations_and_trains_on_them() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = fixture("llama");
    let out = tmp.path().join("distilled.jsonl");
    let args = ["--model", s(&model), "--data", "builtin:arith:50", "--out", s(&out), "--sequences", "10"];
    let shape = ["--prompt-tokens", "8", "--new-tokens", "6", "--batch-size", "4", "--json"];
    let summary: Value = serde_json::from_str(&ok(mtp(&[&["distill"][..], &args, &shape].concat()))?)?;
    assert_eq!(summary["sequences"], 10);
    let lines: Vec<Value> =
        std::fs::read_to_string(&out)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 10);
    for line in &lines {
        assert_eq!(ids(&line["prompt_ids"]).len(), 8);
        let n = ids(&line["completion_ids"]).len();
        assert!((1..=6).contains(&n), "{line}");
        assert!(line["prompt"].is_string() && line["completion"].is_string());
    }
    // Each completion is what `mtp generate` writes greedily after that prompt (up to EOS).
    let first = &lines[0];
    let prompt: Vec<String> = ids(&first["prompt_ids"]).iter().map(i64::to_string).collect();
    let generate =
        ["generate", "--model", s(&model), "--prompt-ids", &prompt.join(","), "--max-new-tokens", "6", "--json"];
    let generated: Value = serde_json::from_str(&ok(mtp(&generate))?)?;
    assert_eq!(ids(&first["completion_ids"]), ids(&generated["token_ids"]));
    // The file trains an adapter.
    let mut train = train_args(&tmp.path().join("run"), "2");
    let at = train.iter().position(|a| a == "builtin:arith:200").expect("the data argument");
    train[at] = s(&out).to_string();
    ok(mtp(&train.iter().map(String::as_str).collect::<Vec<_>>()))?;
    assert!(tmp.path().join("run").join("adapter.safetensors").is_file());
    // Ids the model does not have: an error naming the file, not a panic.
    let foreign = tmp.path().join("foreign.jsonl");
    std::fs::write(&foreign, "{\"prompt_ids\": [1, 2], \"completion_ids\": [3, 99999]}\n".repeat(8))?;
    let mut train = train_args(&tmp.path().join("run2"), "2");
    train[at] = s(&foreign).to_string();
    fails_with(mtp(&train.iter().map(String::as_str).collect::<Vec<_>>()), &["foreign.jsonl", "99999"]);
    // Prompts longer than the data allows: a clear error.
    let long = ["--prompt-tokens", "100000", "--json"];
    fails_with(mtp(&[&["distill"][..], &args, &long].concat()), &["too few"]);
    Ok(())
}

/// Chat distillation: the questions of an Alpaca file through the chat template, answered
/// in batches of prompts of different lengths (padded on the left); each answer is what
/// `mtp generate --chat` writes for that question, token for token.
#[test]
fn chat_distillation_answers_like_generate_chat() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = fixture("llama");
    let data = tmp.path().join("questions.json");
    let questions = [
        "Hi",
        "What is two plus two?",
        "Write a function that adds two numbers and returns the sum, please.",
        "Name a colour.",
        "Why is the sky blue on a clear day, and why does it turn red at sunset?",
        "Count to three.",
    ];
    let rows: Vec<Value> =
        questions.iter().map(|q| serde_json::json!({"instruction": q, "output": "ignored"})).collect();
    std::fs::write(&data, serde_json::to_string(&rows)?)?;
    let out = tmp.path().join("chat.jsonl");
    let summary: Value = serde_json::from_str(&ok(mtp(&[
        "distill",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--chat",
        "--out",
        s(&out),
        "--new-tokens",
        "8",
        "--batch-size",
        "4",
        "--json",
    ]))?)?;
    assert_eq!(summary["sequences"], questions.len());
    let lines: Vec<Value> =
        std::fs::read_to_string(&out)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), questions.len());
    let lengths: std::collections::BTreeSet<usize> = lines.iter().map(|l| ids(&l["prompt_ids"]).len()).collect();
    assert!(lengths.len() > 2, "the prompts should differ in length: {lengths:?}");
    let mut checked = 0;
    for q in questions {
        let generate = ["generate", "--model", s(&model), "--chat", "--prompt", q, "--max-new-tokens", "8", "--json"];
        let generated: Value = serde_json::from_str(&ok(mtp(&generate))?)?;
        let line = lines
            .iter()
            .find(|l| ids(&l["prompt_ids"]) == ids(&generated["prompt_ids"]))
            .ok_or_else(|| anyhow::anyhow!("no distilled line has the prompt of {q:?}"))?;
        assert_eq!(ids(&line["completion_ids"]), ids(&generated["token_ids"]), "{q:?}");
        checked += 1;
    }
    assert_eq!(checked, questions.len());
    // A dataset with no questions says so.
    fails_with(
        mtp(&["distill", "--model", s(&model), "--data", "builtin:code:5", "--chat", "--out", s(&out)]),
        &["no questions"],
    );
    Ok(())
}

/// `mtp train --recipe uno`, its random ids in `mtp generate --json`, and `mtp export`: the
/// PEFT folder for it, a clear refusal for an adapter of the paper's recipe.
#[test]
fn uno_recipe_trains_reports_its_random_ids_and_exports() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("uno");
    let mut args = train_args(&run, "4");
    args.extend(["--recipe", "uno", "--val-every", "0"].map(String::from));
    ok(mtp(&args.iter().map(String::as_str).collect::<Vec<_>>()))?;
    let adapter = run.join("adapter.safetensors");

    let model = fixture("llama");
    let out = ok(mtp(&[
        "generate",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--mode",
        "quadratic",
        "--masks",
        "2",
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        "10",
        "--ignore-eos",
        "--json",
    ]))?;
    let v: Value = serde_json::from_str(out.trim())?;
    let steps = v["steps"].as_array().cloned().unwrap_or_default();
    assert!(steps.len() >= 2, "{v}");
    // The bootstrap block is the prefill's (one block of 2, whose drafts the first step
    // verifies); every step reports the ids its mask rows read: one block of 2 per regular
    // row (quadratic).
    assert_eq!(ids(&v["bootstrap_noise_ids"]).len(), 2, "{v}");
    assert_eq!(ids(&steps[0]["drafts"]).len(), 2, "{v}");
    for step in &steps {
        assert_eq!(ids(&step["noise_ids"]).len(), 2 * (ids(&step["drafts"]).len() + 1), "{step}");
    }

    let peft = tmp.path().join("peft");
    let out = ok(mtp(&["export", "--format", "peft", s(&adapter), s(&peft), "--json"]))?;
    let v: Value = serde_json::from_str(out.trim())?;
    // 2 layers x 7 projections x (A, B).
    assert_eq!(v["tensors"], 28, "{v}");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json"))?)?;
    assert_eq!((config["r"].as_u64(), config["peft_type"].as_str()), (Some(4), Some("LORA")), "{config}");
    assert!(peft.join("adapter_model.safetensors").exists());
    let copy = tmp.path().join("copy.safetensors");
    ok(mtp(&["export", "--format", "safetensors", s(&adapter), s(&copy)]))?;
    assert_eq!(std::fs::read(&copy)?, std::fs::read(&adapter)?);

    let paper = train_adapter(tmp.path(), "1")?.join("adapter.safetensors");
    fails_with(
        mtp(&["export", "--format", "peft", s(&paper), s(&tmp.path().join("no"))]),
        &["cannot serve", "mask embeddings", "--recipe uno"],
    );
    fails_with(mtp(&["export", "--format", "peft", s(&model.join("config.json")), s(&peft)]), &["config.json"]);
    Ok(())
}
