//! The speculative decoder: a prefill that drafts from a mask block after the prompt, then
//! one forward pass per step that verifies the drafts, keeps the accepted rows in the cache
//! and drafts again from the mask block after the last accepted token.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::super::ar::{check_request, decoding_cache};
use super::super::stats::StepStats;
use super::super::strategy::{Layout, Speculative, Strategy};
use super::super::verify::{Verdict, greedy_tokens, verify_greedy, verify_greedy_on_device, verify_sampling};
use super::super::{Decoding, GenerateRequest, Sampler};
use super::detail::{Candidates, StepDetail, top5};
use super::drafter::{Drafter, Kept};
use super::fixed::{FixedSteps, StepCall};
use super::layout::StepLayout;
use super::masks::MaskController;
use crate::error::Result;
use crate::model::{AttnMask, KvCache, Llama};
use crate::mtp::Recipe;
use crate::mtp::masks::noise_ids;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// The result of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// Accepted drafts, in order.
    pub accepted: Vec<i64>,
    /// The next verified token.
    pub next: i64,
    /// Statistics (emitted is filled in by the caller that applies EOS and limits).
    pub stats: StepStats,
    /// Details when asked for.
    pub detail: Option<Box<StepDetail>>,
}

/// A speculative decoder in progress: the cache holds the prompt and every emitted token
/// except `pending`, the verified token the next step starts with.
pub struct SpecDecoder<'a> {
    model: &'a Llama,
    drafter: &'a Drafter,
    layout: Layout,
    sampler: Sampler,
    masks: MaskController,
    cache: KvCache,
    /// The verified token not yet in the cache.
    pending: i64,
    drafts: Vec<i64>,
    /// Greedy decoding: `[pending, drafts..]` on the device, as the last step computed
    /// them, so the next step's input needs no upload.
    inputs: Option<Tensor>,
    /// Sampled decoding: the distribution each draft was drawn from.
    q: Vec<Vec<f32>>,
    steps: usize,
    /// Positions past the cache a step may touch.
    reach: usize,
    /// UNO recipe: where the mask rows' random token ids come from (seeded by the request:
    /// its sampling seed, or 0 for greedy decoding, so a generation is reproducible).
    noise: Option<StdRng>,
    /// Greedy steps of fixed shapes, recorded as CUDA graphs ([`Llama::step_graphs`]).
    fixed: FixedSteps,
    /// The mask blocks the next step keeps, when `auto` pruned some
    /// ([`MaskController::blocks_to_keep`]); `None`: every block.
    blocks: Option<Vec<usize>>,
    /// UNO recipe: the random ids the prefill's mask block read.
    prefill_noise_ids: Vec<i64>,
    /// The final hidden states of the prefill's mask block (`[m, d]`), until the first step:
    /// what [`SpecDecoder::prefill_candidates`] reads.
    prefill_block: Option<Tensor>,
}

impl<'a> SpecDecoder<'a> {
    /// Check the request and run the prefill: the prompt followed by one mask block after
    /// its last token (METHOD.md section 4's bootstrap), one causal pass. Returns the
    /// decoder and the first token; the block's drafts are what the first step verifies.
    pub fn start(model: &'a Llama, spec: Speculative<'a>, req: &GenerateRequest) -> Result<(Self, i64)> {
        spec.masks.check(spec.drafter.k())?;
        let strategy = Strategy::Speculative(spec);
        let reach = strategy.reach();
        check_request(model, req, reach)?;
        let p = req.prompt_ids.len();
        // Two halves (merged weights as one batched product) pad both to the larger; a
        // fixed-shape step needs the cache to hold every row it writes.
        let rows = if spec.drafter.packs_halves() { 2 * strategy.max_rows() } else { strategy.max_rows() };
        let address = model as *const Llama as usize;
        let kept = spec.drafter.kept.borrow_mut().remove(&(spec.layout, spec.masks));
        let kept = kept.filter(|k| k.model == address).map(|k| (k.cache, k.fixed));
        let (cache, fixed) = decoding_cache(model, kept, p + req.max_new_tokens + rows + 1);
        let mut fixed = fixed.filter(|f| f.mode() == model.step_graphs()).unwrap_or_else(|| FixedSteps::new(model));
        fixed.begin();
        let mut decoder = Self {
            model,
            drafter: spec.drafter,
            layout: spec.layout,
            sampler: Sampler::new(req.decoding)?,
            masks: spec.drafter.controller(spec.layout, spec.masks),
            cache,
            pending: 0,
            drafts: Vec::new(),
            inputs: None,
            q: Vec::new(),
            steps: 0,
            reach,
            noise: (spec.drafter.recipe() == Recipe::Uno).then(|| {
                let seed = match req.decoding {
                    Decoding::Sample(p) => p.seed,
                    Decoding::Greedy => 0,
                };
                StdRng::seed_from_u64(seed ^ 0x0A0A_0123_4567_89AB)
            }),
            fixed,
            blocks: None,
            prefill_noise_ids: Vec::new(),
            prefill_block: None,
        };
        let first = decoder.prefill(&req.prompt_ids)?;
        Ok((decoder, first))
    }

    /// The prompt and one mask block after its last token in one pass: every row attends
    /// causally (the block follows the last token, each mask sees what precedes it), the
    /// adapter applies to the block only (its low-rank term, whatever form the steps run),
    /// so the prompt's rows are the ordinary prefill's: bit for bit where a row's products do
    /// not depend on the other rows (the CPU's kernel, up to `linear`'s chunked rows),
    /// else to rounding (a library may multiply p + m rows otherwise than p; greedy
    /// outputs then part only at a near-tie, as METHOD.md allows). The cache keeps the
    /// prompt's rows. Picks the first token from the last prompt row and drafts from the
    /// block, seeded with it; returns the first token.
    fn prefill(&mut self, prompt: &[i64]) -> Result<i64> {
        let (model, drafter) = (self.model, self.drafter);
        let device = model.device();
        let masks = self.masks.masks();
        let (p, past) = (prompt.len() as i64, self.cache.len() as i64);
        self.prefill_noise_ids = match &mut self.noise {
            Some(rng) => noise_ids(rng, masks, model.config.vocab_size),
            None => Vec::new(),
        };
        // `auto` may leave out blocks of the first step as of any other.
        let scored = self.prunes(false) && self.masks.is_auto();
        let (first, drafts, q, confidence) = tch::no_grad(|| -> Result<_> {
            let ids = Tensor::from_slice(prompt).to_device(device).unsqueeze(0);
            let block = if self.prefill_noise_ids.is_empty() {
                drafter.mask_embeddings().narrow(0, 0, masks as i64).unsqueeze(0)
            } else {
                model.embed(&Tensor::from_slice(&self.prefill_noise_ids).to_device(device).unsqueeze(0))
            };
            let x = Tensor::cat(&[model.embed(&ids), block], 1);
            let positions = Tensor::arange_start(past, past + p + masks as i64, (Kind::Int64, device));
            let gated = drafter.prefill_block_gate(p);
            let h = model.forward_embeds(&x, &positions, AttnMask::Causal, Some(&gated), Some(&mut self.cache));
            self.cache.truncate((past + p) as usize);
            let h = h.squeeze_dim(0);
            let first = self.sampler.pick(&model.logits(&h.get(p - 1)))?;
            let z = h.narrow(0, p, masks as i64);
            self.prefill_block = Some(z.shallow_clone());
            Ok(match self.sampler.decoding() {
                Decoding::Greedy => match drafter.greedy_on_host(model, &z, first, scored)? {
                    Some(d) => (first, d.ids, Vec::new(), d.confidence),
                    None => {
                        let prev = Tensor::from_slice(&[first]).to_device(device);
                        (first, Vec::<i64>::try_from(drafter.greedy(model, &z, &prev, None))?, Vec::new(), Vec::new())
                    }
                },
                Decoding::Sample(params) => {
                    let (d, q) = drafter.sampled(model, &z, first, &params, &mut self.sampler)?;
                    (first, d, q, Vec::new())
                }
            })
        })?;
        if scored && confidence.len() == drafts.len() {
            self.blocks = self.masks.blocks_to_keep(&confidence);
        }
        self.pending = first;
        self.drafts = drafts;
        self.q = q;
        Ok(first)
    }

    /// Whether a step (`detailed`: for the step-through view) may leave out mask blocks:
    /// where drafts are made on host vectors (the CPU), greedy quadratic steps may leave out
    /// those verification will likely not need (`auto` chooses them; never in fixed-shape
    /// steps).
    fn prunes(&self, detailed: bool) -> bool {
        !detailed
            && crate::model::linear::few_row_kernel_runs(self.model.device(), self.model.dtype().kind())
            && self.layout == Layout::Quadratic
            && self.sampler.decoding() == Decoding::Greedy
            && !self.fixed.on()
    }

    /// UNO recipe: the random ids the prefill's mask block read (empty for the paper's).
    pub fn prefill_noise_ids(&self) -> &[i64] {
        &self.prefill_noise_ids
    }

    /// Before the first step: the top-5 of each slot of the prefill's mask block (greedy
    /// drafting from the first token), what the step-through view shows of the first drafts;
    /// empty after it.
    pub fn prefill_candidates(&self) -> Result<Vec<Candidates>> {
        let Some(z) = self.prefill_block.as_ref().filter(|_| self.steps == 0) else { return Ok(Vec::new()) };
        let mut probs = Tensor::zeros([0], (Kind::Float, self.model.device()));
        let prev = Tensor::from_slice(&[self.pending]).to_device(self.model.device());
        let _drafts = self.drafter.greedy(self.model, z, &prev, Some(&mut probs));
        top5(&probs)
    }

    /// The drafts the next step will verify.
    pub fn drafts(&self) -> &[i64] {
        &self.drafts
    }

    /// Keep only the mask blocks after the regular rows `blocks` in the next step (each at
    /// most the number of drafts it verifies), as `auto` does on its own where rows cost
    /// time ([`MaskController::blocks_to_keep`]): for tests, which check that whatever
    /// blocks a step keeps the output is AR's. Only greedy quadratic steps on host vectors
    /// (the CPU, f32) without fixed shapes prune; others keep every block.
    pub fn keep_blocks(&mut self, mut blocks: Vec<usize>) {
        blocks.sort_unstable();
        blocks.dedup();
        self.blocks = Some(blocks);
    }

    /// Rows in the cache.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Steps that ran through the fixed-shape pass ([`Llama::step_graphs`]): replayed from a
    /// CUDA graph, or with [`crate::model::StepGraphs::Eager`] run eagerly.
    pub fn fixed_shape_steps(&self) -> usize {
        self.fixed.runs()
    }

    /// Whether a step replayed a recorded CUDA graph.
    pub fn replays_graph(&self) -> bool {
        self.fixed.replayed()
    }

    /// True while another step fits in the model's context.
    pub fn has_room(&self) -> bool {
        self.cache.len() + self.reach <= self.model.config.context_length()
    }

    /// One forward pass: verify the drafts, keep the accepted rows in the cache, choose the
    /// next verified token and draft again. With `detailed`, also returns what the
    /// step-through view shows.
    pub fn step(&mut self, detailed: bool) -> Result<StepResult> {
        let t0 = Instant::now();
        self.steps += 1;
        self.prefill_block = None;
        let (model, drafter) = (self.model, self.drafter);
        let device = model.device();
        let drafts = std::mem::take(&mut self.drafts);
        let q = std::mem::take(&mut self.q);
        let n = drafts.len();
        let verified = self.pending;
        let masks = self.masks.masks();
        let layout = self.layout;
        let on_host = !detailed && crate::model::linear::few_row_kernel_runs(device, model.dtype().kind());
        let prunes = self.prunes(detailed);
        let plan = match self.blocks.take().filter(|b| prunes && b.iter().all(|&g| g <= n)) {
            Some(blocks) => drafter.plan_of(model, StepLayout::with_blocks(layout, n, masks, blocks))?,
            None => drafter.plan(model, layout, n, masks)?,
        };
        let inputs = match self.inputs.take() {
            Some(t) => t,
            None => {
                let ids: Vec<i64> = std::iter::once(self.pending).chain(drafts.iter().copied()).collect();
                Tensor::from_slice(&ids).to_device(device)
            }
        };
        let past = self.cache.len();
        let regular = n as i64 + 1;
        let vocab = model.config.vocab_size;
        let noise_ids = match &mut self.noise {
            Some(rng) => noise_ids(rng, plan.mask_rows(), vocab),
            None => Vec::new(),
        };
        let noise = (!noise_ids.is_empty()).then(|| Tensor::from_slice(&noise_ids).to_device(device));
        // A greedy step of a recorded shape replays its recording (fixed.rs).
        let (fixed, steady) = match self.sampler.decoding() {
            Decoding::Greedy if !detailed => {
                let call = StepCall { model, drafter, plan: &plan, inputs: &inputs, noise: noise.as_ref(), past };
                (self.fixed.run(call, &mut self.cache)?, self.fixed.steady())
            }
            _ => (None, true),
        };
        let mut draft_probs = detailed.then(|| Tensor::zeros([0], (Kind::Float, device)));
        // The new drafts' confidences, where the host chain computed them (`prunes`).
        let mut confidence: Vec<f32> = Vec::new();
        let (a, next, new_drafts, regular_probs) = if let Some(found) = fixed {
            // Linear decoding drafts again only when every draft was accepted.
            let keep = if layout == Layout::Linear && found.accepted < n { 0 } else { masks };
            self.inputs = Some(found.inputs.narrow(0, 0, 1 + keep as i64));
            // The pass wrote its rows after the cache without counting them: count the kept ones.
            self.cache.commit(found.accepted + 1);
            (found.accepted, found.next, found.drafts[..keep].to_vec(), None)
        } else {
            let (h, logits) = tch::no_grad(|| {
                let gated = drafter.step_gate(&plan);
                // Where the step's rows are shared out between threads, the first thread takes
                // the next-token rows' logits while the other finishes its rows.
                let (h, early) = crate::model::row_split::head_on_first_rows(&model.lm_head, regular, || {
                    plan.forward(model, &gated, &inputs, noise.as_ref(), past, Some(&mut self.cache))
                });
                let logits = early.unwrap_or_else(|| model.logits(&h.narrow(0, 0, regular)));
                (h, logits)
            });

            match self.sampler.decoding() {
                // On the CPU the host is the device: read the predictions, verify and draft on
                // plain vectors (a dozen libtorch operations fewer than the device path).
                Decoding::Greedy if on_host => tch::no_grad(|| -> Result<_> {
                    let predictions = greedy_tokens(&logits)?;
                    let Verdict { accepted: a, next } = verify_greedy(&drafts, &predictions);
                    let block = plan.layout.mask_block(a).filter(|_| !(layout == Layout::Linear && a < n));
                    let new_drafts = match block {
                        Some(row) => {
                            let z = h.narrow(0, plan.row(row) as i64, masks as i64);
                            match drafter.greedy_on_host(model, &z, next, prunes && self.masks.is_auto())? {
                                Some(d) => {
                                    confidence = d.confidence;
                                    d.ids
                                }
                                None => {
                                    let prev = Tensor::from_slice(&[next]);
                                    Vec::<i64>::try_from(drafter.greedy(model, &z, &prev, None))?
                                }
                            }
                        }
                        None => Vec::new(),
                    };
                    Ok((a, next, new_drafts, None))
                })?,
                Decoding::Greedy => tch::no_grad(|| -> Result<_> {
                    // `block_rows` has a row for every block: never a pruned plan here.
                    debug_assert!(layout == Layout::Linear || plan.layout.blocks.len() == plan.layout.regular());
                    let predictions = logits.argmax(-1, false);
                    let (accepted, next) = verify_greedy_on_device(&inputs.narrow(0, 1, n as i64), &predictions);
                    let z = h.index_select(0, &plan.block_rows.index_select(0, &accepted).view([-1]));
                    let new_drafts = drafter.greedy(model, &z, &next, draft_probs.as_mut());
                    // The step's one read from the device: accepted count, next token, drafts.
                    let out = Tensor::cat(&[accepted, next, new_drafts], 0);
                    let host = Vec::<i64>::try_from(out.to_device(Device::Cpu))?;
                    let (a, next) = (host[0] as usize, host[1]);
                    // Linear decoding drafts again only when every draft was accepted.
                    let keep = if layout == Layout::Linear && a < n { 0 } else { masks };
                    self.inputs = Some(out.narrow(0, 1, 1 + keep as i64));
                    let probs = detailed.then(|| logits.softmax(-1, Kind::Float));
                    Ok((a, next, host[2..2 + keep].to_vec(), probs))
                })?,
                Decoding::Sample(params) => {
                    let p = tch::no_grad(|| params.distribution(&logits));
                    let p_rows = (0..regular)
                        .map(|g| Vec::<f32>::try_from(p.get(g).to_device(Device::Cpu)))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    let Verdict { accepted: a, next } = verify_sampling(&drafts, &q, &p_rows, &mut self.sampler);
                    let mut new_drafts = Vec::new();
                    if let Some(row) = plan.layout.mask_block(a) {
                        let z = h.narrow(0, plan.row(row) as i64, masks as i64);
                        let (d, new_q) = drafter.sampled(model, &z, next, &params, &mut self.sampler)?;
                        if let Some(out) = draft_probs.as_mut() {
                            *out = Tensor::stack(&new_q.iter().map(|r| Tensor::from_slice(r)).collect::<Vec<_>>(), 0);
                        }
                        new_drafts = d;
                        self.q = new_q;
                    }
                    (a, next, new_drafts, detailed.then_some(p))
                }
            }
        };

        // Keep the cache rows of r_0..r_a, the first a + 1 rows of the step: exactly the
        // rows AR would have computed.
        self.cache.truncate(past + a + 1);
        self.pending = next;
        let seconds = t0.elapsed().as_secs_f64();
        // A step that recorded its shape, or waited for a recording, is no measure of cost.
        self.masks.observe(n, a, masks, plan.layout.len(), steady.then_some(seconds));
        if !confidence.is_empty() && confidence.len() == new_drafts.len() {
            self.blocks = self.masks.blocks_to_keep(&confidence);
        }
        drafter.remember(&self.masks, layout);
        let stats = StepStats {
            step: self.steps,
            drafts: drafts.clone(),
            accepted: a,
            first_rejected: (a < n).then_some(a + 1),
            emitted: a + 1,
            masks,
            blocks: plan.layout.blocks.len(),
            seconds,
            noise_ids: noise_ids.clone(),
        };
        let detail = match (regular_probs, draft_probs) {
            (Some(regular_probs), Some(draft_probs)) => {
                let l = &plan.layout;
                let allowed = plan.allowed();
                let mut input_ids = vec![verified; l.len()];
                input_ids[1..=n].copy_from_slice(&drafts);
                for (r, s) in l.slot.iter().enumerate().skip(l.regular()) {
                    // A mask row: its slot (negative), or the random id it read (UNO).
                    input_ids[r] = noise_ids.get(r - l.regular()).copied().unwrap_or(-s);
                }
                Some(Box::new(StepDetail {
                    inputs: input_ids,
                    block: l.block.clone(),
                    slot: l.slot.clone(),
                    positions: l.offsets().iter().map(|o| o + past as i64).collect(),
                    past,
                    attention: (0..l.len() as i64)
                        .map(|r| Vec::<bool>::try_from(allowed.get(r)))
                        .collect::<std::result::Result<_, _>>()?,
                    regular_top: top5(&regular_probs)?,
                    draft_top: if draft_probs.numel() > 0 { top5(&draft_probs)? } else { Vec::new() },
                    next_drafts: new_drafts.clone(),
                }))
            }
            _ => None,
        };
        self.drafts = new_drafts;
        Ok(StepResult { accepted: drafts[..a].to_vec(), next, stats, detail })
    }
}

impl Drop for SpecDecoder<'_> {
    /// With fixed-shape steps, leave the cache and the recordings to the next generation of
    /// this layout and mask count (not when no step of this one came near a recording: the
    /// step-through view's, sampled decoding's).
    fn drop(&mut self) {
        if self.fixed.on() && self.fixed.has_progress() {
            let cache = std::mem::replace(&mut self.cache, KvCache::new(0, 0));
            let fixed = std::mem::replace(&mut self.fixed, FixedSteps::new(self.model));
            let kept = Kept { model: self.model as *const Llama as usize, cache, fixed };
            self.drafter.kept.borrow_mut().insert((self.layout, self.masks.count()), kept);
        }
    }
}
