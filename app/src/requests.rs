//! The forms turned into worker requests: one function per request, each with its test.
//! Views push intents ([`crate::app::Command`]); the commands call these with the state, so
//! no view builds a request and nothing here draws or touches the worker.

use std::path::PathBuf;

use anyhow::Context;
use mtp_core::ModelSource;
use mtp_core::decode::bench::BenchConfig;
use mtp_core::decode::{Decoding, MaskCount, Mode, SamplingParams};
use mtp_core::train::TrainConfig;
use mtp_core::train::distill::DistillConfig;

use crate::state::Persisted;
use crate::worker::{LaneSpec, ModelSummary, Request};

/// Load the model the Model form names, on its device and in its precision, with the adapter
/// last in use with it in the open project (after a restart too). `in_use`: the model loaded
/// now and the adapter loaded on it, if any: loading the same model again (in another
/// precision, on another device) keeps that adapter. With neither, the demo's default.
pub fn load_model(p: &Persisted, in_use: Option<(&ModelSource, &std::path::Path)>) -> anyhow::Result<Request> {
    let m = &p.model;
    let source: ModelSource = m.source.parse()?;
    // Graphs only where they can be recorded: the form keeps the choice for a CUDA device.
    let cuda_graphs = m.cuda_graphs && m.device.is_cuda();
    let adapter = in_use
        .filter(|(loaded, _)| **loaded == source)
        .map(|(_, path)| path)
        .or_else(|| p.remembered_adapter(&source))
        .map(std::path::Path::to_owned);
    Ok(Request::LoadModel {
        source,
        device: m.device,
        dtype: m.dtype,
        cuda_graphs,
        template_vars: m.template_vars().context("Template variables")?,
        arithmetic: m.draft_arithmetic,
        adapter,
    })
}

/// Load the adapter file the Model form names.
pub fn load_adapter(p: &Persisted) -> Request {
    Request::LoadAdapter { path: PathBuf::from(p.model.adapter.trim()), arithmetic: p.model.draft_arithmetic }
}

/// Preview the Data form's dataset, cut at the Train form's sequence length.
pub fn preview_data(p: &Persisted) -> anyhow::Result<Request> {
    let source = p.data.source.parse().context("Data")?;
    Ok(Request::PreviewData { source, strict: p.data.strict, seq_len: p.train.recipe.training.seq_len })
}

/// Self-distill the loaded model on the Data form's dataset into `out`. Text prompts leave
/// room for the continuation in one training sequence; chat needs a chat template.
pub fn distill(p: &Persisted, model: Option<&ModelSummary>, out: PathBuf) -> anyhow::Result<Request> {
    let d = &p.data;
    let source = d.source.parse().context("Data")?;
    let defaults = DistillConfig::default();
    let config = DistillConfig {
        sequences: d.distill_sequences,
        new_tokens: d.distill_new_tokens,
        prompt_tokens: defaults.prompt_tokens.min(p.train.recipe.training.seq_len / 4).max(1),
        chat: d.distill_chat && model.is_some_and(|m| m.chat_template),
        ..defaults
    };
    Ok(Request::Distill { source, config, out })
}

/// Train with the Train form's recipe on the loaded model (its source, device and
/// precision) and the Data form's dataset, into `run_dir`.
pub fn train(p: &Persisted, model: Option<&ModelSummary>, run_dir: PathBuf) -> anyhow::Result<Request> {
    let m = model.context("load a model first")?;
    let config = TrainConfig {
        model: m.source.clone(),
        data: p.data.source.parse().context("Data")?,
        strict_data: p.data.strict,
        training: mtp_core::train::LoopConfig { device: m.device, ..p.train.recipe.training.clone() },
        dtype: m.dtype,
        // Conversations rendered as the loaded model renders them.
        chat_template_vars: m.tokenizer.template_vars().clone(),
        ..p.train.recipe.clone()
    };
    if config.method.lora.targets.is_empty() {
        anyhow::bail!("choose at least one LoRA target");
    }
    config.validate()?;
    Ok(Request::Train { config: Box::new(config), run_dir })
}

/// Continue the run in `run_dir`: to its own step count, or extended to `extend_to` steps.
pub fn resume(run_dir: PathBuf, extend_to: Option<usize>) -> Request {
    Request::Resume { run_dir, steps: extend_to }
}

/// The race of the Compare form: AR in lane A, the chosen mode in lane B.
pub fn race(p: &Persisted) -> Request {
    let c = &p.compare;
    let decoding = if c.greedy {
        Decoding::Greedy
    } else {
        Decoding::Sample(SamplingParams { temperature: c.temperature, top_k: None, top_p: None, seed: c.seed })
    };
    let lanes =
        [LaneSpec { mode: Mode::Ar, masks: MaskCount::Fixed(0) }, LaneSpec { mode: c.mode, masks: c.mask_count() }];
    Request::Race { prompt: c.prompt.clone(), chat: c.chat, lanes, decoding, max_new_tokens: c.max_new_tokens }
}

/// Start stepping through quadratic decoding of the Step form's prompt.
pub fn step_start(p: &Persisted) -> Request {
    Request::StepStart { prompt: p.step.prompt.clone(), masks: p.step.masks }
}

/// The Bench form's benchmark: AR and the ticked modes at its mask counts, on its prompts
/// file (or the demo's).
pub fn bench(p: &Persisted) -> anyhow::Result<Request> {
    let b = &p.bench;
    let masks =
        b.masks.split(',').map(|s| s.parse::<MaskCount>()).collect::<Result<Vec<_>, _>>().context("Bench: masks")?;
    let mut modes = vec![Mode::Ar];
    if b.linear {
        modes.push(Mode::Linear);
    }
    if b.quadratic {
        modes.push(Mode::Quadratic);
    }
    let prompts = if b.prompts.trim().is_empty() { mtp_core::source::demo_prompts() } else { b.prompts.trim().into() };
    let config =
        BenchConfig { modes, masks, max_new_tokens: b.max_new_tokens, repeats: b.repeats.max(1), chat: b.chat };
    Ok(Request::Bench { prompts, config })
}

/// Export the adapter of the run in `run_dir` as a PEFT LoRA folder, `peft/` in the run.
pub fn export_peft(run_dir: &std::path::Path) -> Request {
    let run = mtp_core::train::RunDir(run_dir.to_owned());
    Request::ExportPeft { adapter: run.adapter(), out: run_dir.join("peft") }
}

/// The Probe form's prompt and continuation.
pub fn probe(p: &Persisted) -> Request {
    Request::Probe { prompt: p.probe.prompt.clone(), continuation: p.probe.continuation.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtp_core::{DType, DeviceSpec};

    fn model() -> anyhow::Result<ModelSummary> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama");
        let info = mtp_core::inspect::ModelInfo::from_folder(&dir)?;
        let config = mtp_core::model::ModelConfig::from_file(&dir.join("config.json"))?;
        let tokenizer = std::sync::Arc::new(mtp_core::TextTokenizer::from_folder(&dir, None, &[])?);
        Ok(ModelSummary {
            source: ModelSource::Local { path: dir.clone() },
            dir,
            info,
            config,
            device: DeviceSpec::Cpu,
            dtype: DType::F32,
            chat_template: true,
            tokenizer,
            load_seconds: 0.0,
        })
    }

    #[test]
    fn train_runs_the_forms_recipe_on_the_loaded_model() -> anyhow::Result<()> {
        let mut p = Persisted::default();
        p.data.source = "builtin:arith:50".into();
        p.train.recipe.method.k = 3;
        p.train.recipe.training.steps = 7;
        let m = model()?;
        let Request::Train { config, run_dir } = train(&p, Some(&m), "runs/x".into())? else {
            anyhow::bail!("not a training request")
        };
        assert_eq!(run_dir, PathBuf::from("runs/x"));
        assert_eq!((config.method.k, config.training.steps), (3, 7));
        assert_eq!(config.model, m.source);
        assert_eq!(config.data.to_string(), "builtin:arith:50");
        // Everything else is the form's recipe as it stands.
        assert_eq!(config.training.optim, p.train.recipe.training.optim);
        assert_eq!(config.lcm_weight, p.train.recipe.lcm_weight);
        assert!(config.chat_template_vars.is_empty());
        // Conversations are rendered with the loaded model's template variables.
        let mut tokenizer = (*m.tokenizer).clone();
        tokenizer.set_template_vars(mtp_core::TemplateVars::from([("enable_thinking".into(), false.into())]));
        let with_vars = ModelSummary { tokenizer: std::sync::Arc::new(tokenizer), ..model()? };
        let Request::Train { config, .. } = train(&p, Some(&with_vars), "runs/x".into())? else {
            anyhow::bail!("not a training request")
        };
        assert_eq!(&config.chat_template_vars, with_vars.tokenizer.template_vars());
        assert!(train(&p, None, "runs/y".into()).is_err(), "no model loaded");
        p.train.recipe.method.lora.targets.clear();
        assert!(train(&p, Some(&m), "runs/z".into()).is_err(), "no target");
        p.data.source = "/no/such/data.jsonl".into();
        assert!(train(&p, Some(&m), "runs/z".into()).is_err());
        Ok(())
    }

    #[test]
    fn distill_asks_for_chat_only_with_a_template() -> anyhow::Result<()> {
        let mut p = Persisted::default();
        p.data.distill_chat = true;
        p.data.distill_sequences = 12;
        let mut m = model()?;
        let chat = |r: Request| matches!(r, Request::Distill { config, .. } if config.chat && config.sequences == 12);
        assert!(chat(distill(&p, Some(&m), "d.jsonl".into())?));
        m.chat_template = false;
        assert!(!chat(distill(&p, Some(&m), "d.jsonl".into())?));
        Ok(())
    }

    #[test]
    fn bench_takes_the_ticked_modes_and_checks_the_masks() -> anyhow::Result<()> {
        let mut p = Persisted::default();
        p.bench.masks = "1,2,auto".into();
        p.bench.linear = false;
        p.bench.quadratic = true;
        let Request::Bench { prompts, config } = bench(&p)? else { anyhow::bail!("not a bench request") };
        assert_eq!(config.modes, [Mode::Ar, Mode::Quadratic]);
        assert_eq!(config.masks, [MaskCount::Fixed(1), MaskCount::Fixed(2), MaskCount::Auto]);
        assert_eq!(prompts, mtp_core::source::demo_prompts());
        // The fastest of three runs by default, as the documented commands; never none.
        assert_eq!(config.repeats, 3);
        p.bench.repeats = 0;
        // Text prompts through the chat template when ticked.
        assert!(!config.chat);
        p.bench.chat = true;
        let Request::Bench { config, .. } = bench(&p)? else { anyhow::bail!("not a bench request") };
        assert_eq!(config.repeats, 1);
        assert!(config.chat);
        p.bench.masks = "1,two".into();
        assert!(bench(&p).is_err());
        Ok(())
    }

    #[test]
    fn race_step_probe_resume_and_loads_carry_their_forms() -> anyhow::Result<()> {
        let mut p = Persisted::default();
        p.compare.greedy = false;
        p.compare.seed = 9;
        p.compare.auto_masks = true;
        let Request::Race { lanes, decoding, prompt, .. } = race(&p) else { anyhow::bail!("not a race") };
        assert_eq!((lanes[0].mode, lanes[1].masks), (Mode::Ar, MaskCount::Auto));
        assert!(matches!(decoding, Decoding::Sample(s) if s.seed == 9));
        assert_eq!(prompt, p.compare.prompt);
        p.step.masks = 3;
        assert!(matches!(step_start(&p), Request::StepStart { masks: 3, .. }));
        p.probe.continuation = "x".into();
        assert!(matches!(probe(&p), Request::Probe { continuation, .. } if continuation == "x"));
        assert!(matches!(resume("r".into(), Some(42)), Request::Resume { steps: Some(42), .. }));
        assert!(matches!(resume("r".into(), None), Request::Resume { steps: None, .. }));
        p.model.source = "demo".into();
        assert!(matches!(
            load_model(&p, None)?,
            Request::LoadModel { source: ModelSource::Demo, cuda_graphs: false, .. }
        ));
        p.model.cuda_graphs = true;
        p.model.device = mtp_core::DeviceSpec::Cpu;
        assert!(matches!(load_model(&p, None)?, Request::LoadModel { cuda_graphs: false, .. }), "not on the CPU");
        p.model.device = mtp_core::DeviceSpec::Cuda(0);
        assert!(matches!(load_model(&p, None)?, Request::LoadModel { cuda_graphs: true, .. }));
        p.model.cuda_graphs = false;
        assert!(matches!(load_model(&p, None)?, Request::LoadModel { cuda_graphs: false, .. }), "switched off");
        // The same model loaded again keeps the adapter in use; another model does not.
        let run = std::path::Path::new("runs/r/adapter.safetensors");
        assert!(matches!(load_model(&p, Some((&ModelSource::Demo, run)))?,
            Request::LoadModel { adapter: Some(a), .. } if a == run));
        let other = ModelSource::Local { path: "/models/other".into() };
        assert!(matches!(load_model(&p, Some((&other, run)))?, Request::LoadModel { adapter: None, .. }));
        // After a restart (nothing loaded), the adapter last in use with the model in the
        // open project, while its file is there; another project's is not used.
        let tmp = tempfile::tempdir()?;
        let kept = tmp.path().join("adapter.safetensors");
        std::fs::write(&kept, b"")?;
        p.project_dir = Some("projects/a".into());
        p.remember_adapter(&ModelSource::Demo, &kept);
        p.remember_adapter(&other, run);
        assert!(matches!(load_model(&p, None)?, Request::LoadModel { adapter: Some(a), .. } if a == kept));
        assert!(
            matches!(load_model(&p, Some((&ModelSource::Demo, run)))?,
            Request::LoadModel { adapter: Some(a), .. } if a == run),
            "the one in use first"
        );
        p.project_dir = Some("projects/b".into());
        assert!(matches!(load_model(&p, None)?, Request::LoadModel { adapter: None, .. }));
        p.project_dir = Some("projects/a".into());
        std::fs::remove_file(&kept)?;
        assert!(matches!(load_model(&p, None)?, Request::LoadModel { adapter: None, .. }), "a deleted file");
        // The template variables, a line each, parsed; a bad line names the field.
        p.model.chat_template_vars = "enable_thinking=false\n\ndate_string=26 Jul 2024\n".into();
        let Request::LoadModel { template_vars, .. } = load_model(&p, None)? else { anyhow::bail!("not a load") };
        assert_eq!(template_vars.get("enable_thinking"), Some(&serde_json::Value::Bool(false)));
        assert_eq!(template_vars.get("date_string"), Some(&serde_json::Value::from("26 Jul 2024")));
        p.model.chat_template_vars = "enable_thinking".into();
        let error = load_model(&p, None).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(error.starts_with("Template variables") && error.contains("KEY=VALUE"), "{error}");
        p.model.chat_template_vars.clear();
        p.model.source = "not a model or a folder".into();
        assert!(load_model(&p, None).is_err());
        p.model.adapter = " a.safetensors ".into();
        assert!(
            matches!(load_adapter(&p), Request::LoadAdapter { path, .. } if path == std::path::Path::new("a.safetensors"))
        );
        p.data.source = "builtin:code:5".into();
        assert!(matches!(preview_data(&p)?, Request::PreviewData { .. }));
        let Request::ExportPeft { adapter, out } = export_peft(std::path::Path::new("runs/a")) else {
            anyhow::bail!("not an export")
        };
        assert_eq!((adapter, out), ("runs/a/adapter.safetensors".into(), "runs/a/peft".into()));
        Ok(())
    }
}
