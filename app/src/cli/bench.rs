//! `mtp bench`: the paper's table (tokens per forward by domain and masks), tokens/s and
//! the speedup over AR on the same prompts, with greedy outputs checked against AR's.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use mtp_core::ModelSource;
use mtp_core::decode::bench::{BenchConfig, read_prompts, run_bench};
use mtp_core::decode::{MaskCount, Mode};

use super::common::{AdapterArg, ModelArgs, demo_default};

/// Arguments of `mtp bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The adapter.
    #[command(flatten)]
    pub adapter: AdapterArg,
    /// JSONL prompts with `prompt` and `domain` (default for the demo: its prompt sets).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Mask counts, comma-separated; `auto` chooses each step's count from the recent
    /// acceptance (default: the adapter's k).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub masks: Vec<MaskCount>,
    /// Modes, comma-separated (AR always runs as the baseline).
    #[arg(long, value_delimiter = ',', default_value = "ar,linear,quadratic")]
    pub modes: Vec<Mode>,
    /// New tokens per prompt.
    #[arg(long, default_value_t = 64, value_parser = super::common::at_least_one)]
    pub max_new_tokens: usize,
    /// Run each generation this many times and count the fastest (for a noisy machine); the
    /// runs of a prompt go round its modes in turn, so each mode's fastest comes from the
    /// same stretch of time.
    #[arg(long, default_value_t = 1, value_parser = super::common::at_least_one)]
    pub repeats: usize,
    /// Encode `prompt` lines as a user's turn with the model's chat template, as an instruct
    /// model is used (`messages` lines always are).
    #[arg(long)]
    pub chat: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also write bench.json, bench.csv and bench.md here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Run it.
pub fn run(args: Args) -> anyhow::Result<()> {
    let source: ModelSource = args.model.model.parse()?;
    let prompts_path =
        demo_default(&source, args.prompts.as_deref(), mtp_core::source::demo_prompts(), "--prompts FILE.jsonl")?;
    let prompts = read_prompts(&prompts_path)?;
    let (_, loaded) = args.model.load()?;
    let drafter = args.adapter.drafter(&source, &loaded.model)?;
    let masks = if args.masks.is_empty() { vec![MaskCount::Fixed(drafter.k())] } else { args.masks.clone() };
    for m in &masks {
        m.check(drafter.k()).context("--masks")?;
    }
    let config = BenchConfig {
        modes: args.modes.clone(),
        masks,
        max_new_tokens: args.max_new_tokens,
        repeats: args.repeats,
        chat: args.chat,
    };

    let bar = if std::io::stderr().is_terminal() && !args.json { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} eta {eta}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Ctrl-C: the table of the prompts measured so far, then status 130.
    let control = mtp_core::train::Control::new();
    super::train::cancel_on_ctrl_c(&control, "the table covers the prompts measured so far");
    let mut progress = |done: usize, total: usize, what: &str| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(what.to_owned());
        if control.is_cancelled() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    };
    let report = match run_bench(&loaded.model, &drafter, &loaded.tokenizer, &prompts, &config, &mut progress) {
        Err(mtp_core::Error::Cancelled) => {
            eprintln!("stopped before the first prompt was measured in every mode: no table");
            std::process::exit(130);
        }
        other => other.with_context(|| format!("benchmarking {}", prompts_path.display()))?,
    };
    let adapter = args.adapter.path(&source).ok();
    let context = mtp_core::decode::explain::Context::of(&drafter, adapter.as_deref(), &loaded.tokenizer);
    let report = mtp_core::decode::bench::BenchReport {
        model: Some(source.to_string()),
        findings: mtp_core::decode::explain::explain(&report, &context),
        adapter,
        ..report
    };
    bar.finish_and_clear();

    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        mtp_core::fsutil::write_json_atomic(&dir.join("bench.json"), &report)?;
        mtp_core::fsutil::write_atomic(&dir.join("bench.csv"), report.to_csv().as_bytes())?;
        mtp_core::fsutil::write_atomic(&dir.join("bench.md"), report.to_markdown().as_bytes())?;
    }
    if args.json {
        super::print_json(&report)?;
    } else {
        println!(
            "{} prompts from {}, {} new tokens each, {} on {}; drafts from {}; adapter form {}{}; {}",
            prompts.len(),
            prompts_path.display(),
            args.max_new_tokens,
            args.model.dtype(),
            args.model.device,
            drafter
                .draft_vocab_size()
                .map_or("the whole vocabulary".into(), |n| format!("a draft vocabulary of {n} tokens")),
            drafter.form(),
            match drafter.extra_bytes() {
                0 => String::new(),
                bytes => format!(" (holding {:.1} MB beyond the model and adapter)", bytes as f64 / 1e6),
            },
            match (drafter.int8_min_rows(), drafter.bf16_min_rows()) {
                (Some(n), _) if drafter.int8_head() => {
                    format!("mask rows in int8 in steps of {n} or more, the draft chain's head and sampler too")
                }
                (Some(n), _) => format!("mask rows in int8 in steps of {n} or more"),
                (None, Some(n)) => format!("mask rows in bf16 in steps of {n} or more"),
                (None, None) => "mask rows exact".into(),
            },
        );
        if let Some(template) = &report.chat_template {
            println!("prompts encoded with the chat template of {template}");
        }
        print!("{}", report.to_markdown());
        println!(
            "\n| domain | mode | masks | masks used | tokens/forward | tokens/s | speedup | step cost vs AR | identical |\n|---|---|---|---|---|---|---|---|---|"
        );
        for r in &report.rows {
            println!(
                "| {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.2}x | {:.2} | {} |",
                r.domain,
                r.mode,
                r.masks,
                r.mean_masks,
                r.tokens_per_forward,
                r.tokens_per_second,
                r.speedup,
                r.step_cost_vs_ar,
                r.identical
            );
        }
    }
    if !report.divergences.is_empty() {
        for d in &report.divergences {
            eprintln!(
                "mismatch: prompt {} ({}), {} with {} masks: first difference at new token {} (AR {:?}, got {:?}); AR top-2 margin there {:.2e}",
                d.prompt + 1,
                d.domain,
                d.mode,
                d.masks,
                d.position,
                d.ar_token,
                d.token,
                d.margin
            );
        }
        anyhow::bail!("{} greedy outputs differ from AR", report.divergences.len());
    }
    if let Some(n) = report.stopped_after {
        eprintln!("stopped after {n} of {} prompts: the table covers those {n}", report.prompts);
        std::process::exit(130);
    }
    Ok(())
}
