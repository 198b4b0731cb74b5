//! The benchmark behind `mtp bench` and the Bench tab: the paper's table (tokens per
//! forward by domain and number of masks) plus wall-clock tokens/s and the speedup over AR
//! measured in the same process on the same prompts, with every greedy output checked
//! against AR's.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::generate;
use super::speculative::{Drafter, LoraForm};
use super::stats::Acceptance;
use super::strategy::{MaskCount, Mode, Strategy};
use super::{Decoding, GenerateOutput, GenerateRequest};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::tokenizer::{ChatMessage, TextTokenizer};

/// One benchmark prompt: raw text, or a conversation (`messages`) encoded with the model's
/// chat template, as an instruct model is used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchPrompt {
    /// The prompt text (empty when `messages` is given).
    #[serde(default)]
    pub prompt: String,
    /// A conversation ending with the turn the model answers, encoded with the chat template
    /// and the generation prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Its domain (code, math, chat, knowledge, ...).
    pub domain: String,
}

impl BenchPrompt {
    /// The prompt's token ids: the conversation through the chat template; the text as it
    /// is, or with `chat` as a user's turn through the chat template.
    pub fn encode(&self, tokenizer: &TextTokenizer, chat: bool) -> Result<Vec<i64>> {
        let templated =
            |messages: &[ChatMessage]| tokenizer.encode_with(&tokenizer.apply_chat_template(messages, true)?, false);
        match &self.messages {
            Some(messages) => templated(messages),
            None if chat => templated(&[ChatMessage::new("user", &self.prompt)]),
            None => tokenizer.encode(&self.prompt),
        }
    }

    /// True when the prompt goes through the chat template (a conversation, or text with
    /// `chat`).
    pub fn templated(&self, chat: bool) -> bool {
        chat || self.messages.is_some()
    }
}

/// Read a prompts file: one JSON object per line with `domain` and either `prompt` (text)
/// or `messages` (a conversation for the chat template). A bad line is an error naming the
/// file and the line.
pub fn read_prompts(path: &Path) -> Result<Vec<BenchPrompt>> {
    let text = crate::error::read_to_string(path)?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| Error::Invalid(format!("{}: line {}: {reason}", path.display(), i + 1));
        let p: BenchPrompt = serde_json::from_str(line).map_err(|e| {
            bad(format!("{e} (each line needs a \"domain\" string and a \"prompt\" string or \"messages\")"))
        })?;
        match &p.messages {
            Some(m) if m.is_empty() => return Err(bad("empty messages".into())),
            Some(_) if !p.prompt.is_empty() => return Err(bad("give \"prompt\" or \"messages\", not both".into())),
            None if p.prompt.is_empty() => return Err(bad("empty prompt".into())),
            _ => {}
        }
        prompts.push(p);
    }
    if prompts.is_empty() {
        return Err(Error::Invalid(format!("{}: no prompts", path.display())));
    }
    Ok(prompts)
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchConfig {
    /// Modes besides AR (AR always runs: it is the baseline).
    pub modes: Vec<Mode>,
    /// Mask counts for the speculative modes (`auto`: chosen each step).
    pub masks: Vec<MaskCount>,
    /// New tokens per prompt.
    pub max_new_tokens: usize,
    /// Runs of each generation; the fastest counts (a shared machine's interruptions only
    /// ever add time). The runs of one prompt go round its modes in turn, so that each
    /// mode's fastest comes from the same stretch of time. 1 when absent.
    #[serde(default = "one")]
    pub repeats: usize,
    /// Encode text prompts as a user's turn with the model's chat template, as an instruct
    /// model is used (conversation prompts always go through it).
    #[serde(default)]
    pub chat: bool,
}

fn one() -> usize {
    1
}

/// One row of the table: a domain (or `all`), a mode and a mask count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    /// Domain, or `all`.
    pub domain: String,
    /// Decoding mode.
    pub mode: Mode,
    /// Masks per step (0 for AR).
    pub masks: MaskCount,
    /// Mean masks per step actually used (the count itself unless `auto`; 0 for AR).
    #[serde(default)]
    pub mean_masks: f64,
    /// Prompts in the row.
    pub prompts: usize,
    /// Tokens generated.
    pub tokens: usize,
    /// Forward passes.
    pub forwards: usize,
    /// Tokens per forward pass (the paper's metric).
    pub tokens_per_forward: f64,
    /// Tokens per second of wall time.
    pub tokens_per_second: f64,
    /// tokens/s over AR's on the same prompts.
    pub speedup: f64,
    /// Mean time of one decoding step over the mean time of one AR decoding step.
    pub step_cost_vs_ar: f64,
    /// Every greedy output equal to AR's.
    pub identical: bool,
    /// Every generation replayed its steps from CUDA graphs (`--cuda-graphs`).
    #[serde(default)]
    pub cuda_graphs: bool,
    /// How the drafts fared, slot by slot, over the row's generations (empty for AR).
    #[serde(default)]
    pub acceptance: Acceptance,
}

/// The tokens of AR's answers in one domain (or `all`) that the draft vocabulary lacks: no
/// draft can be right there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftVocabMisses {
    /// Domain, or `all`.
    pub domain: String,
    /// Tokens of AR's answers.
    pub tokens: usize,
    /// Those outside the draft vocabulary.
    pub outside: usize,
}

/// A greedy output that differs from AR's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// Index of the prompt in the file.
    pub prompt: usize,
    /// Its domain.
    pub domain: String,
    /// Mode.
    pub mode: Mode,
    /// Masks.
    pub masks: MaskCount,
    /// First differing position among the new tokens.
    pub position: usize,
    /// AR's token there.
    pub ar_token: Option<i64>,
    /// The speculative mode's token there.
    pub token: Option<i64>,
    /// AR's top-2 logit margin at that position (tiny: rounding; large: a bug).
    pub margin: f64,
}

/// The benchmark's result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Rows per domain, then `all`; in each, AR first, then each mode and mask count.
    pub rows: Vec<BenchRow>,
    /// Every greedy mismatch.
    pub divergences: Vec<Divergence>,
    /// New tokens per prompt.
    pub max_new_tokens: usize,
    /// How the steps applied the adapter (absent in reports written before it was chosen).
    #[serde(default)]
    pub lora_form: Option<LoraForm>,
    /// The fewest mask rows a step multiplied in bf16 ([`super::DraftArithmetic`]; absent:
    /// never).
    #[serde(default)]
    pub bf16_min_mask_rows: Option<usize>,
    /// The fewest mask rows a step multiplied in int8 (absent: never; takes precedence
    /// over bf16).
    #[serde(default)]
    pub int8_min_mask_rows: Option<usize>,
    /// True when the draft chain read its head (and its sampler's weights) in int8 (with
    /// int8 mask rows).
    #[serde(default)]
    pub int8_draft_head: bool,
    /// Bytes the drafter held beyond the model and the adapter (merged or folded weights,
    /// int8 panels; [`Drafter::extra_bytes`]).
    #[serde(default)]
    pub drafter_extra_bytes: usize,
    /// The chat template that encoded the prompts (its file, and the variables it was
    /// given), when any prompt went through it.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// The model measured, as its source names it (filled in by the caller).
    #[serde(default)]
    pub model: Option<String>,
    /// The adapter's file (filled in by the caller).
    #[serde(default)]
    pub adapter: Option<std::path::PathBuf>,
    /// Stopped on request: the prompts measured (the first ones, every mode of each); the
    /// table covers them alone. Absent: every prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_after: Option<usize>,
    /// Prompts in the benchmark.
    #[serde(default)]
    pub prompts: usize,
    /// Size of the vocabulary drafts were chosen from (absent: the whole vocabulary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_vocab: Option<usize>,
    /// With a draft vocabulary: per domain, AR's answer tokens it lacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draft_vocab_misses: Vec<DraftVocabMisses>,
    /// Why the acceptance is what it is ([`super::explain`]; filled in by the caller, which
    /// knows the adapter's training run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<super::explain::Finding>,
}

/// Receives benchmark progress; `Break` cancels.
pub trait BenchProgress {
    /// `done` of `total` generations finished; `what` is the current one.
    fn progress(&mut self, done: usize, total: usize, what: &str) -> ControlFlow<()>;
}

impl BenchProgress for () {
    fn progress(&mut self, _: usize, _: usize, _: &str) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

impl<F: FnMut(usize, usize, &str) -> ControlFlow<()>> BenchProgress for F {
    fn progress(&mut self, done: usize, total: usize, what: &str) -> ControlFlow<()> {
        self(done, total, what)
    }
}

#[derive(Default, Clone)]
struct Acc {
    prompts: usize,
    tokens: usize,
    forwards: usize,
    seconds: f64,
    step_seconds: f64,
    steps: usize,
    masks_used: usize,
    identical: bool,
    graphs: bool,
    acceptance: Acceptance,
}

impl Acc {
    fn add(&mut self, out: &GenerateOutput, identical: bool) {
        if self.prompts == 0 {
            self.identical = true;
            self.graphs = true;
        }
        self.prompts += 1;
        self.tokens += out.token_ids.len();
        self.forwards += out.forwards;
        self.seconds += out.total_time.as_secs_f64();
        if out.steps.is_empty() {
            // AR: the decoding steps are every forward after the prefill.
            self.step_seconds += (out.total_time - out.prefill_time).as_secs_f64();
            self.steps += out.forwards.saturating_sub(1);
        } else {
            self.step_seconds += out.steps.iter().map(|s| s.seconds).sum::<f64>();
            self.steps += out.steps.len();
            self.masks_used += out.steps.iter().map(|s| s.masks).sum::<usize>();
        }
        self.identical &= identical;
        self.graphs &= out.cuda_graph;
        self.acceptance.merge(&Acceptance::of(&out.steps));
    }

    fn tps(&self) -> f64 {
        if self.seconds > 0.0 { self.tokens as f64 / self.seconds } else { 0.0 }
    }

    fn step_time(&self) -> f64 {
        if self.steps > 0 { self.step_seconds / self.steps as f64 } else { 0.0 }
    }
}

/// AR's top-2 margin after `prompt + prefix` (f32 logits).
fn margin_at(model: &Llama, prompt: &[i64], prefix: &[i64]) -> f64 {
    let ids: Vec<i64> = prompt.iter().chain(prefix).copied().collect();
    let logits = tch::no_grad(|| model.forward(&Tensor::from_slice(&ids).to_device(model.device()).unsqueeze(0), None));
    let last = logits.get(0).get(ids.len() as i64 - 1).to_kind(Kind::Float);
    let (top, _) = last.topk(2, -1, true, true);
    top.double_value(&[0]) - top.double_value(&[1])
}

/// Run the benchmark: for each prompt, AR once and each (mode, masks) once, greedy.
pub fn run_bench(
    model: &Llama,
    drafter: &Drafter,
    tokenizer: &TextTokenizer,
    prompts: &[BenchPrompt],
    config: &BenchConfig,
    progress: &mut dyn BenchProgress,
) -> Result<BenchReport> {
    if config.repeats == 0 {
        return Err(Error::Invalid("repeats must be at least 1".into()));
    }
    for m in &config.masks {
        m.check(drafter.k())?;
    }
    let spec_modes: Vec<Mode> = config.modes.iter().copied().filter(|m| *m != Mode::Ar).collect();
    let runs: Vec<(Mode, MaskCount)> = std::iter::once((Mode::Ar, MaskCount::Fixed(0)))
        .chain(spec_modes.iter().flat_map(|&m| config.masks.iter().map(move |&k| (m, k))))
        .collect();
    let strategies: Vec<Strategy> =
        runs.iter().map(|&(mode, masks)| Strategy::new(mode, Some(drafter), masks)).collect::<Result<_>>()?;
    // Every prompt encoded and every request checked before anything runs: a prompt that
    // cannot run is named, not found after the others have.
    let named = |i: usize, p: &BenchPrompt, e: Error| Error::Invalid(format!("prompt {} ({}): {e}", i + 1, p.domain));
    let mut encoded: Vec<Vec<i64>> = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let ids = p.encode(tokenizer, config.chat).map_err(|e| named(i, p, e))?;
        let req = GenerateRequest {
            prompt_ids: ids,
            max_new_tokens: config.max_new_tokens,
            decoding: Decoding::Greedy,
            eos_ids: vec![],
        };
        for strategy in &strategies {
            super::ar::check_request(model, &req, strategy.reach()).map_err(|e| named(i, p, e))?;
        }
        encoded.push(req.prompt_ids);
    }
    let total = prompts.len() * runs.len() * config.repeats;

    // Warm-up: caches, allocator, thread pool.
    let warm = GenerateRequest {
        prompt_ids: encoded[0].clone(),
        max_new_tokens: 4,
        decoding: Decoding::Greedy,
        eos_ids: vec![],
    };
    for strategy in &strategies {
        generate(model, *strategy, &warm, &mut ())?;
    }

    let mut acc: BTreeMap<(String, usize), Acc> = BTreeMap::new();
    // AR's answer tokens per domain, and those the draft vocabulary lacks.
    let draft_vocab = drafter.draft_vocab_ids();
    let mut misses: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut divergences = Vec::new();
    let mut done = 0;
    // Stopped on request after this many prompts, each measured in every mode.
    let mut stopped_after = None;
    'prompts: for (i, (p, ids)) in prompts.iter().zip(&encoded).enumerate() {
        let req = GenerateRequest {
            prompt_ids: ids.clone(),
            max_new_tokens: config.max_new_tokens,
            decoding: Decoding::Greedy,
            eos_ids: tokenizer.eos_ids.clone(),
        };
        // The repeats go round the modes (AR, then each mode, then AR again ..), so that the
        // fastest run of each mode comes from the same stretch of time: a slow phase of a
        // shared machine weighs on every mode alike, not on whichever ran during it.
        let mut fastest: Vec<Option<GenerateOutput>> = runs.iter().map(|_| None).collect();
        for repeat in 0..config.repeats {
            for (r, &(mode, masks)) in runs.iter().enumerate() {
                let run = if config.repeats > 1 {
                    format!(", run {} of {}", repeat + 1, config.repeats)
                } else {
                    String::new()
                };
                let how = match (mode, masks) {
                    (Mode::Ar, _) => "AR".to_string(),
                    (_, MaskCount::Fixed(1)) => format!("{mode}, 1 mask"),
                    (_, m) => format!("{mode}, {m} masks"),
                };
                let what = format!("prompt {} of {} ({}): {how}{run}", i + 1, prompts.len(), p.domain);
                if progress.progress(done, total, &what) == ControlFlow::Break(()) {
                    // A table of the prompts measured so far; none measured: no table.
                    if i == 0 {
                        return Err(Error::Cancelled);
                    }
                    stopped_after = Some(i);
                    break 'prompts;
                }
                let out = generate(model, strategies[r], &req, &mut ())?;
                if fastest[r].as_ref().is_none_or(|f| out.total_time < f.total_time) {
                    fastest[r] = Some(out);
                }
                done += 1;
            }
        }
        let mut reference: Option<Vec<i64>> = None;
        for (r, (&(mode, masks), out)) in runs.iter().zip(fastest).enumerate() {
            let Some(out) = out else { continue };
            let same = match &reference {
                None => true,
                Some(ar) => *ar == out.token_ids,
            };
            if let (false, Some(ar)) = (same, &reference) {
                let position = ar.iter().zip(&out.token_ids).take_while(|(a, b)| a == b).count();
                divergences.push(Divergence {
                    prompt: i,
                    domain: p.domain.clone(),
                    mode,
                    masks,
                    position,
                    ar_token: ar.get(position).copied(),
                    token: out.token_ids.get(position).copied(),
                    margin: margin_at(model, ids, &ar[..position]),
                });
            }
            if reference.is_none() {
                if let Some(vocab) = &draft_vocab {
                    let outside = out.token_ids.iter().filter(|t| vocab.binary_search(t).is_err()).count();
                    for domain in [p.domain.clone(), "all".to_string()] {
                        let m = misses.entry(domain).or_default();
                        *m = (m.0 + out.token_ids.len(), m.1 + outside);
                    }
                }
                reference = Some(out.token_ids.clone());
            }
            for domain in [p.domain.clone(), "all".to_string()] {
                acc.entry((domain, r)).or_default().add(&out, same);
            }
        }
    }
    if stopped_after.is_none() {
        let _ = progress.progress(done, total, "done");
    }

    let measured = &prompts[..stopped_after.unwrap_or(prompts.len())];
    let mut domains: Vec<String> = measured.iter().map(|p| p.domain.clone()).collect();
    domains.sort();
    domains.dedup();
    domains.push("all".into());
    let mut rows = Vec::new();
    for domain in domains {
        let ar = acc.get(&(domain.clone(), 0)).cloned().unwrap_or_default();
        for (r, &(mode, masks)) in runs.iter().enumerate() {
            let a = acc.get(&(domain.clone(), r)).cloned().unwrap_or_default();
            rows.push(BenchRow {
                domain: domain.clone(),
                mode,
                masks,
                prompts: a.prompts,
                tokens: a.tokens,
                forwards: a.forwards,
                mean_masks: if a.steps > 0 { a.masks_used as f64 / a.steps as f64 } else { 0.0 },
                tokens_per_forward: if a.forwards > 0 { a.tokens as f64 / a.forwards as f64 } else { 0.0 },
                tokens_per_second: a.tps(),
                speedup: if ar.tps() > 0.0 { a.tps() / ar.tps() } else { 0.0 },
                step_cost_vs_ar: if ar.step_time() > 0.0 { a.step_time() / ar.step_time() } else { 0.0 },
                identical: a.identical,
                cuda_graphs: a.graphs,
                acceptance: a.acceptance,
            });
        }
    }
    // The template's file, and the variables it was given.
    let chat_template =
        prompts.iter().any(|p| p.templated(config.chat)).then(|| tokenizer.chat_template_origin()).flatten();
    let chat_template = chat_template.map(|origin| match tokenizer.template_vars() {
        vars if vars.is_empty() => origin,
        vars => format!("{origin} ({})", crate::tokenizer::describe_template_vars(vars)),
    });
    Ok(BenchReport {
        rows,
        divergences,
        max_new_tokens: config.max_new_tokens,
        lora_form: Some(drafter.form()),
        bf16_min_mask_rows: drafter.bf16_min_rows(),
        int8_min_mask_rows: drafter.int8_min_rows(),
        int8_draft_head: drafter.int8_head(),
        drafter_extra_bytes: drafter.extra_bytes(),
        chat_template,
        model: None,
        adapter: None,
        stopped_after,
        prompts: prompts.len(),
        draft_vocab: drafter.draft_vocab_size(),
        draft_vocab_misses: misses
            .into_iter()
            .map(|(domain, (tokens, outside))| DraftVocabMisses { domain, tokens, outside })
            .collect(),
        findings: Vec::new(),
    })
}

/// The axes of the paper's tables: one table per speculative mode (in the report's order),
/// a row per domain (`all` last), a column per mask count (sorted, `auto` last).
#[derive(Debug, Clone, PartialEq)]
pub struct PaperAxes<'a> {
    /// The speculative modes.
    pub modes: Vec<Mode>,
    /// The mask counts.
    pub masks: Vec<MaskCount>,
    /// The domains.
    pub domains: Vec<&'a str>,
}

impl BenchReport {
    /// The axes of the paper's tables ([`Self::to_markdown`], the window's Bench tab).
    pub fn paper_axes(&self) -> PaperAxes<'_> {
        let mut masks: Vec<MaskCount> = self.rows.iter().filter(|r| r.mode != Mode::Ar).map(|r| r.masks).collect();
        masks.sort();
        masks.dedup();
        let mut modes: Vec<Mode> = Vec::new();
        for m in self.rows.iter().map(|r| r.mode).filter(|m| *m != Mode::Ar) {
            if !modes.contains(&m) {
                modes.push(m);
            }
        }
        let mut domains: Vec<&str> = self.rows.iter().map(|r| r.domain.as_str()).collect();
        domains.dedup();
        PaperAxes { modes, masks, domains }
    }

    /// The row of `domain`, `mode` and `masks`, if measured.
    pub fn row(&self, domain: &str, mode: Mode, masks: MaskCount) -> Option<&BenchRow> {
        self.rows.iter().find(|r| r.domain == domain && r.mode == mode && r.masks == masks)
    }

    /// The table as CSV.
    pub fn to_csv(&self) -> String {
        let mut s = String::from(
            "domain,mode,masks,mean_masks,prompts,tokens,forwards,tokens_per_forward,tokens_per_second,speedup,step_cost_vs_ar,identical\n",
        );
        for r in &self.rows {
            s.push_str(&format!(
                "{},{},{},{:.2},{},{},{},{:.3},{:.2},{:.3},{:.3},{}\n",
                r.domain,
                r.mode,
                r.masks,
                r.mean_masks,
                r.prompts,
                r.tokens,
                r.forwards,
                r.tokens_per_forward,
                r.tokens_per_second,
                r.speedup,
                r.step_cost_vs_ar,
                r.identical
            ));
        }
        s
    }

    /// The paper's table for `mode` (tokens per forward, domains by masks) and the
    /// wall-clock columns, as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        if let (Some(model), Some(adapter)) = (&self.model, &self.adapter) {
            s.push_str(&format!(
                "\n{model} with the adapter {}, {} new tokens a prompt\n",
                adapter.display(),
                self.max_new_tokens
            ));
        }
        if let Some(n) = self.stopped_after {
            s.push_str(&format!("\nStopped after {n} of {} prompts: the tables cover those {n}.\n", self.prompts));
        }
        let PaperAxes { modes, masks, domains } = self.paper_axes();
        for mode in modes {
            s.push_str(&format!("\n{mode}: tokens per forward (speedup over AR in wall-clock time)\n\n| domain |"));
            for m in &masks {
                s.push_str(&format!(" {m} masks |"));
            }
            s.push_str("\n|---|");
            s.push_str(&"---|".repeat(masks.len()));
            s.push('\n');
            for d in &domains {
                s.push_str(&format!("| {d} |"));
                for m in &masks {
                    match self.row(d, mode, *m) {
                        Some(r) => s.push_str(&format!(
                            " {:.2} ({:.2}x){} |",
                            r.tokens_per_forward,
                            r.speedup,
                            if r.identical { "" } else { " MISMATCH" }
                        )),
                        None => s.push_str(" - |"),
                    }
                }
                s.push('\n');
            }
        }
        if !self.findings.is_empty() {
            s.push_str("\nWhy this acceptance:\n\n");
            for f in &self.findings {
                s.push_str(&format!("- {}\n", f.text));
            }
        }
        s
    }
}

/// A row of `domain`, `mode` and a fixed mask count, its numbers plain (2 tokens, 1 forward,
/// every ratio 1), for tests that read rows.
#[cfg(test)]
pub(crate) fn test_row(domain: &str, mode: Mode, masks: usize) -> BenchRow {
    BenchRow {
        domain: domain.into(),
        mode,
        masks: MaskCount::Fixed(masks),
        mean_masks: masks as f64,
        prompts: 1,
        tokens: 2,
        forwards: 1,
        tokens_per_forward: 2.0,
        tokens_per_second: 1.0,
        speedup: 1.0,
        step_cost_vs_ar: 1.0,
        identical: true,
        cuda_graphs: false,
        acceptance: Acceptance::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(domain: &str, mode: Mode, masks: usize) -> BenchRow {
        test_row(domain, mode, masks)
    }

    #[test]
    fn markdown_has_one_table_per_mode() {
        let rows = ["code", "math", "all"]
            .iter()
            .flat_map(|d| [row(d, Mode::Ar, 0), row(d, Mode::Linear, 1), row(d, Mode::Quadratic, 1)])
            .collect();
        let md = BenchReport {
            rows,
            divergences: vec![],
            max_new_tokens: 8,
            lora_form: None,
            bf16_min_mask_rows: None,
            int8_min_mask_rows: None,
            int8_draft_head: false,
            drafter_extra_bytes: 0,
            chat_template: None,
            model: None,
            adapter: None,
            stopped_after: None,
            prompts: 3,
            ..BenchReport::default()
        }
        .to_markdown();
        assert_eq!(md.matches("quadratic: tokens per forward").count(), 1);
        assert_eq!(md.matches("linear: tokens per forward").count(), 1);
        assert_eq!(md.matches("| math |").count(), 2);
        assert!(!md.contains("Why this acceptance"));
        // The findings, a line each, after the tables.
        let finding = crate::decode::explain::Finding::from(crate::decode::explain::Why::RawPrompts);
        let md = BenchReport { findings: vec![finding.clone()], ..BenchReport::default() }.to_markdown();
        assert!(md.ends_with(&format!("Why this acceptance:\n\n- {}\n", finding.text)), "{md}");
        let csv = BenchReport {
            rows: vec![row("code", Mode::Ar, 0)],
            divergences: vec![],
            max_new_tokens: 8,
            lora_form: None,
            bf16_min_mask_rows: None,
            int8_min_mask_rows: None,
            int8_draft_head: false,
            drafter_extra_bytes: 0,
            chat_template: None,
            model: None,
            adapter: None,
            stopped_after: None,
            prompts: 3,
            ..BenchReport::default()
        }
        .to_csv();
        assert_eq!(csv.lines().count(), 2);
    }
}
