//! `mtp train`: MTP fine-tuning with a progress bar; `--resume RUN_DIR` continues a run.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use mtp_core::inspect::human_bytes;
use mtp_core::model::Proj;
use mtp_core::mtp::{LoraConfig, MtpConfig};
use mtp_core::train::trainer::Checkpointing;
use mtp_core::train::{Control, Packing, TrainConfig, TrainEvent};
use mtp_core::{DType, LoadOptions, LoadedModel, ModelSource};

use super::progress::DownloadBar;
use super::recipe::TrainLoopArgs;

/// Arguments of `mtp train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Continue the run in this folder from its last checkpoint.
    #[arg(long, conflicts_with_all = ["model", "data", "out", "chat_template_vars"])]
    pub resume: Option<PathBuf>,
    /// A model folder, a hub repo id (owner/name[@revision]) or `demo`.
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<String>,
    /// The training set: a JSONL, JSON or Parquet file (chat messages, ShareGPT, Alpaca,
    /// prompt/completion or text rows), a text file, a folder of text/source files, a hub
    /// dataset (owner/name[@revision]), builtin:NAME[:COUNT], or several joined by commas.
    #[arg(long, required_unless_present = "resume")]
    pub data: Option<String>,
    /// The run folder (config.json, metrics.jsonl, checkpoints/, adapter.safetensors).
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Mask tokens (drafts per step).
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA alpha (the delta is scaled by alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Projections to adapt, comma-separated (q,k,v,o,gate,up,down).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub targets: Vec<String>,
    /// The optimisation loop: steps, batches, learning rate, validation, checkpoints, seed, device.
    #[command(flatten)]
    pub training: TrainLoopArgs,
    /// One example per sequence (cut at --seq-len) instead of packing examples together.
    #[arg(long)]
    pub no_packing: bool,
    /// Every N validation passes (and at the end), measure tokens per forward by decoding a
    /// few held-out prompts at 1..k masks (0 = never).
    #[arg(long, default_value_t = TrainConfig::default().measure_every)]
    pub measure_every: usize,
    /// A variable the chat template reads when rendering conversations, as for the other
    /// commands (`enable_thinking=false`, `date_string=26 Jul 2024`); recorded in the run's
    /// recipe, which a resumed run renders with.
    #[arg(long = "chat-template-var", value_name = "KEY=VALUE", value_parser = super::common::template_var)]
    pub chat_template_vars: Vec<(String, serde_json::Value)>,
    /// What mask rows read: paper (learned mask embeddings, a sampler head) or uno (random
    /// token ids and no sampler: the recipe SGLang's and vLLM's UNO decoding serve; export it
    /// with `mtp export --format peft`).
    #[arg(long, default_value_t = mtp_core::mtp::Recipe::Paper)]
    pub recipe: mtp_core::mtp::Recipe,
    /// Train without the sampler head (ablation).
    #[arg(long)]
    pub no_sampler: bool,
    /// The sampler head's form: paper (the LM head reads the MLP's output) or residual (the
    /// MLP's output is added to the mask's hidden state through a zero-initialised matrix,
    /// so the head starts drafting as the LM head does).
    #[arg(long, default_value_t = mtp_core::mtp::DEFAULT_SAMPLER_FORM)]
    pub sampler_form: mtp_core::mtp::SamplerForm,
    /// Plain LoRA instead of gated LoRA (ablation: changes next-token outputs too).
    #[arg(long)]
    pub no_gate: bool,
    /// Train the mask embeddings too.
    #[arg(long)]
    pub train_mask_embeddings: bool,
    /// Weight of the latent-consistency loss.
    #[arg(long, default_value_t = mtp_core::train::trainer::DEFAULT_LCM_WEIGHT)]
    pub lcm_weight: f64,
    /// How the latent-consistency loss reduces over the hidden width: mean (one weight for
    /// every width) or sum (the first reading; its weight depends on the width).
    #[arg(long, default_value_t = mtp_core::mtp::loss::LcmReduction::Mean)]
    pub lcm_reduction: mtp_core::mtp::loss::LcmReduction,
    /// Fail on the first malformed dataset line.
    #[arg(long)]
    pub strict: bool,
    /// Base model precision (default: bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Activation checkpointing: auto (on when the memory estimate exceeds the device's
    /// memory), on or off.
    #[arg(long, default_value = "auto")]
    pub checkpointing: Checkpointing,
    /// Draft vocabulary stored with the adapter: its most frequent target tokens (0: none).
    #[arg(long, default_value_t = mtp_core::train::trainer::DEFAULT_DRAFT_VOCAB)]
    pub draft_vocab: usize,
    /// Print each event as one JSON line instead of a progress bar.
    #[arg(long)]
    pub json: bool,
}

fn parse_proj(s: &str) -> anyhow::Result<Proj> {
    let s = s.trim().trim_end_matches("_proj");
    Proj::ALL
        .into_iter()
        .find(|p| p.module().trim_end_matches("_proj") == s)
        .with_context(|| format!("unknown LoRA target `{s}` (use q,k,v,o,gate,up,down)"))
}

impl Args {
    fn config(&self) -> anyhow::Result<TrainConfig> {
        let model: ModelSource = self.model.as_deref().unwrap_or("demo").parse()?;
        let data = self.data.as_deref().unwrap_or_default().parse()?;
        let dtype = self.dtype.unwrap_or_else(|| DType::default_for(self.training.device));
        Ok(TrainConfig {
            model,
            data,
            strict_data: self.strict,
            method: MtpConfig {
                k: self.k,
                lora: LoraConfig {
                    rank: self.rank,
                    alpha: self.alpha,
                    targets: self.targets.iter().map(|t| parse_proj(t)).collect::<anyhow::Result<_>>()?,
                },
                gated: !self.no_gate,
                // UNO has no sampler head: its drafts are the LM head's.
                sampler: !self.no_sampler && self.recipe != mtp_core::mtp::Recipe::Uno,
                train_mask_embeddings: self.train_mask_embeddings,
                sampler_form: self.sampler_form,
                recipe: self.recipe,
            },
            lcm_weight: self.lcm_weight,
            lcm_reduction: self.lcm_reduction,
            training: self.training.config(),
            packing: if self.no_packing { Packing::Truncate } else { Packing::Pack },
            dtype,
            draft_vocab: self.draft_vocab,
            checkpointing: self.checkpointing,
            measure_every: self.measure_every,
            chat_template_vars: self.chat_template_vars.iter().cloned().collect(),
        })
    }
}

/// Reports events on a terminal bar or as JSON lines.
pub(crate) struct Reporter {
    json: bool,
    bar: Option<ProgressBar>,
    /// Whether the run trains a sampler head (its loss and accuracies are then shown).
    sampler: bool,
}

impl Reporter {
    pub(crate) fn new(json: bool) -> Self {
        Self { json, bar: None, sampler: true }
    }

    /// For a run without a sampler head (UNO, the ablation, pretraining): its loss and
    /// accuracies, always zero or empty, are left out of the lines.
    pub(crate) fn without_sampler(self, without: bool) -> Self {
        Self { sampler: !without, ..self }
    }

    pub(crate) fn event(&mut self, e: &TrainEvent) {
        if self.json {
            // A closed pipe (`| head`) must not kill the run mid-step: the write is dropped.
            if let Ok(line) = serde_json::to_string(e) {
                use std::io::Write;
                let _ = writeln!(std::io::stdout(), "{line}");
            }
            return;
        }
        match e {
            TrainEvent::Prepared {
                data,
                train_sequences,
                val_sequences,
                trainable_parameters,
                start_step,
                total_steps,
                checkpointing,
                memory_estimate,
            } => {
                eprintln!(
                    "data: {} ({}), {}{}; {train_sequences} training and {val_sequences} validation sequences; {trainable_parameters} trainable parameters",
                    crate::counted(data.examples, "example", "examples"),
                    data.format,
                    crate::counted(data.malformed, "malformed row", "malformed rows"),
                    if data.malformed_rows.is_empty() {
                        String::new()
                    } else {
                        let rows: Vec<String> = data.malformed_rows.iter().map(ToString::to_string).collect();
                        format!(" (first: {})", rows.join("; "))
                    },
                );
                if let Some(bytes) = memory_estimate {
                    eprintln!(
                        "memory: about {} estimated; activation checkpointing {}",
                        human_bytes(*bytes),
                        if *checkpointing { "on" } else { "off" }
                    );
                }
                let bar = if std::io::stderr().is_terminal() {
                    ProgressBar::new(*total_steps as u64)
                } else {
                    ProgressBar::hidden()
                };
                bar.set_style(
                    ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} eta {eta}] {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_position(*start_step as u64);
                self.bar = Some(bar);
            }
            TrainEvent::Step(m) => {
                let acc: Vec<String> = m.losses.slot_acc.iter().map(|a| format!("{a:.2}")).collect();
                let msg = if acc.is_empty() {
                    format!("loss {:.3} lr {:.2e} {:.0} tok/s", m.losses.loss, m.lr, m.tokens_per_second)
                } else {
                    let sampler =
                        if self.sampler { format!(" sampler {:.3}", m.losses.loss_sampler) } else { String::new() };
                    format!(
                        "loss {:.3} (base {:.3}{sampler} lcm {:.3}) slot acc [{}] {:.0} tok/s",
                        m.losses.loss,
                        m.losses.loss_base,
                        m.losses.loss_lcm,
                        acc.join(", "),
                        m.tokens_per_second
                    )
                };
                match &self.bar {
                    Some(bar) if !bar.is_hidden() => {
                        bar.set_position(m.step as u64);
                        bar.set_message(msg);
                    }
                    _ if m.step % 10 == 0 || m.step == 1 => eprintln!("step {}: {msg}", m.step),
                    _ => {}
                }
            }
            TrainEvent::Validation(m) => {
                let round = |v: &[f64]| v.iter().map(|a| (a * 100.0).round() / 100.0).collect::<Vec<_>>();
                let mut line = format!("validation at step {}: loss {:.3}", m.step, m.losses.loss);
                if !m.losses.slot_acc.is_empty() {
                    line.push_str(&format!(", slot accuracy {:?}", round(&m.losses.slot_acc)));
                    if self.sampler {
                        line.push_str(&format!(" (sampler {:?})", round(&m.losses.slot_acc_sampler)));
                    }
                }
                if let Some(e) = &m.expected_tokens_per_forward {
                    line.push_str(&format!("; tokens/forward at 1..k masks: expected {:?}", round(e)));
                }
                if let Some(v) = &m.measured_tokens_per_forward {
                    line.push_str(&format!(", measured {:?}", round(v)));
                }
                match &self.bar {
                    Some(bar) if !bar.is_hidden() => bar.println(line),
                    _ => eprintln!("{line}"),
                }
            }
            TrainEvent::Checkpoint { .. } => {}
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Cancel `control` on Ctrl-C (the command then ends cleanly, saying `what` it keeps); a
/// second Ctrl-C exits at once.
pub(crate) fn cancel_on_ctrl_c(control: &Control, what: &'static str) {
    let flag = control.cancel_flag();
    let _ = ctrlc::set_handler(move || {
        eprintln!("\nstopping: {what} (Ctrl-C again to abort)");
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let control = Control::new();
    cancel_on_ctrl_c(&control, "saving a checkpoint");
    // The recipe, read once: the run folder's when resuming, else the command line's.
    let config = match &args.resume {
        Some(dir) => mtp_core::train::trainer::read_config(dir)?,
        None => args.config()?,
    };
    if args.resume.is_none() && !config.method.sampler && args.sampler_form != mtp_core::mtp::DEFAULT_SAMPLER_FORM {
        eprintln!("note: this run has no sampler head (--recipe uno or --no-sampler); --sampler-form is not used");
    }
    let has_sampler = config.method.sampler;
    let mut reporter = Reporter::new(args.json).without_sampler(!has_sampler);
    let mut estimate = None;
    let mut sink = |e: &TrainEvent| {
        if let TrainEvent::Prepared { memory_estimate, .. } = e {
            estimate = *memory_estimate;
        }
        reporter.event(e)
    };
    // Memory before the model is loaded: what the run adds is measured from here.
    let before = mtp_core::device::process_memory().map(|(now, _)| now);
    let (summary, run_dir) = if let Some(dir) = &args.resume {
        super::common::fetch_data(&config.data)?;
        let loaded = load(&config)?;
        let (_, summary) = mtp_core::train::resume(&loaded, dir, args.training.steps, &mut sink, &control)?;
        (summary, dir.clone())
    } else {
        config.validate()?;
        let out = args.out.clone().context("--out is required")?;
        if out.join("config.json").exists() {
            anyhow::bail!(
                "{} already holds a run; resume it with `mtp train --resume {}` or choose another --out",
                out.display(),
                out.display()
            );
        }
        super::common::fetch_data(&config.data)?;
        let loaded = load(&config)?;
        (mtp_core::train::train(&loaded, &config, &out, &mut sink, &control)?, out)
    };
    reporter.finish();
    // The peak resident memory the run added (the host's; on CUDA the GPU's memory is
    // measured from outside, see scripts/gpu_check.py).
    let peak = match (before, mtp_core::device::process_memory()) {
        (Some(before), Some((_, peak))) => Some(peak.saturating_sub(before)),
        _ => None,
    };
    if args.json {
        super::print_json(&serde_json::json!({ "summary": {
            "outcome": summary.outcome.to_string(),
            "step": summary.step,
            "adapter": summary.adapter,
            "peak_rss_bytes": peak,
            "memory_estimate_bytes": estimate,
        }}))?;
    } else if let Some(peak) = peak {
        eprintln!("peak memory of the run (host, resident): {}", human_bytes(peak));
    }
    eprintln!(
        "{} at step {}; adapter: {}; resume with: mtp train --resume {}",
        summary.outcome,
        summary.step,
        summary.adapter.display(),
        run_dir.display()
    );
    super::exit_if_stopped(summary.outcome);
    Ok(())
}

fn load(config: &TrainConfig) -> anyhow::Result<LoadedModel> {
    // Training's measured tokens per forward decode a few prompts once per mask count: a
    // recording per step shape would cost more than it saves, and keep memory while training.
    let options = LoadOptions {
        device: config.training.device,
        dtype: config.dtype,
        cuda_graphs: false,
        template_vars: config.chat_template_vars.clone(),
        ..LoadOptions::default()
    };
    LoadedModel::load(&config.model, &options, &mut DownloadBar::new())
        .with_context(|| format!("loading model `{}`", config.model))
}
