//! One generation as a resumable state machine: each [`Generation::advance`] runs one
//! forward pass of its decoder (AR, linear or quadratic) and emits the tokens it settles,
//! applying EOS and the token limit the same way for every mode. `generate` runs one to
//! the end; the A/B race interleaves two.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use super::ar::{ArDecoder, check_request};
use super::speculative::SpecDecoder;
use super::strategy::Strategy;
use super::{GenerateOutput, GenerateRequest, StopReason, TokenEvent, TokenOrigin, TokenSink};
use crate::error::Result;
use crate::model::Llama;

enum Decoder<'a> {
    Ar(Box<ArDecoder<'a>>),
    Spec(Box<SpecDecoder<'a>>),
}

/// A generation in progress.
pub struct Generation<'a> {
    model: &'a Llama,
    strategy: Strategy<'a>,
    req: GenerateRequest,
    decoder: Option<Decoder<'a>>,
    out: GenerateOutput,
    done: bool,
    /// Time spent inside `advance`: the generation's own compute time, also when it is
    /// interleaved with another.
    busy: Duration,
}

impl<'a> Generation<'a> {
    /// Prepare a generation (nothing runs until [`Generation::advance`]). Checks the
    /// request against the model and the strategy.
    pub fn new(model: &'a Llama, strategy: Strategy<'a>, req: GenerateRequest) -> Result<Self> {
        if let Strategy::Speculative(s) = &strategy {
            s.masks.check(s.drafter.k())?;
        }
        check_request(model, &req, strategy.reach())?;
        let out = GenerateOutput::empty(Instant::now());
        let done = req.max_new_tokens == 0;
        Ok(Self { model, strategy, req, decoder: None, out, done, busy: Duration::ZERO })
    }

    /// True once generation has stopped.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The output so far.
    pub fn output(&self) -> &GenerateOutput {
        &self.out
    }

    /// Run one forward pass and emit what it settles. Returns `Ok(false)` once done.
    pub fn advance(&mut self, sink: &mut dyn TokenSink) -> Result<bool> {
        if self.done {
            return Ok(false);
        }
        let t0 = Instant::now();
        // On the CPU, the pass's time tells how many threads the next passes get.
        let timed = (self.model.device() == tch::Device::Cpu).then(crate::model::threads::pass);
        let result = self.advance_inner(sink);
        drop(timed);
        self.busy += t0.elapsed();
        self.out.total_time = self.busy;
        if self.out.forwards == 1 {
            self.out.prefill_time = self.busy;
        }
        result.map(|()| !self.done)
    }

    fn advance_inner(&mut self, sink: &mut dyn TokenSink) -> Result<()> {
        match &mut self.decoder {
            None => {
                let first = match self.strategy {
                    Strategy::Ar => {
                        let (d, first) = ArDecoder::start(self.model, &self.req)?;
                        self.decoder = Some(Decoder::Ar(Box::new(d)));
                        first
                    }
                    Strategy::Speculative(spec) => {
                        let (d, first) = SpecDecoder::start(self.model, spec, &self.req)?;
                        self.out.prefill_noise_ids = d.prefill_noise_ids().to_vec();
                        self.decoder = Some(Decoder::Spec(Box::new(d)));
                        first
                    }
                };
                self.out.forwards = 1;
                if let Some(stop) = self.emit(first, 0, TokenOrigin::Verified, sink) {
                    self.stop(stop);
                }
            }
            Some(Decoder::Ar(d)) => {
                let next = d.step()?;
                self.out.cuda_graph = d.replays_graph();
                self.out.forwards += 1;
                let step = self.out.forwards - 1;
                if let Some(stop) = self.emit(next, step, TokenOrigin::Verified, sink) {
                    self.stop(stop);
                }
            }
            Some(Decoder::Spec(d)) => {
                let r = d.step(false)?;
                self.out.cuda_graph = d.replays_graph();
                self.out.forwards += 1;
                let mut stats = r.stats;
                let mut stop = None;
                let mut emitted = 0;
                for (g, &tok) in r.accepted.iter().enumerate() {
                    emitted += 1;
                    stop = self.emit(tok, stats.step, TokenOrigin::Draft { slot: g + 1 }, sink);
                    if stop.is_some() {
                        break;
                    }
                }
                if stop.is_none() {
                    emitted += 1;
                    stop = self.emit(r.next, stats.step, TokenOrigin::Verified, sink);
                }
                stats.emitted = emitted;
                let flow = sink.step(&stats);
                self.out.steps.push(stats);
                if flow == ControlFlow::Break(()) {
                    stop = stop.or(Some(StopReason::Cancelled));
                }
                if let Some(s) = stop {
                    self.stop(s);
                }
            }
        }
        Ok(())
    }

    fn stop(&mut self, reason: StopReason) {
        self.out.stop = reason;
        self.done = true;
    }

    /// Emit one token; returns why generation stops after it, if it does.
    fn emit(&mut self, id: i64, step: usize, origin: TokenOrigin, sink: &mut dyn TokenSink) -> Option<StopReason> {
        let event = TokenEvent { id, index: self.out.token_ids.len(), step, origin };
        self.out.token_ids.push(id);
        if sink.token(&event) == ControlFlow::Break(()) {
            return Some(StopReason::Cancelled);
        }
        if self.req.eos_ids.contains(&id) {
            return Some(StopReason::Eos);
        }
        (self.out.token_ids.len() == self.req.max_new_tokens).then_some(StopReason::MaxTokens)
    }

    /// The finished output.
    pub fn finish(self) -> GenerateOutput {
        self.out
    }
}

/// Generate with `strategy`, streaming tokens and step statistics to `sink`. Stops at EOS
/// and at `max_new_tokens` exactly as AR does, so greedy outputs are comparable token for
/// token.
pub fn generate(
    model: &Llama,
    strategy: Strategy,
    req: &GenerateRequest,
    sink: &mut dyn TokenSink,
) -> Result<GenerateOutput> {
    let mut g = Generation::new(model, strategy, req.clone())?;
    while g.advance(sink)? {}
    Ok(g.finish())
}
