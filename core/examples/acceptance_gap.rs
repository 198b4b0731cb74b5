//! What decoding accepts against what training's numbers say. For examples of a built-in
//! set (a seed training did not use): the model's greedy answer (AR); its quadratic
//! decoding at 1..k masks (measured); a replay of that decoding from the drafts one
//! training pass makes over the prompt and the greedy answer ([`training_drafts`]: every
//! block at once, the sampler fed the true previous token); and the expectation training
//! logs, from the slot accuracies against the data's answers and against the model's own.
//! When decoding computes what training computed, the replay equals the measurement (but
//! for drafts at near-ties); the expectation is above both where answers end (a step
//! cannot emit past the end) and where slots are right together more often than apart.
//! `cargo run --release -p mtp-core --example acceptance_gap ADAPTER [EXAMPLES] [arith|code]`
//! (the demo model; the adapter one trained on it).
use mtp_core::decode::{Decoding, DraftOptions, Drafter, GenerateRequest, MaskCount, Mode, Strategy, generate};
use mtp_core::mtp::MtpAdapter;
use mtp_core::mtp::loss::training_drafts;
use mtp_core::train::data::{BuiltinSet, tokenize};
use mtp_core::train::{builtin, expected_tokens_per_forward};
use mtp_core::{LoadOptions, LoadedModel, ModelSource};

/// Per block position: whether the training pass's drafts at slots 1..k are right.
fn draft_correct(
    model: &mtp_core::Llama,
    adapter: &MtpAdapter,
    ids: &[i64],
    from: usize,
) -> anyhow::Result<Vec<Vec<bool>>> {
    let drafts = training_drafts(model, adapter, ids, from)?;
    Ok(drafts
        .iter()
        .enumerate()
        .map(|(b, row)| row.iter().enumerate().map(|(j, &d)| ids.get(b + j + 2) == Some(&d)).collect())
        .collect())
}

/// Quadratic decoding replayed from the training pass's right and wrong drafts: (tokens,
/// forwards) of an answer of `answer` tokens after a prompt whose last position is `last`.
fn replay(correct: &[Vec<bool>], last: usize, answer: usize, masks: usize) -> (usize, usize) {
    // The prefill emits the first answer token and drafts from the block after the prompt.
    let (mut emitted, mut forwards, mut block) = (1, 1, last);
    while emitted < answer {
        let accepted = correct[block][..masks].iter().take_while(|&&c| c).count();
        let step = (accepted + 1).min(answer - emitted);
        emitted += step;
        forwards += 1;
        block += step;
    }
    (emitted, forwards)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: acceptance_gap ADAPTER [EXAMPLES] [arith|code]";
    let adapter_path = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?;
    let count: usize = args.get(2).map_or(Ok(40), |s| s.parse())?;
    let set = match args.get(3).map(String::as_str) {
        None | Some("arith") => BuiltinSet::Arith,
        Some("code") => BuiltinSet::Code,
        Some(other) => anyhow::bail!("unknown set `{other}`; {usage}"),
    };
    let loaded = LoadedModel::load(&ModelSource::Demo, &LoadOptions::default(), &mut ())?;
    let model = &loaded.model;
    let adapter = MtpAdapter::load(std::path::Path::new(adapter_path), model)?;
    let k = adapter.config.k;
    let _g = tch::no_grad_guard();
    let drafter = Drafter::new(model, &adapter, DraftOptions::default())?;

    let (mut same_answer, mut examples) = (0, 0);
    // Per reference (the data's answer, the model's): right drafts and drafts per slot.
    let mut right = [vec![0.0f64; k], vec![0.0f64; k]];
    let mut seen = [vec![0.0f64; k], vec![0.0f64; k]];
    let (mut measured, mut replayed) = (vec![(0, 0); k], vec![(0, 0); k]);
    for ex in builtin::generate(set, count, 777) {
        let t = tokenize(&ex, &loaded.tokenizer)?;
        // The prompt ends where the targets start; a text example's first half is its prompt.
        let last = match t.loss.iter().position(|&l| l) {
            Some(0) | None => t.ids.len() / 2,
            Some(first) => first,
        };
        if last + 3 >= t.ids.len() {
            continue;
        }
        let prompt = t.ids[..=last].to_vec();
        let req = GenerateRequest {
            prompt_ids: prompt.clone(),
            max_new_tokens: 48,
            decoding: Decoding::Greedy,
            eos_ids: model.config.eos_token_ids.clone(),
        };
        let ar = generate(model, Strategy::Ar, &req, &mut ())?;
        examples += 1;
        same_answer += usize::from(ar.token_ids == t.ids[last + 1..]);
        let greedy: Vec<i64> = prompt.iter().chain(&ar.token_ids).copied().collect();
        for (r, ids) in [&t.ids, &greedy].into_iter().enumerate() {
            for (b, row) in draft_correct(model, &adapter, ids, last)?.iter().enumerate() {
                for (j, &ok) in row.iter().enumerate() {
                    if b + j + 2 < ids.len() {
                        right[r][j] += f64::from(u8::from(ok));
                        seen[r][j] += 1.0;
                    }
                }
            }
        }
        let correct = draft_correct(model, &adapter, &greedy, last)?;
        for m in 1..=k {
            let out =
                generate(model, Strategy::new(Mode::Quadratic, Some(&drafter), MaskCount::Fixed(m))?, &req, &mut ())?;
            anyhow::ensure!(out.token_ids == ar.token_ids, "quadratic decoding at {m} masks parted from AR");
            let (tokens, forwards) = replay(&correct, last, ar.token_ids.len(), m);
            measured[m - 1] = (measured[m - 1].0 + out.token_ids.len(), measured[m - 1].1 + out.forwards);
            replayed[m - 1] = (replayed[m - 1].0 + tokens, replayed[m - 1].1 + forwards);
        }
    }
    let rates = |r: usize| -> Vec<f64> { right[r].iter().zip(&seen[r]).map(|(a, n)| a / n.max(1.0)).collect() };
    let ratio = |v: &[(usize, usize)]| -> Vec<f64> { v.iter().map(|(t, f)| *t as f64 / (*f).max(1) as f64).collect() };
    println!("examples {examples}; the model's greedy answer is the data's in {same_answer}");
    for (r, name) in ["the data's answers", "the model's answers"].into_iter().enumerate() {
        let acc = rates(r);
        println!(
            "slot accuracy against {name}: {acc:.3?}; expected tokens per forward {:.3?}",
            expected_tokens_per_forward(&acc)
        );
    }
    println!("replayed from the training pass's drafts: {:.3?}", ratio(&replayed));
    println!("measured by decoding:                     {:.3?}", ratio(&measured));
    Ok(())
}
