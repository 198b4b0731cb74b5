//! Why a benchmark's acceptance is what it is, in words with their numbers: the question
//! users of speculative decoders ask most ("why is my acceptance lower than the paper's?").
//! A report and a few facts about the adapter in, findings out; each is a measured fact
//! about this adapter on these prompts, with what would change it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::bench::{BenchReport, BenchRow};
use super::strategy::{MaskCount, Mode};

/// The paper's tokens per forward (Tulu3-8B, k = 8, greedy, quadratic; METHOD.md section 5)
/// by domain, at [`PAPER_MASKS`]: our domain name, the paper's benchmark, its figures.
pub const PAPER: [(&str, &str, [f64; 4]); 4] = [
    ("code", "HumanEval", [1.86, 2.63, 3.87, 5.35]),
    ("math", "GSM8K", [1.84, 2.58, 3.75, 5.22]),
    ("chat", "AlpacaEval", [1.61, 1.97, 2.31, 2.52]),
    ("knowledge", "MMLU", [1.54, 1.87, 2.18, 2.38]),
];

/// The mask counts of the paper's table.
pub const PAPER_MASKS: [usize; 4] = [1, 2, 4, 8];

/// The paper's adapter: training steps, LoRA rank, masks trained (k).
const PAPER_TRAINING: (usize, usize, usize) = (50_000, 128, 8);

/// A slot whose acceptance falls this far below the slot before it is named.
const SLOT_DROP: f64 = 0.15;

/// The fewest steps reaching a slot for its acceptance to be compared with the slot before.
const SLOT_MIN_REACHED: usize = 20;

/// A domain lacking this share of its answer tokens in the draft vocabulary is named.
const VOCAB_MISS_SHARE: f64 = 0.03;

/// Measured below this share of what training's validation estimated: the prompts are
/// named as the likely cause. The estimate runs above decoding even on prompts like the
/// training data (the demo's own prompt sets: 2.72 measured against 3.34 estimated at 4
/// masks, 0.81 of it), so only a larger gap points at the prompts.
const FAR_BELOW_TRAINING: f64 = 0.7;

/// Measured at or above this share of the estimate: the prompts are not the limit.
const AS_TRAINING: f64 = 0.95;

/// What the explanation knows besides the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    /// Masks the adapter was trained with.
    pub k: usize,
    /// Its LoRA rank.
    pub rank: usize,
    /// Its training run, when the run's metrics lie beside the adapter.
    pub training: Option<TrainingFacts>,
    /// Whether the model has a chat template.
    pub model_chat_template: bool,
}

impl Context {
    /// For `drafter`'s adapter (read from `adapter`, whose run folder may hold its training
    /// metrics) on the model whose tokenizer is `tokenizer`.
    pub fn of(drafter: &super::Drafter, adapter: Option<&Path>, tokenizer: &crate::tokenizer::TextTokenizer) -> Self {
        Self {
            k: drafter.k(),
            rank: drafter.rank(),
            training: adapter.and_then(TrainingFacts::beside),
            model_chat_template: tokenizer.has_chat_template(),
        }
    }
}

/// What the adapter's training run recorded last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingFacts {
    /// Steps trained (the last step logged).
    pub steps: usize,
    /// The step of the last validation that estimated tokens per forward.
    pub validation_step: usize,
    /// Its expected tokens per forward at 1..k masks (from the drafts' slot accuracies on
    /// held-out training sequences).
    pub expected: Vec<f64>,
}

impl TrainingFacts {
    /// From the metrics beside `adapter`: its run folder's `metrics.jsonl`, or a copy kept
    /// as `<adapter's name>-metrics.jsonl` (the demo's `adapter-metrics.jsonl`); `None`
    /// without either, or when the run logged no validation with expected tokens per
    /// forward. A metrics file that cannot be read is logged and left out: the explanation
    /// never stops a benchmark.
    pub fn beside(adapter: &Path) -> Option<Self> {
        let dir = adapter.parent()?;
        let stem = adapter.file_stem()?.to_string_lossy();
        let path =
            [dir.join(format!("{stem}-metrics.jsonl")), dir.join("metrics.jsonl")].into_iter().find(|p| p.exists())?;
        let metrics = match crate::train::trainer::read_metrics_file(&path) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("the adapter's training metrics are left out of the explanation: {e}");
                return None;
            }
        };
        let steps = metrics.iter().map(|m| m.step).max()?;
        let (validation_step, expected) =
            metrics.iter().rev().find_map(|m| m.expected_tokens_per_forward.clone().map(|e| (m.step, e)))?;
        Some(Self { steps, validation_step, expected })
    }
}

/// One reason, with its numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Why {
    /// A domain the paper measured, at the largest of its mask counts measured here.
    Paper {
        /// Domain.
        domain: String,
        /// The paper's benchmark for it.
        benchmark: String,
        /// Masks.
        masks: usize,
        /// Tokens per forward here.
        ours: f64,
        /// The paper's.
        paper: f64,
    },
    /// The first draft slot's acceptance, which every later slot is reached through.
    FirstSlot {
        /// The mask count of the steps counted (1 where it ran: the paper's 1-mask figures
        /// are its first slot's acceptance).
        masks: MaskCount,
        /// Accepted share of the steps that offered a first draft.
        rate: f64,
        /// Those steps.
        reached: usize,
        /// The paper's first slot, lowest and highest domain (from its 1-mask figures).
        paper: (f64, f64),
    },
    /// The slot after which acceptance falls the most.
    SlotDrop {
        /// The slot (1-based).
        slot: usize,
        /// Its acceptance among the steps that reached it.
        rate: f64,
        /// The slot before's.
        previous: f64,
    },
    /// These prompts against the held-out training sequences.
    AgainstTraining {
        /// Masks.
        masks: usize,
        /// Training's expected tokens per forward there.
        expected: f64,
        /// Measured here (every domain).
        measured: f64,
        /// The validation's step.
        validation_step: usize,
        /// The domain that drafts worst here, and its tokens per forward.
        weakest: Option<(String, f64)>,
    },
    /// Answer tokens the draft vocabulary lacks.
    DraftVocab {
        /// Domain, or `all`.
        domain: String,
        /// AR's answer tokens outside the draft vocabulary.
        outside: usize,
        /// AR's answer tokens.
        tokens: usize,
        /// The draft vocabulary's size.
        size: usize,
    },
    /// Raw-text prompts on a model with a chat template.
    RawPrompts,
    /// How the adapter was trained, against the paper's.
    Training {
        /// Steps (when its run is known).
        steps: Option<usize>,
        /// LoRA rank.
        rank: usize,
        /// Masks trained.
        k: usize,
    },
}

/// A reason and its sentence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// The reason, with its numbers.
    #[serde(flatten)]
    pub why: Why,
    /// It in words.
    pub text: String,
}

impl From<Why> for Finding {
    fn from(why: Why) -> Self {
        let text = why.text();
        Self { why, text }
    }
}

fn percent(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

impl Why {
    /// The reason in one or two sentences.
    pub fn text(&self) -> String {
        match self {
            Why::Paper { domain, benchmark, masks, ours, paper } => format!(
                "{domain} at {masks} mask{}: {ours:.2} tokens per forward; the paper's adapter {paper:.2} on {benchmark}.",
                if *masks == 1 { "" } else { "s" }
            ),
            Why::FirstSlot { masks, rate, reached, paper } => format!(
                "With {}, the first draft is accepted in {} of the {reached} steps that offered one. Every later \
                 draft is reached only through it, so it weighs on every mask count; the paper's 1-mask figures \
                 put its first slot at {} to {}.",
                match masks {
                    MaskCount::Fixed(1) => "1 mask".to_string(),
                    MaskCount::Fixed(n) => format!("{n} masks"),
                    MaskCount::Auto => "the mask count chosen each step".to_string(),
                },
                percent(*rate),
                percent(paper.0),
                percent(paper.1)
            ),
            Why::SlotDrop { slot, rate, previous } => format!(
                "Slot {slot} is where the drafts fall off: {} accepted where slot {} had {}. Masks beyond slot {} \
                 add little here; a longer training run raises the later slots most.",
                percent(*rate),
                slot.saturating_sub(1),
                percent(*previous),
                slot.saturating_sub(1)
            ),
            Why::AgainstTraining { masks, expected, measured, validation_step, weakest } => {
                let weakest = weakest.as_ref().map(|(d, t)| format!(" ({d} drafts worst: {t:.2})")).unwrap_or_default();
                let facts = format!(
                    "Training's last validation (step {validation_step}) estimated {expected:.2} tokens per forward \
                     at {masks} masks from the drafts' accuracies on held-out training sequences; these prompts \
                     measure {measured:.2}{weakest}."
                );
                if *measured < FAR_BELOW_TRAINING * expected {
                    format!(
                        "{facts} That is far below the estimate: these prompts are likely unlike the data the \
                         adapter was trained on; distilling answers to prompts like them and training on those \
                         closes such a gap."
                    )
                } else if *measured >= AS_TRAINING * expected {
                    format!(
                        "{facts} The prompts are not the limit here: more acceptance needs a better-trained adapter."
                    )
                } else {
                    facts
                }
            }
            Why::DraftVocab { domain, outside, tokens, size } => format!(
                "{domain}: {} of AR's answer tokens ({outside} of {tokens}) are outside the {size}-token draft \
                 vocabulary, where no draft can be right. Drafting from the whole vocabulary (slower draft steps), \
                 or training with a larger draft vocabulary, removes this.",
                percent(*outside as f64 / (*tokens).max(1) as f64)
            ),
            Why::RawPrompts => "The prompts were encoded as raw text, but the model has a chat template: an \
                 instruct model answers, and an adapter distilled from its chat answers drafts, under its template. \
                 Encode them with the chat template, or give them as conversations (`messages`)."
                .into(),
            Why::Training { steps, rank, k } => {
                let (paper_steps, paper_rank, paper_k) = PAPER_TRAINING;
                let steps = steps.map(|s| format!("{s} steps at ")).unwrap_or_default();
                format!(
                    "The adapter trained {steps}rank {rank} with k = {k}; the paper's trained {paper_steps} steps at \
                     rank {paper_rank} with k = {paper_k}, on an 8B model."
                )
            }
        }
    }
}

fn fixed(r: &BenchRow) -> Option<usize> {
    match r.masks {
        MaskCount::Fixed(n) => Some(n),
        MaskCount::Auto => None,
    }
}

/// Every domain's row of `mode` with `masks`.
fn all_row(report: &BenchReport, mode: Mode, masks: MaskCount) -> Option<&BenchRow> {
    report.rows.iter().find(|r| r.domain == "all" && r.mode == mode && r.masks == masks)
}

/// The speculative row the explanation reads slot by slot: every domain together, the
/// quadratic mode where it ran (else linear), at its largest fixed mask count (else `auto`).
fn main_row(report: &BenchReport) -> Option<&BenchRow> {
    [Mode::Quadratic, Mode::Linear].into_iter().find_map(|mode| {
        let rows = || report.rows.iter().filter(move |r| r.domain == "all" && r.mode == mode);
        rows()
            .filter(|r| fixed(r).is_some_and(|n| n > 0))
            .max_by_key(|r| fixed(r))
            .or_else(|| rows().find(|r| r.masks == MaskCount::Auto))
    })
}

/// Why `report`'s acceptance is what it is: the domains the paper measured against its
/// figures, then the reasons that apply, each with its numbers. The paper's figures and
/// the training's estimate are quadratic decoding's at fixed mask counts, and only such
/// rows are held against them. Empty without a speculative row.
pub fn explain(report: &BenchReport, context: &Context) -> Vec<Finding> {
    let Some(main) = main_row(report) else { return Vec::new() };
    let mut found: Vec<Why> = Vec::new();

    // The paper's domains, each at the largest of its mask counts measured here.
    for (domain, benchmark, figures) in PAPER {
        let row = PAPER_MASKS.iter().zip(figures).rev().find_map(|(&m, paper)| {
            report
                .rows
                .iter()
                .find(|r| r.domain == domain && r.mode == Mode::Quadratic && r.masks == MaskCount::Fixed(m))
                .map(|r| (m, r.tokens_per_forward, paper))
        });
        if let Some((masks, ours, paper)) = row {
            found.push(Why::Paper { domain: domain.into(), benchmark: benchmark.into(), masks, ours, paper });
        }
    }

    // Slot by slot: the first slot from the 1-mask steps where they ran (what the paper's
    // 1-mask figures measure), the fall between slots from the main row.
    let one = all_row(report, main.mode, MaskCount::Fixed(1)).filter(|r| r.acceptance.rate(1).is_some());
    let first = one.unwrap_or(main);
    if let (Some(rate), Some(&reached)) = (first.acceptance.rate(1), first.acceptance.reached.first()) {
        let paper_first = PAPER.iter().map(|(_, _, f)| f[0] - 1.0);
        let paper = (paper_first.clone().fold(f64::INFINITY, f64::min), paper_first.fold(0.0, f64::max));
        found.push(Why::FirstSlot { masks: first.masks, rate, reached, paper });
    }
    let acceptance = &main.acceptance;
    let drop = (2..=acceptance.reached.len())
        .filter(|&slot| acceptance.reached[slot - 1] >= SLOT_MIN_REACHED)
        .filter_map(|slot| Some((slot, acceptance.rate(slot)?, acceptance.rate(slot - 1)?)))
        .filter(|&(_, rate, previous)| previous - rate >= SLOT_DROP)
        .max_by(|a, b| (a.2 - a.1).total_cmp(&(b.2 - b.1)));
    if let Some((slot, rate, previous)) = drop {
        found.push(Why::SlotDrop { slot, rate, previous });
    }

    // Against what training estimated, at the largest quadratic mask count it estimated.
    if let Some(t) = &context.training
        && let Some(row) = report
            .rows
            .iter()
            .filter(|r| r.domain == "all" && r.mode == Mode::Quadratic)
            .filter(|r| fixed(r).is_some_and(|n| n > 0 && n <= t.expected.len()))
            .max_by_key(|r| fixed(r))
        && let Some(masks) = fixed(row)
    {
        let domains =
            || report.rows.iter().filter(|r| r.domain != "all" && r.mode == Mode::Quadratic && r.masks == row.masks);
        let weakest = domains()
            .min_by(|a, b| a.tokens_per_forward.total_cmp(&b.tokens_per_forward))
            .filter(|_| domains().count() > 1)
            .map(|r| (r.domain.clone(), r.tokens_per_forward));
        found.push(Why::AgainstTraining {
            masks,
            expected: t.expected[masks - 1],
            measured: row.tokens_per_forward,
            validation_step: t.validation_step,
            weakest,
        });
    }

    // Tokens no draft can hit.
    if let Some(size) = report.draft_vocab {
        for m in &report.draft_vocab_misses {
            if m.tokens > 0 && m.outside as f64 >= VOCAB_MISS_SHARE * m.tokens as f64 {
                found.push(Why::DraftVocab { domain: m.domain.clone(), outside: m.outside, tokens: m.tokens, size });
            }
        }
    }

    if context.model_chat_template && report.chat_template.is_none() {
        found.push(Why::RawPrompts);
    }
    let (paper_steps, paper_rank, paper_k) = PAPER_TRAINING;
    let steps = context.training.as_ref().map(|t| t.steps);
    if steps.is_some_and(|s| s < paper_steps) || context.rank < paper_rank || context.k < paper_k {
        found.push(Why::Training { steps, rank: context.rank, k: context.k });
    }
    found.into_iter().map(Finding::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::bench::DraftVocabMisses;
    use crate::decode::stats::Acceptance;

    fn row(domain: &str, mode: Mode, masks: usize, tpf: f64, acceptance: Acceptance) -> BenchRow {
        BenchRow { tokens_per_forward: tpf, acceptance, ..crate::decode::bench::test_row(domain, mode, masks) }
    }

    fn acceptance(reached: &[usize], accepted: &[usize]) -> Acceptance {
        Acceptance { reached: reached.to_vec(), accepted: accepted.to_vec(), emitted: Vec::new() }
    }

    fn report() -> BenchReport {
        let slots = acceptance(&[100, 40, 30, 10], &[40, 30, 10, 5]);
        BenchReport {
            rows: vec![
                row("chat", Mode::Ar, 0, 1.0, Acceptance::default()),
                row("chat", Mode::Quadratic, 2, 1.5, Acceptance::default()),
                row("chat", Mode::Quadratic, 4, 1.6, Acceptance::default()),
                row("code", Mode::Quadratic, 4, 2.2, Acceptance::default()),
                row("all", Mode::Quadratic, 2, 1.7, Acceptance::default()),
                row("all", Mode::Quadratic, 4, 1.9, slots),
            ],
            draft_vocab: Some(4096),
            draft_vocab_misses: vec![
                DraftVocabMisses { domain: "all".into(), tokens: 400, outside: 8 },
                DraftVocabMisses { domain: "chat".into(), tokens: 200, outside: 20 },
            ],
            ..BenchReport::default()
        }
    }

    fn kinds(findings: &[Finding]) -> Vec<&'static str> {
        findings
            .iter()
            .map(|f| match f.why {
                Why::Paper { .. } => "paper",
                Why::FirstSlot { .. } => "first_slot",
                Why::SlotDrop { .. } => "slot_drop",
                Why::AgainstTraining { .. } => "against_training",
                Why::DraftVocab { .. } => "draft_vocab",
                Why::RawPrompts => "raw_prompts",
                Why::Training { .. } => "training",
            })
            .collect()
    }

    /// Each reason comes with the report's numbers: the paper's domains at the largest
    /// paper mask count measured, the first slot, the steepest fall between slots, the
    /// training run's expectation, the domains a draft vocabulary starves, raw prompts on
    /// a chat model, and the training against the paper's.
    #[test]
    fn findings_carry_the_reports_numbers() {
        let training = TrainingFacts { steps: 470, validation_step: 470, expected: vec![1.6, 2.0, 2.2, 2.4] };
        let context = Context { k: 4, rank: 16, training: Some(training), model_chat_template: true };
        let found = explain(&report(), &context);
        assert_eq!(
            kinds(&found),
            ["paper", "paper", "first_slot", "slot_drop", "against_training", "draft_vocab", "raw_prompts", "training"]
        );
        assert_eq!(
            found[0].why,
            Why::Paper { domain: "code".into(), benchmark: "HumanEval".into(), masks: 4, ours: 2.2, paper: 3.87 }
        );
        assert_eq!(found[1].text, "chat at 4 masks: 1.60 tokens per forward; the paper's adapter 2.31 on AlpacaEval.");
        let Why::FirstSlot { masks, rate, reached, paper } = found[2].why else { unreachable!() };
        assert_eq!((masks, rate, reached), (MaskCount::Fixed(4), 0.4, 100));
        assert!((paper.0 - 0.54).abs() < 1e-9 && (paper.1 - 0.86).abs() < 1e-9, "{paper:?}");
        assert!(
            found[2].text.starts_with("With 4 masks, the first draft is accepted in 40% of the 100 steps"),
            "{}",
            found[2].text
        );
        // With a 1-mask row, its steps are the ones counted.
        let mut with_one = report();
        with_one.rows.push(row("all", Mode::Quadratic, 1, 1.5, acceptance(&[80], &[50])));
        let found = explain(&with_one, &context);
        let first = found.iter().find(|f| matches!(f.why, Why::FirstSlot { .. })).map(|f| f.text.as_str());
        assert!(
            first.is_some_and(|t| t.starts_with("With 1 mask, the first draft is accepted in 62% of the 80 steps"))
        );
        let found = explain(&report(), &context);
        // Slot 3 (10 of 30) after slot 2 (30 of 40): the largest fall.
        let Why::SlotDrop { slot, rate, previous } = found[3].why else { unreachable!() };
        assert_eq!(slot, 3);
        assert!((rate - 1.0 / 3.0).abs() < 1e-9 && (previous - 0.75).abs() < 1e-9);
        // 1.9 measured against 2.4 estimated at 4 masks (79%): the facts, chat the weakest.
        assert_eq!(
            found[4].why,
            Why::AgainstTraining {
                masks: 4,
                expected: 2.4,
                measured: 1.9,
                validation_step: 470,
                weakest: Some(("chat".into(), 1.6))
            }
        );
        assert!(found[4].text.ends_with("these prompts measure 1.90 (chat drafts worst: 1.60)."), "{}", found[4].text);
        // 2% of every domain's tokens is under the threshold; chat's 10% is named.
        assert_eq!(found[5].why, Why::DraftVocab { domain: "chat".into(), outside: 20, tokens: 200, size: 4096 });
        assert!(found[5].text.starts_with("chat: 10% of AR's answer tokens (20 of 200)"), "{}", found[5].text);
        assert!(found[7].text.contains("470 steps at rank 16 with k = 4"), "{}", found[7].text);
    }

    /// A measurement as good as training expected says so; conversation prompts, no
    /// training run and the paper's recipe leave their reasons out; no speculative row, no
    /// findings.
    #[test]
    fn reasons_that_do_not_apply_are_left_out() {
        let mut r = report();
        r.chat_template = Some("tokenizer_config.json".into());
        r.draft_vocab_misses.clear();
        let training = TrainingFacts { steps: 60_000, validation_step: 60_000, expected: vec![1.6, 2.0, 2.0, 2.0] };
        let context = Context { k: 8, rank: 128, training: Some(training), model_chat_template: true };
        let found = explain(&r, &context);
        assert_eq!(kinds(&found), ["paper", "paper", "first_slot", "slot_drop", "against_training"]);
        assert!(
            found[4]
                .text
                .ends_with("The prompts are not the limit here: more acceptance needs a better-trained adapter."),
            "{}",
            found[4].text
        );
        // Far below the estimate: the prompts are named.
        let far = Context {
            training: Some(TrainingFacts {
                steps: 60_000,
                validation_step: 60_000,
                expected: vec![1.6, 2.0, 2.0, 3.0],
            }),
            ..context
        };
        let text = &explain(&r, &far)[4].text;
        assert!(text.contains("likely unlike the data the adapter was trained on"), "{text}");
        let no_run = Context { k: 4, rank: 16, training: None, model_chat_template: false };
        let found = explain(&r, &no_run);
        assert!(!kinds(&found).contains(&"against_training"));
        assert_eq!(
            found.last().map(|f| f.text.as_str()),
            Some(
                "The adapter trained rank 16 with k = 4; the paper's trained 50000 steps at rank 128 with k = 8, on an 8B model."
            )
        );
        r.rows.retain(|row| row.mode == Mode::Ar);
        assert!(explain(&r, &no_run).is_empty());
    }

    /// Linear rows are not held against the paper's figures nor training's estimate (both
    /// quadratic); an `auto`-only run still gets its slots; training's estimate is read at
    /// the largest mask count it covers; a slot reached by few steps is not called a fall;
    /// the paper's recipe without a known run is not listed as a difference.
    #[test]
    fn rows_the_paper_and_training_do_not_measure_are_left_to_their_slots() {
        let training = TrainingFacts { steps: 470, validation_step: 470, expected: vec![1.6, 2.0] };
        let context = Context { k: 4, rank: 16, training: Some(training), model_chat_template: false };
        let mut linear = report();
        linear.draft_vocab_misses.clear();
        linear.rows.iter_mut().filter(|r| r.mode == Mode::Quadratic).for_each(|r| r.mode = Mode::Linear);
        assert_eq!(kinds(&explain(&linear, &context)), ["first_slot", "slot_drop", "training"]);

        let mut auto = report();
        auto.draft_vocab_misses.clear();
        auto.rows.retain(|r| r.mode == Mode::Ar);
        let mut row = row("all", Mode::Quadratic, 0, 1.8, acceptance(&[50, 30], &[30, 20]));
        row.masks = MaskCount::Auto;
        auto.rows.push(row);
        let found = explain(&auto, &context);
        assert_eq!(kinds(&found), ["first_slot", "training"]);
        assert!(found[0].text.starts_with("With the mask count chosen each step, the first draft is accepted in 60%"));

        // Training estimated 1..2 masks: the 2-mask row (1.7) is held against its 2.0.
        let found = explain(&report(), &context);
        let against = found.iter().find(|f| matches!(f.why, Why::AgainstTraining { .. })).map(|f| f.why.clone());
        assert_eq!(
            against,
            Some(Why::AgainstTraining { masks: 2, expected: 2.0, measured: 1.7, validation_step: 470, weakest: None })
        );

        // Slot 2 reached by 10 steps only: no fall named.
        let mut few = report();
        few.rows.iter_mut().filter(|r| r.domain == "all" && r.masks == MaskCount::Fixed(4)).for_each(|r| {
            r.acceptance = acceptance(&[100, 10], &[10, 1]);
        });
        assert!(!kinds(&explain(&few, &context)).contains(&"slot_drop"));

        let paper_recipe = Context { k: 8, rank: 128, training: None, model_chat_template: false };
        assert!(!kinds(&explain(&report(), &paper_recipe)).contains(&"training"));
    }

    /// A finding's JSON holds its kind, its numbers and its sentence, and reads back.
    #[test]
    fn findings_round_trip_through_json() -> anyhow::Result<()> {
        let context = Context { k: 4, rank: 16, training: None, model_chat_template: false };
        let found = explain(&report(), &context);
        let json = serde_json::to_value(&found)?;
        assert_eq!(json[2]["kind"], "first_slot");
        assert_eq!(json[2]["reached"], 100);
        assert!(json[2]["text"].as_str().is_some_and(|t| t.starts_with("With 4 masks, the first draft")));
        let back: Vec<Finding> = serde_json::from_value(json)?;
        assert_eq!(back, found);
        Ok(())
    }

    /// The training facts come from the run folder holding the adapter: its last step and
    /// its last validation with expected tokens per forward; none without a run.
    #[test]
    fn training_facts_come_from_the_run_beside_the_adapter() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let adapter = dir.path().join("adapter.safetensors");
        assert_eq!(TrainingFacts::beside(&adapter), None);
        let line = |step: usize, split: &str, expected: Option<&str>| {
            format!(
                "{{\"step\":{step},\"split\":\"{split}\",\"loss\":1.0,\"loss_base\":1.0,\"loss_sampler\":0.0,\
                 \"loss_lcm\":0.0,\"slot_acc\":[0.5],\"slot_acc_sampler\":[0.5],\"lr\":0.001,\"tokens_per_second\":1.0,\"elapsed\":1.0{}}}\n",
                expected.map(|e| format!(",\"expected_tokens_per_forward\":{e}")).unwrap_or_default()
            )
        };
        let metrics =
            [line(50, "val", Some("[1.5,1.8]")), line(100, "val", Some("[1.6,1.9]")), line(120, "train", None)];
        std::fs::write(dir.path().join("metrics.jsonl"), metrics.concat())?;
        assert_eq!(
            TrainingFacts::beside(&adapter),
            Some(TrainingFacts { steps: 120, validation_step: 100, expected: vec![1.6, 1.9] })
        );
        // A copy named after the adapter (an adapter kept outside its run folder) comes first.
        std::fs::write(dir.path().join("adapter-metrics.jsonl"), line(300, "val", Some("[1.7]")))?;
        assert_eq!(
            TrainingFacts::beside(&adapter),
            Some(TrainingFacts { steps: 300, validation_step: 300, expected: vec![1.7] })
        );
        Ok(())
    }
}
