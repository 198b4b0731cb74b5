//! Autoregressive generation: one prefill pass over the prompt, then one token per forward
//! pass with the KV cache. The baseline every speculative mode is measured against.

use std::ops::ControlFlow;
use std::time::Instant;

use tch::{Kind, Tensor};

use super::{GenerateOutput, GenerateRequest, Sampler, StopReason, TokenEvent, TokenOrigin, TokenSink};
use crate::error::{Error, Result};
use crate::model::Llama;

/// Check that a request fits the model: a non-empty prompt of valid ids, and room in the
/// context for the prompt plus `max_new_tokens` (plus `extra` positions a decoding mode
/// needs beyond the emitted tokens).
pub fn check_request(model: &Llama, req: &GenerateRequest, extra: usize) -> Result<()> {
    if req.prompt_ids.is_empty() {
        return Err(Error::Invalid("the prompt is empty".into()));
    }
    model.check_ids(&req.prompt_ids)?;
    let needed = req.prompt_ids.len() + req.max_new_tokens + extra;
    let context = model.config.context_length();
    if needed > context {
        return Err(Error::ContextLength {
            what: format!("a prompt of {} tokens + {} new tokens", req.prompt_ids.len(), req.max_new_tokens),
            needed,
            context,
        });
    }
    Ok(())
}

/// Logits of the last position only (the LM head on one row, not the whole prompt).
///
/// # Shapes
/// `h`: `[1, t, d]` -> `[vocab]`.
pub fn last_logits(model: &Llama, h: &Tensor) -> Tensor {
    let t = h.size()[1];
    model.logits(&h.narrow(1, t - 1, 1)).view([-1])
}

/// Generate with plain autoregressive decoding, streaming each token to `sink`.
pub fn generate_ar(model: &Llama, req: &GenerateRequest, sink: &mut dyn TokenSink) -> Result<GenerateOutput> {
    check_request(model, req, 0)?;
    let mut sampler = Sampler::new(req.decoding)?;
    let start = Instant::now();
    let device = model.device();
    let mut cache = model.new_cache(req.prompt_ids.len() + req.max_new_tokens);
    let mut tokens = Vec::with_capacity(req.max_new_tokens);
    let mut forwards = 0;
    let mut prefill_time = None;

    let out = tch::no_grad(|| {
        let mut input = Tensor::from_slice(&req.prompt_ids).to_device(device).unsqueeze(0);
        loop {
            if tokens.len() == req.max_new_tokens {
                return StopReason::MaxTokens;
            }
            let past = cache.len() as i64;
            let t = input.size()[1];
            let positions = Tensor::arange_start(past, past + t, (Kind::Int64, device));
            let h = model.forward_embeds(
                &model.embed(&input),
                &positions,
                crate::model::AttnMask::Causal,
                None,
                Some(&mut cache),
            );
            let logits = last_logits(model, &h);
            let id = sampler.pick(&logits);
            prefill_time.get_or_insert_with(|| start.elapsed());
            let event = TokenEvent { id, index: tokens.len(), step: forwards, origin: TokenOrigin::Verified };
            forwards += 1;
            tokens.push(id);
            if sink.token(&event) == ControlFlow::Break(()) {
                return StopReason::Cancelled;
            }
            if req.eos_ids.contains(&id) {
                return StopReason::Eos;
            }
            input = Tensor::from_slice(&[id]).to_device(device).unsqueeze(0);
        }
    });
    Ok(GenerateOutput {
        token_ids: tokens,
        forwards,
        stop: out,
        prefill_time: prefill_time.unwrap_or_default(),
        total_time: start.elapsed(),
        steps: Vec::new(),
    })
}
