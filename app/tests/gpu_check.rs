//! `scripts/gpu-check` end to end on the CPU with tiny shapes, so that the GPU proof a
//! session with a GPU runs cannot rot in the sessions without one. Needs the reference
//! stack (transformers) in the project's Python environment, which `./scripts/test`
//! installs.

use std::path::Path;
use std::process::Command;

#[test]
fn gpu_check_runs_on_tiny_shapes_and_writes_every_section() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or_else(|| anyhow::anyhow!("no root"))?;
    let out = tempfile::tempdir()?;
    // Questions the real-model section chat-distills on the device before it trains.
    let questions = out.path().join("questions.jsonl");
    std::fs::write(
        &questions,
        (0..4)
            .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is {i} + {i}?\"}}]}}\n"))
            .collect::<String>(),
    )?;
    let done = Command::new(root.join("scripts/gpu-check"))
        .args(["--tiny", "--device", "cpu", "--mtp", env!("CARGO_BIN_EXE_mtp")])
        .args(["--sections", "parity,ar,step_cost,gemm_rows,kernels,train,demo,demo_train,smollm2_train", "--out"])
        .arg(out.path())
        // A model folder stands in for the GGUF parts that scripts/gpu-pack makes.
        .arg("--smollm2")
        .arg(root.join("tests/fixtures/models/llama"))
        .arg("--smollm2-questions")
        .arg(&questions)
        .output()?;
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "gpu-check failed:\n{err}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("gpu-cpu.json"))?)?;
    assert!(report["device"].is_string() && report["date"].is_string());
    assert_eq!(report["errors"].as_array().map(Vec::len), Some(0), "{err}");
    let fields: [(&str, &[&str]); 6] = [
        (
            "ar",
            &[
                "shape",
                "dtype",
                "ours_tokens_per_s",
                "transformers_tokens_per_s",
                "bound_tokens_per_s",
                "graphed_tokens_per_s",
            ],
        ),
        ("step_cost", &["shape", "form", "mode", "masks", "ratio"]),
        ("gemm_rows", &["shape", "rows", "qkv_us", "o_us", "gate_up_us", "down_us", "layer_us", "attention_us"]),
        ("train", &["shape", "ours_tokens_per_s", "reference_tokens_per_s", "peak_bytes", "estimate_bytes"]),
        ("demo", &["masks", "tokens_per_forward", "speedup", "identical"]),
        ("parity", &["family", "dtype", "max_abs_diff", "greedy_identical", "ok"]),
    ];
    for (list, keys) in fields {
        let rows = report[list].as_array().ok_or_else(|| anyhow::anyhow!("no {list}"))?;
        assert!(!rows.is_empty(), "{list} is empty");
        for row in rows {
            for key in keys {
                assert!(!row[key].is_null(), "{list}: no {key} in {row}");
            }
        }
    }
    // Every fixture family in both precisions, within tolerance.
    let parity = report["parity"].as_array().map_or(0, |p| p.iter().filter(|r| r["ok"] == true).count());
    assert_eq!(parity, 12, "{}", report["parity"]);
    assert!(report["demo"].as_array().is_some_and(|d| d.iter().all(|r| r["identical"] == true)));
    // `--cuda-graphs` (eager on the CPU) gives AR's tokens.
    assert!(
        report["ar"].as_array().is_some_and(|a| a.iter().all(|r| r["graphed_identical"] == true)),
        "{}",
        report["ar"]
    );
    // Both forms of the adapter's term are measured.
    for form in ["low-rank", "merged"] {
        assert!(report["step_cost"].as_array().is_some_and(|c| c.iter().any(|r| r["form"] == form)), "no {form}");
        // And again with `--cuda-graphs` (nothing recorded on the CPU), the outputs AR's.
        let graphed = |r: &serde_json::Value| r["form"] == form && r["graphs"] == true;
        let rows = report["step_cost"].as_array().map(|c| c.iter().filter(|r| graphed(r)).collect::<Vec<_>>());
        assert!(rows.as_ref().is_some_and(|r| !r.is_empty()), "no {form} with --cuda-graphs");
        assert!(rows.is_some_and(|r| r.iter().all(|r| r["identical"] == true && r["graphed"] == false)), "{form}");
    }
    // The kernels section: each step's wall time from the two lengths (a difference of two
    // short timings, whose sign the noise of a shared CPU may flip), and its operations from
    // libtorch's profiler (`mtp generate --profile-trace`; on the CPU its operations, in f16
    // through libtorch's general path as on CUDA, stand in for the kernels): a speculative
    // step issues more than an AR step; without a GPU (no
    // ncu), the ncu parser read on a sample of its table: three kernels, each named apart.
    let kernels = &report["kernels"];
    let steps = &kernels["shapes"]["tiny"];
    for mode in ["ar", "quadratic-2"] {
        assert!(steps[mode]["step_wall_us"].as_f64().is_some_and(f64::is_finite), "{kernels}");
        assert_eq!(steps[mode]["source"], "profiler (cpu_op)", "{kernels}");
    }
    let ops = |mode: &str| steps[mode]["kernels_per_step"].as_f64().unwrap_or(0.0);
    assert!(ops("ar") >= 10.0 && ops("quadratic-2") > ops("ar"), "{kernels}");
    // The folded form: one product a projection group fewer than the low-rank form.
    let count = |mode: &str, op: &str| steps[mode]["by_kernel"][op]["count"].as_f64().unwrap_or(0.0);
    let layers = 2.0; // TINY's num_hidden_layers (scripts/gpu_check.py)
    assert!(
        count("quadratic-2-low-rank", "aten::mm") - count("quadratic-2-folded", "aten::mm") >= 4.0 * layers - 0.5,
        "{kernels}"
    );
    assert!(ops("quadratic-2-folded") < ops("quadratic-2-low-rank"), "{kernels}");
    // Its forms as reported, and the folded weights' memory.
    assert_eq!(steps["quadratic-2-folded"]["lora_form"], "folded", "{kernels}");
    assert_eq!(steps["quadratic-2-low-rank"]["lora_form"], "low-rank", "{kernels}");
    let extra = |mode: &str| steps[mode]["drafter_extra_bytes"].as_u64().unwrap_or(0);
    assert!(extra("quadratic-2-folded") > extra("quadratic-2-low-rank"), "{kernels}");
    assert!(steps["ar"]["by_kernel"].as_object().is_some_and(|k| k.contains_key("aten::empty")), "{kernels}");
    let sample = kernels["sample_parsed"].as_object().ok_or_else(|| anyhow::anyhow!("no sample: {kernels}"))?;
    assert_eq!(sample.len(), 3, "{kernels}");
    assert_eq!(sample["nvjet_tst_64x8_64x16_4x1_v_bz_TNT"], serde_json::json!([1, 11520.0]), "{kernels}");
    // The demo's recipe trained on the device: timed, raced, its adapter kept.
    let trained = &report["demo_train"];
    assert!(trained["train_seconds"].as_f64().is_some_and(|s| s > 0.0), "{trained}");
    let rows = trained["rows"].as_array().ok_or_else(|| anyhow::anyhow!("no demo_train rows"))?;
    assert!(!rows.is_empty() && rows.iter().all(|r| r["identical"] == true), "{trained}");
    assert!(out.path().join("demo-adapter-trained-here.safetensors").exists());
    // The real model's section: trained for a counted number of steps, raced, its adapter
    // returned in parts that join back to the file whose digest the report gives.
    let smol = &report["smollm2_train"];
    assert!(smol["steps"].as_u64().is_some_and(|s| s > 0) && smol["train_seconds"].as_f64().is_some(), "{smol}");
    assert_eq!(smol["distill"]["sequences"].as_u64(), Some(4), "{smol}");
    assert!(out.path().join("smollm2-distilled.jsonl.xz").exists());
    let rows = smol["rows"].as_array().ok_or_else(|| anyhow::anyhow!("no smollm2_train rows"))?;
    assert!(!rows.is_empty() && rows.iter().all(|r| r["identical"] == true), "{smol}");
    let mut joined = Vec::new();
    for part in smol["adapter_parts"].as_array().ok_or_else(|| anyhow::anyhow!("no adapter parts"))? {
        joined.extend(std::fs::read(out.path().join(part.as_str().unwrap_or_default()))?);
    }
    assert_eq!(joined.len() as u64, smol["adapter_bytes"].as_u64().unwrap_or_default());
    assert!(safetensors::SafeTensors::deserialize(&joined).is_ok(), "the joined parts are not a safetensors file");
    let md = std::fs::read_to_string(out.path().join("gpu-cpu.md"))?;
    assert!(md.contains("### AR decoding") && md.contains("### Training") && md.contains("trained here"), "{md}");
    assert!(md.contains("SmolLM2-135M-Instruct trained here"), "{md}");
    Ok(())
}
