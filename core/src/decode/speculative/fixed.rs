//! Greedy speculative steps of fixed shapes, recorded as CUDA graphs (or, for the tests on
//! the CPU, run eagerly through the same code): [`Llama::step_graphs`].
//!
//! A greedy step already keeps its work on the device until one small read (accepted
//! count, next token, new drafts). Here that work is one recorded pass: the step's rows
//! written after a cache length held on the device ([`StepPlan::forward_in_place`]), the
//! verification, the next mask block's hidden states chosen by the accepted count, and the
//! draft chain. A replay then costs one launch where the step issued several hundred
//! operations, each a host launch (about 10 us on the GPU docs/BENCHMARKS.md measured).
//!
//! One recording per step shape (drafts, masks), made the second time a shape comes (a
//! shape `auto` visits once never records); the UNO recipe's random mask ids are one more
//! input written before each run. Steps that do not fit a recording run the ordinary pass:
//! sampled decoding, the step-through view's detailed steps, and a cache without room for
//! the step's rows. The recordings and the cache they write to pass from one generation to
//! the next of the same layout and mask count through the drafter (`Drafter::kept`).

use std::collections::HashMap;
use std::rc::Rc;

use tch::{Device, Kind, Tensor};

use super::super::verify::verify_greedy_on_device;
use super::drafter::Drafter;
use super::layout::StepPlan;
use crate::error::{Error, Result};
use crate::model::{FixedStep, KvCache, Llama, StepGraphs};

/// What one greedy step found: the accepted count, the next token and the new drafts.
pub(super) struct Found {
    /// Drafts accepted.
    pub accepted: usize,
    /// The next verified token.
    pub next: i64,
    /// The next step's drafts (the step's mask count of them).
    pub drafts: Vec<i64>,
    /// `[next, drafts..]` on the device: the next step's inputs as this step wrote them.
    pub inputs: Tensor,
}

/// What one step hands to its fixed-shape pass.
#[derive(Clone, Copy)]
pub(super) struct StepCall<'a> {
    /// The model.
    pub model: &'a Llama,
    /// The adapter prepared for decoding.
    pub drafter: &'a Drafter,
    /// The step's rows and constants (its shape).
    pub plan: &'a Rc<StepPlan>,
    /// `[drafts + 1]` on the device: the verified token and the drafts.
    pub inputs: &'a Tensor,
    /// The UNO recipe's random mask ids, `[mask rows]`.
    pub noise: Option<&'a Tensor>,
    /// Rows in the cache before the step.
    pub past: usize,
}

/// One shape's step, recorded.
struct ShapeStep {
    plan: Rc<StepPlan>,
    /// `[drafts + 1]` int64: the verified token and the drafts, written before each run.
    inputs: Tensor,
    /// `[1]` int64: the cache length, written before each run.
    past: Tensor,
    /// `[mask rows]` int64: the UNO recipe's random ids of the mask rows, written before each run.
    noise: Option<Tensor>,
    /// Writes `[accepted, next, drafts..]`.
    step: FixedStep<Tensor>,
}

/// The step's work on the device: verify the drafts, choose the mask block after the last
/// accepted row, draft from it. Returns `[accepted, next, drafts..]` (int64). Never inlined:
/// the `step_ops` example counts the operations inside it.
#[inline(never)]
fn verify_and_draft(
    model: &Llama,
    drafter: &Drafter,
    plan: &StepPlan,
    (inputs, noise, past): (&Tensor, Option<&Tensor>, &Tensor),
    cache: &mut KvCache,
) -> Tensor {
    tch::no_grad(|| {
        let n = plan.layout.drafts as i64;
        let h = plan.forward_in_place(model, &drafter.step_gate(plan), inputs, noise, past, cache);
        let predictions = model.logits(&h.narrow(0, 0, n + 1)).argmax(-1, false);
        let (accepted, next) = verify_greedy_on_device(&inputs.narrow(0, 1, n), &predictions);
        let z = h.index_select(0, &plan.block_rows.index_select(0, &accepted).view([-1]));
        let drafts = drafter.greedy(model, &z, &next, None);
        Tensor::cat(&[accepted, next, drafts], 0)
    })
}

/// A shape's state: seen once, recorded, or failed to record (it then runs the ordinary pass).
enum Slot {
    Seen,
    Ready(Box<ShapeStep>),
    Failed,
}

/// The fixed-shape steps of one speculative decoder.
pub(super) struct FixedSteps {
    mode: StepGraphs,
    slots: HashMap<(usize, usize), Slot>,
    /// Steps run through a fixed-shape pass.
    runs: usize,
    replayed: bool,
    /// Whether the last step's time is a steady step's: not one that recorded its shape,
    /// nor one that ran the ordinary pass while its shape waits for a recording.
    steady: bool,
    /// The cache buffers the recordings write to ([`KvCache::buffers_id`]).
    buffers: Option<u64>,
}

impl FixedSteps {
    /// For `model`'s [`StepGraphs`] mode.
    pub fn new(model: &Llama) -> Self {
        Self { mode: model.step_graphs(), slots: HashMap::new(), runs: 0, replayed: false, steady: true, buffers: None }
    }

    /// The mode its recordings were made in.
    pub fn mode(&self) -> StepGraphs {
        self.mode
    }

    /// True when this decoder runs fixed-shape steps at all.
    pub fn on(&self) -> bool {
        self.mode != StepGraphs::Off
    }

    /// A new generation with these recordings: its counts start again.
    pub fn begin(&mut self) {
        self.runs = 0;
        self.replayed = false;
        self.steady = true;
    }

    /// True when some step shape has been seen or recorded (worth keeping for the next
    /// generation).
    pub fn has_progress(&self) -> bool {
        self.slots.values().any(|s| !matches!(s, Slot::Failed))
    }

    /// Steps run through a fixed-shape pass so far.
    pub fn runs(&self) -> usize {
        self.runs
    }

    /// Whether the last step's time is what a step of its shape costs from now on (the mask
    /// count chosen on the fly learns only from those).
    pub fn steady(&self) -> bool {
        self.steady
    }

    /// True once a step replayed a recorded graph.
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// Run `call`'s step when its shape has a recording, recording it the second time the
    /// shape comes; `None`: the caller runs the ordinary pass. A failed recording is
    /// logged, and its shape runs the ordinary pass from then on.
    pub fn run(&mut self, call: StepCall, cache: &mut KvCache) -> Result<Option<Found>> {
        self.steady = true;
        let plan = call.plan;
        if !self.on() || call.past + plan.rows() > cache.capacity() {
            return Ok(None);
        }
        // Recordings write to the cache's buffers as they were: new buffers, new recordings.
        if self.buffers != Some(cache.buffers_id()) {
            self.slots.clear();
            self.buffers = Some(cache.buffers_id());
        }
        let key = (plan.layout.drafts, plan.layout.masks);
        let mut step = match self.slots.remove(&key) {
            None => {
                self.slots.insert(key, Slot::Seen);
                self.steady = false;
                return Ok(None);
            }
            Some(Slot::Failed) => {
                self.slots.insert(key, Slot::Failed);
                return Ok(None);
            }
            Some(Slot::Seen) => {
                // Its time (warm-ups, the recording, a replay) says nothing of the next steps.
                self.steady = false;
                match record(call, cache, self.mode == StepGraphs::Record) {
                    Ok(step) => Box::new(step),
                    Err(e) => {
                        tracing::warn!(
                            "speculative steps of {} drafts, {} masks run without a CUDA graph: {e}",
                            key.0,
                            key.1
                        );
                        self.slots.insert(key, Slot::Failed);
                        return Ok(None);
                    }
                }
            }
            Some(Slot::Ready(step)) => step,
        };
        let found = run_step(call, &mut step, cache);
        self.runs += 1;
        self.replayed |= step.step.replays();
        self.slots.insert(key, Slot::Ready(step));
        found.map(Some)
    }
}

/// Record `call`'s step (or, without `graphs`, run it once eagerly) on its own copies of
/// its inputs.
fn record(call: StepCall, cache: &mut KvCache, graphs: bool) -> Result<ShapeStep> {
    let StepCall { model, drafter, plan, .. } = call;
    let device = model.device();
    let own_inputs = call.inputs.to_device(device).copy();
    let own_noise = call.noise.map(|n| n.to_device(device).copy());
    let own_past = Tensor::full([1], call.past as i64, (Kind::Int64, device));
    let step = FixedStep::new(device, graphs, || {
        verify_and_draft(model, drafter, plan, (&own_inputs, own_noise.as_ref(), &own_past), cache)
    })?;
    Ok(ShapeStep { plan: Rc::clone(plan), inputs: own_inputs, past: own_past, noise: own_noise, step })
}

/// One step: write the inputs, replay (or run), read the result.
fn run_step(call: StepCall, step: &mut ShapeStep, cache: &mut KvCache) -> Result<Found> {
    let StepCall { model, drafter, .. } = call;
    let ShapeStep { plan, inputs: own_inputs, past: own_past, noise: own_noise, step } = step;
    tch::no_grad(|| -> Result<()> {
        own_inputs.copy_(call.inputs);
        let _ = own_past.fill_(call.past as i64);
        match (own_noise.as_mut(), call.noise) {
            (Some(own), Some(ids)) => own.copy_(ids),
            (None, None) => {}
            _ => return Err(Error::Invalid("a recorded step's mask rows changed their inputs".into())),
        }
        Ok(())
    })?;
    let out = step.run(|| verify_and_draft(model, drafter, plan, (own_inputs, own_noise.as_ref(), own_past), cache))?;
    // The step's one read from the device.
    let host = Vec::<i64>::try_from(out.to_device(Device::Cpu))?;
    let [accepted, next, drafts @ ..] = host.as_slice() else {
        return Err(Error::Invalid(format!("a speculative step wrote {} values, not at least 2", host.len())));
    };
    Ok(Found {
        accepted: *accepted as usize,
        next: *next,
        drafts: drafts.to_vec(),
        inputs: out.narrow(0, 1, out.size()[0] - 1),
    })
}
