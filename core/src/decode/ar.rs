//! Autoregressive generation: one prefill pass over the prompt, then one token per forward
//! pass with the KV cache. The baseline every speculative mode is measured against.

use tch::{Kind, Tensor};

use super::{GenerateOutput, GenerateRequest, Sampler, TokenSink};
use crate::error::{Error, Result};
use crate::model::{AttnMask, FixedStep, Gated, KvCache, Llama, StepGraphs};

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
            what: match extra {
                0 => format!("a prompt of {} tokens + {} new tokens", req.prompt_ids.len(), req.max_new_tokens),
                _ => format!(
                    "a prompt of {} tokens + {} new tokens + {extra} positions for a speculative step's drafts and masks",
                    req.prompt_ids.len(),
                    req.max_new_tokens
                ),
            },
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

/// Autoregressive decoding one forward pass at a time: the cache holds the prompt and
/// every emitted token but the last, which the next step feeds.
pub struct ArDecoder<'a> {
    model: &'a Llama,
    sampler: Sampler,
    cache: KvCache,
    /// The last chosen token, not yet in the cache.
    pub pending: i64,
    /// The step of fixed shapes, once the first step records it ([`Llama::step_graphs`]);
    /// `Err` after a recording failed (steps then run the ordinary pass).
    graph: Option<std::result::Result<GraphedStep, ()>>,
}

/// An AR step of fixed shapes, recorded as a CUDA graph ([`StepGraphs::Record`]) or run
/// eagerly ([`StepGraphs::Eager`]): the pending token and its position are written into
/// fixed device tensors, one replay runs the whole forward pass (the new row's keys and
/// values written in place, the whole cache attended under a mask) and writes the logits.
#[derive(Debug)]
pub(crate) struct GraphedStep {
    token: Tensor,
    position: Tensor,
    step: FixedStep<Tensor>,
    /// The cache buffers the recording writes to ([`KvCache::buffers_id`]).
    buffers: u64,
}

/// The recorded pass: the logits of `token` at `position`, `[vocab]`. Never inlined: the
/// `step_ops` example counts the operations inside it.
#[inline(never)]
fn in_place_logits(model: &Llama, token: &Tensor, position: &Tensor, cache: &mut KvCache) -> Tensor {
    tch::no_grad(|| model.logits(&model.forward_in_place(token, position, cache)).view([-1]))
}

impl GraphedStep {
    /// Record a step at the cache's current length for `pending`. The warm-up runs and the
    /// recording write that token's keys and values at that position, as the step will.
    fn record(model: &Llama, cache: &mut KvCache, pending: i64) -> Result<Self> {
        let device = model.device();
        let token = Tensor::full([1, 1], pending, (Kind::Int64, device));
        let position = Tensor::full([1], cache.len() as i64, (Kind::Int64, device));
        let record = model.records_graphs();
        let step = FixedStep::new(device, record, || in_place_logits(model, &token, &position, cache))?;
        Ok(Self { token, position, step, buffers: cache.buffers_id() })
    }

    /// Feed `pending` at the cache's length; the logits of the next token.
    fn run(&mut self, model: &Llama, cache: &mut KvCache, pending: i64) -> Result<&Tensor> {
        if cache.len() >= cache.capacity() {
            return Err(Error::Invalid(format!("the cache holds {} positions, all used", cache.capacity())));
        }
        let _ = self.token.fill_(pending);
        let _ = self.position.fill_(cache.len() as i64);
        let (token, position) = (&self.token, &self.position);
        let logits = self.step.run(|| in_place_logits(model, token, position, cache))?;
        cache.commit(1);
        Ok(logits)
    }
}

/// What an AR generation with fixed-shape steps leaves for the next one ([`Llama`] keeps
/// it): its cache, whose buffers the recording writes to, and the recording (or the failure
/// to make one, not tried again).
#[derive(Debug)]
pub(crate) struct KeptAr {
    cache: KvCache,
    graph: Option<std::result::Result<GraphedStep, ()>>,
}

/// The cache for a generation that needs `capacity` positions: with fixed-shape steps, the
/// last generation's when it is large enough and not more than twice what a new one would
/// be (a fixed-shape pass attends over the whole cache; its recordings then replay again;
/// it is emptied), else a new one rounded up to 128 positions, so that the next generations
/// fit it too; without them, a new one of that capacity.
pub(crate) fn decoding_cache<T>(model: &Llama, kept: Option<(KvCache, T)>, capacity: usize) -> (KvCache, Option<T>) {
    if model.step_graphs() == StepGraphs::Off {
        return (model.new_cache(capacity), None);
    }
    let rounded = capacity.div_ceil(128) * 128;
    match kept {
        Some((mut cache, recorded)) if (capacity..=2 * rounded).contains(&cache.capacity()) => {
            cache.clear();
            (cache, Some(recorded))
        }
        _ => (model.new_cache(rounded), None),
    }
}

impl<'a> ArDecoder<'a> {
    /// Check the request, run the prefill and choose the first token.
    pub fn start(model: &'a Llama, req: &GenerateRequest) -> Result<(Self, i64)> {
        check_request(model, req, 0)?;
        let kept = model.kept_ar.borrow_mut().take().map(|k| (k.cache, k.graph));
        let (mut cache, graph) = decoding_cache(model, kept, req.prompt_ids.len() + req.max_new_tokens);
        let mut sampler = Sampler::new(req.decoding)?;
        let first = tch::no_grad(|| {
            let input = Tensor::from_slice(&req.prompt_ids).to_device(model.device()).unsqueeze(0);
            sampler.pick(&forward_last(model, &input, &mut cache, None))
        })?;
        Ok((Self { model, sampler, cache, pending: first, graph: graph.flatten() }, first))
    }

    /// Whether the steps replay a recorded CUDA graph.
    pub fn replays_graph(&self) -> bool {
        matches!(&self.graph, Some(Ok(g)) if g.step.replays())
    }

    /// Feed the pending token and choose the next.
    pub fn step(&mut self) -> Result<i64> {
        let model = self.model;
        // A recording writes to the cache buffers it saw: new buffers, a new recording.
        if matches!(&self.graph, Some(Ok(g)) if g.buffers != self.cache.buffers_id()) {
            self.graph = None;
        }
        if self.graph.is_none() && model.step_graphs() != StepGraphs::Off {
            // The cache was made for the whole request: the graph's steps fit in it.
            self.graph = Some(GraphedStep::record(model, &mut self.cache, self.pending).map_err(|e| {
                tracing::warn!("AR steps run without a CUDA graph: {e}");
            }));
        }
        let next = match &mut self.graph {
            Some(Ok(graph)) => {
                let logits = graph.run(model, &mut self.cache, self.pending)?;
                tch::no_grad(|| self.sampler.pick(logits))?
            }
            _ => {
                let input = Tensor::from_slice(&[self.pending]).to_device(model.device()).unsqueeze(0);
                tch::no_grad(|| self.sampler.pick(&forward_last(model, &input, &mut self.cache, None)))?
            }
        };
        self.pending = next;
        Ok(next)
    }
}

impl Drop for ArDecoder<'_> {
    /// With fixed-shape steps, leave the cache and the recording to the next generation.
    fn drop(&mut self) {
        if self.model.step_graphs() != StepGraphs::Off && self.graph.is_some() {
            let cache = std::mem::replace(&mut self.cache, KvCache::new(0, 0));
            *self.model.kept_ar.borrow_mut() = Some(KeptAr { cache, graph: self.graph.take() });
        }
    }
}

/// Forward `input` (`[1, t]`) after the cache through the causal path, with `adapter`
/// when given; logits of the last position (`[vocab]`).
pub(crate) fn forward_last(model: &Llama, input: &Tensor, cache: &mut KvCache, adapter: Option<&Gated>) -> Tensor {
    let past = cache.len() as i64;
    let t = input.size()[1];
    let positions = Tensor::arange_start(past, past + t, (Kind::Int64, model.device()));
    let h = model.forward_embeds(&model.embed(input), &positions, AttnMask::Causal, adapter, Some(cache));
    last_logits(model, &h)
}

/// Generate with plain autoregressive decoding, streaming each token to `sink`.
pub fn generate_ar(model: &Llama, req: &GenerateRequest, sink: &mut dyn TokenSink) -> Result<GenerateOutput> {
    super::generation::generate(model, super::Strategy::Ar, req, sink)
}
