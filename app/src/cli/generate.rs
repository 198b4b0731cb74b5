//! `mtp generate`: text from a prompt, streamed to the terminal or summarised as JSON.

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::Context;
use mtp_core::decode::{
    Decoding, GenerateRequest, LoraForm, MaskCount, Mode, SamplingParams, StepStats, Strategy, TokenEvent, TokenOrigin,
    generate,
};
use mtp_core::tokenizer::ChatMessage;
use serde::Serialize;

use super::common::{AdapterArg, ModelArgs};

/// Arguments of `mtp generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text, encoded exactly as the model's tokenizer says.
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    pub prompt: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub prompt_ids: Option<Vec<i64>>,
    /// Wrap `--prompt` as a user turn with the model's chat template.
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens holding this much probability.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Seed of sampled decoding.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The adapter, for --mode linear|quadratic.
    #[command(flatten)]
    pub adapter: AdapterArg,
    /// ar (one token per forward), linear or quadratic (speculative, with the adapter).
    #[arg(long, default_value = "ar")]
    pub mode: Mode,
    /// Mask tokens per step (1..=k of the adapter, or auto: chosen each step from the recent
    /// acceptance and the step's measured cost; default: auto).
    #[arg(long, allow_negative_numbers = true)]
    pub masks: Option<MaskCount>,
    /// Keep generating after an end-of-sequence token (benchmarks: always `--max-new-tokens`).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Also write the prompt's logits (`[t, vocab]`, f32) to this safetensors file, for
    /// comparisons with the reference implementation.
    #[arg(long)]
    pub dump_logits: Option<std::path::PathBuf>,
    /// Record libtorch's profiler over the generation (over the repeats alone when there
    /// are some): every operation and, on a GPU, every kernel, CUDA graph replays
    /// included; written to this file as a Chrome trace (as `torch.profiler` writes it).
    #[arg(long)]
    pub profile_trace: Option<std::path::PathBuf>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Benchmarks: generate this many more times after a first (warm-up) run, in the same
    /// process; the JSON then reports each run's seconds and the median as `total_seconds`.
    #[arg(long, default_value_t = 0)]
    pub repeats: usize,
}

#[derive(Serialize)]
struct StepLine {
    /// The drafts the step verified (the previous step's mask block made them).
    drafts: Vec<i64>,
    accepted: usize,
    first_rejected: Option<usize>,
    emitted: usize,
    masks: usize,
    /// Mask blocks in the step (`auto` may leave out those verification would likely not
    /// need).
    blocks: usize,
    /// UNO recipe: the random ids the step's mask rows read.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    noise_ids: Vec<i64>,
}

#[derive(Serialize)]
struct Report<'a> {
    model: String,
    mode: Mode,
    masks: MaskCount,
    /// How the steps applied the adapter (speculative modes).
    lora_form: Option<LoraForm>,
    /// The fewest mask rows a step multiplied in bf16 (`--draft-arithmetic`; null: never).
    bf16_min_mask_rows: Option<usize>,
    /// The fewest mask rows a step multiplied in int8 (null: never; before bf16).
    int8_min_mask_rows: Option<usize>,
    /// True when the draft chain read its head (and its sampler's weights) in int8 (with
    /// int8 mask rows).
    int8_draft_head: bool,
    /// Bytes the drafter held beyond the model and the adapter (merged or folded weights,
    /// int8 panels).
    drafter_extra_bytes: usize,
    /// UNO recipe: the random ids the mask block after the prompt read (in the prefill; the
    /// drafts that block made are the first step's `drafts`).
    #[serde(skip_serializing_if = "Option::is_none")]
    bootstrap_noise_ids: Option<Vec<i64>>,
    device: String,
    dtype: String,
    /// Whether decoding steps were replayed from a CUDA graph (`--cuda-graphs` on a CUDA device, in
    /// a build that has them, and the recording succeeded; a failed one is logged).
    cuda_graphs: bool,
    prompt_ids: &'a [i64],
    token_ids: &'a [i64],
    text: String,
    forwards: usize,
    tokens_per_forward: f64,
    tokens_per_second: f64,
    prefill_seconds: f64,
    total_seconds: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    repeat_seconds: Vec<f64>,
    stop_reason: mtp_core::decode::StopReason,
    /// Per draft slot, the steps that reached it and those that accepted it; the steps by
    /// tokens emitted (speculative modes; empty for AR).
    acceptance: mtp_core::decode::Acceptance,
    steps: Vec<StepLine>,
}

impl Args {
    fn decoding(&self) -> anyhow::Result<Decoding> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            anyhow::bail!("--temperature must be finite and >= 0 (0 = greedy), got {}", self.temperature);
        }
        Ok(if self.temperature == 0.0 {
            Decoding::Greedy
        } else {
            Decoding::Sample(SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            })
        })
    }
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let decoding = args.decoding()?;
    let (source, loaded) = args.model.load()?;
    let tok = &loaded.tokenizer;
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) if args.chat => {
            let rendered = tok.apply_chat_template(&[ChatMessage::new("user", text)], true)?;
            tok.encode_with(&rendered, false)?
        }
        (Some(text), _) => tok.encode(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => anyhow::bail!("give --prompt or --prompt-ids"),
    };
    if args.mode == Mode::Ar {
        let unused: Vec<&str> = [(args.adapter.adapter.is_some(), "--adapter"), (args.masks.is_some(), "--masks")]
            .into_iter()
            .filter_map(|(given, flag)| given.then_some(flag))
            .collect();
        if !unused.is_empty() {
            eprintln!("note: --mode ar decodes without an adapter; {} not used", unused.join(" and "));
        }
    }
    let drafter = match args.mode {
        Mode::Ar => None,
        mode => Some(args.adapter.drafter(&source, &loaded.model).with_context(|| match args.adapter.adapter {
            None => format!("--mode {mode} needs an MTP adapter"),
            Some(_) => format!("--mode {mode}"),
        })?),
    };
    let masks = match (&drafter, args.masks) {
        (None, _) => MaskCount::Fixed(0),
        (Some(_), None) => MaskCount::Auto,
        (Some(_), Some(m)) => m,
    };
    let strategy = Strategy::new(args.mode, drafter.as_ref(), masks).with_context(|| format!("--masks {masks}"))?;
    let eos_ids = if args.ignore_eos { Vec::new() } else { tok.eos_ids.clone() };
    let req = GenerateRequest { prompt_ids, max_new_tokens: args.max_new_tokens, decoding, eos_ids };

    if let Some(path) = &args.dump_logits {
        let ids = tch::Tensor::from_slice(&req.prompt_ids).unsqueeze(0).to_device(loaded.model.device());
        let logits = tch::no_grad(|| loaded.model.forward(&ids, None)).squeeze_dim(0).to_kind(tch::Kind::Float);
        mtp_core::checkpoint::save(path, &[("logits".to_string(), logits)], None)?;
    }
    let mut stream = tok.stream(false);
    let mut stdout = std::io::stdout();
    let json = args.json;
    let colour = !json && args.mode != Mode::Ar && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut sink = |e: &TokenEvent| {
        if !json {
            let text = stream.push(e.id);
            // On a terminal, accepted drafts are shown in colour (one per slot).
            match e.origin {
                TokenOrigin::Draft { slot } if colour => {
                    let _ = write!(stdout, "\x1b[{}m{text}\x1b[0m", 31 + (slot % 6));
                }
                _ => {
                    let _ = write!(stdout, "{text}");
                }
            }
            let _ = stdout.flush();
        }
        ControlFlow::Continue(())
    };
    let device = loaded.model.device();
    let start = || args.profile_trace.as_ref().map(|_| mtp_core::model::trace::Trace::start(device)).transpose();
    // The first generation is recorded only when it is the only one.
    let mut recording = if args.repeats == 0 { start()? } else { None };
    let mut out = generate(&loaded.model, strategy, &req, &mut sink)?;
    if args.repeats > 0 {
        recording = start()?;
    }
    let mut repeat_seconds = Vec::with_capacity(args.repeats);
    for _ in 0..args.repeats {
        out = generate(&loaded.model, strategy, &req, &mut ())?;
        repeat_seconds.push(out.total_time.as_secs_f64());
    }
    if let (Some(recording), Some(path)) = (recording, &args.profile_trace) {
        recording.finish(path).with_context(|| format!("writing the profiler's trace to {}", path.display()))?;
    }
    let median = {
        let mut s = repeat_seconds.clone();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied()
    };
    let text = tok.decode(&out.token_ids, false).unwrap_or_default();
    if json {
        super::print_json(&Report {
            model: source.to_string(),
            mode: args.mode,
            masks,
            lora_form: drafter.as_ref().map(|d| d.form()),
            bf16_min_mask_rows: drafter.as_ref().and_then(|d| d.bf16_min_rows()),
            int8_min_mask_rows: drafter.as_ref().and_then(|d| d.int8_min_rows()),
            int8_draft_head: drafter.as_ref().is_some_and(|d| d.int8_head()),
            drafter_extra_bytes: drafter.as_ref().map_or(0, |d| d.extra_bytes()),
            bootstrap_noise_ids: (!out.prefill_noise_ids.is_empty()).then(|| out.prefill_noise_ids.clone()),
            device: args.model.device.to_string(),
            dtype: args.model.dtype().to_string(),
            cuda_graphs: out.cuda_graph,
            prompt_ids: &req.prompt_ids,
            token_ids: &out.token_ids,
            text,
            forwards: out.forwards,
            tokens_per_forward: out.tokens_per_forward(),
            tokens_per_second: median.map_or(out.tokens_per_second(), |t| out.token_ids.len() as f64 / t.max(1e-12)),
            prefill_seconds: out.prefill_time.as_secs_f64(),
            total_seconds: median.unwrap_or(out.total_time.as_secs_f64()),
            repeat_seconds,
            stop_reason: out.stop,
            acceptance: mtp_core::decode::Acceptance::of(&out.steps),
            steps: out
                .steps
                .iter()
                .map(|s: &StepStats| StepLine {
                    drafts: s.drafts.clone(),
                    accepted: s.accepted,
                    first_rejected: s.first_rejected,
                    emitted: s.emitted,
                    masks: s.masks,
                    blocks: s.blocks,
                    noise_ids: s.noise_ids.clone(),
                })
                .collect(),
        })
    } else {
        println!("{}", stream.finish());
        eprintln!(
            "[{} tokens, {} forwards ({:.2} tokens/forward), {:.1} tokens/s, stop: {}]",
            out.token_ids.len(),
            out.forwards,
            out.tokens_per_forward(),
            out.tokens_per_second(),
            out.stop
        );
        let acceptance = mtp_core::decode::Acceptance::of(&out.steps).summary();
        if !acceptance.is_empty() {
            eprintln!("[drafts accepted: {acceptance}]");
        }
        Ok(())
    }
}
