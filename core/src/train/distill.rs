//! Self-distillation: training data made of the base model's own greedy continuations.
//!
//! Greedy speculative decoding accepts a draft only when it equals the base model's own
//! next-token choice, so the masks are best trained on what the model itself writes, not on
//! text it merely read. This matters most when a dataset and the model part ways (a small
//! model that loops, a model tuned away from its data); Medusa-2 and EAGLE make the same
//! choice. The paper trains on data close to its model's outputs (Tulu3-8B-SFT on the Tulu3
//! SFT mix) and says nothing of this; it is an option here, never a silent default.
//!
//! Two ways to choose prompts. From text: windows of exactly `prompt_tokens` tokens cut
//! from a dataset's token stream (the examples concatenated, as pretraining saw them) just
//! before a position the dataset marks as a target. For chat (an instruct model, distilled
//! the way it is used, as EAGLE-3 and SpecForge regenerate responses with the target
//! model): the dataset's questions (each conversation up to an assistant turn, an Alpaca
//! instruction, a `prompt`) through the model's chat template, the response generated to
//! the end-of-turn token. Prompts of different lengths share a batch padded on the left:
//! padding is masked out of attention and positions start after it, so each row computes
//! what it would alone.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::Control;
use super::data::{self, DataSource, Example, Tokenized};
use super::formats::{self, RowFile};
use crate::bundle::LoadedModel;
use crate::error::{Error, Result};
use crate::model::{AttnMask, Llama};
use crate::tokenizer::{ChatMessage, TextTokenizer};

/// How much to distill and how.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Prompts to continue.
    pub sequences: usize,
    /// Tokens per prompt.
    pub prompt_tokens: usize,
    /// Greedy tokens generated per prompt (fewer when the model ends the text).
    pub new_tokens: usize,
    /// Prompts decoded together.
    pub batch_size: usize,
    /// Seed of the prompt choice.
    pub seed: u64,
    /// Chat: the dataset's questions through the chat template (`prompt_tokens` unused).
    #[serde(default)]
    pub chat: bool,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self { sequences: 4000, prompt_tokens: 32, new_tokens: 96, batch_size: 32, seed: 0, chat: false }
    }
}

/// One distilled example: a prompt from the data and the model's greedy continuation (ending
/// with the first end-of-sequence token, when one came).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Distilled {
    /// The prompt's token ids.
    pub prompt_ids: Vec<i64>,
    /// The continuation's token ids.
    pub completion_ids: Vec<i64>,
}

/// The prompts a distillation continues: questions through the chat template, or windows of
/// the text.
fn prompts_of(loaded: &LoadedModel, source: &DataSource, config: &DistillConfig) -> Result<Vec<Vec<i64>>> {
    if config.chat {
        chat_prompts(loaded, source, config)
    } else {
        let (examples, _) = data::read_examples(source, false)?;
        let tokenized = examples.iter().map(|e| data::tokenize(e, &loaded.tokenizer)).collect::<Result<Vec<_>>>()?;
        choose_prompts(&tokenized, config)
    }
}

/// What [`distill_into`] did.
#[derive(Debug, Clone)]
pub struct DistillOutcome {
    /// Every answered prompt, in prompt order (all of them when `complete`).
    pub examples: Vec<Distilled>,
    /// How many of them an earlier, interrupted run had answered.
    pub reused: usize,
    /// Tokens this run decoded (the answers it did not take from the earlier run).
    pub decoded_tokens: usize,
    /// Every prompt is answered and `out` is written.
    pub complete: bool,
    /// Where the answers of an unfinished run are kept.
    pub partial: std::path::PathBuf,
}

/// What makes answers of an earlier run valid for this one: greedy answers depend on the
/// model, its precision and the token cap, not on which prompts a run chose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PartialHeader {
    model: String,
    dtype: crate::device::DType,
    new_tokens: usize,
}

/// The whole pass: read `source`, tokenize it with the model's tokenizer, choose the prompts
/// and continue them (see [`continue_greedy`] for `control`; `progress(done, total)` after
/// each batch) into the JSONL file `out`, written atomically once every prompt is answered,
/// keeping each finished batch in `OUT.partial` as it goes: a run that is stopped, killed or
/// crashes loses at most one batch, and the same command run again decodes only the prompts
/// not answered yet (a partial file of another model, precision or token cap is refused).
/// The partial file is removed once `out` is written.
pub fn distill_into(
    loaded: &LoadedModel,
    source: &DataSource,
    config: &DistillConfig,
    out: &Path,
    control: &Control,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<DistillOutcome> {
    use std::io::Write;
    let prompts = prompts_of(loaded, source, config)?;
    let partial = crate::fsutil::suffixed(out, ".partial");
    let header =
        PartialHeader { model: loaded.source.to_string(), dtype: loaded.model.dtype(), new_tokens: config.new_tokens };
    let mut answered = read_partial(&partial, &header)?;
    let todo: Vec<Vec<i64>> = prompts.iter().filter(|p| !answered.contains_key(*p)).cloned().collect();
    let reused = prompts.len() - todo.len();
    if reused == 0 && !answered.is_empty() {
        tracing::warn!(
            "{}: its {} answers are to other prompts (chosen with another seed or prompt length); they are not used",
            partial.display(),
            answered.len()
        );
    }
    progress(reused, prompts.len());
    let mut file = if todo.is_empty() {
        None
    } else {
        if let Some(parent) = partial.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let fresh = !partial.exists();
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(&partial).map_err(|e| Error::io(&partial, e))?;
        if fresh {
            let line =
                serde_json::to_string(&header).map_err(|source| Error::Json { path: partial.clone(), source })?;
            writeln!(f, "{line}").map_err(|e| Error::io(&partial, e))?;
        }
        Some(f)
    };
    let eos = &loaded.tokenizer.eos_ids;
    let (mut decoded, mut decoded_tokens) = (0, 0);
    for chunk in todo.chunks(config.batch_size.max(1)) {
        if control.is_cancelled() {
            break;
        }
        let rows =
            continue_greedy(&loaded.model, chunk, config.new_tokens, config.batch_size, eos, control, &mut |_, _| {})?;
        if let Some(f) = file.as_mut() {
            let mut text = String::new();
            for d in &rows {
                let line = serde_json::to_string(d).map_err(|source| Error::Json { path: partial.clone(), source })?;
                text.push_str(&line);
                text.push('\n');
            }
            f.write_all(text.as_bytes()).and_then(|()| f.sync_data()).map_err(|e| Error::io(&partial, e))?;
        }
        decoded += rows.len();
        decoded_tokens += rows.iter().map(|d| d.completion_ids.len()).sum::<usize>();
        for d in rows {
            answered.insert(d.prompt_ids, d.completion_ids);
        }
        progress(reused + decoded, prompts.len());
    }
    let examples: Vec<Distilled> = prompts
        .iter()
        .filter_map(|p| answered.get(p).map(|c| Distilled { prompt_ids: p.clone(), completion_ids: c.clone() }))
        .collect();
    let complete = examples.len() == prompts.len();
    if complete {
        write_jsonl(out, &examples, &loaded.tokenizer)?;
        if partial.exists() {
            std::fs::remove_file(&partial).map_err(|e| Error::io(&partial, e))?;
        }
    }
    Ok(DistillOutcome { examples, reused, decoded_tokens, complete, partial })
}

/// The answers an interrupted run kept in `path` (none when there is no such file), refused
/// when they were made under another `header`. A last line cut short by a crash is cut off
/// the file too, so that what is appended next starts on a line of its own.
fn read_partial(path: &Path, header: &PartialHeader) -> Result<std::collections::HashMap<Vec<i64>, Vec<i64>>> {
    let mut answered = std::collections::HashMap::new();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(answered),
        Err(e) => return Err(Error::io(path, e)),
    };
    let whole = text.rfind('\n').map_or(0, |i| i + 1);
    if whole < text.len() {
        if whole == 0 {
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
            return Ok(answered);
        }
        let f = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| Error::io(path, e))?;
        f.set_len(whole as u64).map_err(|e| Error::io(path, e))?;
    }
    let mut lines = text[..whole].lines();
    let json = |source| Error::Json { path: path.to_owned(), source };
    let theirs: PartialHeader = serde_json::from_str(lines.next().unwrap_or_default()).map_err(json)?;
    if &theirs != header {
        return Err(Error::Invalid(format!(
            "{} holds the answers of an unfinished distillation of {} ({}, {} new tokens), not of {} ({}, {} new \
             tokens): delete it to start over, or write to another file",
            path.display(),
            theirs.model,
            theirs.dtype,
            theirs.new_tokens,
            header.model,
            header.dtype,
            header.new_tokens
        )));
    }
    for line in lines {
        let d: Distilled = serde_json::from_str(line).map_err(json)?;
        answered.insert(d.prompt_ids, d.completion_ids);
    }
    Ok(answered)
}

/// Every question of `source` (see [`formats::parse_questions`]); an error when it has none.
pub fn read_questions(source: &DataSource) -> Result<Vec<Vec<ChatMessage>>> {
    let rows = |path: &std::path::Path, file: RowFile| -> Result<Vec<Vec<ChatMessage>>> {
        let (rows, _) = formats::read_rows(path, file, false, &formats::parse_questions)?;
        Ok(rows.into_iter().flatten().collect())
    };
    let questions = match source {
        DataSource::Jsonl { path } => rows(path, RowFile::Jsonl)?,
        DataSource::Json { path } => rows(path, RowFile::Json)?,
        DataSource::Parquet { path } => rows(path, RowFile::Parquet)?,
        DataSource::Hub { .. } => {
            return read_questions(&source.resolve(&crate::source::HubOptions::from_env(), &mut ())?);
        }
        DataSource::Mix { sources } => {
            let mut all = Vec::new();
            for part in sources {
                all.extend(read_questions(part)?);
            }
            all
        }
        DataSource::Text { .. } | DataSource::Folder { .. } | DataSource::Builtin { .. } => {
            let (examples, _) = data::read_examples(source, false)?;
            examples
                .into_iter()
                .flat_map(|e| match e {
                    Example::Chat { messages } => formats::conversation_questions(messages),
                    Example::PromptCompletion { prompt, .. } => vec![vec![ChatMessage::new("user", &prompt)]],
                    Example::Text { .. } | Example::Tokens { .. } => Vec::new(),
                })
                .collect()
        }
    };
    if questions.is_empty() {
        return Err(Error::Invalid(format!(
            "{source} has no questions: chat distillation needs rows with `messages`, `conversations`, \
             `instruction` or `prompt`"
        )));
    }
    Ok(questions)
}

/// `config.sequences` questions of `source` (seeded; all of them when there are fewer),
/// each through the chat template with the generation prompt, as `mtp generate --chat`
/// encodes a prompt; those that leave no room for `new_tokens` in the context are dropped.
/// Sorted by length, so that batches hold prompts of similar lengths.
pub fn chat_prompts(loaded: &LoadedModel, source: &DataSource, config: &DistillConfig) -> Result<Vec<Vec<i64>>> {
    let tok = &loaded.tokenizer;
    let mut questions = read_questions(source)?;
    questions.shuffle(&mut StdRng::seed_from_u64(config.seed ^ 0xC4A7_D157));
    questions.truncate(config.sequences);
    let room = loaded.model.config.context_length().saturating_sub(config.new_tokens);
    let mut prompts = Vec::with_capacity(questions.len());
    let mut too_long = 0;
    for q in &questions {
        let ids = tok.encode_with(&tok.apply_chat_template(q, true)?, false)?;
        if ids.is_empty() || ids.len() > room {
            too_long += 1;
        } else {
            prompts.push(ids);
        }
    }
    if too_long > 0 {
        tracing::warn!(
            "{too_long} questions left no room for {} new tokens in the context: skipped",
            config.new_tokens
        );
    }
    if prompts.is_empty() {
        return Err(Error::Invalid(format!("every question of {source} is too long for the model's context")));
    }
    prompts.sort_by_key(Vec::len);
    Ok(prompts)
}

/// Write `examples` as JSONL, atomically: per line the texts (for people and the Data view)
/// and the ids (what training reads), `prompt`, `completion`, `prompt_ids`, `completion_ids`.
pub fn write_jsonl(path: &Path, examples: &[Distilled], tok: &TextTokenizer) -> Result<()> {
    let mut text = String::new();
    for d in examples {
        let line = serde_json::json!({
            "prompt": tok.decode(&d.prompt_ids, false)?,
            "completion": tok.decode(&d.completion_ids, false)?,
            "prompt_ids": d.prompt_ids,
            "completion_ids": d.completion_ids,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    crate::fsutil::write_atomic(path, text.as_bytes())
}

/// Choose `config.sequences` prompt windows from `examples`: each is the `prompt_tokens`
/// tokens of the concatenated stream before a position whose token is a target of the data.
/// Seeded; an error when the data is shorter than one prompt.
pub fn choose_prompts(examples: &[Tokenized], config: &DistillConfig) -> Result<Vec<Vec<i64>>> {
    let p = config.prompt_tokens;
    if p == 0 {
        return Err(Error::Invalid("distillation needs prompts of at least one token".into()));
    }
    let ids: Vec<i64> = examples.iter().flat_map(|t| t.ids.iter().copied()).collect();
    let loss: Vec<bool> = examples.iter().flat_map(|t| t.loss.iter().copied()).collect();
    // Cut before token c when the data wants c predicted (its predecessor carries loss).
    let cuts: Vec<usize> = (p..ids.len()).filter(|&c| loss[c - 1]).collect();
    if cuts.is_empty() {
        return Err(Error::Invalid(format!(
            "the dataset has {} tokens: too few for one prompt of {p} tokens before a target",
            ids.len()
        )));
    }
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x0D15_7111);
    Ok((0..config.sequences)
        .map(|_| {
            let c = cuts[rng.random_range(0..cuts.len())];
            ids[c - p..c].to_vec()
        })
        .collect())
}

/// Continue every prompt greedily for `new_tokens` tokens, `batch_size` at a time (prompts
/// of different lengths padded on the left), cutting each continuation after its first
/// token in `eos`. `progress(done, total)` is called after each batch. Stops early
/// (returning what is done) when `control` is cancelled.
pub fn continue_greedy(
    model: &Llama,
    prompts: &[Vec<i64>],
    new_tokens: usize,
    batch_size: usize,
    eos: &[i64],
    control: &Control,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Distilled>> {
    let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if prompts.iter().any(Vec::is_empty) {
        return Err(Error::Invalid("an empty prompt in a distillation".into()));
    }
    if p + new_tokens > model.config.context_length() {
        return Err(Error::ContextLength {
            what: format!("a prompt of {p} tokens + {new_tokens} new tokens"),
            needed: p + new_tokens,
            context: model.config.context_length(),
        });
    }
    for q in prompts {
        model.check_ids(q)?;
    }
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch_size.max(1)) {
        if control.is_cancelled() {
            break;
        }
        let rows = tch::no_grad(|| greedy_batch(model, chunk, new_tokens, eos))?;
        for (prompt, mut completion) in chunk.iter().zip(rows) {
            if let Some(end) = completion.iter().position(|t| eos.contains(t)) {
                completion.truncate(end + 1);
            }
            out.push(Distilled { prompt_ids: prompt.clone(), completion_ids: completion });
        }
        progress(out.len(), prompts.len());
    }
    Ok(out)
}

/// Greedy continuations of prompts decoded as one batch with a KV cache. Every
/// [`COMPACT_EVERY`] tokens the rows that have written a token of `eos` leave the batch (and
/// the cache), so a batch costs what its unfinished rows need; it ends when none is left.
/// Shorter prompts are padded on the left: their padding is masked out of every row's
/// attention (a padding row attends to itself alone, so that nothing it computes is NaN)
/// and their positions start after it.
///
/// # Shapes
/// `prompts`: b prompts of at most p tokens -> b rows of at most `new_tokens` ids.
fn greedy_batch(model: &Llama, prompts: &[Vec<i64>], new_tokens: usize, eos: &[i64]) -> Result<Vec<Vec<i64>>> {
    let device = model.device();
    let b = prompts.len() as i64;
    let p = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let pads: Vec<i64> = prompts.iter().map(|q| p - q.len() as i64).collect();
    let flat: Vec<i64> = prompts
        .iter()
        .zip(&pads)
        .flat_map(|(q, &pad)| std::iter::repeat_n(0, pad as usize).chain(q.iter().copied()))
        .collect();
    let input = Tensor::from_slice(&flat).view([b, p]).to_device(device);
    let mut cache = model.new_cache(p as usize + new_tokens);
    let padded = pads.iter().any(|&pad| pad > 0);
    // Per row: the first real column, and whether each cache column is a real token.
    let pad = Tensor::from_slice(&pads).to_device(device).unsqueeze(1); // [b, 1]
    let columns = Tensor::arange(p + new_tokens as i64, (Kind::Int64, device)).unsqueeze(0); // [1, S]
    let mut real = columns.ge_tensor(&pad); // [b, S]
    let cols = columns.narrow(1, 0, p);
    let (positions, mask) = if padded {
        let rows = cols.view([p, 1]);
        let causal = cols.le_tensor(&rows); // [p, p]
        let own = cols.eq_tensor(&rows);
        let mask = causal.unsqueeze(0).logical_and(&real.narrow(1, 0, p).unsqueeze(1)).logical_or(&own); // [b, p, p]
        ((&cols - &pad).clamp_min(0), Some(mask.unsqueeze(1))) // [b, p], [b, 1, p, p]
    } else {
        (cols.squeeze_dim(0), None)
    };
    let attn = mask.as_ref().map_or(AttnMask::Causal, AttnMask::Custom);
    let h = model.forward_embeds(&model.embed(&input), &positions, attn, None, Some(&mut cache));
    let logits = model.logits(&h.narrow(1, p - 1, 1)); // [b, 1, vocab]
    let mut next = logits.select(1, 0).argmax(-1, false); // [b]
    let eos = Tensor::from_slice(eos).to_device(device);
    let mut ended = Tensor::zeros([b], (Kind::Bool, device));
    let mut lengths = Tensor::from_slice(&prompts.iter().map(|q| q.len() as i64).collect::<Vec<_>>()).to_device(device);
    // The batch rows still decoding (indices into `prompts`), and what each stretch of
    // steps between two compactions wrote for the rows alive during it.
    let mut alive: Vec<usize> = (0..prompts.len()).collect();
    let mut stretches: Vec<(Vec<usize>, Vec<Tensor>)> = vec![(alive.clone(), Vec::new())];
    for i in 0..new_tokens {
        if let Some((_, steps)) = stretches.last_mut() {
            steps.push(next.shallow_clone());
        }
        ended = ended.logical_or(&Tensor::isin(&next, &eos, false, false));
        if i + 1 == new_tokens {
            break;
        }
        // Which rows ended costs a read from the device: every few tokens.
        if i % COMPACT_EVERY == COMPACT_EVERY - 1 {
            let done = Vec::<bool>::try_from(&ended.to_device(tch::Device::Cpu))?;
            if done.iter().all(|&d| d) {
                break;
            }
            if done.iter().any(|&d| d) {
                let keep: Vec<i64> = (0..done.len() as i64).filter(|&r| !done[r as usize]).collect();
                alive = keep.iter().map(|&r| alive[r as usize]).collect();
                let keep = Tensor::from_slice(&keep).to_device(device);
                cache.keep_rows(&keep);
                next = next.index_select(0, &keep);
                real = real.index_select(0, &keep);
                lengths = lengths.index_select(0, &keep);
                ended = ended.index_select(0, &keep);
                stretches.push((alive.clone(), Vec::new()));
            }
        }
        let x = next.unsqueeze(1);
        let out = if padded {
            let s = p + i as i64 + 1;
            let positions = (&lengths + i as i64).unsqueeze(1); // [b, 1]
            let mask = real.narrow(1, 0, s).reshape([alive.len() as i64, 1, 1, s]);
            let h = model.forward_embeds(&model.embed(&x), &positions, AttnMask::Custom(&mask), None, Some(&mut cache));
            model.logits(&h)
        } else {
            model.forward(&x, Some(&mut cache))
        };
        next = out.select(1, 0).argmax(-1, false);
    }
    let mut rows = vec![Vec::new(); prompts.len()];
    for (rows_alive, steps) in stretches.iter().filter(|(_, steps)| !steps.is_empty()) {
        let n = steps.len();
        let all = Tensor::stack(steps, 1).to_kind(Kind::Int64).to_device(tch::Device::Cpu); // [alive, n]
        let values = Vec::<i64>::try_from(all.reshape([-1]))?;
        for (&row, written) in rows_alive.iter().zip(values.chunks(n)) {
            rows[row].extend_from_slice(written);
        }
    }
    Ok(rows)
}

/// Tokens between two looks at which rows of a distillation batch have ended.
const COMPACT_EVERY: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_end_before_targets_and_are_seeded() -> Result<()> {
        // Two examples: the first all prompt but its last token, the second all target.
        let a = Tokenized { ids: (0..10).collect(), loss: (0..10).map(|i| i == 8).collect() };
        let b = Tokenized { ids: (100..110).collect(), loss: vec![true; 10] };
        let config = DistillConfig { sequences: 50, prompt_tokens: 4, ..DistillConfig::default() };
        let prompts = choose_prompts(&[a.clone(), b.clone()], &config)?;
        assert_eq!(prompts.len(), 50);
        let stream: Vec<i64> = a.ids.iter().chain(&b.ids).copied().collect();
        for q in &prompts {
            assert_eq!(q.len(), 4);
            let at = stream.windows(4).position(|w| w == q.as_slice()).expect("a window of the stream");
            let next = at + 4;
            // The token after the prompt is a target: 9 (after loss[8]) or one of the second example's.
            assert!(next == 9 || next >= 10, "cut before {next}");
        }
        assert_eq!(choose_prompts(&[a.clone(), b.clone()], &config)?, prompts);
        let other = choose_prompts(&[a.clone(), b], &DistillConfig { seed: 1, ..config })?;
        assert_ne!(other, prompts);
        let err = choose_prompts(&[a], &DistillConfig { prompt_tokens: 20, ..config }).expect_err("too short");
        assert!(err.to_string().contains("too few"), "{err}");
        Ok(())
    }
}
