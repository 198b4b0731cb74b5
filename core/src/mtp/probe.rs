//! The paper's Figure 1 on any model: after a prompt, k mask tokens; for each mask slot,
//! the rank of the true future token (from a known continuation) under the base model
//! (same mask inputs, adapter off), under the tuned adapter (LM head on the mask's state),
//! and after the sampler head (conditioned on the true previous token).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::adapter::MtpAdapter;
use super::masks::attention_mask;
use crate::error::{Error, Result};
use crate::model::{AttnMask, Gated, Llama};

/// Ranks for one position (slot 0 = the ordinary next token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotRank {
    /// 0 for the next token (NTP), j for mask m_j (predicting the token j places later).
    pub slot: usize,
    /// The true token at that place.
    pub token: i64,
    /// 1-based rank under the base model with placeholder (mask) inputs and no adapter.
    pub rank_base: usize,
    /// 1-based rank under the tuned adapter (LM head on the mask's final state).
    pub rank_tuned: usize,
    /// 1-based rank after the sampler head, for the mask slots of an adapter that has one
    /// (`None` for slot 0: decoding takes the next token from the LM head, never from the
    /// sampler).
    pub rank_sampler: Option<usize>,
}

/// The probe of one prompt and continuation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// The prompt ids.
    pub prompt_ids: Vec<i64>,
    /// The continuation ids (the truth the ranks refer to).
    pub continuation_ids: Vec<i64>,
    /// Slot 0 (NTP) then every mask slot the continuation covers.
    pub slots: Vec<SlotRank>,
}

/// 1-based rank of `token` in `logits` (`[V]`): one plus the number of strictly larger
/// logits.
fn rank(logits: &Tensor, token: i64) -> usize {
    let target = logits.double_value(&[token]);
    logits.gt(target).sum(Kind::Int64).int64_value(&[]) as usize + 1
}

/// The prompt's ids and the continuation's as they follow the prompt in the text (a word
/// the two share is tokenized whole, as the model would read it), or, where the text's
/// tokens do not start with the prompt's, the continuation's on its own.
pub fn encode(tok: &crate::tokenizer::TextTokenizer, prompt: &str, continuation: &str) -> Result<(Vec<i64>, Vec<i64>)> {
    let prompt_ids = tok.encode(prompt)?;
    let joint = tok.encode(&format!("{prompt}{continuation}"))?;
    let continuation_ids = match joint.strip_prefix(prompt_ids.as_slice()) {
        Some(rest) if !rest.is_empty() => rest.to_vec(),
        _ => tok.encode_with(continuation, false)?,
    };
    Ok((prompt_ids, continuation_ids))
}

/// Run the probe. The continuation must hold at least two tokens (the next token and the
/// one mask m_1 predicts); slots beyond the continuation or the adapter's k are left out.
pub fn probe(model: &Llama, adapter: &MtpAdapter, prompt_ids: &[i64], continuation_ids: &[i64]) -> Result<ProbeReport> {
    if prompt_ids.is_empty() {
        return Err(Error::Invalid("the probe needs a prompt".into()));
    }
    if continuation_ids.len() < 2 {
        return Err(Error::Invalid("the continuation must have at least 2 tokens".into()));
    }
    model.check_ids(prompt_ids)?;
    model.check_ids(continuation_ids)?;
    let k = adapter.config.k.min(continuation_ids.len() - 1);
    let p = prompt_ids.len();
    if p + k + 1 > model.config.context_length() {
        return Err(Error::ContextLength {
            what: "the probe".into(),
            needed: p + k + 1,
            context: model.config.context_length(),
        });
    }
    let device = model.device();
    let cpu = (Kind::Int64, Device::Cpu);
    let block = Tensor::cat(&[Tensor::arange(p as i64, cpu), Tensor::full([k as i64], p as i64 - 1, cpu)], 0);
    let slot = Tensor::cat(&[Tensor::zeros([p as i64], cpu), Tensor::arange_start(1, k as i64 + 1, cpu)], 0);
    let mut tokens = prompt_ids.to_vec();
    tokens.extend(std::iter::repeat_n(0, k));
    let mask = attention_mask(&block, &slot).to_device(device);
    let positions = (&block + &slot).to_device(device);
    let tok = Tensor::from_slice(&tokens).to_device(device).unsqueeze(0);
    let slot_d = slot.to_device(device).unsqueeze(0);
    // The rows of interest: the last prompt token, then each mask.
    let rows = Tensor::arange_start(p as i64 - 1, (p + k) as i64, (Kind::Int64, device));

    let (base, tuned) = tch::no_grad(|| {
        let x = adapter.embed(model, &tok, &slot_d);
        let gated = adapter.gated(&slot_d, model.dtype().kind());
        let run = |a: Option<&Gated>| {
            model.forward_embeds(&x, &positions, AttnMask::Custom(&mask), a, None).squeeze_dim(0).index_select(0, &rows)
        };
        (run(None), run(Some(&gated)))
    });
    let base_logits = tch::no_grad(|| model.logits(&base).to_kind(Kind::Float));
    let tuned_logits = tch::no_grad(|| model.logits(&tuned).to_kind(Kind::Float));
    // The sampler conditions on the true previous token: continuation[j - 1] for mask j (the
    // pass includes slot 0, conditioned on the last prompt token, whose rank is not reported).
    let sampler_logits = adapter.sampler().map(|head| {
        let mut prev = vec![prompt_ids[p - 1]];
        prev.extend_from_slice(&continuation_ids[..k]);
        let prev = Tensor::from_slice(&prev).to_device(device);
        tch::no_grad(|| {
            model.logits(&head.forward(&model.embed(&prev), &tuned).to_kind(model.dtype().kind())).to_kind(Kind::Float)
        })
    });

    let slots = (0..=k)
        .map(|j| {
            let token = continuation_ids[j];
            SlotRank {
                slot: j,
                token,
                rank_base: rank(&base_logits.get(j as i64), token),
                rank_tuned: rank(&tuned_logits.get(j as i64), token),
                rank_sampler: sampler_logits.as_ref().filter(|_| j > 0).map(|s| rank(&s.get(j as i64), token)),
            }
        })
        .collect();
    Ok(ProbeReport { prompt_ids: prompt_ids.to_vec(), continuation_ids: continuation_ids.to_vec(), slots })
}
